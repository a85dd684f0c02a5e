"""Write the synthetic demo catalogue: product images + ``products.parquet`` (see clipita/sources/synth.py).

    python -m jobs.synth --out demo-catalog --products 20000 [--seed 0] [--workers 8]
    python -m jobs.synth --out s3://bucket/catalogs/demo --products 100000
    ray job submit --working-dir . -- python -m jobs.synth --out s3://bucket/catalogs/demo --products 100000
    python -m jobs.synth --features-only --out WORKDIR --products 1000000   # features/ directly, no images
    python -m jobs.synth --features-only --out WORKDIR --products 100000 --duplicates 0.05   # + second listings

A small CPU job: it does not use Ray, only a pool of local processes (``--workers``, default min(CPUs, 8)).
Under ``ray job submit`` it runs on the head node; write to ``s3://`` there so that other jobs can read it.
The same seed gives byte-identical output whatever ``--workers`` is. ``--features-only`` writes a workdir instead
of a catalogue: the features jobs.embed would write, at production widths, without images
(clipita/sources/synth_features.py).
"""
from __future__ import annotations

import argparse
import sys

from clipita import storage
from clipita.sources import synth, synth_features


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        print(f"synth: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m jobs.synth", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="catalogue (workdir with --features-only) folder or s3:// "
                        "prefix to write")
    parser.add_argument("--products", type=int, required=True, help="number of products (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same catalogue (>= 0)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: min(CPUs, 8))")
    parser.add_argument("--duplicates", type=float, default=0.0,
                        help="share of products listed twice (another seller, a shared group_id column; default 0)")
    parser.add_argument("--mislabel", type=float, default=0.0,
                        help="share of listings put under a wrong category on purpose, recorded in "
                        "mislabeled.parquet (what jobs.classify's mis-categorised listings are measured on; default 0)")
    parser.add_argument("--features-only", action="store_true",
                        help="write a features workdir at production widths directly (no images, no encoders), "
                        "for scale benchmarks and bring-your-own-embeddings users")
    args = parser.parse_args(argv)

    if args.features_only:
        try:
            stats = synth_features.write_features(args.out, args.products, seed=args.seed, workers=args.workers,
                                                  log=lambda line: print(line, file=sys.stderr),
                                                  duplicates=args.duplicates)
        except (ValueError, storage.StorageError) as e:
            parser.error(str(e).splitlines()[0])
        dups = f" ({stats['duplicates']:,} second listings, group_id)" if stats.get("duplicates") else ""
        print(f"synth: wrote features of {stats['used']:,} products{dups} in {stats['categories']:,} categories to "
              f"{args.out} in {stats['seconds']:.1f} s ({stats['products_per_s']:,.0f} products/s)")
        return 0
    try:
        summary = synth.write_catalog(args.out, args.products, seed=args.seed, workers=args.workers,
                                      duplicates=args.duplicates, mislabel=args.mislabel)
    except (ValueError, storage.StorageError) as e:
        parser.error(str(e).splitlines()[0])
    images = ", ".join(f"{n:,} {fmt}" for fmt, n in summary["images"].items())
    dups = f", {summary['duplicates']:,} second listings (group_id)" if summary["duplicates"] else ""
    dups += f", {summary['mislabeled']:,} under a wrong category (mislabeled.parquet)" if summary["mislabeled"] else ""
    print(f"synth: wrote {summary['products']:,} products ({images}) in {summary['categories']} categories "
          f"({summary['leaves']} leaves, {summary['roots']} roots){dups} to {args.out} in {summary['seconds']:.1f} s "
          f"({summary['products_per_s']:,.0f}/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
