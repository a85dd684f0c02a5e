"""Throughput of the embed stage: ``run_embed`` (Ray Data: read, decode, encode, write parts) against a bare
single-process loop over the same images with the same encoders (read bytes, ``load_image``, ``ImageEncoder``,
``TextEncoder`` on titles and attributes, in batches of ``embed.batch_size``; no Ray, no output).

    python benchmarks/embed.py                                   # offline config, 500 and 2,000 products
    python benchmarks/embed.py --sizes 2000 --job "" --job "embed.batch_size=256" \\
        --job "embed.cpus_per_actor=2,bench.ray_cpus=3"          # knobs side by side in one run
    python benchmarks/embed.py --sizes 2000 --bare-threads 0 --bare-image timm   # against timm's own model
    python benchmarks/embed.py --gpu --config configs/production.yaml --set encoders.image_pretrained= \\
        --sizes 5000,20000                                       # GPU machine: one GPU per encoder actor

Each ``--job`` is one job run per size (comma-separated overrides): config keys (``embed.batch_size=256``) and
two benchmark keys, ``bench.ray_cpus=N`` (``ray.init(num_cpus=N)``, default: all cores) and
``bench.omp_threads=N`` (OMP_NUM_THREADS of the Ray workers: torch's thread count in an encoder actor whose
``embed.cpus_per_actor`` is below 1, since clipita sets the threads itself from 1 up). Ray starts afresh for each
job run and its start (~5 s) is not timed; the actors' start (imports, model loads) is.

Start-up vs steady state: the job's encoder actors log when they were built and every batch they encode; the
driver's part writes and final category embedding are timed too. "steady" = images / (last part written - first
batch started): the whole pipeline once the encoders run, without actor start-up and category embedding; the bare
loop's steady rate leaves out its encoder loading. "encoder busy" < 100% means the encoders waited for input.
GPU anchor (PAPER.md): clip-retrieval embeds ~2,500 ViT-B/32 images/s per A100;
this job also runs the text encoder on titles and attributes.

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
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from clipita import storage  # noqa: E402
from clipita.config import ConfigError, load_config  # noqa: E402
from clipita.sources import synth  # noqa: E402
from clipita.stages import embed  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared machine.py beside this script
from machine import cpu, torch_device  # noqa: E402

from clipita.runtime import parse_overrides  # noqa: E402

GOAL = 0.9  # the goal: the job reaches 0.9x the bare loop's throughput
BENCH_KEYS = ("bench.ray_cpus", "bench.omp_threads")


def machine() -> str:
    return f"{cpu()}, {torch_device()}"



def catalogue(folder: str, n: int) -> str:
    """A synthetic catalogue of n products under folder, written once and reused."""
    out = os.path.join(folder, f"catalog-{n}")
    if not os.path.exists(os.path.join(out, "products.parquet")):
        synth.write_catalog(out, n, seed=0, progress=False)
    return out


# --------------------------------------------------------------------------------------------- the two runners

def timm_image_encoder(enc_cfg, size: int):
    """The bare timm loop's image encoder for ``pkg:`` weights: timm's own model (pooled, no head) with the package's
    tensors, normalised and L2-normalised as ImageEncoder does, with no open_clip in between."""
    import timm
    import torch

    from clipita import pretrained

    entry = pretrained.package_weights(enc_cfg.image_pretrained)
    model = timm.create_model(entry.timm_model, num_classes=0).eval()
    mapped = pretrained.efficientnet_to_timm(pretrained.read_state_dict(entry), [len(s) for s in model.blocks])
    model.load_state_dict({k: v for k, v in mapped.items() if not k.startswith("classifier.")})
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (entry.mean, entry.std))

    @torch.inference_mode()
    def encode(pixels: np.ndarray, batch: int) -> np.ndarray:
        assert pixels.shape[1:] == (size, size, 3)
        out = []
        for s in range(0, len(pixels), batch):  # the same forward size as ImageEncoder.encode
            x = torch.from_numpy(pixels[s:s + batch]).permute(0, 3, 1, 2).float().div(255)
            out.append(torch.nn.functional.normalize(model((x - mean) / std), dim=-1).numpy())
        return np.concatenate(out)

    return encode


def run_bare(root: str, cfg, threads: int, bare_image: str = "clipita") -> dict:
    """Single process, no Ray: the same per-product work as ReadParts + EmbedParts, batch by batch.
    Runs in a fresh process (bare_run), so its start-up pays the same imports as the job's actors.
    ``bare_image`` "timm": images through timm's model directly (``pkg:`` weights) instead of ImageEncoder."""
    t0 = time.perf_counter()
    import torch

    from clipita.encoders import ImageEncoder, TextEncoder, image_preprocess_spec, load_image

    if threads:
        torch.set_num_threads(threads)
    size = image_preprocess_spec(cfg.encoders)[0]
    text_enc = TextEncoder(cfg.encoders)
    encode_images = timm_image_encoder(cfg.encoders, size) if bare_image == "timm" else \
        ImageEncoder(cfg.encoders).encode
    rows = pq.read_table(os.path.join(root, "products.parquet"),
                         columns=["image", "title", "attributes"]).to_pylist()
    t1 = time.perf_counter()
    batch = cfg.embed.batch_size
    for s in range(0, len(rows), batch):
        chunk = rows[s:s + batch]
        pixels = []
        for r in chunk:
            with open(storage.resolve(root, r["image"]), "rb") as f:
                pixels.append(load_image(f.read(), size))
        encode_images(np.stack(pixels), cfg.embed.image_batch)
        text_enc.encode([r["title"] for r in chunk])
        text_enc.encode_attributes([r["attributes"] for r in chunk])
    t2 = time.perf_counter()
    return {"wall": t2 - t0, "images": len(rows), "ready": t1 - t0, "steady": len(rows) / (t2 - t1)}


def bare_run(root: str, cfg, threads: int, bare_image: str = "clipita") -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_bare, root, cfg, threads, bare_image).result()


class TimedEmbedder(embed.EmbedParts):
    """The job's encoder actor, logging when it was built and each batch (whole parts: encoded and written) it
    finished (wall-clock timestamps, one line each, to ``log_path`` on this machine). Defined in the benchmark, so
    Ray ships it by value."""

    log_path = ""

    def __init__(self, *args, **kwargs):
        start = time.time()  # the actor process has started and imported this class
        super().__init__(*args, **kwargs)
        self._write("init", start, time.time(), 0)

    def __call__(self, batch):
        start = time.time()
        out = super().__call__(batch)
        self._write("batch", start, time.time(), batch.num_rows)
        return out

    def _write(self, kind: str, start: float, stop: float, rows: int) -> None:
        with open(self.log_path, "a") as f:
            f.write(f"{kind} {start} {stop} {rows}\n")


def run_job(root: str, workdir: str, cfg, ray_cpus: int, omp_threads: int | None) -> dict:
    """run_embed in a fresh local Ray (started and stopped outside the timed span), with the encoder actor's
    timeline and the driver's part writes and category embedding timed."""
    import ray
    import ray.data

    env = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if omp_threads:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    ray.init(address="local", num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    ray.data.DataContext.get_current().enable_progress_bars = False
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    TimedEmbedder.log_path = os.path.join(workdir, "embedder-timeline.txt")
    # run_embed looks this name up in its module at call time, so replacing it there times the real run.
    original = embed.EmbedParts
    embed.EmbedParts = TimedEmbedder
    try:
        t0 = time.time()
        stats = embed.run_embed(root, workdir, cfg, log=lambda *_: None)
        wall = time.time() - t0
        with open(TimedEmbedder.log_path) as f:
            timeline = [(kind, float(a), float(b), int(n)) for kind, a, b, n in (line.split() for line in f)]
    finally:
        embed.EmbedParts = original
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    inits = [(a, b) for kind, a, b, _ in timeline if kind == "init"]
    batches = [(a, b) for kind, a, b, _ in timeline if kind == "batch"]
    first, last = min(a for a, _ in batches), max(b for _, b in batches)
    return {"wall": wall, "images": stats["embedded_this_run"], "categories": None,  # a task beside the stream
            "started": max(a for a, _ in inits) - t0, "ready": max(b for _, b in inits) - t0, "first_batch": first - t0,
            # the pipeline once encoding has begun: reads, encodes and part writes, to the last part written
            "steady": stats["embedded_this_run"] / (last - first),
            "busy": sum(b - a for a, b in batches) / (max(b for _, b in batches) - first) / len(inits)}


# --------------------------------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", default="configs/offline.yaml", help="clipita config (default configs/offline.yaml)")
    p.add_argument("--sizes", default="500,2000", help="catalogue sizes in products (default 500,2000)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every runner, e.g. embed.batch_size=128 (repeatable)")
    p.add_argument("--job", action="append", metavar="K=V,K=V",
                   help='one job variant: extra overrides ("" = as configured); repeatable (default: one, "")')
    p.add_argument("--bare-threads", default="0,1",
                   help="torch threads of the bare loop, one row each; 0 = torch's default (default 0,1)")
    p.add_argument("--bare-image", choices=("clipita", "timm"), default="clipita",
                   help="the bare loop's image encoder: clipita's ImageEncoder, or timm's model directly (pkg: "
                        "weights, e.g. the offline EfficientNet-Lite0; default clipita)")
    p.add_argument("--gpu", action="store_true", help="embed.gpus_per_actor=1 (the bare loop uses the GPU too)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds over all cells, alternating order, the fastest run of each kept (default 1)")
    p.add_argument("--scratch", help="folder for catalogues and workdirs (default: a new temp folder, removed)")
    args = p.parse_args()
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s})
        base = parse_overrides(args.set)
        if args.gpu:
            base["embed.gpus_per_actor"] = "1"
        variants = [parse_overrides([kv for kv in (j or "").split(",") if kv]) for j in (args.job or [""])]
        configs = [load_config(args.config, {**base, **{k: x for k, x in v.items() if k not in BENCH_KEYS}})
                   for v in variants]
        bare_cfg = load_config(args.config, base)
        bare_threads = [int(t) for t in args.bare_threads.split(",") if t]
    except (ConfigError, ValueError) as e:
        sys.exit(f"error: {e}")
    scratch = args.scratch or tempfile.mkdtemp(prefix="clipita-bench-embed-")
    os.makedirs(scratch, exist_ok=True)
    load_before = os.getloadavg()
    best: dict[tuple[int, str, str], dict] = {}  # (products, runner, settings) -> fastest run
    try:
        roots = {n: catalogue(scratch, n) for n in sizes}
        cells = []
        for n in sizes:
            for threads in bare_threads:
                cells.append((n, "bare", f"1 process, {args.bare_image} images, torch {threads or 'default'} threads",
                               lambda root=roots[n], t=threads: bare_run(root, bare_cfg, t, args.bare_image)))
            for v, cfg in zip(variants, configs):
                ray_cpus = int(v.get("bench.ray_cpus", os.cpu_count() or 1))
                omp = int(v["bench.omp_threads"]) if "bench.omp_threads" in v else None
                label = ",".join(f"{k}={x}" for k, x in v.items()) or "as configured"
                cells.append((n, "job", label, lambda root=roots[n], c=cfg, r=ray_cpus, o=omp:
                              run_job(root, os.path.join(scratch, "workdir"), c, r, o)))
        # Rounds in alternating order, the fastest run of each cell kept: a burst of load from other processes
        # on a shared machine then hits different cells in each round.
        for round_ in range(max(1, args.repeats)):
            for n, runner, label, fn in (cells if round_ % 2 == 0 else cells[::-1]):
                r = fn()
                key = (n, runner, label)
                if key not in best or r["wall"] < best[key]["wall"]:
                    best[key] = r
                print(f"# round {round_ + 1}: {n} products, {runner} ({label}): {r['wall']:.1f} s",
                      file=sys.stderr, flush=True)
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    results = [(n, runner, label, best[(n, runner, label)]) for n, runner, label, _ in cells]

    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {machine()}")
    print(f"command: python benchmarks/embed.py {' '.join(sys.argv[1:])}")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          f"(above the core count, other processes shared the machine)")
    ec = bare_cfg.embed
    print(f"config {args.config}: image {bare_cfg.encoders.image_model}, text {bare_cfg.encoders.text_model}; "
          f"embed batch_size {ec.batch_size}, part_rows {ec.part_rows}, actors {ec.min_actors}-{ec.max_actors}, "
          f"cpus_per_actor {ec.cpus_per_actor}, gpus_per_actor {ec.gpus_per_actor}, read_workers {ec.read_workers}")
    print()
    print("| products | runner | settings | wall s | encoder start / ready s | first batch s | categories s | "
          "images/s (wall) | x bare | images/s (steady) | x bare | encoder busy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    # The baseline at each size is the best bare row (wall and steady separately): the job has to beat the
    # single process at its best thread count, not at an unlucky one.
    bare_wall = {n: max(r["images"] / r["wall"] for m, who, _, r in results if who == "bare" and m == n)
                 for n in sizes}
    bare_steady = {n: max(r["steady"] for m, who, _, r in results if who == "bare" and m == n) for n in sizes}
    verdicts = []
    for n, who, label, r in results:
        rate, steady = r["images"] / r["wall"], r["steady"]
        if who == "bare":
            ready, first, cats, busy = f"- / {r['ready']:.1f}", "-", "-", "-"
        else:
            ready, first = f"{r['started']:.1f} / {r['ready']:.1f}", f"{r['first_batch']:.1f}"
            cats, busy = "beside", f"{100 * r['busy']:.0f}%"
        print(f"| {n:,} | {who} | {label} | {r['wall']:.1f} | {ready} | {first} | {cats} | {rate:,.1f} | "
              f"{rate / bare_wall[n]:.2f} | {steady:,.1f} | {steady / bare_steady[n]:.2f} | {busy} |")
        if who == "job" and n == sizes[-1]:
            ratio = steady / bare_steady[n]
            verdicts.append(f"{label}, {n:,} products: {rate / bare_wall[n]:.2f}x the best bare loop with start-up, "
                            f"{ratio:.2f}x steady ({'meets' if ratio >= GOAL else 'misses'} the {GOAL}x goal)")
    print()
    print("wall s: timed span (job: run_embed with Ray already up; bare: a fresh process's imports, encoder loads "
          "and loop). encoder start / ready s: job = the last encoder actor entered / left its constructor "
          "(before: Ray Data start, actor process launch; during: imports, model loads), bare = - / encoders "
          "loaded. first batch s: an encoder actor starts its first batch. categories s: the tree is embedded in a "
          "Ray task beside the stream (not timed apart). images/s (steady): job = images / (last part written - first batch started), "
          "bare = images / loop time. x bare: against the best bare row of that size. encoder busy: share of the "
          "steady span the encoder actors spent encoding (below 100%: waiting for reads or for the driver).")
    for v in verdicts:
        print(f"- {v}")


if __name__ == "__main__":
    main()
