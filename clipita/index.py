"""USearch HNSW shards of product vectors, built where the vectors stream, searched by fan-out and merge.

Layout under ``<workdir>/index/<scope>/`` where scope is ``test`` (the evaluation candidates) or ``all`` (every
product: what the endpoint serves):

    rows/<shard>.parquet             the shard's products in key order: product_id, title, image, category_path
    <group>/<shard>.usearch ...      one HNSW graph per shard and group, keys = first_key + row in the shard
    <group>/manifest.json            model, setting, scope, dims, dtype, count, metric, rows_dir,
                                     shards [{name, count, first_key, sha256}]

A group is a model (``mpnet``, ``clip``) or a trained model and its setting (``clip-ita-specific``). Every group of
a scope has the same shards with the same rows, so a row position means the same product in all of them, and the
rows are stored once. manifest.json is written last: a group without it is unfinished. A shard whose SHA-256 does
not match the manifest refuses to load (``IndexIntegrityError``) instead of returning wrong neighbours.

The build stage (jobs.index) is clipita/stages/index.py; ``build_group`` builds one group from vectors in memory
(benchmarks, tests).
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipita import storage
from clipita.vectors import unit_rows

DTYPES = ("f32", "f16", "i8")
SCOPES = ("test", "all")
ROW_COLUMNS = ["product_id", "title", "image", "category_path"]
DTYPE_BYTES = {"f32": 4, "f16": 2, "i8": 1}
GRAPH_BYTES = 200  # HNSW links + key per vector at M = 16 (usearch's own estimate is ~2·M·4 + overhead)
# Inner product on vectors normalised before they are stored: the cosine, without usearch's per-distance norms
# (13-15% faster builds, benchmarks/history/index.md). usearch's i8 inner product is not rescaled: i8 keeps "cos".
METRICS = {"f32": "ip", "f16": "ip", "i8": "cos"}


class IndexIntegrityError(RuntimeError):
    """A shard or manifest that does not match what was built; one line naming it."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ShardWriter:
    """Accumulates rows and each group's vectors of one scope; ``flush`` writes them as one shard per group."""

    def __init__(self, scope_uri: str, groups: dict[str, int], prefix: str, dtype: str, connectivity: int,
                 expansion_add: int, rows_dir: str = "rows", shard_no: int = 0, threads: int = 1):
        self.scope_uri, self.groups, self.prefix, self.rows_dir = scope_uri, groups, prefix, rows_dir
        self.threads = threads
        self.dtype, self.connectivity, self.expansion_add = dtype, connectivity, expansion_add
        self.shard_no = shard_no  # keys of shard s start at s << 32: unique across builders without coordination
        self.entries: dict[str, list[dict]] = {g: [] for g in groups}
        self._open()

    def _open(self) -> None:
        from usearch.index import Index

        self.indexes = {g: Index(ndim=d, metric=METRICS[self.dtype], dtype=self.dtype,
                                 connectivity=self.connectivity, expansion_add=self.expansion_add) for g, d in self.groups.items()}
        self.rows: list[pa.Table] = []
        self.count = 0

    def add(self, rows: pa.Table, vectors: dict[str, np.ndarray]) -> None:
        if rows.num_rows == 0:
            return
        first = (self.shard_no << 32) + self.count
        keys = np.arange(first, first + rows.num_rows, dtype=np.uint64)
        for g, index in self.indexes.items():
            # threads: 1 gives the same graph on every build; 0 (every core) builds faster, a slightly different one
            index.add(keys, unit_rows(vectors[g]), threads=self.threads)
        self.rows.append(rows)
        self.count += rows.num_rows

    def flush(self) -> None:
        if self.count == 0:
            return
        name = f"{self.prefix}-{self.shard_no:05d}"
        storage.write_parquet(storage.join(self.scope_uri, self.rows_dir, f"{name}.parquet"), pa.concat_tables(self.rows))
        for g, index in self.indexes.items():
            data = index.save()  # a bytearray: hashed and written as it is, not copied
            storage.write_bytes(storage.join(self.scope_uri, g, f"{name}.usearch"), data)
            self.entries[g].append({"name": name, "count": self.count, "first_key": self.shard_no << 32,
                                    "sha256": _sha256(data)})
        self.shard_no += 1
        self._open()


def write_manifests(scope_uri: str, groups: dict[str, int], entries: dict[str, list[dict]], meta: dict[str, dict],
                    dtype: str, rows_dir: str = "../rows") -> dict[str, dict]:
    """One manifest per group, shards in name order (the row order every group of the scope shares)."""
    out = {}
    for g, dims in groups.items():
        shards = sorted(entries[g], key=lambda e: e["name"])
        out[g] = dict(meta[g], dims=dims, dtype=dtype, count=sum(e["count"] for e in shards),
                      metric=METRICS[dtype], rows_dir=rows_dir, shards=shards)
        storage.write_json(storage.join(scope_uri, g, "manifest.json"), out[g])
    return out


def _build_slice(uri: str, vectors: np.ndarray, ids: np.ndarray, shard_no: int, dtype: str, connectivity: int,
                 expansion_add: int, threads: int) -> list[dict]:
    writer = ShardWriter(uri, {"": vectors.shape[1]}, "shard", dtype, connectivity, expansion_add, rows_dir="",
                         shard_no=shard_no, threads=threads)
    writer.add(pa.table({"product_id": pa.array(list(ids), pa.string())}), {"": vectors})
    writer.flush()
    return writer.entries[""]


def build_group(uri: str, vectors: np.ndarray, ids: np.ndarray, meta: dict, shards: int, dtype: str = "f32",
                connectivity: int = 16, expansion_add: int = 128, threads: int = 1) -> dict:
    """One group from vectors held in memory (benchmarks, tests): ``shards`` parallel Ray tasks of ``threads``
    CPUs (and insert threads) each, one per block of rows; the rows files sit beside the shards. jobs.index
    streams instead (``build_indexes``)."""
    import ray

    if dtype not in DTYPES:
        raise ValueError(f"index dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    shards = max(1, min(shards, n))
    bounds = np.linspace(0, n, shards + 1).astype(int)
    task = ray.remote(num_cpus=threads)(_build_slice)
    refs = [task.remote(uri, vectors[a:b], ids[a:b], i, dtype, connectivity, expansion_add, threads)
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    entries = [e for r in ray.get(refs) for e in r]
    # the group's files, rows included, sit in uri itself (group "" of the scope folder uri)
    return write_manifests(uri, {"": vectors.shape[1]}, {"": entries}, {"": meta}, dtype, rows_dir="")[""]


@dataclass
class SearchResult:
    rows: np.ndarray  # (Q, k) int64 row positions (into ShardedIndex.rows), -1 where fewer than k exist
    scores: np.ndarray  # (Q, k) float32 cosine similarity, -inf for padding


def recorded_ef(manifest: dict) -> int:
    """The HNSW ef a group's index was built to be searched with (its manifest), else the index default."""
    from clipita.config import IndexConfig

    return int(manifest.get("expansion_search") or IndexConfig.expansion_search)


class ShardedIndex:
    """All shards of one group, checked against the manifest, searched by fan-out and merge. ``columns`` of the
    rows files are loaded as one Arrow table (``rows``) whose positions are what ``search`` returns."""

    def __init__(self, uri: str, view: bool = True, cache_dir: str | None = None,
                 columns: list[str] | None = ("product_id",), shards: tuple[int, int] | None = None):
        """``shards`` (start, stop): only those shards of the manifest (one partition of the group); row
        positions then count from the first of them."""
        from usearch.index import Index

        try:
            self.manifest = storage.read_json(storage.join(uri, "manifest.json"))
        except storage.StorageError:
            raise IndexIntegrityError(f"no index at {uri} (manifest.json missing): run jobs.index") from None
        if shards is not None:
            self.manifest = dict(self.manifest, shards=self.manifest["shards"][slice(*shards)])
        entries = self.manifest["shards"]
        counts = np.array([e["count"] for e in entries], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.first_keys = np.array([e["first_key"] for e in entries], dtype=np.int64)
        self.rows = read_rows(uri, self.manifest, list(columns)) if columns else None
        self.shards = []
        for entry in entries:
            shard_uri = storage.join(uri, f"{entry['name']}.usearch")
            data = storage.read_bytes(shard_uri)
            if _sha256(data) != entry["sha256"]:
                raise IndexIntegrityError(f"index shard {shard_uri} does not match its checksum in manifest.json "
                                          f"(corrupt or replaced): rebuild it with jobs.index")
            if view:  # memory-map a local file (downloading remote shards once into the cache folder)
                path = self._local_copy(shard_uri, data, cache_dir)
                self.shards.append(Index.restore(path, view=True))
            else:
                self.shards.append(Index.restore(data))
            del data
        self.dims = self.manifest["dims"]

    @property
    def ids(self) -> np.ndarray:
        return np.asarray(self.rows.column("product_id").to_pylist(), dtype=object)

    def column(self, name: str, rows: np.ndarray) -> list:
        """Values of a rows column at row positions (-1 positions are skipped by the caller)."""
        return self.rows.column(name).take(pa.array(np.asarray(rows, dtype=np.int64))).to_pylist()

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
        return int(self.offsets[-1])

    def search(self, queries: np.ndarray, k: int, ef: int | None = None, exact: bool = False,
               threads: int = 0) -> SearchResult:
        """Top-k rows per query over every shard (each searched for k, results merged by score). ``exact``
        scans every vector instead of walking the graph (usearch's brute force: the recall reference);
        ``threads`` 0: every core."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if self.manifest.get("metric") == "ip":  # scores are cosines, as with "cos" (indexes built before)
            queries = unit_rows(queries)
        if queries.shape[1] != self.dims:
            raise ValueError(f"queries have {queries.shape[1]} dims, the index {self.dims}")
        q = len(queries)
        rows, scores = [], []
        for i, shard in enumerate(self.shards):
            if ef:
                shard.expansion_search = max(ef, k)
            m = shard.search(queries, min(k, len(shard)), exact=exact, threads=threads)
            kk = np.asarray(m.keys, dtype=np.int64).reshape(q, -1)
            dd = np.asarray(m.distances, dtype=np.float32).reshape(q, -1)
            # one query comes back as Matches (no .counts), several as BatchMatches
            counts = np.asarray(getattr(m, "counts", [len(m.keys)])).reshape(q)
            valid = np.arange(kk.shape[1])[None, :] < counts[:, None]
            rows.append(np.where(valid, kk - self.first_keys[i] + self.offsets[i], -1))
            scores.append(np.where(valid, 1.0 - dd, -np.inf))
        if not rows:
            return SearchResult(np.full((q, k), -1, np.int64), np.full((q, k), -np.inf, np.float32))
        rows, scores = np.concatenate(rows, axis=1), np.concatenate(scores, axis=1)
        # best first; among equal scores the lower row first, as the exact ranking does
        order = np.lexsort((np.where(rows < 0, np.iinfo(np.int64).max, rows), -scores), axis=1)[:, :k]
        top_rows = np.take_along_axis(rows, order, 1)
        top = np.take_along_axis(scores, order, 1).astype(np.float32)
        if top_rows.shape[1] < k:
            pad = k - top_rows.shape[1]
            top_rows = np.pad(top_rows, ((0, 0), (0, pad)), constant_values=-1)
            top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf)
        return SearchResult(top_rows, top)


def _relative(uri: str, rel: str) -> str:
    """``uri/rel`` with ``..`` resolved (object stores take ``..`` in a key literally)."""
    scheme, _, path = uri.rpartition("://")
    out = posixpath.normpath(posixpath.join(path, rel)) if rel else path
    return f"{scheme}://{out}" if scheme else out


def read_rows(uri: str, manifest: dict, columns: list[str]) -> pa.Table:
    """The rows of a group's shards (in row-position order) as one Arrow table: compact strings, no Python object
    per product."""
    rows_dir = _relative(uri, manifest.get("rows_dir", ""))
    tables = []
    for e in manifest["shards"]:
        file = storage.join(rows_dir, f"{e['name']}.parquet")
        try:
            t = pq.read_table(pa.BufferReader(storage.read_bytes(file)), columns=columns)
        except storage.StorageError:
            raise IndexIntegrityError(f"index {uri}: rows file {file} is missing: rebuild it with jobs.index") from None
        if t.num_rows != e["count"]:
            raise IndexIntegrityError(f"index {uri}: {file} has {t.num_rows} rows, manifest says {e['count']}")
        tables.append(t)
    return pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in columns})
