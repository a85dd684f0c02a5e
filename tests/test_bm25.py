"""clipita.bm25.SparseBM25 returns exactly rank_bm25 BM25Okapi.get_scores -> float32 -> metrics.rank_scores."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from clipita.bm25 import SparseBM25, tokenize
from clipita.metrics import rank_scores

WORDS = "red blue Shoe shoe boot café Über über 日本 x y z a b c d e f".split()


def reference(titles: list[str], queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What BM25Ranker does today: dense rank_bm25 scores, float32, rank_scores. Also the float64 scores."""
    bm25 = BM25Okapi([tokenize(str(t)) or ["\x00"] for t in titles])
    s64 = np.stack([bm25.get_scores(tokenize(q)) for q in queries])
    s32 = s64.astype(np.float32)
    rows = rank_scores(s32, k)
    return rows, np.take_along_axis(s32, rows, axis=1), s64


def assert_same(titles: list[str], queries: list[str], k: int, index: SparseBM25 | None = None) -> None:
    rows, scores, s64 = reference(titles, queries, k)
    index = index or SparseBM25(titles)
    for q, dense in zip(queries, s64):  # float64, before the cast: every matched document bitwise, the rest 0
        matched, sparse = index._scores(q)
        assert sparse.tobytes() == dense[matched].tobytes()
        assert not np.delete(dense, matched).any()
    got_rows, got_scores = index.top_k(queries, k)
    assert got_rows.dtype == np.int64 and got_scores.dtype == np.float32
    assert got_rows.shape == got_scores.shape == (len(queries), min(k, len(titles)))
    np.testing.assert_array_equal(got_rows, rows)
    assert got_scores.tobytes() == scores.tobytes()  # bitwise, not just ==


def corpus(seed: int) -> tuple[list[str], list[str]]:
    """Short titles over a small Zipf vocabulary: many exact ties, common terms (negative idf), empty titles."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    vocab = WORDS[:int(rng.integers(2, len(WORDS) + 1))]
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.2
    titles = [" ".join(rng.choice(vocab, int(rng.integers(0, 20)), p=p / p.sum())) for _ in range(n)]
    titles += ["", " ,;- "]  # empty after tokenising: the one-token "\x00" document
    rng.shuffle(titles)
    queries = [" ".join(rng.choice(vocab + ["unknown", "UNKNOWN"], int(rng.integers(0, 5)))) for _ in range(25)]
    queries += ["", "zzz", "red, red RED", "shoe-boot / café"]
    return titles, queries


@pytest.mark.parametrize("seed", range(12))
def test_random_corpora_match_rank_bm25(seed):
    titles, queries = corpus(seed)
    index = SparseBM25(titles)
    matching = [len({r for t in set(tokenize(q)) if t in index.vocab
                     for r in index.rows[index.indptr[index.vocab[t]]:index.indptr[index.vocab[t] + 1]]})
                for q in queries]
    n = len(titles)
    for k in sorted({1, 2, 7, min(matching) + 1, max(matching), max(matching) + 1, n - 1, n, n + 5, 3 * n} - {0}):
        assert_same(titles, queries, k, index)


def test_float32_ties_and_negative_scores_are_covered():
    # The random corpora must hold the hard cases: distinct float64 scores that the float32 cast ties (so the
    # rank order is the row order, not the float64 order), and scores below 0 (epsilon floor below 0).
    reordered = negative = 0
    for seed in range(40):
        titles, queries = corpus(seed)
        _, _, s64 = reference(titles, queries, 1)
        n = len(titles)
        reordered += int((rank_scores(s64, n) != rank_scores(s64.astype(np.float32), n)).any(axis=1).sum())
        negative += int((s64 < 0).sum())
        assert_same(titles, queries, 10)
    assert reordered > 0 and negative > 0


def test_larger_corpus_small_k():
    rng = np.random.default_rng(7)
    vocab = [f"w{i}" for i in range(60)]
    p = 1.0 / np.arange(1, 61)
    titles = [" ".join(rng.choice(vocab, int(rng.integers(1, 13)), p=p / p.sum())) for _ in range(4000)]
    queries = [" ".join(rng.choice(vocab, int(rng.integers(1, 4)))) for _ in range(60)] + ["w0 w0 w1", "nope"]
    index = SparseBM25(titles)
    for k in (1, 10, 100, 5000):
        assert_same(titles, queries, k, index)


def test_hand_checked_example():
    titles = ["red shoe", "blue shoe", "red red boot", ""]  # lengths 2, 2, 3, 1 ("\x00"): mean 2
    index = SparseBM25(titles)
    assert len(index) == 4 and index.avgdl == 2.0
    idf_1 = math.log(3.5) - math.log(1.5)  # a term in 1 of 4 documents
    rows, scores = index.top_k(["blue", "boot", "Red", "blue blue", "nothing"], 3)
    # blue: doc 1, tf 1, dl = avgdl: denominator 1 + 1.5 = 2.5, so the score is the idf; zeros fill rows 0, 2.
    assert rows[0].tolist() == [1, 0, 2] and scores[0, 0] == np.float32(idf_1) and scores[0, 1:].tolist() == [0, 0]
    # boot: doc 2, dl 3: 1.5 * (0.25 + 0.75 * 3 / 2) = 2.0625
    assert rows[1].tolist() == [2, 0, 1] and scores[1, 0] == np.float32(idf_1 * 2.5 / 3.0625)
    # red: in 2 of 4 documents, idf log(2.5) - log(2.5) = 0: every score 0, lowest rows first.
    assert rows[2].tolist() == [0, 1, 2] and not scores[2].any()
    # a repeated token counts twice; an unknown one adds nothing
    assert rows[3, 0] == 1 and scores[3, 0] == np.float32(2 * idf_1)
    assert rows[4].tolist() == [0, 1, 2] and not scores[4].any()
    assert_same(titles, ["blue", "boot", "Red", "blue blue", "nothing", "red shoe boot", ""], 3)


def test_single_document_and_negative_idf():
    # One document: every idf is log(0.5) - log(1.5) < 0, so the floor epsilon * average idf is negative too.
    for k in (1, 3):
        assert_same(["Red shoe"], ["red", "shoe red", "", "blue"], k)
        assert_same([""], ["red", ""], k)
    # a, b in 3 of 4 documents: idf < 0 and the average idf too, so their floor is negative and the documents
    # holding them rank below the one that matches nothing.
    titles = ["a b", "b a", "a b", "c"]
    assert_same(titles, ["a", "a b", "b a a", "c", "q"], 4)
    index = SparseBM25(titles)
    assert index.average_idf < 0 and (index.idf[:2] == index.epsilon * index.average_idf).all()
    rows, scores = index.top_k(["a"], 4)
    assert rows[0].tolist() == [3, 0, 1, 2] and scores[0, 0] == 0 and (scores[0, 1:] < 0).all()


def test_only_unknown_or_empty_queries():
    titles, _ = corpus(3)
    assert_same(titles, ["unknown", "", "!!", "zzz qqq zzz"], 5)
    assert_same(titles, ["unknown"], len(titles) + 10)
    rows, scores = SparseBM25(titles).top_k([], 5)
    assert rows.shape == scores.shape == (0, 5)


def test_arguments_and_memory():
    with pytest.raises(ValueError):
        SparseBM25([])
    index = SparseBM25(["a b", "b c c"])
    with pytest.raises(ValueError):
        index.top_k(["a"], 0)
    assert index.tf.dtype == np.uint8 and index.rows.dtype == np.int32
    assert 0 < index.nbytes < 200


def _old_tokenize(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())  # clipita.rankers.tokenize before it moved


def test_tokenize_unchanged():
    from clipita import rankers

    assert rankers.tokenize is tokenize
    rng = np.random.default_rng(0)
    pool = list("abcXYZ019_ -,.;'\"!?/\t\n") + list("éÜßİıΣσςﬁ日本語ー٣①²ǅ") + ["\u0301", "\u200b", "\x00", "🙂"]
    for _ in range(3000):
        text = "".join(rng.choice(pool, int(rng.integers(0, 30))))
        assert tokenize(text) == _old_tokenize(text)
    assert tokenize("Women's Boots, size 38 — Über") == ["women", "s", "boots", "size", "38", "über"]


@pytest.mark.parametrize("seed", range(6))
def test_partitions_merged_equal_one_index(seed):
    """Titles split over partitions (as evaluation's ranking actors hold them), scored with the merged corpus
    statistics and merged by (score, product id), give exactly rank_bm25's top-k over the id-sorted corpus."""
    from clipita.bm25 import BM25Corpus

    titles, queries = corpus(seed)
    ids = [f"p{i:05d}" for i in range(len(titles))]
    rng = np.random.default_rng(seed)
    part_of = rng.integers(0, 3, len(titles))
    parts = [[i for i in range(len(titles)) if part_of[i] == p] for p in range(3)]
    parts = [p for p in parts if p]
    indexes = [SparseBM25([titles[i] for i in p]) for p in parts]
    corpus_ = BM25Corpus.merge([ix.stats([ids[i] for i in p]) for ix, p in zip(indexes, parts)])
    for ix in indexes:
        ix.use(corpus_)
    k = 15
    rows, scores, _ = reference(titles, queries, k)
    got_rows, got_scores = [], []
    for ix, p in zip(indexes, parts):
        r, s = ix.top_k(queries, k)
        got_rows.append(np.asarray(p)[r])
        got_scores.append(s)
    r, s = np.concatenate(got_rows, 1), np.concatenate(got_scores, 1)
    order = np.lexsort((r, -s), axis=1)[:, :k]  # ids sort like rows here
    np.testing.assert_array_equal(np.take_along_axis(r, order, 1), rows)
    assert np.take_along_axis(s, order, 1).tobytes() == scores.tobytes()
