"""jobs.match: listings of the same product (e-CLIP's product matching) from the all-products index's neighbours.

    python -m jobs.match --workdir demo-workdir --config configs/offline.yaml
    python -m jobs.match --workdir /tmp/run --set match.k=20 --set match.model=clip-ita
    ray job submit --working-dir . -- python -m jobs.match --workdir s3://shop/clipita

Needs jobs.index (index/all/<model group>/). Writes match/groups/<shard>.parquet (product_id, group, size of every
product in a predicted group of 2+ listings), match/stats.json, and the match rows of metrics.json / metrics.md
when the features or the catalogue have a group_id column (clipita/stages/match.py).
"""
from __future__ import annotations

import argparse

from clipita import runtime
from clipita.stages.match import run_match


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jobs.match", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="workdir URI with index/all/ (jobs.index)")
    parser.add_argument("--model", help="whose index finds the neighbours (match.model; default clip)")
    parser.add_argument("--k", type=int, help="neighbours searched per product (match.k)")
    runtime.add_config_argument(parser)
    args = parser.parse_args(argv)
    args.set += [f"match.{k}={v}" for k, v in (("model", args.model), ("k", args.k)) if v is not None]
    with runtime.job("jobs.match"):
        cfg = runtime.config_from_args(args)
        runtime.start_ray()
        stats = run_match(args.workdir, cfg)
        print(f"jobs.match: {stats['predicted_groups']:,} groups of 2+ listings ({stats['products_in_groups']:,} of "
              f"{stats['products']:,} products) in {stats['seconds']} s under {args.workdir}/match")


if __name__ == "__main__":
    main()
