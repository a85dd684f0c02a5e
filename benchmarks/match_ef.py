"""The HNSW ef of jobs.match's candidate search: queries per core-second and the share of near-duplicate pairs
found, against usearch's exact scan, on one shard pair of a built all-products index.

    python benchmarks/match_ef.py --workdir /tmp/clipita-match/features-1000000      # after benchmarks/match.py --keep
    python benchmarks/match_ef.py --workdir W --queries 4096 --efs 128,32 --min-score 0.6

``--queries`` rows spread evenly over shard 0 are searched, one thread, for the k + 1 = 11 nearest (what jobs.match asks
with its default k) in shard 0 (itself: where synth's second listings sit) and in shard 1 (another shard); the
reference is the exact top 11. "Pairs" are the exact neighbours of cosine >= ``--min-score`` other than the row
itself (second listings sit near 0.7, other products of a leaf lower), "found" the share of them the graph walk
returns. Prints the machine, the date, the command and one markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu  # noqa: E402
from scale import ROOT  # noqa: E402

sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--workdir", required=True, help="a workdir with an all-products index of 2+ shards")
    p.add_argument("--group", default="clip", help="index/all/<group> (jobs.match's default model: clip)")
    p.add_argument("--queries", type=int, default=8192)
    p.add_argument("--efs", default="128,64,32,16,11")
    p.add_argument("--min-score", type=float, default=0.6)
    args = p.parse_args()
    from clipita import storage
    from clipita.downstream import shard_vectors
    from clipita.index import ShardedIndex
    from clipita.workdir import group_dir

    uri = group_dir(args.workdir, "all", args.group)
    if len(storage.read_json(storage.join(uri, "manifest.json"))["shards"]) < 2:
        raise SystemExit(f"match_ef: {uri} needs 2+ shards")
    own = ShardedIndex(uri, view=True, columns=None, shards=(0, 1))
    entry = own.manifest["shards"][0]
    # rows spread over the shard: HNSW finds early-inserted rows (the graph's hubs) more easily than late ones
    count = int(entry["count"])
    at = np.unique(np.linspace(0, count - 1, min(args.queries, count)).astype(np.int64))
    keys = (int(entry["first_key"]) + at).astype(np.uint64)
    q = np.stack([shard_vectors(own.shards[0], int(k), 1)[0] for k in keys])
    rows = []
    for j in (0, 1):
        other = own if j == 0 else ShardedIndex(uri, view=True, columns=None, shards=(1, 2))
        t = time.time()
        exact = other.search(q, 11, exact=True, threads=1)
        exact_s = time.time() - t
        me = at[:, None] if j == 0 else -1
        want = (exact.scores >= args.min_score) & (exact.rows != me)
        for ef in [int(x) for x in args.efs.split(",")]:
            t = time.time()
            got = other.search(q, 11, ef=ef, threads=1)
            seconds = time.time() - t
            hit = sum(len(set(exact.rows[r][want[r]].tolist()) & set(got.rows[r].tolist()))
                      for r in np.flatnonzero(want.any(axis=1)))
            rows.append((j, ef, len(q) / seconds, len(q) / exact_s, int(want.sum()), hit))
            print(f"match_ef: shard 0 -> {j}, ef {ef}: {len(q) / seconds:,.0f} queries / core-s, "
                  f"{hit}/{int(want.sum())} pairs", flush=True)
    print()
    print(f"machine: {cpu()}; load average {os.getloadavg()[0]:.1f}; {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"command: python benchmarks/match_ef.py {' '.join(sys.argv[1:])}")
    print()
    print(f"| shard pair | ef | queries / core-s | vs ef {rows[0][1]} | exact scan q / core-s | pairs >= "
          f"{args.min_score} | found |")
    print("|---|---|---|---|---|---|---|")
    for j, ef, qps, exact_qps, want, hit in rows:
        base = next(r[2] for r in rows if r[0] == j)
        print(f"| 0 -> {j} | {ef} | {qps:,.0f} | {qps / base:.2f}x | {exact_qps:,.0f} | {want:,} | "
              f"{f'{100 * hit / want:.1f}%' if want else '–'} |")


if __name__ == "__main__":
    main()
