"""Retrieval metrics of the paper for many queries at once, vectorised with numpy, in percent (0-100).

Inputs are a (Q, L) boolean ``hits`` matrix (is the item at rank k relevant to query q?) and ``n_relevant`` (Q,),
R = the number of relevant candidates per query, which may exceed the hits in the list (relevant items that were
not retrieved). Definitions (PAPER.md "Metrics"):
- ``P@K``      = relevant items in the top K / K.
- ``mAP@K``    = the paper's hits-normalised AP: (1/|relevant in top K|) * sum_{k<=K, k relevant} P@k; 0 with none.
- ``mAP@K_std``= the common AP@K: sum_{k<=K, k relevant} P@k / min(R, K).
- ``R-prec``   = relevant items in the top R / R.
Ranks beyond L count as misses, for P@K with K > L and for R-precision with R > L: pass lists of length
L >= max R (and >= max K) to get exact values. Queries with R = 0 have no defined value: they are NaN per query,
left out of every mean and counted under ``queries_without_relevant``. Means over a subset of queries (seen /
unseen categories) are ``retrieval_metrics(hits[mask], n_relevant[mask])``.

Typical use, brute force over all candidates::

    R = count_relevant(cand_labels, query_labels)
    ranked = rank_scores(scores, k=max(int(R.max()), 10))
    retrieval_metrics(hits_from_ranking(ranked, cand_labels, query_labels), R)
"""
from __future__ import annotations

from typing import Sequence

import math

import numpy as np

PRECISION_AT = (1, 5, 10)
AP_AT = (5, 10)


def _check_comparable(a: np.ndarray, b: np.ndarray) -> None:
    # numpy compares an int array with a str array as all-False without complaint: every metric would silently be 0.
    text_a, text_b = a.dtype.kind in "US", b.dtype.kind in "US"
    if text_a != text_b and "O" not in (a.dtype.kind, b.dtype.kind):
        raise ValueError(f"candidate labels ({a.dtype}) and query labels ({b.dtype}) are of different kinds")


def count_relevant(labels_of_candidates: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """R per query: how many candidates carry the query's label. Returns (Q,) int64."""
    cand, qry = np.asarray(labels_of_candidates), np.asarray(query_labels)
    _check_comparable(cand, qry)
    uniq, counts = np.unique(cand, return_counts=True)
    if len(uniq) == 0:
        return np.zeros(len(qry), dtype=np.int64)
    pos = np.minimum(np.searchsorted(uniq, qry), len(uniq) - 1)
    return np.where(uniq[pos] == qry, counts[pos], 0).astype(np.int64)


def hits_from_ranking(ranked: np.ndarray, labels_of_candidates: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """(Q, L) bool: does the candidate at each rank carry the query's label? -1 in ``ranked`` is "no item"."""
    ranked, cand, qry = np.asarray(ranked), np.asarray(labels_of_candidates), np.asarray(query_labels)
    if ranked.ndim != 2 or qry.shape != (ranked.shape[0],):
        raise ValueError(f"ranked must be (Q, L) and query_labels (Q,), got {ranked.shape} and {qry.shape}")
    _check_comparable(cand, qry)
    valid = ranked >= 0
    if valid.any() and ranked.max() >= len(cand):
        raise ValueError(f"ranked holds candidate index {ranked.max()} but there are only {len(cand)} candidates")
    if len(cand) == 0:
        return valid  # all padding
    items = cand[np.where(valid, ranked, 0)]
    return valid & np.asarray(items == qry[:, None], dtype=bool)


def per_query_metrics(hits: np.ndarray, n_relevant: np.ndarray, precision_at: Sequence[int] = PRECISION_AT,
                      ap_at: Sequence[int] = AP_AT) -> dict[str, np.ndarray]:
    """Each metric per query, (Q,) float64 in percent; NaN where R = 0."""
    hits, R = np.asarray(hits, dtype=bool), np.asarray(n_relevant, dtype=np.int64)
    if hits.ndim != 2 or R.shape != (hits.shape[0],):
        raise ValueError(f"hits must be (Q, L) and n_relevant (Q,), got {hits.shape} and {R.shape}")
    if min((*precision_at, *ap_at), default=1) < 1:
        raise ValueError("metric cut-offs K must be >= 1")
    Q, L = hits.shape
    ranks = np.arange(1, L + 1)
    # Column k of these is the value over the top k (column 0: the empty top), so a cut-off K reads column
    # min(K, L): ranks past the end of the list add nothing, i.e. count as misses.
    n_hits = np.zeros((Q, L + 1))
    np.cumsum(hits, axis=1, out=n_hits[:, 1:])
    prec_sum = np.zeros((Q, L + 1))
    np.cumsum(np.where(hits, n_hits[:, 1:] / ranks, 0.0), axis=1, out=prec_sum[:, 1:])
    if (n_hits[:, -1] > R).any():
        q = int(np.argmax(n_hits[:, -1] > R))
        raise ValueError(f"query {q} has {int(n_hits[q, -1])} relevant items ranked but n_relevant = {R[q]}")

    has_rel = R > 0
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 only where R = 0 (or no hits, handled by where)
        for k in precision_at:
            out[f"P@{k}"] = n_hits[:, min(k, L)] / k
        for k in ap_at:
            h, s = n_hits[:, min(k, L)], prec_sum[:, min(k, L)]
            out[f"mAP@{k}"] = np.where(h > 0, s / h, 0.0)
            out[f"mAP@{k}_std"] = s / np.minimum(R, k)
        out["R-prec"] = n_hits[np.arange(Q), np.minimum(R, L)] / R
    return {key: np.where(has_rel, 100.0 * v, np.nan) for key, v in out.items()}


def retrieval_metrics(hits: np.ndarray, n_relevant: np.ndarray, precision_at: Sequence[int] = PRECISION_AT,
                      ap_at: Sequence[int] = AP_AT) -> dict[str, float]:
    """Means over queries with R > 0 of ``per_query_metrics`` (NaN when there are none), plus the counts
    ``queries`` (R > 0) and ``queries_without_relevant`` (R = 0)."""
    per_query = per_query_metrics(hits, n_relevant, precision_at, ap_at)
    has_rel = np.asarray(n_relevant) > 0
    n = int(has_rel.sum())
    out: dict[str, float] = {k: float(v[has_rel].mean()) if n else float("nan") for k, v in per_query.items()}
    out["queries"] = n
    out["queries_without_relevant"] = int(len(has_rel) - n)
    return out


def harmonic_mean(seen: float | None, unseen: float | None, fallback: bool = False) -> float | None:
    """HM = 2·s·u / (s + u) of seen and unseen figures (the base-to-new convention of CLIP fine-tuning research:
    CoOp, CoCoOp); 0 when both are 0. A side without queries (None or NaN) makes it None (a report says so), or
    with ``fallback`` the other side, NaN if neither has one (model selection needs a number)."""
    missing = [v is None or math.isnan(v) for v in (seen, unseen)]
    if any(missing):
        if not fallback:
            return None
        return float("nan") if all(missing) else float(unseen if missing[0] else seen)
    return 0.0 if seen + unseen == 0 else 2 * seen * unseen / (seen + unseen)


def rank_scores(scores: np.ndarray, k: int) -> np.ndarray:
    """(Q, min(k, N)) candidate indices, best score first; equal scores rank the lower candidate index first."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (Q, N), got shape {scores.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    Q, N = scores.shape
    k = min(k, N)
    if k == 0:
        return np.zeros((Q, 0), dtype=np.int64)
    # argpartition alone picks an arbitrary subset of the candidates tied with the k-th best score, so take the
    # k-th best value t and keep everything above t plus the lowest-index ties needed to make k.
    t = np.partition(scores, N - k, axis=1)[:, N - k, None]
    above, tied = scores > t, scores == t
    need = k - above.sum(axis=1, keepdims=True)
    keep = above | (tied & (np.cumsum(tied, axis=1, dtype=np.int32) <= need))
    top = np.nonzero(keep)[1].reshape(Q, k)  # each row's k indices, ascending
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")  # stable: lower index first
    return np.take_along_axis(top, order, axis=1)
