"""jobs.evaluate: every model (bm25, mpnet, clip, clip-i, clip-ia, clip-ita) on every setting and split.

    python -m jobs.evaluate --workdir demo-workdir --config configs/offline.yaml
    ray job submit --working-dir . -- python -m jobs.evaluate --workdir s3://shop/clipita

Needs jobs.index (it ranks through the test split's shards). Writes metrics.json, metrics.md (laid out like the
paper's Table 1, with its numbers) and metrics.png.
Use the same --config (data section: seed, split fractions) as jobs.train, or the splits will not match.
"""
from __future__ import annotations

import argparse

from clipita import runtime, storage, workdir
from clipita.stages import evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jobs.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="workdir URI (features/, checkpoints/, index/)")
    runtime.add_config_argument(parser)
    args = parser.parse_args(argv)
    with runtime.job("jobs.evaluate"):
        cfg = runtime.config_from_args(args)
        runtime.start_ray()
        rows = evaluate.evaluate(args.workdir, cfg)
        print(storage.read_bytes(workdir.metrics_file(args.workdir, "md")).decode())
        print(f"jobs.evaluate: {len(rows)} rows -> {storage.join(args.workdir, 'metrics.json')}, "
              f"{storage.join(args.workdir, 'metrics.png')}")


if __name__ == "__main__":
    main()
