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

jobs.index (``build_indexes``) runs two passes, so that no stage waits on a slower one. A Ray Data pass reads the
features and an actor stage (``ProductVectors``, GPU when configured) applies every model to each block and writes
it to a file under ``index/_vectors/``. Then one Ray task per shard builds it from its own slices of those files
(shards of at most the rows that fit ``index.builder_mb``) and writes it. The driver holds the list of files and
the shard plan: no vector and no product passes through it.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipita import storage
from clipita.features import (COLUMNS, FeatureSource, Products, labeler_for, product_files, products_dataset,
                              read_table, vector_width)
from clipita.models import DENSE, REGISTRY, TRAINED_MODELS
from clipita.rankers import HeadRanker, load_ranker
from clipita.runtime import Every
from clipita.tree import SETTINGS
from clipita.vectors import unit_rows, vector_column, vectors
from clipita.workdir import index_dir, stage_stats

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

    def search(self, queries: np.ndarray, k: int, ef: int | None = None, exact: bool = False) -> SearchResult:
        """Top-k rows per query over every shard (each searched for k, results merged by score). ``exact``
        scans every vector instead of walking the graph (usearch's brute force: the recall reference)."""
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
            m = shard.search(queries, min(k, len(shard)), exact=exact, threads=0)  # threads=0: every core
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


def dense_groups(workdir: str, settings) -> list[tuple[str, str | None]]:
    """(model, setting) of every dense model that can be indexed: the zero-shot ones once, each trained model per
    setting whose best checkpoint exists."""
    groups: list[tuple[str, str | None]] = [(n, None) for n in DENSE if not REGISTRY[n].trained]
    for setting in settings:
        groups += [(n, setting) for n in TRAINED_MODELS
                   if storage.exists(storage.join(REGISTRY[n].checkpoint(workdir, setting), "config.json"))]
    return groups


class ProductVectors:
    """Ray Data actor stage: a block of feature rows -> one vectors file under ``out_uri`` (its index rows, whether
    each is a test product, and every dense model's product vector as ``v:<group>``), and one row describing it.
    Trained heads load once per actor (GPU when it has one). Vectors are stored as float16 unless the index keeps
    float32 (an f16 index gets the same values either way)."""

    def __init__(self, workdir: str, groups: list[tuple[str, str | None]], labeler, out_uri: str, dtype: str):
        import torch

        self.rankers = {REGISTRY[m].index_group(s): load_ranker(workdir, m, s) for m, s in groups}
        if torch.cuda.is_available():  # the actor was given a GPU (index.gpus_per_actor): the heads run there
            for r in self.rankers.values():
                if isinstance(r, HeadRanker):
                    r.to("cuda")
        self.labeler, self.out_uri = labeler, out_uri
        self.dtype = np.float32 if dtype == "f32" else np.float16

    def __call__(self, batch: pa.Table) -> pa.Table:
        import uuid

        products = Products.from_table(batch)
        test = np.array([self.labeler.split(p, path) == "test" for p, path in zip(products.ids, products.paths)],
                        dtype=bool)
        out = batch.select(ROW_COLUMNS).append_column("is_test", pa.array(test))
        for g, ranker in self.rankers.items():
            v = np.asarray(ranker.product_vectors(products), dtype=self.dtype)
            out = out.append_column(f"v:{g}", vector_column(v))
        name = f"{uuid.uuid4().hex}.parquet"  # a retried block writes a new file; only the returned ones are read
        storage.write_parquet(storage.join(self.out_uri, name), out)
        return pa.table({"file": [name], "rows": [batch.num_rows], "test_rows": [int(test.sum())],
                         "first_id": [str(products.ids[0]) if len(products) else ""]})


def shard_count(total: int, shard_rows: int, parallel: int = 1) -> int:
    """Shards for ``total`` rows: as few of at most ``shard_rows`` as hold them, and when that takes more than one
    round of ``parallel`` shard tasks (those that run at once), a multiple of ``parallel``, so that no core idles
    through a last round of fewer shards (5 shards on 2 cores run as 2 + 2 + 1; 6 as 2 + 2 + 2, each a sixth
    smaller). Fewer shards than ``parallel`` stay as they are: a query walks every shard."""
    k = max(1, -(-total // shard_rows))
    return k if k <= parallel else -(-k // parallel) * parallel


def plan_shards(files: list[tuple[str, int]], shard_rows: int, parallel: int = 1) -> list[list[tuple[str, int, int]]]:
    """Cut files of (name, rows) in this order into ``shard_count`` shards of equal size (± 1 row's worth of
    rounding): each shard is a list of (file, start, stop) slices, rows counted within the file."""
    total = sum(rows for _, rows in files)
    if total:
        shard_rows = -(-total // shard_count(total, shard_rows, parallel))  # ceil(total / number of shards)
    shards: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    room = shard_rows
    for name, rows in files:
        start = 0
        while start < rows:
            take = min(room, rows - start)
            current.append((name, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                shards.append(current)
                current, room = [], shard_rows
    if current:
        shards.append(current)
    return shards


def _build_shard(scope_uri: str, vectors_uri: str, slices: list[tuple[str, int, int]], groups: dict[str, int],
                 shard_no: int, test_only: bool, ic) -> dict[str, dict]:
    """Ray task: one shard per group from its own slices of the vectors files, read one file at a time."""
    writer = ShardWriter(scope_uri, groups, "shard", ic.dtype, ic.connectivity, ic.expansion_add,
                         shard_no=shard_no, threads=ic.build_threads)
    for name, start, stop in slices:
        t = read_table(storage.join(vectors_uri, name))
        if test_only:
            t = t.filter(t.column("is_test"))
        t = t.slice(start, stop - start)
        writer.add(t.select(ROW_COLUMNS), {g: vectors(t.column(f"v:{g}")) for g in groups})
        del t
    writer.flush()
    return {g: e[0] for g, e in writer.entries.items()}


def vector_dims(workdir: str, model: str, setting: str | None) -> int:
    """Width of a model's product vectors, read from the features' schema or the checkpoint (no vectors loaded)."""
    spec = REGISTRY[model]
    if spec.trained:
        from clipita.checkpoint import load_metadata_config  # torch: loaded only where heads run

        return int(load_metadata_config(spec.checkpoint(workdir, setting))["output_dim"])
    return vector_width(workdir, COLUMNS[spec.reads[0]])


def rows_per_shard(ic, dims) -> int:
    """Products per shard: what fits ``index.builder_mb`` with every model's vectors and graph, both scopes open."""
    per_row = sum(d * DTYPE_BYTES[ic.dtype] + GRAPH_BYTES for d in dims)
    return max(100, ic.builder_mb * 2**20 // (2 * per_row))


def build_indexes(workdir: str, cfg, log=print) -> dict:
    """jobs.index: every dense model's product vectors, for the test split (evaluation) and all products
    (serving), into sharded USearch indexes. Returns the stats also written to index/stats.json.

    Two passes, so that no stage waits on a slower one: a Ray Data pass writes every block's vectors to files
    under index/_vectors (the heads run once per product), then one Ray task per shard builds it from its own
    slices of those files. The driver holds the list of files and the shard plan."""
    import ray

    import ray.data

    t0 = time.time()
    ic = cfg.index
    workdir = storage.absolute(workdir)
    labeler = labeler_for(workdir, cfg.data)
    groups = dense_groups(workdir, SETTINGS)
    dims = {REGISTRY[m].index_group(s): vector_dims(workdir, m, s) for m, s in groups}
    shard_rows = rows_per_shard(ic, dims.values())
    log(f"index: {len(groups)} models x 2 scopes ({', '.join(dims)}), shards of at most {shard_rows:,} products "
        f"({ic.dtype})")
    root = index_dir(workdir)
    fs, path = storage.filesystem(root)
    if fs.exists(path):  # a rebuild replaces everything: shards of an older run would not match the new rows
        fs.rm(path, recursive=True)
    vectors_uri = storage.join(root, "_vectors")

    ds = products_dataset(FeatureSource(product_files(workdir)), cfg.data.stream_mb).map_batches(
        ProductVectors, fn_constructor_args=(workdir, groups, labeler, vectors_uri, ic.dtype), batch_format="pyarrow",
        batch_size=ic.batch_size, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=ic.vector_actors),
        num_cpus=0.5, num_gpus=ic.gpus_per_actor or None)
    files, written, every = [], 0, Every(30)
    for f in ds.iter_rows():
        files.append(f)
        written += f["rows"]
        if every():
            log(f"index: vectors of {written:,} products written ({time.time() - t0:.0f} s)")
    files.sort(key=lambda f: (f["first_id"], f["file"]))  # a stable order: the same rows give the same shards
    t1 = time.time()
    log(f"index: {written:,} products' vectors in {len(files)} files ({t1 - t0:.0f} s)")

    parallel = ic.shards or max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, ic.build_threads))
    plans = [(scope, no, slices) for scope in SCOPES
             for no, slices in enumerate(plan_shards([(f["file"], f["rows" if scope == "all" else "test_rows"])
                                                      for f in files], shard_rows, parallel))]
    task = ray.remote(num_cpus=max(1, ic.build_threads))(_build_shard)
    pending, entries, started, every = {}, {scope: {g: [] for g in dims} for scope in SCOPES}, 0, Every(30)
    while started < len(plans) or pending:
        while started < len(plans) and (not ic.shards or len(pending) < ic.shards):
            scope, no, slices = plans[started]
            ref = task.remote(storage.join(root, scope), vectors_uri, slices, dims, no, scope == "test", ic)
            pending[ref], started = scope, started + 1
        done, _ = ray.wait(list(pending), num_returns=1)
        scope = pending.pop(done[0])
        for g, entry in ray.get(done[0]).items():
            entries[scope][g].append(entry)
        finished = started - len(pending)
        if every(force=finished == len(plans)):
            log(f"index: {finished}/{len(plans)} shards built ({time.time() - t1:.0f} s)")
    fs.rm(storage.filesystem(vectors_uri)[1], recursive=True)

    built = []
    for scope in SCOPES:
        # what a reader of the index must search with to get what jobs.evaluate measured (serve reads them)
        meta = {REGISTRY[m].index_group(s): {"model": m, "setting": s, "scope": scope,
                                             "expansion_search": ic.expansion_search,
                                             "query_text": cfg.data.query_text} for m, s in groups}
        for g, manifest in write_manifests(storage.join(root, scope), dims, entries[scope], meta, ic.dtype).items():
            built.append({"group": g, "scope": scope, "count": manifest["count"], "shards": len(manifest["shards"])})
        log(f"index: {scope}: {built[-1]['count']:,} products in {built[-1]['shards']} shards per model")
    stats = {"stage": "index", "groups": built, "seconds": round(time.time() - t0, 2), "dtype": ic.dtype,
             "shard_rows": shard_rows, "vector_seconds": round(t1 - t0, 2)}
    storage.write_json(stage_stats(workdir, "index"), stats)
    return stats
