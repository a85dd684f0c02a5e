"""USearch shards: parallel build, fan-out search equal to exact search, integrity checks, local and S3."""
import numpy as np
import pytest

from clipita import storage
from clipita.index import IndexIntegrityError, ShardedIndex, build_group
from clipita.metrics import rank_scores
from clipita.vectors import unit_rows



def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sharded_search_equals_exact_search(ray_session, tmp_path, request, where):
    rng = np.random.default_rng(0)
    vectors, queries = unit(rng, 3000, 48), unit(rng, 50, 48)
    ids = np.array([f"P{i}" for i in range(3000)], dtype=object)
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    uri = storage.join(root, "index/test/mpnet")
    # stored as given (any length): the index scores by cosine all the same ("ip" on rows it normalises)
    lengths = rng.uniform(0.2, 5.0, (3000, 1)).astype(np.float32)
    manifest = build_group(uri, vectors * lengths, ids, {"model": "mpnet", "setting": None, "scope": "test"},
                           shards=4)
    assert manifest["count"] == 3000 and len(manifest["shards"]) == 4 and manifest["dims"] == 48
    assert manifest["metric"] == "ip"
    assert sum(s["count"] for s in manifest["shards"]) == 3000

    index = ShardedIndex(uri, view=True, cache_dir=str(tmp_path / "cache"))
    found = index.search(3 * queries, 20, ef=3000)
    exact = rank_scores(queries @ vectors.T, 20)
    assert np.array_equal(found.rows, exact)  # recall 1.0 with a large ef, same order
    np.testing.assert_allclose(found.scores, np.take_along_axis(queries @ vectors.T, exact, 1), atol=1e-5)
    assert list(index.ids[found.rows[0][:3]]) == [f"P{i}" for i in exact[0][:3]]
    one = index.search(queries[0], 20, ef=3000)  # a single query (usearch answers it in another shape)
    assert np.array_equal(one.rows[0], exact[0])
    more = index.search(queries[:2], 5000)  # k beyond the index: padded with -1
    assert (more.rows[:, :3000] >= 0).all() and (more.rows[:, 3000:] == -1).all()


@pytest.mark.parametrize("dtype,min_recall", [("f16", 0.99), ("i8", 0.9)])
def test_quantised_shards_keep_recall(ray_session, tmp_path, dtype, min_recall):
    rng = np.random.default_rng(1)
    vectors, queries = unit(rng, 2000, 32), unit(rng, 40, 32)
    uri = str(tmp_path / dtype)
    manifest = build_group(uri, vectors, np.arange(2000).astype(str), {"model": "clip"}, shards=2, dtype=dtype)
    assert manifest["metric"] == {"f16": "ip", "i8": "cos"}[dtype]  # usearch's i8 inner product is not rescaled
    result = ShardedIndex(uri).search(queries, 10, ef=2000)
    found = result.rows
    exact = rank_scores(queries @ vectors.T, 10)
    cosines = np.take_along_axis(queries @ vectors.T, found, 1)
    np.testing.assert_allclose(result.scores, cosines, atol=0.02)  # scores are cosines at either precision
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)])
    assert recall >= min_recall


def test_a_corrupted_shard_is_refused(ray_session, tmp_path):
    rng = np.random.default_rng(2)
    uri = str(tmp_path / "idx")
    build_group(uri, unit(rng, 500, 16), np.arange(500).astype(str), {"model": "clip"}, shards=2)
    shard = tmp_path / "idx" / "shard-00001.usearch"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(IndexIntegrityError, match="shard-00001.usearch does not match its checksum"):
        ShardedIndex(uri)
    with pytest.raises(IndexIntegrityError, match="manifest.json missing"):
        ShardedIndex(str(tmp_path / "nothing"))


def test_jobs_index_streams_into_several_shards_that_search_as_one(ray_session, embedded_workdir, demo_config,
                                                                    tmp_path):
    """Shards hold at most index.builder_mb of vectors and graph: tiny here, so several shards per
    scope; their union, searched by fan-out, equals exact search over every product."""
    import dataclasses
    import shutil

    from clipita.features import load_categories, load_products
    from clipita.rankers import Queries, load_ranker
    from clipita.stages.index import build_indexes
    from clipita.workdir import group_dir

    work = tmp_path / "work"
    shutil.copytree(f"{embedded_workdir}/features", work / "features")
    cfg = dataclasses.replace(demo_config, index=dataclasses.replace(demo_config.index, builder_mb=1, shards=2))
    stats = build_indexes(str(work), cfg, log=lambda *_: None)
    all_mpnet = next(g for g in stats["groups"] if g["group"] == "mpnet" and g["scope"] == "all")
    assert all_mpnet["shards"] >= 3 and all_mpnet["count"] == 600
    assert not (work / "index" / "_vectors").exists()  # the vector files are gone once the shards are built
    index = ShardedIndex(group_dir(str(work), "all", "mpnet"))
    products, categories = load_products(str(work)), load_categories(str(work))
    assert sorted(index.ids) == sorted(products.ids)  # every product once
    ranker = load_ranker("", "mpnet")
    queries = ranker.query_vectors(Queries.from_categories(categories, categories.ids[:30]))
    exact = rank_scores(queries @ ranker.product_vectors(products).T, 10)
    found = index.search(queries, 10, ef=600)
    assert [list(index.ids[r]) for r in found.rows] == [list(products.ids[r]) for r in exact]


def test_unit_rows_scales_every_block_and_keeps_zero_rows_zero():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2500, 16)) * rng.uniform(0.1, 9.0, (2500, 1))).astype(np.float16)
    x[[0, 999, 1000, 2499]] = 0  # zero rows at and around the block edges
    y = unit_rows(x, block=1000)
    assert y.dtype == np.float32 and y.flags.c_contiguous and y.shape == x.shape
    expect = x.astype(np.float32) / np.maximum(np.linalg.norm(x.astype(np.float32), axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose(y, expect, rtol=1e-6, atol=1e-7)
    assert not y[[0, 999, 1000, 2499]].any()
    assert x.dtype == np.float16 and not x[0].any() and x[1].any()  # the input is left as it was


def test_shard_plan_covers_every_row_once_in_equal_shards():
    from clipita.stages.index import plan_shards

    files = [("a", 100), ("b", 0), ("c", 57), ("d", 23)]
    plan = plan_shards(files, 70)
    assert len(plan) == 3  # as few as hold 180 rows at <= 70 each, and equal: 60 each
    assert [sum(stop - start for _, start, stop in s) for s in plan] == [60, 60, 60]
    covered = [(name, row) for s in plan for name, start, stop in s for row in range(start, stop)]
    assert covered == [(name, row) for name, n in files for row in range(n)]  # in order, each row once
    assert plan_shards([("a", 0)], 10) == [] and plan_shards([("a", 5)], 10) == [[("a", 0, 5)]]
    # two shard tasks at once: 3 shards would run as 2 + 1, so 4 of 45 rows; one round's worth stays as it is
    assert [sum(stop - start for _, start, stop in s) for s in plan_shards(files, 70, parallel=2)] == [45] * 4
    assert len(plan_shards(files, 70, parallel=4)) == 3 and len(plan_shards([("a", 5)], 10, parallel=2)) == 1
