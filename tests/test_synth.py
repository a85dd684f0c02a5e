"""The synthetic catalogue: format, tree, determinism, learnable signal, S3 output and the CLI."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipita import storage
from clipita.sources import synth
from clipita.tree import category_id

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 400
SEED = 7


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth") / "catalog")
    summary = synth.write_catalog(out, N, seed=SEED, workers=2, progress=False)
    assert summary["products"] == N
    return out


def _rows(uri: str) -> list[dict]:
    return pq.read_table(storage.join(uri, "products.parquet")).to_pylist()


def _has_word(text: str, phrases: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(p)}\b", text, re.IGNORECASE) for p in phrases)


def test_tree_is_marketplace_like():
    paths = synth.CATEGORY_PATHS
    assert 60 <= len(paths) <= 130
    assert {len(p) for p in paths} == {3, 4}
    assert len({p[0] for p in paths}) >= 6
    assert len({category_id(p) for p in paths}) == len(paths)
    # the same name under different parents: leaves (Boots) and inner nodes (Accessories)
    leaf_parents: dict[str, set] = {}
    for p in paths:
        leaf_parents.setdefault(p[-1], set()).add(p[:-1])
    assert leaf_parents["Boots"] >= {("Women", "Shoes"), ("Men", "Shoes")}
    inner = {category_id(p[:d]) for p in paths for d in range(1, len(p)) if p[d - 1] == "Accessories"}
    assert {"Women > Accessories", "Men > Accessories"} <= inner
    assert all(synth.NOUNS[p] for p in paths)


def test_catalog_format(catalog):
    table = pq.read_table(storage.join(catalog, "products.parquet"))
    assert table.schema.names == ["product_id", "title", "attributes", "category_path", "image"]
    types = {f.name: f.type for f in table.schema}
    assert types["product_id"] == pa.string() and types["title"] == pa.string() and types["image"] == pa.string()
    for name in ("attributes", "category_path"):
        assert pa.types.is_list(types[name]) and types[name].value_type == pa.string()
    rows = table.to_pylist()
    assert len(rows) == N
    assert len({r["product_id"] for r in rows}) == N and all(r["product_id"] for r in rows)
    assert all(tuple(r["category_path"]) in synth.NOUNS for r in rows)
    assert len({r["category_path"][0] for r in rows}) >= 6

    modes, sizes, formats = Counter(), set(), Counter()
    for r in rows:
        assert not r["image"].startswith("/") and "://" not in r["image"]
        with Image.open(os.path.join(catalog, r["image"])) as im:
            im.load()  # decodes the whole file, not only the header
            modes[im.mode] += 1
            sizes.add(im.size)
            formats[im.format] += 1
            assert r["image"].rsplit(".", 1)[1] == {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[im.format]
    assert modes["RGB"] > N / 2 and modes["RGBA"] > 0 and modes["L"] > 0
    assert formats["JPEG"] > N / 2 and formats["PNG"] > 0
    assert min(min(s) for s in sizes) < 96 and max(max(s) for s in sizes) >= 200
    assert any(w != h for w, h in sizes)


def test_titles_and_attributes(catalog):
    rows = _rows(catalog)
    titles = [r["title"] for r in rows]
    assert any(not t.isascii() for t in titles)
    assert any(len(t) > 90 for t in titles)
    # a title names its own category far more often than a random other one (misleading titles are noise)
    rng = np.random.default_rng(0)
    own = np.mean([_has_word(r["title"], synth.NOUNS[tuple(r["category_path"])]) for r in rows])
    others = [synth.CATEGORY_PATHS[i] for i in rng.integers(len(synth.CATEGORY_PATHS), size=len(rows))]
    other = np.mean([_has_word(r["title"], synth.NOUNS[p]) for r, p in zip(rows, others)])
    assert 0.75 < own < 0.95, own  # about 10% of titles mislead and a few name nothing
    assert other < 0.1, other

    counts = [len(r["attributes"]) for r in rows]
    assert min(counts) >= 0 and max(counts) <= 10 and 3 < np.mean(counts) < 8
    assert all(re.fullmatch(r"[a-z ]+: \S.*", a) for r in rows for a in r["attributes"])
    # the colour attribute usually names the same colour within a parent category
    by_parent: dict[tuple, Counter] = {}
    for r in rows:
        for a in r["attributes"]:
            if a.startswith(("color: ", "colour: ")):
                by_parent.setdefault(tuple(r["category_path"][:-1]), Counter())[a.split(": ", 1)[1]] += 1
    big = [c for c in by_parent.values() if sum(c.values()) >= 10]
    assert big and np.mean([c.most_common(1)[0][1] / sum(c.values()) for c in big]) > 0.5


def test_leaf_sizes_are_uneven(catalog):
    counts = Counter(tuple(r["category_path"]) for r in _rows(catalog))
    per_leaf = [counts.get(p, 0) for p in synth.CATEGORY_PATHS]
    assert max(per_leaf) >= 10 * max(1, int(np.median(per_leaf)))


def _object_colours(path: str) -> np.ndarray:
    """Colour histogram (4 levels per channel) of the pixels that differ from the border's median colour."""
    a = np.asarray(Image.open(path).convert("RGB").resize((32, 32)), dtype=float)
    background = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
    pixels = a.reshape(-1, 3)
    fg = pixels[np.abs(pixels - background).sum(1) > 60]
    q = ((fg if len(fg) else pixels) // 64).astype(int)
    h = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64).astype(float)
    return h / h.sum()


def test_images_carry_the_parent_category(catalog):
    rows = _rows(catalog)
    x = np.array([_object_colours(os.path.join(catalog, r["image"])) for r in rows])
    y = [tuple(r["category_path"][:-1]) for r in rows]
    half = N // 2
    labels = sorted(set(y[:half]))
    centroids = np.array([x[[i for i in range(half) if y[i] == c]].mean(0) for c in labels])
    pred = [labels[int(np.argmin(((centroids - x[i]) ** 2).sum(1)))] for i in range(half, N)]
    accuracy = np.mean([p == y[i] for p, i in zip(pred, range(half, N))])
    majority = Counter(y[:half]).most_common(1)[0][0]
    baseline = np.mean([y[i] == majority for i in range(half, N)])
    assert accuracy > 1.5 * baseline and accuracy > 5 / len(labels), (accuracy, baseline, len(labels))


def test_deterministic_whatever_the_workers(catalog, tmp_path):
    again = str(tmp_path / "again")
    synth.write_catalog(again, N, seed=SEED, workers=1, progress=False)
    name = "products.parquet"
    assert storage.read_bytes(f"{again}/{name}") == storage.read_bytes(f"{catalog}/{name}")
    for r in _rows(catalog):
        assert storage.read_bytes(f"{again}/{r['image']}") == storage.read_bytes(f"{catalog}/{r['image']}")

    # a smaller catalogue of the same seed is a prefix (product i depends on (seed, i) only)
    small = str(tmp_path / "small")
    synth.write_catalog(small, 50, seed=SEED, workers=1, progress=False)
    assert _rows(small) == _rows(catalog)[:50]

    other = str(tmp_path / "other")
    synth.write_catalog(other, 50, seed=SEED + 1, workers=1, progress=False)
    rows, base = _rows(other), _rows(catalog)[:50]
    assert sum(a["title"] != b["title"] for a, b in zip(rows, base)) > 40
    assert sum(a["category_path"] != b["category_path"] for a, b in zip(rows, base)) > 25
    same_images = sum(storage.read_bytes(f"{other}/{a['image']}") == storage.read_bytes(f"{catalog}/{b['image']}")
                      for a, b in zip(rows, base))
    assert same_images == 0


def test_duplicates_are_second_listings_sharing_a_group(catalog, tmp_path):
    out = str(tmp_path / "dups")
    summary = synth.write_catalog(out, 50, seed=SEED, workers=1, progress=False, duplicates=0.3)
    rows = _rows(out)
    seconds = [r for r in rows if r["product_id"].endswith("-2")]
    assert summary["duplicates"] == len(seconds) and 5 <= len(seconds) <= 25 and len(rows) == 50 + len(seconds)
    assert [dict(r, group_id=None) for r in rows if not r["product_id"].endswith("-2")] == [
        dict(r, group_id=None) for r in _rows(catalog)[:50]]  # the products themselves are unchanged
    first = {r["product_id"]: r for r in rows}
    for r in seconds:
        original = first[r["product_id"][:-2]]
        assert r["group_id"] == original["group_id"] == original["product_id"] and r["image"] == original["image"]
        assert r["title"].startswith(original["title"] + " - ") and r["category_path"] == original["category_path"]
    with pytest.raises(ValueError, match="duplicated"):
        synth.write_catalog(out, 5, duplicates=2.0, progress=False)


def test_bad_arguments_raise_one_line(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        synth.write_catalog(str(tmp_path / "c"), 0, progress=False)
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        synth.write_catalog("ftp://host/c", 5, progress=False)


def test_s3_output(catalog, s3_bucket):
    out = f"{s3_bucket}/catalogs/demo"
    synth.write_catalog(out, 40, seed=SEED, workers=2, progress=False)
    fs, path = storage.arrow_filesystem(out)
    rows = pq.read_table(f"{path}/products.parquet", filesystem=fs).to_pylist()
    assert rows == _rows(catalog)[:40]
    s3, _ = storage.filesystem(out)
    for r in rows[:10]:
        data = s3.cat_file(f"{path}/{r['image']}")
        assert data == storage.read_bytes(f"{catalog}/{r['image']}")
        Image.open(io.BytesIO(data)).load()


def test_s3_missing_bucket_is_one_line(s3_endpoint):
    with pytest.raises(storage.StorageError, match="cannot write") as err:
        synth.write_catalog("s3://no-such-bucket-here/cat", 5, workers=1, progress=False)
    assert "\n" not in str(err.value)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.synth", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_cli(tmp_path):
    out = str(tmp_path / "cli")
    done = _cli("--out", out, "--products", "50")
    assert done.returncode == 0, done.stderr
    assert len(_rows(out)) == 50
    assert "wrote 50 products" in done.stdout and "50/50 products" in done.stderr

    for args, message in ((["--out", out, "--products", "0"], "at least 1"),
                          (["--out", "ftp://host/x", "--products", "5"], "unsupported URI scheme")):
        bad = _cli(*args)
        assert bad.returncode == 2
        assert message in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1
