"""Training throughput: ``training.train`` (what jobs.train runs: Ray Train, TorchTrainer) against a bare
single-process torch loop (ClipIta + ContrastiveLoss + AdamW, ``model.train_step``) over the same features, the
same batches and the same epochs, and the scaling of 2 workers x B against 1 x 2B and 1 x B.

    python benchmarks/train.py                                    # 20,000 random products, 4 epochs, B = 128
    python benchmarks/train.py --products 40000 --epochs 5 --job "train.workers=1,bench.omp_threads=2"
    python benchmarks/train.py --gpu --products 200000 --batch 1024   # GPU machine: train.use_gpu, bare on cuda
    python benchmarks/train.py --bare-threads 0 --job "" --job "train.workers=0" --rounds 4  # the 0.9x line

Features are random unit vectors of the production widths (CLIP ViT-B/32 image 512, MPNet 768 for title,
attributes and category names; ``--image-dim``/``--text-dim``) over the synthetic category tree, written into a
scratch workdir's ``features/`` with ``embed.write_part``; throughput does not depend on their values. Runs use
the ``specific`` setting (``train.batch_size`` = B) and the CLIP-ITA variant.

Rows: bare (B and 2B, each with torch's default threads and with 1 thread: ``--bare-threads``), then job runs
(``--job``: comma-separated overrides; default 0 x B (local mode, in the driver), 1 x B, 1 x B with 1 torch
thread, 1 x 2B, 2 x B). Benchmark keys in a ``--job``: ``bench.batch=N`` (per-worker batch),
``bench.ray_cpus=N`` (``ray.init(num_cpus=N)``), ``bench.omp_threads=N`` (OMP_NUM_THREADS of the Ray workers;
a worker sets its torch threads itself, ``train.torch_threads``). The bare loop trains the job's heads
(``training.head_config``: the recipe's) with its loss, KgCoOp term included. Ray starts afresh for each
job run, untimed. ``samples/s`` = global samples per second of the training steps alone (the job's own
``curve.json`` ``samples_per_s``), the best epoch after the first (warm-up; every epoch is listed); ``other s`` =
the rest of the job's wall time: Ray Train start, dataset loading, validation loss and checkpoints every epoch.
``--rounds N`` repeats the bare and job rows N times (every other round the jobs first) and compares each job with
the bare rows of its own round: on a shared machine a single pair is noise (0.78-1.06x in three runs here).

Prints the machine, the date and one markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from clipita import storage  # noqa: E402
from clipita import workdir as workdir_layout  # noqa: E402
from clipita.config import ConfigError, load_config  # noqa: E402
from clipita.features import labels_for, load_categories, load_products  # noqa: E402
from clipita.sources.synth import CATEGORY_PATHS  # noqa: E402
from clipita.stages import embed  # noqa: E402
from clipita.stages import train as training  # noqa: E402
from clipita.tree import CategoryTree  # noqa: E402
from clipita.vectors import vector_column  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared machine.py beside this script
from machine import cpu, torch_device  # noqa: E402

from clipita.runtime import parse_overrides  # noqa: E402

GOAL = 0.9  # the goal: the 1-worker job reaches 0.9x the bare loop
VARIANT, SETTING = "ita", "specific"
BENCH_KEYS = ("bench.batch", "bench.ray_cpus", "bench.omp_threads")


def machine() -> str:
    return f"{cpu()}, {torch_device()}"



def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_random_features(workdir: str, n: int, image_dim: int, text_dim: int, part_rows: int = 4096) -> None:
    """features/products/*.parquet (through embed.write_part, as jobs.embed writes them) and
    features/categories.parquet (the columns features.load_categories reads) of random unit vectors."""
    rng = np.random.default_rng(0)
    paths = [list(CATEGORY_PATHS[i]) for i in rng.integers(0, len(CATEGORY_PATHS), n)]
    for start in range(0, n, part_rows):
        stop = min(n, start + part_rows)
        k = stop - start
        rows = pa.table({
            "product_id": [f"P{i:07d}" for i in range(start, stop)], "title": [""] * k, "attributes": [[]] * k,
            "category_path": paths[start:stop], "image": [""] * k, "part": [""] * k, "reason": [""] * k,
            "source": [""] * k,
        }, schema=embed.ROW_SCHEMA)
        for name, d in (("image_emb", image_dim), ("title_emb", text_dim), ("attr_emb", text_dim)):
            rows = rows.append_column(name, vector_column(_unit(rng, k, d).astype(np.float16)))
        embed.write_part(workdir, f"f00000-r{start:09d}", rows)
    tree = CategoryTree(paths)
    ids = sorted(tree.nodes)
    table = pa.table({"category": ids, "name": [c.rsplit(" > ", 1)[-1] for c in ids],
                      "depth": [tree.depth(c) for c in ids], "parent": [tree.parent(c) for c in ids],
                      "products": [tree.nodes[c].products for c in ids],
                      **{f"{kind}_{mode}": vector_column(_unit(rng, len(ids), text_dim if kind == "text" else
                                                               image_dim).astype(np.float16))
                         for kind in ("text", "clip") for mode in ("name", "path")}})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(workdir_layout.categories_file(workdir), sink.getvalue().to_pybytes())


def steady(rates: list[float]) -> float:
    """The best epoch after the first (the first pays allocation and warm-up). Best, not median: on a shared
    machine an epoch of two torch threads now and then runs 3-4x slower when another process takes a core."""
    return float(max(rates[1:] if len(rates) > 1 else rates))


# --------------------------------------------------------------------------------------------- the two runners

def run_bare(workdir: str, cfg, batch: int, device: str, threads: int) -> dict:
    """The job's epoch loop without Ray: same arrays, permutation, model, loss, optimizer and train_step."""
    from clipita.loss import ContrastiveLoss
    from clipita.model import ClipIta, make_optimizer, train_step

    tc = cfg.train
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    t0 = time.perf_counter()
    products, categories = load_products(workdir), load_categories(workdir)
    labels = labels_for(products, cfg.data)
    mask = labels.split == "train"
    lab = labels.by_setting[SETTING][mask]
    data = {"image": products.image[mask], "title": products.title[mask], "attributes": products.attributes[mask],
            "category": categories.text[cfg.data.query_text][categories.index(lab)],
            "label": np.unique(lab, return_inverse=True)[1].astype(np.int64)}
    torch.manual_seed(tc.seed)
    head = training.head_config(tc, VARIANT, products.image.shape[1], products.title.shape[1])  # the job's heads
    model = ClipIta(head).to(device)
    kg_weight = tc.kg_weight if head.residual else 0.0
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay)
    loss_fn = ContrastiveLoss(tc.lam, tc.label_mask, gather=False)
    autocast = torch.bfloat16 if device == "cuda" else None
    n = len(data["label"])
    rates, train_seconds = [], 0.0
    for epoch in range(tc.epochs):
        start = time.perf_counter()
        perm = np.random.default_rng([tc.seed, epoch]).permutation(n)
        steps = n // batch
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            train_step(model, loss_fn, optimizer, {k: torch.from_numpy(np.ascontiguousarray(v[idx]))
                                                   for k, v in data.items()}, autocast_dtype=autocast,
                       kg_weight=kg_weight)
        seconds = time.perf_counter() - start
        train_seconds += seconds
        rates.append(steps * batch / seconds)
    wall = time.perf_counter() - t0
    torch.set_num_threads(default_threads)
    return {"rates": rates, "wall": wall, "other": wall - train_seconds, "n": n}


def run_job(workdir: str, cfg, ray_cpus: int, omp_threads: int | None) -> dict:
    """training.train in a fresh local Ray (started and stopped outside the timed span)."""
    import ray

    env = {"OMP_NUM_THREADS": str(omp_threads)} if omp_threads else {}
    ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env} if env else None)
    shutil.rmtree(storage.join(workdir, "checkpoints"), ignore_errors=True)
    try:
        t0 = time.perf_counter()
        stats = training.train(workdir, VARIANT, SETTING, cfg, log=lambda *_: None)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    history = storage.read_json(storage.join(workdir_layout.run_dir(workdir, VARIANT, SETTING), "curve.json"))
    shutil.rmtree(storage.join(workdir, "checkpoints"), ignore_errors=True)
    return {"rates": [h["samples_per_s"] for h in history], "wall": wall,
            "other": wall - sum(h["seconds"] for h in history), "n": stats["train_products"]}


# --------------------------------------------------------------------------------------------------- main

DEFAULT_JOBS = ("train.workers=0", "train.workers=1", "train.workers=1,train.torch_threads=1",
                "train.workers=1,bench.batch=2B", "train.workers=2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", default="configs/offline.yaml", help="clipita config (its train: section)")
    p.add_argument("--products", type=int, default=20_000,
                   help="random products (the train split of the specific setting is used; default 20,000)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (default 4; the first is warm-up)")
    p.add_argument("--batch", type=int, default=128, help="B, per-worker batch (default 128, the paper's)")
    p.add_argument("--image-dim", type=int, default=512, help="image feature width (default 512, ViT-B/32)")
    p.add_argument("--text-dim", type=int, default=768, help="text feature width (default 768, MPNet)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every run (repeatable)")
    p.add_argument("--job", action="append", metavar="K=V,K=V",
                   help=f"one job run (overrides; bench.batch=2B doubles B); default: {' | '.join(DEFAULT_JOBS)}")
    p.add_argument("--bare-threads", default="0,1",
                   help="torch threads of the bare loop, one row each per batch; 0 = torch's default (default 0,1)")
    p.add_argument("--gpu", action="store_true", help="train.use_gpu=true for the job, cuda for the bare loop")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat bare and job rows this many times, every other round jobs first; the goal line "
                        "takes the median of the rounds' ratios (default 1)")
    p.add_argument("--scratch", help="workdir for the features (default: a new temp folder, removed)")
    args = p.parse_args()
    try:
        base = {**parse_overrides(args.set), "train.epochs": str(args.epochs)}
        if args.gpu:
            base["train.use_gpu"] = "true"
        jobs = [parse_overrides([kv for kv in j.split(",") if kv]) for j in (args.job or DEFAULT_JOBS)]
        bare_cfg = load_config(args.config, base)
        runs = []
        for j in jobs:
            batch = j.get("bench.batch", str(args.batch)).replace("2B", str(2 * args.batch))
            cfg = load_config(args.config, {**base, **{k: v for k, v in j.items() if k not in BENCH_KEYS},
                                            "train.batch_size": batch})
            ray_cpus = int(j.get("bench.ray_cpus", os.cpu_count() or 1))
            omp = int(j["bench.omp_threads"]) if "bench.omp_threads" in j else None
            extra = ",".join(f"{k}={v}" for k, v in j.items() if k not in ("train.workers", "bench.batch"))
            runs.append((cfg, int(batch), ray_cpus, omp, extra))
        if args.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {args.rounds}")
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    scratch = args.scratch or tempfile.mkdtemp(prefix="clipita-bench-train-")
    device = "cuda" if args.gpu else "cpu"
    rows = []  # (runner, workers, batch, settings, result)
    load_before = os.getloadavg()
    try:
        write_random_features(scratch, args.products, args.image_dim, args.text_dim)
        for rnd in range(args.rounds):  # odd rounds run the jobs first: a machine that drifts favours neither side
            order = ("bare", "job") if rnd % 2 == 0 else ("job", "bare")
            for who in order:
                if who == "bare":
                    for b in (args.batch, 2 * args.batch):
                        for threads in [int(t) for t in args.bare_threads.split(",") if t]:
                            result = run_bare(scratch, bare_cfg, b, device, threads)
                            rows.append((rnd, "bare", 1, b, f"1 process, torch {threads or torch.get_num_threads()} "
                                         f"threads", result))
                            print(f"# round {rnd + 1}: bare 1 x {b}, {threads} threads: {result['wall']:.1f} s",
                                  file=sys.stderr, flush=True)
                    continue
                for cfg, batch, ray_cpus, omp, extra in runs:
                    result = run_job(scratch, cfg, ray_cpus, omp)
                    rows.append((rnd, "job", cfg.train.workers, batch, extra or "as configured", result))
                    print(f"# round {rnd + 1}: job {cfg.train.workers} x {batch}: {result['wall']:.1f} s",
                          file=sys.stderr, flush=True)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {machine()}")
    print(f"command: python benchmarks/train.py {' '.join(sys.argv[1:])}")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          f"(above the core count, other processes shared the machine)")
    tc = bare_cfg.train
    print(f"CLIP-ITA heads {args.image_dim}+2x{args.text_dim} -> {tc.hidden_dim} -> {tc.output_dim}, "
          f"{rows[0][-1]['n']:,} train products ({SETTING}), {args.epochs} epochs, AdamW; ray_cpus default "
          f"{os.cpu_count()}")
    print()
    print("| round | runner | workers x batch | global batch | settings | samples/s (steady) | x bare (same global "
          "batch) | x bare 1xB | samples/s per epoch | wall s | other s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    # The baseline of a global batch is its best bare row of the same round: the job has to match the single
    # process at its best thread count (on a loaded machine one torch thread can beat two).
    bare: dict[tuple[int, int], float] = {}
    for rnd, who, _, b, _, r in rows:
        if who == "bare":
            bare[rnd, b] = max(bare.get((rnd, b), 0.0), steady(r["rates"]))
    ratios: dict[tuple[int, str], list[float]] = {}
    for rnd, who, workers, batch, label, r in rows:
        rate = steady(r["rates"])
        global_batch = batch * max(1, workers)
        same = f"{rate / bare[rnd, global_batch]:.2f}" if (rnd, global_batch) in bare else "-"
        shape = f"{workers} x {batch}" + (" (local mode)" if who == "job" and workers == 0 else "")
        epochs = " ".join(f"{x:,.0f}" for x in r["rates"])
        print(f"| {rnd + 1} | {who} | {shape} | {global_batch} | {label} | {rate:,.0f} | {same} | "
              f"{rate / bare[rnd, args.batch]:.2f} | {epochs} | {r['wall']:.1f} | {r['other']:.1f} |")
        if who == "job" and workers <= 1 and batch == args.batch:
            ratios.setdefault((workers, label), []).append(rate / bare[rnd, args.batch])
    print()
    print("samples/s (steady): global samples/s of the training steps, the best epoch after the first (all epochs "
          "listed; the job's from its curve.json); x bare: against the best bare row of the same round and global "
          "batch, and of 1 x B. other s: wall minus training steps (job: Ray Train start, data, val loss, "
          "checkpoints; bare: loading).")
    for (workers, label), rs in ratios.items():
        ratio = float(np.median(rs))
        mode = "1-worker job" if workers == 1 else "local-mode job"
        rounds = f" (median of rounds: {', '.join(f'{x:.2f}' for x in rs)})" if len(rs) > 1 else ""
        print(f"- {mode} ({label}): {ratio:.2f}x the best bare loop{rounds} "
              f"({'meets' if ratio >= GOAL else 'misses'} the {GOAL}x goal)")


if __name__ == "__main__":
    main()
