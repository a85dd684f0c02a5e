"""jobs.match against jobs.index on features-only workdirs with second listings: wall time of both jobs, peak RSS of
every process of each (the job's driver, every Ray worker, Ray's daemons: benchmarks/scale.py's sampler) and the
test F1 of the predicted groups against synth's group_id.

    python benchmarks/match.py                              # 100k and 1M products (1M: about 40 minutes here)
    python benchmarks/match.py --sizes 100000 --duplicates 0.05
    python benchmarks/match.py --sizes 1000000 --keep       # reuse / keep /tmp/clipita-match/features-1000000

Each size: ``write_features(..., duplicates=SHARE)`` (SHARE of the products listed a second time, group_id),
then ``python -m jobs.index --workdir W`` and ``python -m jobs.match --workdir W`` as subprocesses. Goals: test F1
>= 90 on synth's second listings; at 1M every process <= 1.5 GB RSS and match's wall <= 1.5x index's.

Prints the machine, the date, the command and one markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu  # noqa: E402
from scale import ROOT, gb, heap, run_stage, who  # noqa: E402  (the process-tree RSS sampler)

sys.path.insert(0, ROOT)


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        return out.stdout.strip() + (" + uncommitted changes" if dirty.strip() else "")
    except OSError:
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--sizes", default="100000,1000000", help="products per features-only workdir")
    p.add_argument("--duplicates", type=float, default=0.05, help="share of products listed twice")
    p.add_argument("--root", default="/tmp/clipita-match", help="where the workdirs go")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for both jobs")
    p.add_argument("--keep", action="store_true", help="keep the workdirs (reused if present: synth skipped)")
    p.add_argument("--stages", default="index,match", help="'match' alone reuses a kept workdir's index (its wall "
                   "then comes from index/stats.json, marked *, and its RSS is not sampled)")
    args = p.parse_args()
    from clipita.sources.synth_features import write_features

    overrides = [a for s in args.set for a in ("--set", s)]
    os.makedirs(args.root, exist_ok=True)
    rows = []
    for n in [int(x) for x in args.sizes.split(",") if x]:
        work = os.path.join(args.root, f"features-{n}")
        if not os.path.exists(os.path.join(work, "features", "categories.parquet")):
            shutil.rmtree(work, ignore_errors=True)
            stats = write_features(work, n, duplicates=args.duplicates, log=lambda line: None)
            print(f"match bench: {n:,} products + {stats.get('duplicates', 0):,} second listings in "
                  f"{stats['seconds']:.0f} s", flush=True)
        listings = json.load(open(os.path.join(work, "features", "stats.json")))["used"]
        if "index" in args.stages.split(","):
            index = run_stage(["jobs.index", "--workdir", work, *overrides], os.path.join(args.root,
                                                                                           f"index-{n}.log"))
            print(f"match bench: {n:,} index {index['seconds']:.0f} s; largest processes (GB): {index['top']}",
                  flush=True)
        else:
            index = {"seconds": json.load(open(os.path.join(work, "index", "stats.json")))["seconds"], "reused": True}
        match = run_stage(["jobs.match", "--workdir", work, *overrides], os.path.join(args.root, f"match-{n}.log"))
        metrics = {r["split"]: r for r in json.load(open(os.path.join(work, "match", "metrics.json")))}
        stats = json.load(open(os.path.join(work, "match", "stats.json")))
        rows.append((n, listings, index, match, metrics, stats))
        print(f"match bench: {n:,} match {match['seconds']:.0f} s, test F1 {metrics['test']['F1']}; largest "
              f"processes (GB): {match['top']}", flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"machine: {cpu()}; load average {os.getloadavg()[0]:.1f}; {datetime.datetime.now():%Y-%m-%d %H:%M}; "
          f"commit {commit()}")
    print(f"command: python benchmarks/match.py {' '.join(sys.argv[1:])}")
    print()
    print("GB: peak RSS (private / object store) per process kind, as benchmarks/scale.py; heap = RSS - RssShmem.")
    print()
    print("| products (listings) | index s | match s | match / index | index: driver / largest worker (heap) | "
          "match: driver / largest worker (heap) | that worker | Ray daemons | threshold | test P / R / F1 | "
          "val F1 | candidates |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, listings, index, match, metrics, stats in rows:
        t = metrics["test"]
        print(f"| {n:,} ({listings:,}) | {index['seconds']:.0f}{'*' if index.get('reused') else ''} | "
              f"{match['seconds']:.0f} | "
              f"{match['seconds'] / index['seconds']:.2f} | {gb(index.get('driver'))} / {gb(index.get('worker'))} "
              f"({heap(index.get('worker_heap'))}) | {gb(match.get('driver'))} / {gb(match.get('worker'))} "
              f"({heap(match.get('worker_heap'))}) | {who(match.get('worker'))} | "
              f"{gb(match.get('daemon'))} | {stats['threshold']:.3f} ({stats['threshold_from']}) | "
              f"{t['precision']:.1f} / {t['recall']:.1f} / {t['F1']:.1f} | {metrics['val']['F1']:.1f} | "
              f"{stats['pairs']:,} |")


if __name__ == "__main__":
    main()
