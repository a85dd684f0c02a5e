"""jobs.classify's wall time and every process's peak RSS on a workdir with an index (benchmarks/scale.py's sampler).

    python benchmarks/classify.py --workdir /tmp/clipita-match/features-100000      # e.g. after benchmarks/match.py --keep
    python benchmarks/classify.py --products 100000                                  # synth features-only + jobs.index first

Prints one markdown row: products, jobs.index seconds (when it built the index), jobs.classify seconds, the peak RSS
(private / object store) of the driver and the largest Ray worker, and the exact-category accuracy@1 rows of the
run (test split, seen / unseen) for each model.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu  # noqa: E402
from match import commit  # noqa: E402
from scale import ROOT, gb, run_stage, who  # noqa: E402  (the process-tree RSS sampler)

sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--workdir", help="a workdir with index/all (default: a new features-only one of --products)")
    p.add_argument("--products", type=int, default=100_000, help="products of the features-only workdir")
    p.add_argument("--root", default="/tmp/clipita-classify", help="where a new workdir and the logs go")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="config override")
    args = p.parse_args()
    overrides = [a for s in args.set for a in ("--set", s)]
    os.makedirs(args.root, exist_ok=True)
    work, index = args.workdir, None
    if work is None:
        from clipita.sources.synth_features import write_features

        work = os.path.join(args.root, f"features-{args.products}")
        if not os.path.exists(os.path.join(work, "features", "categories.parquet")):
            write_features(work, args.products, log=lambda line: None)
        index = run_stage(["jobs.index", "--workdir", work, *overrides], os.path.join(args.root, "index.log"))
    run = run_stage(["jobs.classify", "--workdir", work, *overrides], os.path.join(args.root, "classify.log"))
    stats = json.load(open(os.path.join(work, "classify", "stats.json")))
    rows = json.load(open(os.path.join(work, "classify", "metrics.json")))
    acc = "; ".join(f"{r['model']} {r['mode']} {r['split']} {r['acc@1']:.1f}" for r in rows
                    if r["task"] == "classify" and r["depth"] is None and r["split"] != "all")
    print(f"machine: {cpu()}; load average {os.getloadavg()[0]:.1f}; {datetime.datetime.now():%Y-%m-%d %H:%M}; "
          f"commit {commit()}")
    print(f"command: python benchmarks/classify.py {' '.join(sys.argv[1:])}")
    print("| products | index s | classify s | driver GB | largest worker GB | acc@1 (test, exact) |")
    print("|---|---|---|---|---|---|")
    print(f"| {stats['products']:,} | {'-' if index is None else round(index['seconds'])} | {run['seconds']:.0f} | "
          f"{gb(run.get('driver'))} | {gb(run.get('worker'))} ({who(run.get('worker'))}) | {acc} |")
    print(f"largest processes (GB): {run['top']}")


if __name__ == "__main__":
    main()
