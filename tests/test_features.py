"""Labels where the rows are: the per-block Labeler and the census of Ray tasks against the whole-catalogue
reference (every product in one process)."""
from collections import Counter

import numpy as np
import pytest

from clipita.census import census
from clipita.features import labeler_for, labels_for, load_products, load_tree
from clipita.tree import SETTINGS, CategoryTree, Labeler, assign_labels, category_id
from clipita.vectors import vectors


def test_a_labeler_per_row_equals_labels_of_the_whole_list():
    rng = np.random.default_rng(0)
    paths = [[f"R{rng.integers(3)}", f"C{rng.integers(4)}", f"L{rng.integers(5)}"][: 1 + rng.integers(3)]
             for _ in range(400)]
    ids = [f"p{i}" for i in range(400)]
    whole = assign_labels(ids, paths, seed=3, unseen_fraction=0.2)
    labeler = Labeler.build(CategoryTree(paths), seed=3, unseen_fraction=0.2)
    assert labeler.held  # some categories are held out
    for i in range(0, 400, 37):  # any row alone, as a Ray task over one block sees it
        assert labeler.split(ids[i], paths[i]) == whole.split[i]
        assert all(labeler.label(ids[i], paths[i], s) == whole.by_setting[s][i] for s in SETTINGS)


@pytest.mark.slow  # the embedded workdir fixture starts Ray
def test_the_tree_from_categories_parquet_holds_out_what_the_paths_would(embedded_workdir, demo_config):
    products = load_products(embedded_workdir)
    from_paths = Labeler.build(CategoryTree(products.paths), demo_config.data.seed,
                               unseen_fraction=demo_config.data.unseen_fraction)
    assert labeler_for(embedded_workdir, demo_config.data).held == from_paths.held
    tree = load_tree(embedded_workdir)
    assert {c: n.products for c, n in tree.nodes.items()} == {
        c: n.products for c, n in CategoryTree(products.paths).nodes.items()}


@pytest.mark.slow
def test_census_of_ray_tasks_equals_counting_in_one_process(ray_session, embedded_workdir, demo_config):
    products = load_products(embedded_workdir)
    labels = labels_for(products, demo_config.data)
    counts = census(embedded_workdir, labeler_for(embedded_workdir, demo_config.data))
    for split in ("train", "val", "test"):
        mask = labels.split == split
        for s in SETTINGS:
            assert counts.labels[(s, split)] == dict(Counter(labels.by_setting[s][mask].tolist())), (s, split)
        nodes = Counter(category_id(p[:d]) for p, m in zip(products.paths, mask) if m for d in range(1, len(p) + 1))
        assert counts.nodes[split] == dict(nodes)
    assert counts.split_size("test") == int((labels.split == "test").sum())


@pytest.mark.parametrize("remote", [False, True])
def test_products_dataset_reads_every_row_once_in_tasks_of_whole_row_groups(ray_session, tmp_path, s3_bucket,
                                                                           monkeypatch, remote):
    """Files cut every which way (row groups smaller than a read task, one row group larger than one, an empty
    file): each read task holds whole row groups of one file, and the dataset yields every row exactly once,
    with the transform applied in the read task; on local disk and over the S3 protocol."""
    import functools

    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipita import features, storage, streams

    monkeypatch.setattr(streams, "READ_TASK_ROWS", 1000)
    monkeypatch.setattr(streams, "READ_BATCH_ROWS", 256)
    root = f"{s3_bucket}/work" if remote else str(tmp_path / "work")
    cuts = {"part-0.parquet": (0, 3500, 300), "part-1.parquet": (3500, 6000, 2500), "part-2.parquet": (6000, 6000, 10)}
    for name, (lo, hi, group) in cuts.items():
        table = pa.table({"product_id": [f"p{i:05d}" for i in range(lo, hi)],
                          "image_emb": pa.FixedSizeListArray.from_arrays(
                              pa.array(np.arange(2 * lo, 2 * hi, dtype=np.float32)), 2)})
        fs, path = storage.arrow_filesystem(storage.join(root, "features", "products", name))
        fs.create_dir(path.rsplit("/", 1)[0])
        pq.write_table(table, path, filesystem=fs, row_group_size=group)

    source = streams.FeatureSource(features.product_files(root), ["product_id", "image_emb"])
    assert [(u[0].rsplit("/", 1)[1], u[2]) for u in source.units] == (
        [("part-0.parquet", 1200)] * 2 + [("part-0.parquet", 1100), ("part-1.parquet", 2500), ("part-2.parquet", 0)])

    def twice(table, factor):
        return {"product_id": np.asarray(table.column("product_id").to_pylist()),
                "double": vectors(table.column("image_emb"))[:, 0] * factor}

    ds = streams.products_dataset(source, transform=functools.partial(twice, factor=2))
    rows = {r["product_id"]: r["double"] for r in ds.iter_rows()}
    assert len(rows) == 6000
    assert all(rows[f"p{i:05d}"] == 4 * i for i in range(0, 6000, 97))


def test_products_dataset_registers_the_idle_backoff_once(ray_session, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from clipita.streams import FeatureSource, products_dataset
    from clipita.ray_compat import idle_backoff

    path = str(tmp_path / "part-00000.parquet")
    pq.write_table(pa.table({"product_id": ["a", "b"]}), path)
    for _ in range(2):
        ds = products_dataset(FeatureSource([path], ["product_id"]))
    assert ray.data.DataContext.get_current().custom_execution_callback_classes.count(idle_backoff()) == 1
    # streaming_split runs the executor in a coordinator actor: the callback travels there by value
    assert sorted(r["product_id"] for r in ds.streaming_split(1)[0].iter_rows()) == ["a", "b"]
