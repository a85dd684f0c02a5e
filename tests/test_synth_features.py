"""jobs.synth --features-only: a features workdir in jobs.embed's layout, its signal, determinism and the CLI."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from clipita import catalog, features, storage
from clipita.config import EncoderConfig
from clipita.sources import synth_features
from clipita.tree import CategoryTree, category_id
from clipita.vectors import vector_column, vectors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, SEED = 3000, 3
ARGS = dict(levels=3, branching=4, image_dim=32, text_dim=64, part_rows=1000, log=lambda line: None)
PARTS = ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("sf") / "run")
    stats = synth_features.write_features(out, N, seed=SEED, workers=2, **ARGS)
    assert stats["used"] == N
    return out


def _files(workdir: str) -> dict[str, bytes]:
    names = [f"products/{p}" for p in PARTS] + ["categories.parquet"]
    return {n: storage.read_bytes(storage.join(workdir, "features", n)) for n in names}


def _vector_type(d: int, dtype) -> pa.DataType:
    return vector_column(np.zeros((1, d), dtype)).type  # exactly what jobs.embed writes


def test_layout_and_schema(workdir):
    assert sorted(os.listdir(f"{workdir}/features/products")) == PARTS
    assert sorted(os.listdir(f"{workdir}/features")) == ["categories.parquet", "encoders.json", "products",
                                                         "stats.json"]
    expected = catalog.SCHEMA
    for name, d in (("image_emb", 32), ("title_emb", 64), ("attr_emb", 64)):
        expected = expected.append(pa.field(name, _vector_type(d, np.float16)))
    expected = expected.append(pa.field("n_attributes", pa.int32()))
    first = 0
    for part in PARTS:
        table = pq.read_table(f"{workdir}/features/products/{part}")
        assert table.schema.equals(expected), table.schema
        ids = table.column("product_id").to_pylist()
        assert ids == [f"s{SEED}-{i:010d}" for i in range(first, first + 1000)]  # row order = product index
        first += 1000
        assert table.column("image").to_pylist() == [f"images/{i}.jpg" for i in ids]
        assert table.column("n_attributes").to_pylist() == [len(a) for a in table.column("attributes").to_pylist()]

    cats = pq.read_table(f"{workdir}/features/categories.parquet")
    assert cats.schema.names == ["category", "name", "depth", "parent", "products", "text_name", "text_path",
                                 "clip_name", "clip_path"]
    assert [cats.schema.field(c).type for c in ("category", "name", "depth", "parent", "products")] == \
        [pa.string(), pa.string(), pa.int64(), pa.string(), pa.int64()]
    assert cats.schema.field("text_name").type == cats.schema.field("text_path").type == _vector_type(64, np.float32)
    assert cats.schema.field("clip_name").type == cats.schema.field("clip_path").type == _vector_type(32, np.float32)

    assert storage.read_json(f"{workdir}/features/encoders.json") == dataclasses.asdict(EncoderConfig())
    assert features.recorded_encoders(workdir) == EncoderConfig()
    assert storage.read_json(f"{workdir}/catalog.json") == {"catalog": f"{workdir}/catalog", "features_only": True}
    stats = storage.read_json(f"{workdir}/features/stats.json")
    assert {k: stats[k] for k in ("stage", "read", "used", "quarantined", "reasons", "parts", "synthetic")} == \
        {"stage": "embed", "read": N, "used": N, "quarantined": 0, "reasons": {}, "parts": 3, "synthetic": True}
    assert stats["products_per_s"] > 0 and stats["categories"] == cats.num_rows


def test_readers_and_vectors(workdir):
    products, cats = features.load_products(workdir), features.load_categories(workdir)
    table = pq.read_table(f"{workdir}/features/products")  # files in name order = product_id order
    assert len(products) == N and len(set(products.ids)) == N
    assert table.column("product_id").to_pylist() == list(products.ids)
    for name in ("image_emb", "title_emb", "attr_emb"):
        assert table.schema.field(name).type.value_type == pa.float16()
    for m in (products.image, products.title):
        np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1, atol=2e-3)
    n_attr = table.column("n_attributes").to_numpy()
    norms = np.linalg.norm(products.attributes, axis=1)
    assert 0.05 < (n_attr == 0).mean() < 0.35  # some products have no attributes: zero vectors
    np.testing.assert_allclose(norms[n_attr > 0], 1, atol=2e-3)
    assert not norms[n_attr == 0].any()
    keys = [a.split(": ")[0] for row in table.column("attributes").to_pylist() for a in row]
    assert set(keys) == {"color", "material", "size", "style", "pattern", "finish"}
    for m in (*cats.text.values(), *cats.clip.values()):
        np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1, atol=1e-5)
    assert list(cats.ids) == sorted(cats.ids)
    assert {category_id(p) for p in products.paths} <= set(cats.ids)
    assert {len(p) for p in products.paths} == {3}
    assert len(set(cats.names)) == len(cats.names)  # names are unique across the tree
    leaf_named = np.mean([p[-1] in t.split() for p, t in zip(products.paths, products.titles)])
    assert 0.7 < leaf_named < 0.9  # BM25 has signal, not an oracle


def test_category_rows_match_the_products(workdir):
    paths = features.load_products(workdir).paths
    tree = CategoryTree(paths)
    rows = pq.read_table(f"{workdir}/features/categories.parquet").to_pylist()
    assert len(rows) == len(tree) == 4 + 16 + 64
    for r in rows:
        node = tree.nodes[r["category"]]
        assert (r["name"], r["depth"], r["parent"], r["products"]) == (node.name, node.depth, node.parent,
                                                                        node.products)
    loaded = features.load_tree(workdir)  # stages that never read the paths get the same tree
    assert {c: (n.parent, n.products, sorted(n.children)) for c, n in loaded.nodes.items()} == \
        {c: (n.parent, n.products, sorted(n.children)) for c, n in tree.nodes.items()}
    sizes = Counter(category_id(p) for p in paths).values()
    assert max(sizes) > 3 * min(sizes)  # Zipf-like popularity: categories of different sizes


def test_same_seed_same_bytes_whatever_the_workers(workdir, tmp_path):
    one = str(tmp_path / "one")
    synth_features.write_features(one, N, seed=SEED, workers=1, **ARGS)
    assert _files(one) == _files(workdir)
    other = str(tmp_path / "other")
    synth_features.write_features(other, N, seed=SEED + 1, workers=1, **ARGS)
    a, b = _files(workdir), _files(other)
    assert all(a[n] != b[n] for n in a)
    with pytest.raises(ValueError, match="already holds features"):  # stale parts would mix with new ones
        synth_features.write_features(one, N, seed=SEED, workers=1, **ARGS)


def test_zero_shot_signal(workdir):
    """Ranking a leaf's products by title_emb . text_name (the MPNet baseline): far above chance, not perfect."""
    products, cats = features.load_products(workdir), features.load_categories(workdir)
    leaf = np.array([category_id(p) for p in products.paths], dtype=object)
    r_prec, chance = [], []
    for i in np.flatnonzero([c.count(" > ") == 2 for c in cats.ids]):
        relevant = leaf == cats.ids[i]
        r = int(relevant.sum())
        top = np.argsort(-(products.title @ cats.text["name"][i]), kind="stable")[:r]
        r_prec.append(relevant[top].mean())
        chance.append(r / N)
    mean = float(np.mean(r_prec))
    print(f"zero-shot title R-precision over {len(r_prec)} leaves: {mean:.3f} (chance {np.mean(chance):.3f})")
    assert 10 * np.mean(chance) < mean < 0.9


def test_s3_output_is_the_same(workdir, s3_bucket):
    uri = f"{s3_bucket}/runs/sf"
    synth_features.write_features(uri, N, seed=SEED, workers=2, **ARGS)
    assert _files(uri) == _files(workdir)
    assert len(features.load_products(uri)) == N


def test_bad_arguments():
    for kwargs, message in ((dict(products=0), "number of products"), (dict(products=5, seed=-1), "seed"),
                            (dict(products=5, levels=0), "levels"), (dict(products=5, workers=0), "workers"),
                            (dict(products=5, levels=9, branching=8), "nodes")):
        with pytest.raises(ValueError, match=message):
            synth_features.write_features("/nonexistent/never-written", **kwargs)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.synth", "--features-only", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})


def test_cli(tmp_path):
    out = str(tmp_path / "cli")
    done = _cli("--out", out, "--products", "300", "--workers", "1")
    assert done.returncode == 0, done.stderr
    assert "wrote features of 300 products" in done.stdout and "products/s" in done.stdout
    table = pq.read_table(f"{out}/features/products")
    assert table.num_rows == 300
    assert table.schema.field("image_emb").type.list_size == 512  # production widths
    assert table.schema.field("title_emb").type.list_size == table.schema.field("attr_emb").type.list_size == 768

    for args, message in ((["--out", str(tmp_path / "x"), "--products", "0"], "at least 1"),
                          (["--out", out, "--products", "5"], "already holds features"),
                          (["--out", "ftp://host/x", "--products", "5"], "unsupported URI scheme")):
        bad = _cli(*args)
        assert bad.returncode == 2, bad.stderr
        assert message in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def _cosines(a: pa.Table, b: pa.Table, column: str) -> np.ndarray:
    x, y = (np.asarray(vectors(t.column(column)), np.float32) for t in (a, b))
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    return np.einsum("ij,ij->i", x, y) / np.maximum(nx * ny, 1e-12)


def test_duplicates_are_second_listings_with_a_group_id(workdir, tmp_path):
    """--duplicates with --features-only: a seeded share of products listed again as <id>-2 right after the
    original, same category and attributes, embeddings close to but not equal to the original's; group_id on
    every row; the same bytes whatever the workers, and the products themselves unchanged."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    stats = synth_features.write_features(one, N, seed=SEED, workers=1, duplicates=0.2, **ARGS)
    synth_features.write_features(two, N, seed=SEED, workers=2, duplicates=0.2, **ARGS)
    assert _files(one) == _files(two)
    table = pq.read_table(f"{one}/features/products")
    assert table.schema.names[-1] == "group_id" and table.schema.field("group_id").type == pa.string()
    ids, groups = table.column("product_id").to_pylist(), table.column("group_id").to_pylist()
    second = np.array([p.endswith("-2") for p in ids])
    assert stats["duplicates"] == second.sum() and stats["used"] == N + second.sum() == table.num_rows
    assert 0.15 * N < second.sum() < 0.25 * N
    at = np.flatnonzero(second)
    assert all(ids[i] == f"{ids[i - 1]}-2" and groups[i] == groups[i - 1] == ids[i - 1] for i in at)
    assert all(g == p for p, g, s in zip(ids, groups, second) if not s)
    originals = table.filter(pa.array(~second))
    assert originals.drop_columns(["group_id"]).equals(pq.read_table(f"{workdir}/features/products"))
    dup, orig = table.take(pa.array(at)), table.take(pa.array(at - 1))
    for column in ("category_path", "attributes", "n_attributes"):
        assert dup.column(column).equals(orig.column(column))
    assert all(t.startswith(o + " - ") for t, o in zip(dup.column("title").to_pylist(),
                                                      orig.column("title").to_pylist()))
    image = _cosines(dup, orig, "image_emb")
    assert 0.88 < image.min() and image.max() < 0.98  # a re-shot photo: close, never the same vector
    title = _cosines(dup, orig, "title_emb")
    assert 0.88 < title.min() and title.max() < 0.98
    no_attr = dup.column("n_attributes").to_numpy() == 0
    assert not np.asarray(vectors(dup.column("attr_emb")))[no_attr].any()  # zero stays zero
    cats = pq.read_table(f"{one}/features/categories.parquet")  # second listings count in their categories
    assert cats.filter(pc.equal(cats.column("depth"), 1)).column("products").to_numpy().sum() == \
        table.num_rows
    with pytest.raises(ValueError, match="duplicated products"):
        synth_features.write_features(str(tmp_path / "bad"), 5, duplicates=1.5)
    done = _cli("--out", str(tmp_path / "cli"), "--products", "300", "--workers", "1", "--duplicates", "0.1",
                "--seed", "1")
    assert done.returncode == 0, done.stderr
    assert "second listings, group_id" in done.stdout
    assert "group_id" in pq.read_table(f"{tmp_path}/cli/features/products").schema.names
