"""jobs.pipeline: the whole product end to end: synth (no --catalog) -> align -> embed -> train -> index -> evaluate
-> classify -> match.

    python -m jobs.pipeline --workdir demo-workdir                      # the demo: synthetic catalogue, offline
    python -m jobs.pipeline --workdir /data/run --catalog /data/shop --config configs/production.yaml
    ray job submit --working-dir . -- python -m jobs.pipeline --catalog s3://shop/catalog \
        --workdir s3://shop/clipita --config configs/production.yaml --set embed.gpus_per_actor=1 --gpu

Every stage skips what is already complete (finished embed parts, trained runs), so a re-run after a failure
resumes. Without --catalog it writes a synthetic catalogue to <workdir>/catalog and uses configs/offline.yaml
unless --config says otherwise. Ends with metrics.md printed and the paths of metrics.json / metrics.png;
<workdir>/pipeline.json holds the seconds of each stage.
"""
from __future__ import annotations

import argparse
import os
import time

from clipita import runtime, storage, workdir
from clipita.models import VARIANTS
from clipita.sources import synth
from clipita.stages import align, classify, embed, evaluate, match, train
from clipita.stages.index import build_indexes
from clipita.tree import SETTINGS

OFFLINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "offline.yaml")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jobs.pipeline", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--workdir", required=True, help="workdir URI for every stage's outputs")
    parser.add_argument("--catalog", help="catalogue root URI; without it a synthetic demo catalogue is written")
    parser.add_argument("--products", type=int, default=2000, help="size of the synthetic catalogue (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic catalogue")
    parser.add_argument("--mislabel", type=float, default=0.0, help="synthetic catalogue: share of listings put "
                        "under a wrong category on purpose (jobs.classify measures finding them; default 0)")
    parser.add_argument("--workers", type=int, help="Ray Train workers per run (train.workers)")
    parser.add_argument("--gpu", action="store_true", help="train on GPUs (train.use_gpu)")
    runtime.add_config_argument(parser)
    args = parser.parse_args(argv)
    if args.catalog is None and args.config is None:
        args.config = OFFLINE
    args.set += [f"train.{k}={v}" for k, v in (("workers", args.workers), ("use_gpu", args.gpu or None))
                 if v is not None]
    with runtime.job("jobs.pipeline"):
        args.workdir = storage.absolute(args.workdir)
        cfg = runtime.config_from_args(args)
        runtime.start_ray()
        seconds: dict[str, float] = {}

        def stage(name: str, fn):
            t0 = time.time()
            print(f"== {name}", flush=True)
            out = fn()
            seconds[name] = round(time.time() - t0, 1)
            print(f"== {name}: {seconds[name]} s", flush=True)
            return out

        catalog = storage.absolute(args.catalog) if args.catalog else storage.join(args.workdir, "catalog")
        if args.catalog is None:
            if storage.exists(storage.join(catalog, "products.parquet")):
                print(f"== synth: {catalog} exists; kept")
            else:
                stage("synth", lambda: synth.write_catalog(catalog, args.products, seed=args.seed,
                                                           mislabel=args.mislabel))
        if cfg.align.enabled:  # --set align.enabled=false: the paper's frozen towers
            stage("align", lambda: align.run_align(catalog, args.workdir, cfg))
        stats = stage("embed", lambda: embed.run_embed(catalog, args.workdir, cfg))
        if stats["used"] == 0:
            raise ValueError(f"no usable product in {catalog}: see {args.workdir}/quarantine")
        stage("train", lambda: train.train_runs(args.workdir, [(v, s) for s in SETTINGS for v in VARIANTS],
                                                   cfg))
        stage("index", lambda: build_indexes(args.workdir, cfg))
        stage("evaluate", lambda: evaluate.evaluate(args.workdir, cfg))
        stage("classify", lambda: classify.run_classify(args.workdir, cfg))
        stage("match", lambda: match.run_match(args.workdir, cfg))
        seconds["total"] = round(sum(seconds.values()), 1)
        storage.write_json(workdir.pipeline_record(args.workdir),
                           {"catalog": catalog, "products_read": stats["read"], "used": stats["used"],
                            "quarantined": stats["quarantined"], "seconds": seconds})
        print(storage.read_bytes(workdir.metrics_file(args.workdir, "md")).decode())
        print(f"jobs.pipeline: {stats['used']} products ({stats['quarantined']} quarantined) in {seconds['total']} s; "
              f"metrics: {storage.join(args.workdir, 'metrics.json')}, {storage.join(args.workdir, 'metrics.png')}")


if __name__ == "__main__":
    main()
