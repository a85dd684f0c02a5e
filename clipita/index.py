"""USearch HNSW shards of product vectors: built in parallel (one Ray task per block), searched by fan-out.

Layout under ``<workdir>/index/<scope>/<group>/`` where scope is ``test`` (the evaluation candidates) or
``all`` (every product: what the endpoint serves) and group is the model (``mpnet``, ``clip``) or model and
setting (``clip-ita-specific``) for trained heads:

    shard-00000.usearch ...   one HNSW graph per block of consecutive rows, keys = row numbers
    ids.parquet               row -> product_id
    manifest.json             model, setting, scope, dims, dtype, count, metric, shards [{file, count, sha256}]

manifest.json is written last: a group without it is unfinished. A shard whose SHA-256 does not match the
manifest refuses to load (``IndexIntegrityError``) instead of returning wrong neighbours.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipita import storage

DTYPES = ("f32", "f16", "i8")


class IndexIntegrityError(RuntimeError):
    """A shard or manifest that does not match what was built; one line naming it."""


def group_name(model: str, setting: str | None) -> str:
    return f"{model}-{setting}" if setting else model


def group_dir(workdir: str, scope: str, group: str) -> str:
    return storage.join(workdir, "index", scope, group)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_shard(vectors: np.ndarray, first_key: int, uri: str, dtype: str, connectivity: int,
                expansion_add: int) -> dict:
    """Build one HNSW shard over ``vectors`` (keys first_key...) and write it; returns its manifest entry."""
    from usearch.index import Index

    index = Index(ndim=vectors.shape[1], metric="cos", dtype=dtype, connectivity=connectivity,
                  expansion_add=expansion_add)
    index.add(np.arange(first_key, first_key + len(vectors), dtype=np.uint64), vectors, threads=1)
    data = bytes(index.save())
    storage.write_bytes(uri, data)
    return {"file": uri.rsplit("/", 1)[-1], "count": len(vectors), "first_key": first_key, "sha256": _sha256(data)}


def build_group(uri: str, vectors: np.ndarray, ids: np.ndarray, meta: dict, shards: int, dtype: str = "f32",
                connectivity: int = 16, expansion_add: int = 128) -> dict:
    """Build a group's shards as parallel Ray tasks (one per block of rows); write ids and the manifest."""
    import ray

    if dtype not in DTYPES:
        raise ValueError(f"index dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    shards = max(1, min(shards, n))
    bounds = np.linspace(0, n, shards + 1).astype(int)
    task = ray.remote(num_cpus=1)(build_shard)
    refs = [task.remote(vectors[a:b], int(a), storage.join(uri, f"shard-{i:05d}.usearch"), dtype, connectivity,
                        expansion_add) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    entries = ray.get(refs)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"product_id": pa.array(list(ids), pa.string())}), sink)
    storage.write_bytes(storage.join(uri, "ids.parquet"), sink.getvalue().to_pybytes())
    manifest = dict(meta, dims=int(vectors.shape[1]), dtype=dtype, count=n, metric="cos", shards=entries)
    storage.write_json(storage.join(uri, "manifest.json"), manifest)
    return manifest


@dataclass
class SearchResult:
    rows: np.ndarray  # (Q, k) int64 row numbers into ``ids``, -1 where fewer than k exist
    scores: np.ndarray  # (Q, k) float32 cosine similarity, -inf for padding


class ShardedIndex:
    """All shards of one group, checked against the manifest, searched by fan-out and merge."""

    def __init__(self, uri: str, view: bool = True, cache_dir: str | None = None):
        from usearch.index import Index

        try:
            self.manifest = storage.read_json(storage.join(uri, "manifest.json"))
        except storage.StorageError:
            raise IndexIntegrityError(f"no index at {uri} (manifest.json missing): run jobs.index") from None
        ids = pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(uri, "ids.parquet"))))
        self.ids = np.asarray(ids.column("product_id").to_pylist(), dtype=object)
        if len(self.ids) != self.manifest["count"]:
            raise IndexIntegrityError(f"index {uri}: ids.parquet has {len(self.ids)} rows, manifest says "
                                      f"{self.manifest['count']}")
        self.shards = []
        for entry in self.manifest["shards"]:
            shard_uri = storage.join(uri, entry["file"])
            data = storage.read_bytes(shard_uri)
            if _sha256(data) != entry["sha256"]:
                raise IndexIntegrityError(f"index shard {shard_uri} does not match its checksum in manifest.json "
                                          f"(corrupt or replaced): rebuild it with jobs.index")
            if view:  # memory-map a local file (downloading remote shards once into the cache folder)
                path = self._local_copy(shard_uri, data, cache_dir)
                self.shards.append(Index.restore(path, view=True))
            else:
                self.shards.append(Index.restore(data))
        self.dims = self.manifest["dims"]

    @staticmethod
    def _local_copy(uri: str, data: bytes, cache_dir: str | None) -> str:
        if not storage.is_remote(uri):
            return storage.filesystem(uri)[1]
        folder = cache_dir or os.path.join(tempfile.gettempdir(), "clipita-index")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, hashlib.sha256(data).hexdigest()[:24] + ".usearch")
        if not os.path.exists(path):  # content-addressed: another replica may have it memory-mapped already
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # atomic: a reader never sees a half-written shard
        return path

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int, ef: int | None = None) -> SearchResult:
        """Top-k rows per query over every shard (each searched for k, results merged by score)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.dims:
            raise ValueError(f"queries have {queries.shape[1]} dims, the index {self.dims}")
        q = len(queries)
        keys, scores = [], []
        for shard in self.shards:
            if ef:
                shard.expansion_search = max(ef, k)
            m = shard.search(queries, min(k, len(shard)))
            kk = np.asarray(m.keys, dtype=np.int64).reshape(q, -1)
            dd = np.asarray(m.distances, dtype=np.float32).reshape(q, -1)
            # one query comes back as Matches (no .counts), several as BatchMatches
            counts = np.asarray(getattr(m, "counts", [len(m.keys)])).reshape(q)
            valid = np.arange(kk.shape[1])[None, :] < counts[:, None]
            keys.append(np.where(valid, kk, -1))
            scores.append(np.where(valid, 1.0 - dd, -np.inf))
        keys, scores = np.concatenate(keys, axis=1), np.concatenate(scores, axis=1)
        # best first; among equal scores the lower row first, as the exact ranking does
        order = np.lexsort((np.where(keys < 0, np.iinfo(np.int64).max, keys), -scores), axis=1)[:, :k]
        rows, top = np.take_along_axis(keys, order, 1), np.take_along_axis(scores, order, 1).astype(np.float32)
        if rows.shape[1] < k:
            pad = k - rows.shape[1]
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
            top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf)
        return SearchResult(rows, top)


def dense_groups(workdir: str, settings) -> list[tuple[str, str | None]]:
    """(model, setting) of every dense model that can be indexed: the zero-shot baselines once, each trained
    model per setting whose best checkpoint exists."""
    from clipita.rankers import TRAINED, VARIANT_OF
    from clipita.training import best_checkpoint

    groups: list[tuple[str, str | None]] = [("mpnet", None), ("clip", None)]
    for setting in settings:
        for model in TRAINED:
            if storage.exists(storage.join(best_checkpoint(workdir, VARIANT_OF[model], setting), "config.json")):
                groups.append((model, setting))
    return groups


def build_indexes(workdir: str, cfg, scopes=("test", "all"), log=print) -> dict:
    """jobs.index: every dense model's product vectors, for the test split (evaluation) and all products
    (serving), into sharded USearch indexes. Returns the stats also written to index/stats.json."""
    import time

    from clipita.features import labels_for, load_products
    from clipita.rankers import load_ranker
    from clipita.tree import SETTINGS

    t0 = time.time()
    ic = cfg.index
    workdir = storage.absolute(workdir)
    products = load_products(workdir)
    test = labels_for(products, cfg.data).split == "test"
    built = []
    for model, setting in dense_groups(workdir, SETTINGS):
        ranker = load_ranker(workdir, model, setting)
        vectors = ranker.product_vectors(products)
        for scope in scopes:
            rows = test if scope == "test" else np.ones(len(products), bool)
            name = group_name(model, setting)
            t1 = time.time()
            manifest = build_group(group_dir(workdir, scope, name), vectors[rows], products.ids[rows],
                                   {"model": model, "setting": setting, "scope": scope}, ic.shards, ic.dtype,
                                   ic.connectivity, ic.expansion_add)
            built.append({"group": name, "scope": scope, "count": manifest["count"],
                          "shards": len(manifest["shards"]), "seconds": round(time.time() - t1, 3)})
            log(f"index: {scope}/{name}: {manifest['count']} vectors x {manifest['dims']} ({ic.dtype}) in "
                f"{len(manifest['shards'])} shards, {built[-1]['seconds']} s")
    stats = {"stage": "index", "groups": built, "seconds": round(time.time() - t0, 2), "dtype": ic.dtype}
    storage.write_json(storage.join(workdir, "index", "stats.json"), stats)
    return stats
