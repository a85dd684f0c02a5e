"""Latency and throughput of the query endpoint (serve/app.py) under concurrent load, with and without
``@serve.batch`` on the CategoryEncoder, one run side by side, on loopback.

    python benchmarks/serve.py --workdir demo-workdir
    python benchmarks/serve.py --build /tmp/bench-serve --products 600      # synth -> embed -> train -> index first
    python benchmarks/serve.py --workdir demo-workdir --queries known --concurrency 1,32 --requests 4000
    python benchmarks/serve.py --workdir /tmp/clipita-scale/features-1000000 --queries known --setting specific \
        --encoders configs/offline.yaml                          # a features-only workdir (jobs.synth) at 1M

Each mode starts the application (one replica per deployment), warms it up, then sends ``--requests`` GET /search
from ``--concurrency`` clients (asyncio, one process) and records each response time. ``free`` queries are unique
texts outside the category tree, so every request runs the sentence encoder; ``known`` queries are tree
categories (stored embeddings: only the head and the index search run). Prints the machine, the date and one
markdown table (p50 / p99 ms, queries/s, non-200 responses) for benchmarks/RESULTS.md, and the peak memory of
each replica process (RSS, and its anonymous part: what the replica holds beyond the memory-mapped shards).

A features-only workdir (``jobs.synth --features-only``) records the production encoders, which cannot be loaded
without a model hub: ``--encoders FILE`` records that config's encoders for the run instead (restored after), so
the encoder replica starts; only ``--queries known`` (stored category embeddings) is meaningful then.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import socket
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# `python benchmarks/serve.py` puts benchmarks/ first on sys.path, where this file would shadow the `serve` package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import numpy as np  # noqa: E402

sys.path.insert(0, HERE)  # the shared machine.py beside this script
from machine import cpu, torch_device  # noqa: E402

sys.path.remove(HERE)  # and out again, or this file shadows the serve package
WARMUP = 50  # requests per mode before timing (first calls load lazily-initialised kernels)
WORDS = ("vintage", "waterproof", "kids", "organic", "wireless", "leather", "compact", "summer", "gift", "travel")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_workdir(out: str, products: int, config: str) -> str:
    """A small workdir for the benchmark: synthetic catalogue -> embed -> CLIP-ITA (setting all) -> index."""
    from clipita.config import load_config
    from clipita.sources.synth import write_catalog
    from clipita.stages.embed import run_embed
    from clipita.stages.index import build_indexes
    from clipita.stages.train import train

    workdir = os.path.join(out, "work")
    if os.path.exists(os.path.join(workdir, "index", "stats.json")):
        return workdir
    # a few in-process epochs with small batches: the benchmark times serving, not retrieval quality
    cfg = load_config(config, {"train.workers": 0, "train.epochs": 3, "train.batch_size": 32})
    quiet = lambda *_: None  # noqa: E731
    write_catalog(os.path.join(out, "catalog"), products, seed=0, workers=1, progress=False)
    run_embed(os.path.join(out, "catalog"), workdir, cfg, log=quiet)
    train(workdir, "ita", "all", cfg, log=quiet)
    build_indexes(workdir, cfg, log=quiet)
    return workdir


def query_texts(workdir: str, kind: str, n: int) -> list[str]:
    from clipita.features import load_categories

    names = sorted(set(load_categories(workdir).names))
    rng = np.random.default_rng(0)
    if kind == "known":
        return [names[i] for i in rng.integers(0, len(names), n)]
    # unique texts: a word, a category name and a counter, so no two requests embed the same string
    return [f"{WORDS[i % len(WORDS)]} {names[j]} {i}" for i, j in enumerate(rng.integers(0, len(names), n))]


async def load(url: str, texts: list[str], k: int, model: str, concurrency: int) -> tuple[list[float], int, float]:
    """(latencies in s, non-200 count, wall seconds) of GET /search for every text, ``concurrency`` at a time."""
    import aiohttp

    latencies: list[float] = []
    failed = 0
    queue = iter(texts)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal failed
        for text in queue:  # a shared iterator: each client takes the next text when it is free
            start = time.perf_counter()
            async with session.get(url, params={"category": text, "k": str(k), "model": model}) as r:
                await r.read()
                failed += r.status != 200
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, failed, wall


def replica_memory() -> dict[str, tuple[int, int]]:
    """(RSS, anonymous RSS) in bytes of each Serve replica process of the app, by deployment (Linux /proc)."""
    out: dict[str, tuple[int, int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read().split(b"\0")[0].decode(errors="replace")
            if not name.startswith("ray::ServeReplica:bench:"):
                continue
            with open(f"/proc/{pid}/status") as f:
                kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if v.strip().endswith("kB")}
        except (OSError, ValueError):
            continue
        deployment = name.split(":")[2].split()[0].split(".")[0]
        out[deployment] = max(out.get(deployment, (0, 0)), (kb.get("VmRSS", 0) * 1024, kb.get("RssAnon", 0) * 1024))
    return out


def machine() -> str:
    return f"{cpu()}, Python {platform.python_version()}"



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", help="an existing workdir with index/all/ (jobs.index)")
    where.add_argument("--build", metavar="DIR", help="build a synthetic workdir under DIR first (reused if there)")
    p.add_argument("--products", type=int, default=600, help="catalogue size for --build (default 600)")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "offline.yaml"), help="config for --build")
    p.add_argument("--requests", type=int, default=1000, help="timed requests per row (default 1000)")
    p.add_argument("--concurrency", default="1,16", help="comma-separated client counts (default 1,16)")
    p.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--model", default="clip-ita", help="model to query (default clip-ita)")
    p.add_argument("--queries", choices=("free", "known"), default="free", help="query texts (default free)")
    p.add_argument("--batch-size", type=int, default=32, help="max_batch_size with batching (default 32)")
    p.add_argument("--setting", default="all", help="whose trained heads the app serves (default all)")
    p.add_argument("--encoders", help="config whose encoders the run records in the workdir (features-only)")
    args = p.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",") if c.strip().isdigit()]
    if len(concurrency) != len([c for c in args.concurrency.split(",") if c]) or args.requests < 1 or args.requests > 100_000 or not concurrency or min(concurrency) < 1:
        sys.exit("serve benchmark: --requests must be in 1..100000 and --concurrency positive integers")

    import ray
    from ray import serve

    from clipita.storage import StorageError
    from serve.app import app

    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)

    def application(batching: bool) -> serve.Application:
        return app({"workdir": workdir, "model": args.model, "batching": batching, "setting": args.setting,
                    "max_batch_size": args.batch_size})

    recorded = os.path.join(args.workdir or "", "features", "encoders.json")
    original = open(recorded).read() if args.encoders and os.path.exists(recorded) else None
    if original is not None:
        import dataclasses
        import json

        from clipita.config import load_config

        with open(recorded, "w") as f:
            json.dump(dataclasses.asdict(load_config(args.encoders).encoders), f)

    try:
        workdir = args.workdir or build_workdir(args.build, args.products, args.config)
        texts = query_texts(workdir, args.queries, WARMUP + args.requests * len(concurrency))
        application(True)  # checks the workdir and arguments before any replica starts
    except (ValueError, FileNotFoundError, StorageError) as e:  # bad arguments or inputs: one line, no trace
        ray.shutdown()
        sys.exit(f"serve benchmark: error: {str(e).splitlines()[0]}")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/search"
    rows, memory = [], {}
    try:
        for batching in (True, False):
            serve.run(application(batching), name="bench", route_prefix="/")
            asyncio.run(load(url, texts[:WARMUP], args.k, args.model, max(concurrency)))
            offset = WARMUP
            for c in concurrency:
                batch = texts[offset:offset + args.requests]
                offset += args.requests
                lat, failed, wall = asyncio.run(load(url, batch, args.k, args.model, c))
                ms = np.array(lat) * 1000
                rows.append((f"on (max {args.batch_size})" if batching else "off", c, len(lat), failed,
                             np.percentile(ms, 50), np.percentile(ms, 99), len(lat) / wall))
            memory.update({k: max(v, memory.get(k, (0, 0))) for k, v in replica_memory().items()})
            serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
        if original is not None:
            with open(recorded, "w") as f:
                f.write(original)

    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {machine()}")
    print(f"command: python benchmarks/serve.py {' '.join(sys.argv[1:])}")
    print(f"workdir: {workdir}; model {args.model}, k {args.k}, {args.queries} queries; "
          "1 SearchApi + 1 CategoryEncoder replica (1 CPU each), clients in the same machine")
    print()
    print("| @serve.batch | clients | requests | non-200 | p50 ms | p99 ms | queries/s |")
    print("|---|---|---|---|---|---|---|")
    for mode, c, n, failed, p50, p99, qps in rows:
        print(f"| {mode} | {c} | {n} | {failed} | {p50:.1f} | {p99:.1f} | {qps:.1f} |")
    print()
    for name, (rss, anon) in sorted(memory.items()):
        print(f"replica {name}: RSS {rss / 2**30:.2f} GB, anonymous {anon / 2**30:.2f} GB")


if __name__ == "__main__":
    main()
