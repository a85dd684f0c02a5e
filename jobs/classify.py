"""jobs.classify: every product's category (zero-shot and a kNN probe), mis-categorised listings, k-means clusters,
attribute values and policy flags, from the all-products index (clipita/stages/classify.py).

    python -m jobs.classify --workdir demo-workdir --config configs/offline.yaml
    python -m jobs.classify --workdir s3://shop/clipita --set classify.model=clip-ita \
        --set 'classify.flags=restricted: Beauty & Personal Care > Fragrance'
    ray job submit --working-dir . -- python -m jobs.classify --workdir s3://shop/clipita

Needs jobs.index (and jobs.train for the trained heads). Writes classify/ (predictions/, suspects.parquet,
clusters/, flags.json, stats.json) and its rows and section into metrics.json / metrics.md.
Use the same --config (data section: seed, split fractions) as jobs.train, or the splits will not match.
"""
from __future__ import annotations

import argparse

from clipita import runtime, storage
from clipita.stages.classify import run_classify
from clipita.workdir import task_metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jobs.classify", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--workdir", required=True, help="workdir URI (features/, index/, checkpoints/)")
    runtime.add_config_argument(parser)
    args = parser.parse_args(argv)
    with runtime.job("jobs.classify"):
        cfg = runtime.config_from_args(args)
        runtime.start_ray()
        stats = run_classify(args.workdir, cfg)
        print(storage.read_bytes(task_metrics(storage.absolute(args.workdir), "classify", "md")).decode())
        print(f"jobs.classify: {stats['products']:,} products, {stats['rows']} rows in {stats['seconds']} s -> "
              f"{storage.join(args.workdir, 'classify')}")


if __name__ == "__main__":
    main()
