"""jobs.index, the build stage: every dense model's product vectors, for the test split (evaluation) and all
products (serving), into sharded USearch indexes (the format and its search: clipita/index.py).

Two passes, so that no stage waits on a slower one. A Ray Data pass reads the features and an actor stage
(``ProductVectors``, GPU when configured) applies every model to each block and writes it to a file under
``index/_vectors/``. Then one Ray task per shard builds it from its own slices of those files (shards of at most the
rows that fit ``index.builder_mb``) and writes it. The driver holds the list of files and the shard plan: no vector
and no product passes through it.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from clipita import storage
from clipita.features import COLUMNS, Products, labeler_for, product_files, read_table, vector_width
from clipita.index import DTYPE_BYTES, GRAPH_BYTES, ROW_COLUMNS, SCOPES, ShardWriter, write_manifests
from clipita.models import DENSE, REGISTRY, TRAINED_MODELS
from clipita.rankers import HeadRanker, load_ranker
from clipita.runtime import Every
from clipita.streams import FeatureSource, products_dataset
from clipita.tree import SETTINGS
from clipita.vectors import vector_column, vectors
from clipita.workdir import index_dir, stage_stats


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
