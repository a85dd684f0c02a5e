"""BM25 Okapi over an inverted index: the exact top-k of ``rank_bm25.BM25Okapi`` + ``metrics.rank_scores``,
scoring only the documents that contain a query token.

``rank_bm25.BM25Okapi.get_scores`` scores every document (O(N) per query, and a Python dict per document). Here
postings are CSR numpy arrays (term -> ascending doc rows and term frequencies, ~6 bytes a posting) and a query
costs O(postings of its tokens + k). Scores are bitwise rank_bm25's: idf, the epsilon floor, the mean document
length and each document's per-token term are computed with the same float64 operations in the same order, and
a document's terms are added in query-token order (a repeated token counts twice, an unknown token adds 0).
Documents that contain no query token score 0 and fill the list, lowest rows first, exactly as rank_scores ranks
ties; documents can also score below 0 (an epsilon floor below 0 when the average idf is negative).

Tokenisation: lower-cased Unicode word characters (``\\w+``), no stemming, no stop words: titles and category
names are short, and the paper's BM25 baseline states no more.
"""
from __future__ import annotations

import math
import re
from array import array
from typing import Sequence

import numpy as np

from clipita.metrics import rank_scores

EMPTY = "\x00"  # the one token of an empty title (\w+ never yields it): keeps the mean length above 0


def tokenize(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class SparseBM25:
    """BM25 Okapi (k1, b, epsilon as rank_bm25) over titles; ``top_k`` ranks them for query strings.

    The titles may be one partition of a larger corpus: ``stats`` gives this partition's document frequencies,
    ``BM25Corpus.merge`` combines every partition's, and ``use`` scores with the merged (global) idf and mean
    length, so each partition's scores are bitwise those of one index over the whole corpus."""

    def __init__(self, titles: Sequence[str], k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25):
        self.k1, self.b, self.epsilon = k1, b, epsilon
        # Term ids in order of first occurrence (document order, then token order): rank_bm25 sums the idf for
        # its average in that order (its dict's insertion order), and float addition is order-sensitive.
        self.vocab: dict[str, int] = {}
        first = array("q")  # per term: its first document row << 16 | token position there
        token_ids, lengths = array("i"), array("i")  # 4 bytes a token, not a Python list of ints
        for row, title in enumerate(titles):
            tokens = tokenize(str(title)) or [EMPTY]
            lengths.append(len(tokens))
            for pos, t in enumerate(tokens):
                tid = self.vocab.setdefault(t, len(self.vocab))
                if tid == len(first):
                    first.append(row << 16 | min(pos, 0xFFFF))
                token_ids.append(tid)
        n, n_terms = len(lengths), len(self.vocab)
        if n == 0:
            raise ValueError("SparseBM25 needs at least one title")
        self.doc_len = np.frombuffer(lengths, np.int32).astype(np.int64)
        self.first = np.frombuffer(first, np.int64)
        terms = np.frombuffer(token_ids, np.int32)

        # Postings: one (term, row) key per token, counted; sorted by term then row, so each term's rows ascend.
        keys = terms.astype(np.int64) * n + np.repeat(np.arange(n, dtype=np.int64), self.doc_len)
        keys, tf = np.unique(keys, return_counts=True)
        self.rows = (keys % n).astype(np.int32)
        self.tf = tf.astype(np.min_scalar_type(int(tf.max())))
        self.indptr = np.zeros(n_terms + 1, np.int64)
        np.cumsum(np.bincount(keys // n, minlength=n_terms), out=self.indptr[1:])
        del keys, terms
        self.use(BM25Corpus.merge([self.stats()], epsilon))

    def stats(self, doc_keys: Sequence[str] | None = None) -> dict:
        """Document count, total length and, per term, (document frequency, sort key of its first occurrence).
        ``doc_keys`` orders this partition's documents within the whole corpus (e.g. their product ids, the
        corpus being sorted by id); by default documents are ordered by row."""
        df = np.diff(self.indptr).tolist()
        rows, pos = (self.first >> 16).tolist(), (self.first & 0xFFFF).tolist()
        keys = rows if doc_keys is None else [doc_keys[r] for r in rows]
        return {"n": len(self), "length": int(self.doc_len.sum()),
                "terms": {t: (df[i], keys[i], pos[i]) for t, i in self.vocab.items()}}

    def use(self, corpus: "BM25Corpus") -> None:
        """Score with ``corpus``'s idf and mean document length (this partition's terms must be in it)."""
        self.idf = np.array([corpus.idf[t] for t in self.vocab], np.float64)
        self.avgdl, self.average_idf = corpus.avgdl, corpus.average_idf
        # The document half of get_scores' denominator, same expression, computed once instead of per query.
        self.norm = self.k1 * (1 - self.b + self.b * self.doc_len / self.avgdl)

    def __len__(self) -> int:
        return len(self.doc_len)

    @property
    def nbytes(self) -> int:
        """Bytes held in numpy arrays (the vocabulary dict is extra: ~100 bytes a distinct term)."""
        return sum(a.nbytes for a in (self.rows, self.tf, self.indptr, self.idf, self.doc_len, self.norm))

    def _scores(self, query: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows, float64 scores) of the documents holding a query token, rows ascending."""
        rows, terms = [], []
        for t in tokenize(query):
            tid = self.vocab.get(t)
            if tid is None:
                continue  # rank_bm25: idf 0, adds 0 to every document
            lo, hi = self.indptr[tid], self.indptr[tid + 1]
            r, tf = self.rows[lo:hi], self.tf[lo:hi].astype(np.float64)
            rows.append(r)
            terms.append(self.idf[tid] * (tf * (self.k1 + 1) / (tf + self.norm[r])))
        if not rows:
            return np.zeros(0, np.int32), np.zeros(0)
        if len(rows) == 1:
            return rows[0], 0.0 + terms[0]  # 0.0 + x as get_scores' zero start does (turns -0.0 into 0.0)
        unique, inverse = np.unique(np.concatenate(rows), return_inverse=True)
        # bincount adds the weights in input order onto 0.0: per document, in query-token order, as get_scores.
        return unique, np.bincount(inverse, weights=np.concatenate(terms), minlength=len(unique))

    def top_k(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows (Q, min(k, N)) int64, best first (ties: lower row first), and their float32 scores."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        n = len(self)
        k = min(k, n)
        out_rows, out_scores = np.zeros((len(queries), k), np.int64), np.zeros((len(queries), k), np.float32)
        for i, query in enumerate(queries):
            rows, scores = self._scores(query)
            scores = scores.astype(np.float32)  # rank on float32, as the dense path does: the cast may tie
            nonzero = scores != 0
            rows, scores = rows[nonzero], scores[nonzero]
            # Every other document scores 0; only the lowest k of them can make the list (ties: lower row first).
            first = np.ones(min(n, k + len(rows)), bool)
            first[rows[rows < len(first)]] = False
            zero_rows = np.flatnonzero(first)[:k]
            # A row-ordered compact vector: rank_scores' tie order (lower position first) is then lower row first.
            cand = np.concatenate([rows.astype(np.int64), zero_rows])
            order = np.argsort(cand, kind="stable")
            cand, cand_scores = cand[order], np.concatenate([scores, np.zeros(len(zero_rows), np.float32)])[order]
            top = rank_scores(cand_scores[None], k)[0]
            out_rows[i], out_scores[i] = cand[top], cand_scores[top]
        return out_rows, out_scores


class BM25Corpus:
    """idf of every term and the mean document length of a corpus, from its partitions' ``SparseBM25.stats``."""

    def __init__(self, idf: dict[str, float], avgdl: float, average_idf: float):
        self.idf, self.avgdl, self.average_idf = idf, avgdl, average_idf

    @classmethod
    def merge(cls, stats: Sequence[dict], epsilon: float = 0.25) -> "BM25Corpus":
        n = sum(s["n"] for s in stats)
        df: dict[str, list] = {}
        for s in stats:
            for t, (f, key, pos) in s["terms"].items():
                seen = df.get(t)
                if seen is None:
                    df[t] = [f, key, pos]
                else:
                    seen[0] += f
                    seen[1:] = min(seen[1:], [key, pos])
        # idf exactly as BM25Okapi._calc_idf: math.log (numpy's log may differ in the last bit), a left-to-right
        # sum for the average in first-occurrence order (sum() compensates on Python >= 3.12), then the floor on
        # the negative ones.
        order = sorted(df, key=lambda t: df[t][1:])
        idf = {t: math.log(n - df[t][0] + 0.5) - math.log(df[t][0] + 0.5) for t in order}
        idf_sum = 0.0
        for t in order:
            idf_sum += idf[t]
        average_idf = idf_sum / len(order)
        return cls({t: v if v >= 0 else epsilon * average_idf for t, v in idf.items()},
                   sum(s["length"] for s in stats) / n, average_idf)
