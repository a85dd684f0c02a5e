"""jobs.embed: stream a catalogue through the frozen encoders into <workdir>/features/ (Ray Data).

    python -m jobs.embed --catalog demo-workdir/catalog --workdir demo-workdir --config configs/offline.yaml
    ray job submit --working-dir . -- python -m jobs.embed --catalog s3://shop/catalog \
        --workdir s3://shop/clipita --config configs/production.yaml --set embed.gpus_per_actor=1

Writes features/products/<part>.parquet, features/categories.parquet, quarantine/<part>.parquet,
features/stats.json and catalog.json. A re-run skips finished parts (resume after a crash or Ctrl-C).
"""
from __future__ import annotations

import argparse
import sys

from clipita import runtime
from clipita.stages import embed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jobs.embed", description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", required=True, help="catalogue root: local path, file:// or s3://")
    parser.add_argument("--workdir", required=True, help="workdir URI shared by all jobs")
    runtime.add_config_argument(parser)
    args = parser.parse_args(argv)
    with runtime.job("jobs.embed"):
        cfg = runtime.config_from_args(args)
        runtime.start_ray()
        stats = embed.run_embed(args.catalog, args.workdir, cfg)
        print(f"jobs.embed: {stats['read']} rows read, {stats['used']} embedded, {stats['quarantined']} "
              f"quarantined; {stats['seconds']} s, {stats['products_per_s']} products/s this run")
        if stats["used"] == 0:  # the only failure that is not one row's problem: nothing could be used
            print(f"jobs.embed: error: no usable product in {args.catalog}: see the reasons in "
                  f"{args.workdir}/quarantine", file=sys.stderr)
            raise SystemExit(1)


if __name__ == "__main__":
    main()
