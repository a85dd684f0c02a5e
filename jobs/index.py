"""jobs.index: USearch HNSW shards of every dense model's product vectors, built in parallel Ray tasks.

    python -m jobs.index --workdir demo-workdir --config configs/offline.yaml
    ray job submit --working-dir . -- python -m jobs.index --workdir s3://shop/clipita --shards 16 --dtype i8

Indexes mpnet and clip (zero-shot) and every trained model with a best checkpoint, for the test split
(index/test/, what jobs.evaluate searches) and for all products (index/all/, what the endpoint serves).
"""
from __future__ import annotations

import argparse

from clipita import index, runtime
from clipita.stages.index import build_indexes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jobs.index", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="workdir URI with features/ (and checkpoints/)")
    parser.add_argument("--shards", type=int, help="most shards built at once (index.shards; 0 = as many as "
                                                   "the cluster's CPUs run)")
    parser.add_argument("--dtype", choices=index.DTYPES, help="stored precision (index.dtype)")
    runtime.add_config_argument(parser)
    args = parser.parse_args(argv)
    args.set += [f"index.{k}={v}" for k, v in (("shards", args.shards), ("dtype", args.dtype)) if v is not None]
    with runtime.job("jobs.index"):
        cfg = runtime.config_from_args(args)
        runtime.start_ray()
        stats = build_indexes(args.workdir, cfg)
        print(f"jobs.index: {len(stats['groups'])} indexes in {stats['seconds']} s under {args.workdir}/index")


if __name__ == "__main__":
    main()
