"""USearch shards: parallel build, fan-out search equal to exact search, integrity checks, local and S3."""
import numpy as np
import pytest

from clipita import storage
from clipita.index import IndexIntegrityError, ShardedIndex, build_group
from clipita.metrics import rank_scores

pytestmark = pytest.mark.slow


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
    manifest = build_group(uri, vectors, ids, {"model": "mpnet", "setting": None, "scope": "test"}, shards=4)
    assert manifest["count"] == 3000 and len(manifest["shards"]) == 4 and manifest["dims"] == 48
    assert sum(s["count"] for s in manifest["shards"]) == 3000

    index = ShardedIndex(uri, view=True, cache_dir=str(tmp_path / "cache"))
    found = index.search(queries, 20, ef=3000)
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
    build_group(uri, vectors, np.arange(2000).astype(str), {"model": "clip"}, shards=2, dtype=dtype)
    found = ShardedIndex(uri).search(queries, 10, ef=2000).rows
    exact = rank_scores(queries @ vectors.T, 10)
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
