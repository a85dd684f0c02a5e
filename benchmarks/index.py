"""Vector search: build time, queries/s and recall@10 of USearch HNSW (clipita's ``build_group`` shards built in
Ray tasks + ``ShardedIndex.search``, and a plain single-shard ``usearch.index.Index``) against exact numpy search
(matmul + argpartition, and clipita's ``metrics.rank_scores``) and faiss-cpu ``IndexHNSWFlat``, on the same
vectors, queries and machine, in one run.

    python benchmarks/index.py                                    # 100k x 512, random and clustered (~5 min)
    python benchmarks/index.py --sizes 1000000 --data clustered --queries 500   # 1M: ~10 min per HNSW build
    python benchmarks/index.py --data clustered --methods exact,clipita --shards 1 --dtypes f32,f16,i8

Vectors are unit-norm float32, cosine similarity: ``random`` (uniform on the sphere: no structure, the hard case
for graph indexes) and ``clustered`` (a Gaussian mixture: ``--clusters`` centres, each point its centre plus noise
of norm ~``--spread``, normalised; closer to real embeddings, which group by category). Queries are drawn from the
same distribution and are not in the index. Both HNSW libraries use M = 16 (``--connectivity``) and ef_construction
= 64 (``--expansion-add``, index.expansion_add); each row searches with the ef of its row (faiss efSearch, USearch
expansion_search). Queries are searched in one batch per method, on all cores (USearch ``threads=0``, faiss and
BLAS OpenMP), so queries/s is throughput, not single-query latency. Build time of clipita's index includes moving
the vectors to the Ray tasks, serialising each shard, its SHA-256, the ids parquet and the manifest.

The faiss rows need ``pip install faiss-cpu`` (not a clipita dependency; 1.15.1 in benchmarks/history/index.md).

Prints the machine, the date and one markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared machine.py beside this script
from machine import cpu, torch_device  # noqa: E402

K = 10  # recall@K
EXACT_BLOCK = 64  # queries per exact matmul block (64 x 1M float32 scores = 256 MB)


def machine() -> str:
    import faiss
    import usearch

    return f"{cpu()}; numpy {np.__version__}, usearch {usearch.__version__}, faiss {faiss.__version__}"



# ------------------------------------------------------------------------------------------------------ data

def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def vectors(kind: str, n: int, d: int, seed: int, clusters: int, spread: float) -> np.ndarray:
    """n unit vectors; the same centres for every seed (index and queries share the mixture)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    centres = _normalise(np.random.default_rng(12345).standard_normal((clusters, d), dtype=np.float32))
    for s in range(0, n, 100_000):  # in blocks: 1M x 512 float64 temporaries would need 4 GB more
        m = min(n, s + 100_000) - s
        x = rng.standard_normal((m, d), dtype=np.float32)
        if kind == "clustered":
            x *= spread / np.sqrt(d)
            x += centres[rng.integers(0, clusters, m)]
        out[s:s + m] = _normalise(x)
    return out


# --------------------------------------------------------------------------------------------------- methods

def exact_numpy(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Top-k by inner product: matmul + argpartition + sort of the k, per block of queries."""
    out = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), EXACT_BLOCK):
        scores = queries[s:s + EXACT_BLOCK] @ base.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[s:s + EXACT_BLOCK] = np.take_along_axis(top, order, axis=1)
    return out


def exact_rank_scores(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """clipita's exact ranking (metrics.rank_scores: tie-stable top-k) over the same matmul blocks."""
    from clipita.metrics import rank_scores

    return np.concatenate([rank_scores(queries[s:s + EXACT_BLOCK] @ base.T, k)
                           for s in range(0, len(queries), EXACT_BLOCK)])


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found.tolist(), truth.tolist())]))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def bench_usearch(base, queries, efs, args, dtype: str) -> list[tuple[str, float, int, float, np.ndarray]]:
    from usearch.index import Index

    from clipita.index import METRICS

    def build():  # the metric clipita stores this precision with (base rows are unit vectors already)
        index = Index(ndim=base.shape[1], metric=METRICS[dtype], dtype=dtype, connectivity=args.connectivity,
                      expansion_add=args.expansion_add)
        index.add(np.arange(len(base), dtype=np.uint64), base, threads=0)
        return index

    index, seconds = timed(build)
    rows = []
    for ef in efs:
        index.expansion_search = ef
        index.search(queries[:10], K, threads=0)  # warm-up
        m, qs = timed(lambda: index.search(queries, K, threads=0))
        rows.append((f"usearch Index, 1 shard, {dtype}, {METRICS[dtype]}", seconds, ef, qs, np.asarray(m.keys, np.int64)))
    return rows


def bench_clipita(base, queries, efs, args, folder: str, dtype: str) -> list[tuple[str, float, int, float,
                                                                                np.ndarray]]:
    from clipita.config import IndexConfig
    from clipita.index import ShardedIndex, build_group

    from clipita.stages.index import rows_per_shard, shard_count

    uri = os.path.join(folder, "clipita-index")
    ids = np.array([f"P{i:07d}" for i in range(len(base))], dtype=object)
    # jobs.index's shards: as many rows as fit index.builder_mb (one model), a multiple of the cores when more than
    # one; every core builds (a task per shard, cores / shards threads each when there are fewer shards than cores)
    shards = args.shards or shard_count(len(base), rows_per_shard(IndexConfig(dtype=dtype), [base.shape[1]]),
                                        os.cpu_count())
    threads = max(1, os.cpu_count() // shards)
    _, seconds = timed(lambda: build_group(uri, base, ids, {"model": "bench"}, shards, dtype,
                                           args.connectivity, args.expansion_add, threads))
    index = ShardedIndex(uri)
    rows = []
    for ef in efs:
        index.search(queries[:10], K, ef)  # warm-up (and sets ef on every shard)
        result, qs = timed(lambda: index.search(queries, K, ef))
        rows.append((f"clipita build_group + ShardedIndex, {shards} shards, {dtype}", seconds, ef, qs,
                     result.rows))
    del index
    shutil.rmtree(uri, ignore_errors=True)
    return rows


def bench_faiss(base, queries, efs, args) -> list[tuple[str, float, int, float, np.ndarray]]:
    import faiss

    def build():
        index = faiss.IndexHNSWFlat(base.shape[1], args.connectivity, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = args.expansion_add
        index.add(base)
        return index

    index, seconds = timed(build)
    rows = []
    for ef in efs:
        index.hnsw.efSearch = ef
        index.search(queries[:10], K)
        (_, found), qs = timed(lambda: index.search(queries, K))
        rows.append(("faiss IndexHNSWFlat, f32", seconds, ef, qs, found.astype(np.int64)))
    return rows


# ------------------------------------------------------------------------------------------------------ main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--sizes", default="100000", help="index sizes (default 100000; 1000000 takes ~10 min per "
                                                      "HNSW build here)")
    p.add_argument("--data", default="random,clustered", help="random,clustered (default both)")
    p.add_argument("--dim", type=int, default=512, help="vector width (default 512: CLIP ViT-B/32, the heads)")
    p.add_argument("--queries", type=int, default=1000, help="queries per (data, size) (default 1000)")
    p.add_argument("--ef", default="32,64,128,256",
                   help="search ef values, faiss and USearch alike (default 32,64,128,256; clipita's is 128, "
                        "index.expansion_search)")
    p.add_argument("--connectivity", type=int, default=16, help="HNSW M (default 16, index.connectivity)")
    p.add_argument("--expansion-add", type=int, default=64, help="ef_construction (default 64, index.expansion_add)")
    p.add_argument("--shards", type=int, default=0, help="clipita build_group shards, one single-threaded task "
                                                         "each (default 0: as jobs.index cuts them, by "
                                                         "index.builder_mb; fewer shards than cores get threads)")
    p.add_argument("--dtypes", default="f16", help="USearch stored precisions, one build each: f32,f16,i8 "
                                                    "(default f16, index.dtype)")
    p.add_argument("--clusters", type=int, default=1000, help="mixture components of clustered data (default 1000)")
    p.add_argument("--spread", type=float, default=0.7, help="noise norm around a centre (default 0.7: within-"
                                                             "cluster cosine ~0.67)")
    p.add_argument("--methods", default="exact,rank_scores,usearch,clipita,faiss",
                   help="subset to run (default all: exact,rank_scores,usearch,clipita,faiss)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    kinds = [k for k in args.data.split(",") if k]
    efs = [int(e) for e in args.ef.split(",") if e]
    methods = set(args.methods.split(","))
    dtypes = [d for d in args.dtypes.split(",") if d]
    if not set(dtypes) <= {"f32", "f16", "i8"}:
        sys.exit("error: --dtypes takes f32,f16,i8")
    if not set(kinds) <= {"random", "clustered"} or any(e < K for e in efs):
        sys.exit(f"error: --data takes random,clustered and every --ef must be >= {K}")
    folder = tempfile.mkdtemp(prefix="clipita-bench-index-")
    if "clipita" in methods:
        import ray

        # Before anything imports usearch: ray.init in a process that has loaded usearch aborts
        # (std::regex_error from mixed libstdc++ builds). Ray stays up, idle, for the whole run.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    table = []  # (data, n, method, build s, ef, qps, recall)
    load_before = os.getloadavg()
    try:
        for kind in kinds:
            for n in sizes:
                base = vectors(kind, n, args.dim, 1, args.clusters, args.spread)
                queries = vectors(kind, args.queries, args.dim, 2, args.clusters, args.spread)
                exact_numpy(base, queries[:EXACT_BLOCK], K)  # warm-up (BLAS threads, page faults)
                truth, seconds = timed(lambda: exact_numpy(base, queries, K))
                if "exact" in methods:
                    table.append((kind, n, "exact numpy (matmul + argpartition)", None, None,
                                  len(queries) / seconds, 1.0))
                if "rank_scores" in methods:
                    found, seconds = timed(lambda: exact_rank_scores(base, queries, K))
                    table.append((kind, n, "exact clipita rank_scores", None, None, len(queries) / seconds,
                                  recall(found, truth)))
                runs = [*(("usearch", lambda d=d: bench_usearch(base, queries, efs, args, d)) for d in dtypes),
                        *(("clipita", lambda d=d: bench_clipita(base, queries, efs, args, folder, d)) for d in dtypes),
                        ("faiss", lambda: bench_faiss(base, queries, efs, args))]
                for name, fn in runs:
                    if name in methods:
                        for method, build, ef, seconds, found in fn():
                            table.append((kind, n, method, build, ef, len(queries) / seconds, recall(found, truth)))
                        gc.collect()  # free the previous index before the next one is built
                        print(f"# {kind} {n:,}: {name} done", file=sys.stderr, flush=True)
                del base
                gc.collect()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if "clipita" in methods:
            ray.shutdown()

    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {machine()}")
    print(f"command: python benchmarks/index.py {' '.join(sys.argv[1:])}")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          f"(above the core count, other processes shared the machine)")
    print(f"{args.dim}-d unit vectors, cosine; {args.queries} queries (not in the index), one batch per method; "
          f"HNSW M={args.connectivity}, ef_construction={args.expansion_add}; clustered: {args.clusters} centres, "
          f"spread {args.spread}")
    print()
    print(f"| data | vectors | method | build s | ef | queries/s | x exact numpy | recall@{K} |")
    print("|---|---|---|---|---|---|---|---|")
    exact = {(d, n): qps for d, n, m, _, _, qps, _ in table if m.startswith("exact numpy")}
    for d, n, method, build, ef, qps, rec in table:
        ratio = f"{qps / exact[(d, n)]:.1f}" if (d, n) in exact else "-"
        print(f"| {d} | {n:,} | {method} | {'-' if build is None else f'{build:.1f}'} | {ef or '-'} | {qps:,.0f} | "
              f"{ratio} | {rec:.4f} |")


if __name__ == "__main__":
    main()
