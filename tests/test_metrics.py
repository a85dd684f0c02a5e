"""clipita.metrics: hand-computed cases, agreement with trec_eval (through ir_measures' pytrec_eval backend) and
a brute-force Python reference on seeded random data."""
from __future__ import annotations

import math

import numpy as np
import pytest

from clipita.metrics import count_relevant, hits_from_ranking, per_query_metrics, rank_scores, retrieval_metrics


def hits_of(*rows: str) -> np.ndarray:
    """'0010' -> [False, False, True, False]: one query per string."""
    return np.array([[c == "1" for c in row] for row in rows], dtype=bool)


# --- rank_scores ---------------------------------------------------------------------------------------------

def test_rank_scores_breaks_ties_by_lower_index():
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1],
                       [1.0, 1.0, 1.0, 1.0, 1.0]])
    # Three candidates tie at 0.5 across the k = 3 boundary: the lowest indices win, in index order.
    assert rank_scores(scores, 3).tolist() == [[1, 0, 2], [0, 1, 2]]
    assert rank_scores(scores, 1).tolist() == [[1], [0]]


def test_rank_scores_k_beyond_candidates_returns_all():
    scores = np.array([[0.2, 0.7, 0.7]])
    assert rank_scores(scores, 10).tolist() == [[1, 2, 0]]


@pytest.mark.parametrize("seed", range(3))
def test_rank_scores_matches_full_sort(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(60, 40)).astype(np.float32)  # few distinct values: ties everywhere
    for k in (1, 7, 40):
        expected = [sorted(range(40), key=lambda j: (-row[j], j))[:k] for row in scores]
        assert rank_scores(scores, k).tolist() == expected


def test_rank_scores_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        rank_scores(np.array([[0.1, np.nan]]), 1)
    with pytest.raises(ValueError, match="k must be"):
        rank_scores(np.zeros((2, 3)), 0)


# --- hits_from_ranking / count_relevant ----------------------------------------------------------------------

def test_hits_from_ranking_string_labels_and_padding():
    cand = np.array(["shoes", "bags", "shoes", "hats"], dtype=object)
    queries = np.array(["shoes", "hats"], dtype=object)
    # -1 pads short lists; candidate 0 is "shoes", yet the padding must not count as a hit for "shoes".
    ranked = np.array([[2, 1, 0, -1],
                       [3, -1, -1, -1]])
    assert hits_from_ranking(ranked, cand, queries).tolist() == [[True, False, True, False],
                                                                  [True, False, False, False]]
    assert count_relevant(cand, queries).tolist() == [2, 1]


def test_hits_from_ranking_int_labels():
    ranked = np.array([[0, 1, 2], [2, 1, 0]])
    assert hits_from_ranking(ranked, np.array([7, 8, 7]), np.array([7, 8])).tolist() == [[True, False, True],
                                                                                          [False, True, False]]


def test_count_relevant_absent_label_is_zero():
    assert count_relevant(np.array(["a", "b", "a"]), np.array(["c", "a", "0", "zz"])).tolist() == [0, 2, 0, 0]
    assert count_relevant(np.array([], dtype=str), np.array(["a"])).tolist() == [0]


def test_label_errors_are_one_line():
    with pytest.raises(ValueError, match="only 3 candidates"):
        hits_from_ranking(np.array([[0, 3]]), np.array([1, 2, 3]), np.array([1]))
    # int vs str labels would otherwise compare all-False silently
    with pytest.raises(ValueError, match="different kinds"):
        hits_from_ranking(np.array([[0]]), np.array([1, 2]), np.array(["1"]))
    with pytest.raises(ValueError, match="different kinds"):
        count_relevant(np.array([1, 2]), np.array(["1"]))


# --- hand-computed metrics -----------------------------------------------------------------------------------

def test_paper_and_std_ap_differ_when_r_exceeds_hits():
    # One hit at rank 3, R = 4: paper AP@5 = P@3 / 1 hit; std AP@5 = P@3 / min(4, 5).
    m = retrieval_metrics(hits_of("0010000000"), np.array([4]))
    assert m["mAP@5"] == pytest.approx(100 / 3)
    assert m["mAP@5_std"] == pytest.approx(100 * (1 / 3) / 4)  # 8.33
    assert m["P@1"] == 0 and m["P@5"] == pytest.approx(20) and m["P@10"] == pytest.approx(10)
    assert m["R-prec"] == pytest.approx(25)  # 1 relevant in the top 4


def test_r_smaller_than_k():
    # R = 2, both retrieved at ranks 1 and 3: both AP variants agree (all relevant items are in the top K).
    m = retrieval_metrics(hits_of("1010000000"), np.array([2]))
    assert m["P@5"] == pytest.approx(40)
    assert m["mAP@5"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert m["mAP@5_std"] == pytest.approx(m["mAP@5"])
    assert m["R-prec"] == pytest.approx(50)  # top 2 holds one of them


def test_r_larger_than_k():
    # R = 8, hits at ranks 2 and 4 of the top 5, then 6, 7, 8 of the top 10.
    m = retrieval_metrics(hits_of("0101011100"), np.array([8]))
    assert m["mAP@5"] == pytest.approx(100 * (1 / 2 + 2 / 4) / 2)
    assert m["mAP@5_std"] == pytest.approx(100 * (1 / 2 + 2 / 4) / 5)
    ap10 = 1 / 2 + 2 / 4 + 3 / 6 + 4 / 7 + 5 / 8
    assert m["mAP@10"] == pytest.approx(100 * ap10 / 5)
    assert m["mAP@10_std"] == pytest.approx(100 * ap10 / 8)
    assert m["R-prec"] == pytest.approx(100 * 5 / 8)


def test_r_larger_than_list_counts_missing_ranks_as_misses():
    # Only 3 ranks were retrieved, R = 5: ranks 4.. are misses for P@5, P@10 and R-precision.
    m = retrieval_metrics(hits_of("110"), np.array([5]))
    assert m["P@1"] == pytest.approx(100)
    assert m["P@5"] == pytest.approx(40) and m["P@10"] == pytest.approx(20)
    assert m["R-prec"] == pytest.approx(40)
    assert m["mAP@5"] == pytest.approx(100) and m["mAP@5_std"] == pytest.approx(40)
    assert m["mAP@10_std"] == pytest.approx(40)  # min(5, 10) = 5


def test_query_without_relevant_items_is_excluded_and_counted():
    hits, R = hits_of("100", "000", "010"), np.array([1, 0, 2])
    m = retrieval_metrics(hits, R)
    assert m["queries"] == 2 and m["queries_without_relevant"] == 1
    assert m["P@1"] == pytest.approx(50)  # (100 + 0) / 2, not / 3
    per_query = per_query_metrics(hits, R)
    assert np.isnan(per_query["P@1"][1]) and not np.isnan(per_query["P@1"][[0, 2]]).any()


def test_no_query_with_relevant_items_gives_nan_means():
    m = retrieval_metrics(hits_of("00"), np.array([0]))
    assert m["queries"] == 0 and m["queries_without_relevant"] == 1 and math.isnan(m["P@1"])


def test_more_hits_than_n_relevant_is_an_error():
    with pytest.raises(ValueError, match="n_relevant"):
        retrieval_metrics(hits_of("110"), np.array([1]))


# --- agreement with trec_eval via ir_measures ----------------------------------------------------------------

def random_retrieval(seed: int, Q: int = 200, N: int = 50, L: int = 20):
    """Random scores over N candidates with skewed labels (R from 0 to beyond L), ranked by rank_scores."""
    rng = np.random.default_rng(seed)
    n_labels = 8
    p = 0.5 ** np.arange(1, n_labels + 1)
    cand = rng.choice(n_labels, size=N, p=p / p.sum())
    queries = rng.integers(0, n_labels + 2, size=Q)  # the last labels are (nearly) never carried: R = 0
    scores = rng.random((Q, N))
    ranked = rank_scores(scores, L)
    return cand, queries, scores, ranked


def test_agrees_with_trec_eval():
    import ir_measures
    from ir_measures import AP, P, Rprec

    cand, queries, scores, ranked = random_retrieval(seed=0)
    R = count_relevant(cand, queries)
    hits = hits_from_ranking(ranked, cand, queries)
    assert (R == 0).any() and (R > ranked.shape[1]).any() and ((R > 0) & (R <= 5)).any()  # the data covers every case

    qrels = {f"q{q}": {f"d{j}": int(cand[j] == queries[q]) for j in range(len(cand))} for q in range(len(queries))
             if R[q] > 0}
    run = {f"q{q}": {f"d{j}": float(scores[q, j]) for j in ranked[q]} for q in range(len(queries))}
    measures = [P @ 1, P @ 5, P @ 10, Rprec, AP @ 5, AP @ 10]
    trec = {m: np.full(len(queries), np.nan) for m in measures}
    for row in ir_measures.pytrec_eval.iter_calc(measures, qrels, run):
        trec[row.measure][int(row.query_id[1:])] = row.value

    ours = per_query_metrics(hits, R)
    has = R > 0
    assert not np.isnan(trec[P @ 1][has]).any()
    for k in (1, 5, 10):
        np.testing.assert_allclose(ours[f"P@{k}"][has], 100 * trec[P @ k][has], atol=1e-9)
    np.testing.assert_allclose(ours["R-prec"][has], 100 * trec[Rprec][has], atol=1e-9)

    # trec_eval's map_cut_K is sum_{k<=K relevant} P@k / R. Ours divide the same sum by min(R, K) (std) or by the
    # hits in the top K (paper), so rescaling gives an exact comparison on every query ...
    for k in (5, 10):
        total = trec[AP @ k][has] * R[has]
        hits_k = ours[f"P@{k}"][has] / 100 * k
        np.testing.assert_allclose(ours[f"mAP@{k}_std"][has], 100 * total / np.minimum(R[has], k), atol=1e-9)
        expected_paper = np.divide(100 * total, hits_k, out=np.zeros_like(total), where=hits_k > 0)
        np.testing.assert_allclose(ours[f"mAP@{k}"][has], expected_paper, atol=1e-9)
        # ... and where R <= K the std variant is trec_eval's number itself.
        small = has & (R <= k)
        assert small.any()
        np.testing.assert_allclose(ours[f"mAP@{k}_std"][small], 100 * trec[AP @ k][small], atol=1e-9)

    means = retrieval_metrics(hits, R)
    assert means["queries"] == has.sum()
    assert means["P@5"] == pytest.approx(100 * np.mean(trec[P @ 5][has]))
    assert means["R-prec"] == pytest.approx(100 * np.mean(trec[Rprec][has]))


# --- brute-force reference -----------------------------------------------------------------------------------

def reference_metrics(hits: np.ndarray, R: np.ndarray, precision_at, ap_at) -> dict[str, float]:
    """The definitions written as plain loops, one query at a time."""
    rows = []
    for h, r in zip(hits.tolist(), R.tolist()):
        if r == 0:
            continue
        def hits_in_top(k):
            return sum(h[:k])  # slicing past the end: missing ranks are misses
        row = {f"P@{k}": hits_in_top(k) / k for k in precision_at}
        for k in ap_at:
            precisions = [hits_in_top(i + 1) / (i + 1) for i in range(min(k, len(h))) if h[i]]
            row[f"mAP@{k}"] = sum(precisions) / len(precisions) if precisions else 0.0
            row[f"mAP@{k}_std"] = sum(precisions) / min(r, k)
        row["R-prec"] = hits_in_top(r) / r
        rows.append(row)
    out = {key: 100 * sum(row[key] for row in rows) / len(rows) for key in rows[0]}
    out["queries"] = len(rows)
    out["queries_without_relevant"] = len(R) - len(rows)
    return out


@pytest.mark.parametrize("seed,L", [(0, 3), (1, 10), (2, 25), (3, 1)])
def test_matches_brute_force_reference(seed, L):
    rng = np.random.default_rng(seed)
    Q = 300
    hits = rng.random((Q, L)) < rng.uniform(0.05, 0.6, size=(Q, 1))
    R = hits.sum(axis=1) + rng.integers(0, 15, size=Q) * (rng.random(Q) < 0.7)  # R >= hits, sometimes R = 0
    precision_at, ap_at = (1, 2, 5, 10), (1, 3, 5, 10, 30)
    assert (R == 0).any()
    ours = retrieval_metrics(hits, R, precision_at, ap_at)
    expected = reference_metrics(hits, R, precision_at, ap_at)
    assert ours.keys() == expected.keys()
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
