"""BM25 over titles: build time, memory and queries/s of clipita's inverted index (``bm25.SparseBM25.top_k``)
against rank_bm25 ``BM25Okapi.get_scores`` + ``metrics.rank_scores`` (what ``rankers.BM25Ranker`` does), on the
same synthetic titles and queries, in one run; the top-10 rows and scores of every timed query are checked equal.

    python benchmarks/bm25.py                                     # 100k titles, 500 queries per kind (~1 min)
    python benchmarks/bm25.py --titles 1000000 --methods sparse   # build time and memory at 1M

Titles: 5-12 tokens each from a vocabulary of ``--vocab`` made-up words with Zipf frequencies (exponent 1, like
natural language: the commonest word is in about half the titles). Queries: 1-3 words, of two kinds:
``category`` words drawn uniformly from frequency ranks 50-5,000 (category names are common nouns, not the
commonest words) and ``zipf`` words drawn like the titles' (the commonest words come up often: the worst case for
an inverted index). Queries run one at a time, on one core. Memory: ``nbytes`` of SparseBM25's arrays, and the
growth of the process's resident memory across each build (Python objects included; approximate).

Prints the machine, the date, the command and one markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared machine.py beside this script
from machine import cpu  # noqa: E402

K = 10


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def words(n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct made-up lower-case words, 3-10 letters."""
    out: dict[str, None] = {}
    while len(out) < n:
        for length in rng.integers(3, 11, n):
            out["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), length))] = None
    return np.array(list(out)[:n])


def titles(n: int, vocab: np.ndarray, rng: np.random.Generator) -> list[str]:
    p = 1.0 / np.arange(1, len(vocab) + 1)
    lengths = rng.integers(5, 13, n)
    tokens = vocab[rng.choice(len(vocab), int(lengths.sum()), p=p / p.sum())]
    ends = np.cumsum(lengths)
    return [" ".join(tokens[e - m:e]) for e, m in zip(ends.tolist(), lengths.tolist())]


def queries(kind: str, n: int, vocab: np.ndarray, rng: np.random.Generator) -> list[str]:
    if kind == "category":
        pick = lambda m: vocab[rng.integers(50, min(5000, len(vocab)), m)]  # noqa: E731
    else:
        p = 1.0 / np.arange(1, len(vocab) + 1)
        pick = lambda m: vocab[rng.choice(len(vocab), m, p=p / p.sum())]  # noqa: E731
    return [" ".join(pick(int(m))) for m in rng.integers(1, 4, n)]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--titles", type=int, default=100_000, help="corpus size (default 100000)")
    p.add_argument("--vocab", type=int, default=20_000, help="distinct words (default 20000)")
    p.add_argument("--queries", type=int, default=500, help="queries per kind (default 500)")
    p.add_argument("--methods", default="sparse,rank_bm25", help="subset to run (default sparse,rank_bm25)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    methods = set(args.methods.split(","))
    if not methods <= {"sparse", "rank_bm25"}:
        sys.exit("error: --methods takes sparse,rank_bm25")
    from rank_bm25 import BM25Okapi

    from clipita.bm25 import SparseBM25, tokenize
    from clipita.metrics import rank_scores

    rng = np.random.default_rng(args.seed)
    vocab = words(args.vocab, rng)
    corpus = titles(args.titles, vocab, rng)
    qs = {kind: queries(kind, args.queries, vocab, rng) for kind in ("category", "zipf")}
    load_before = os.getloadavg()

    results = {}  # (method, kind) -> (rows, scores)
    table = []  # (method, build s, nbytes MB or None, RSS MB, kind, queries/s, postings per query)
    if "sparse" in methods:
        gc.collect()
        before = rss_mb()
        index, build = timed(lambda: SparseBM25(corpus))
        grown = rss_mb() - before
        df = np.diff(index.indptr)
        for kind, texts in qs.items():
            index.top_k(texts[:5], K)  # warm-up
            results["sparse", kind], seconds = timed(lambda: index.top_k(texts, K))
            touched = np.mean([sum(int(df[index.vocab[t]]) for t in tokenize(q) if t in index.vocab) for q in texts])
            table.append(("clipita SparseBM25.top_k", build, index.nbytes / 2**20, grown, kind,
                          len(texts) / seconds, touched))
        del index
    if "rank_bm25" in methods:
        gc.collect()
        before = rss_mb()
        bm25, build = timed(lambda: BM25Okapi([tokenize(t) or ["\x00"] for t in corpus]))
        grown = rss_mb() - before

        def dense(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
            s = np.stack([bm25.get_scores(tokenize(q)) for q in texts]).astype(np.float32)
            rows = rank_scores(s, K)
            return rows, np.take_along_axis(s, rows, axis=1)

        for kind, texts in qs.items():
            dense(texts[:2])
            results["rank_bm25", kind], seconds = timed(lambda: dense(texts))
            table.append(("rank_bm25 BM25Okapi + rank_scores", build, None, grown, kind, len(texts) / seconds,
                          float(args.titles)))
        del bm25

    same = {kind: all(np.array_equal(a, b) for a, b in zip(results["sparse", kind], results["rank_bm25", kind]))
            for kind in qs} if methods == {"sparse", "rank_bm25"} else {}
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {cpu()}; numpy {np.__version__}, Python "
          f"{sys.version.split()[0]}")
    print(f"command: python benchmarks/bm25.py {' '.join(sys.argv[1:])}")
    print(f"load average (1 min) before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          f"(above the core count, other processes shared the machine)")
    print(f"{args.titles:,} titles, {sum(len(t.split()) for t in corpus):,} tokens, vocabulary {args.vocab:,} (Zipf); "
          f"{args.queries} queries per kind, one at a time, top-{K}")
    if same:
        print("same top-10 rows and scores as rank_bm25 + rank_scores: "
              + ", ".join(f"{kind} {'yes' if ok else 'NO'}" for kind, ok in same.items()))
    print()
    print("| method | build s | arrays MB | RSS growth MB | queries | queries/s | postings (docs) scored per query |")
    print("|---|---|---|---|---|---|---|")
    for method, build, mb, grown, kind, qps, touched in table:
        print(f"| {method} | {build:.2f} | {'-' if mb is None else f'{mb:.1f}'} | {grown:,.0f} | {kind} | {qps:,.1f} "
              f"| {touched:,.0f} |")
    if same and not all(same.values()):
        sys.exit("error: SparseBM25 and rank_bm25 disagree")


if __name__ == "__main__":
    main()
