"""What e-CLIP's downstream tasks share (jobs.classify, jobs.match, the endpoint's /classify and /similar): the
categories a product is put into (the tree's leaves), a model's category vectors, scores of products against them,
policy flags over subtrees, and the vectors an index shard stores.

A product is categorised into a leaf: its score against a category is the model's cosine (the same product and
category vectors the retrieval ranks with); the probability of a leaf is the softmax of the cosines at
``classify.temperature``, and a flag's mass the summed probability of the leaves under its subtrees.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipita.tree import SEP, CategoryTree, category_id
from clipita.vectors import unit_rows


def leaves(tree: CategoryTree) -> list[str]:
    """The categories a product is put into, in id order (the label space of every classification)."""
    return sorted(tree.leaves)


def category_vectors(workdir: str, model: str, setting: str, ids, query_text: str = "name") -> np.ndarray:
    """(C, D) unit query vectors of the tree categories ``ids`` for ``model`` (its heads of ``setting``), from the
    embeddings jobs.embed stored: the vectors jobs.evaluate ranks with."""
    from clipita.features import load_categories
    from clipita.rankers import Queries, load_ranker

    ranker = load_ranker(workdir, model, setting)
    return unit_rows(np.asarray(ranker.query_vectors(Queries.from_categories(load_categories(workdir), list(ids),
                                                                             query_text)), np.float32))


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    z = scores / temperature
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(axis=1, keepdims=True)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column indices (N, k) of the highest scores best first (ties: lower index first), and those scores."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else \
        np.tile(np.arange(scores.shape[1]), (len(scores), 1))
    vals = np.take_along_axis(scores, part, 1)
    order = np.lexsort((part, -vals), axis=1)
    idx = np.take_along_axis(part, order, 1)
    return idx, np.take_along_axis(scores, idx, 1)


def parse_flags(entries, tree: CategoryTree) -> dict[str, list[str]]:
    """``classify.flags`` ("NAME: Category > Path" entries) -> {name: [subtree ids]}; a path the tree does not
    have is one error naming it."""
    out: dict[str, list[str]] = {}
    for entry in entries:
        name, _, path = entry.partition(":")
        cid = category_id([p.strip() for p in path.split(">") if p.strip()])
        if cid not in tree:
            raise ValueError(f"classify.flags: {name.strip()}: no category {cid!r} in the tree")
        out.setdefault(name.strip(), []).append(cid)
    return out


def flag_columns(flags: dict[str, list[str]], leaf_ids: list[str]) -> dict[str, np.ndarray]:
    """{flag: (C,) bool} the leaves under any of the flag's subtrees."""
    return {name: np.array([any(c == s or c.startswith(s + SEP) for s in subtrees) for c in leaf_ids], bool)
            for name, subtrees in flags.items()}


@dataclass
class Categoriser:
    """A model's categorisation of product vectors: top-k leaves with their cosines, and each flag's mass with
    whether it passes its threshold (classify/flags.json, chosen on validation by jobs.classify)."""

    leaf_ids: list[str]
    vectors: np.ndarray  # (C, D) unit category vectors of the leaves
    temperature: float = 0.05
    flags: dict[str, np.ndarray] | None = None  # flag -> (C,) leaves under it
    thresholds: dict[str, float] | None = None

    def scores(self, products: np.ndarray) -> np.ndarray:
        return unit_rows(np.asarray(products, np.float32)) @ self.vectors.T

    def flag_mass(self, scores: np.ndarray) -> dict[str, np.ndarray]:
        p = softmax(scores, self.temperature)
        return {name: p[:, under].sum(axis=1) for name, under in (self.flags or {}).items()}

    def __call__(self, products: np.ndarray, k: int) -> list[dict]:
        """One answer per product vector: ``{"categories": [{"category", "score"}], "flags": [{"flag", "score",
        "flagged"}]}``."""
        s = self.scores(products)
        idx, top = top_k(s, k)
        mass = self.flag_mass(s)
        return [{"categories": [{"category": self.leaf_ids[j], "score": float(v)} for j, v in zip(idx[i], top[i])],
                 "flags": [{"flag": f, "score": float(m[i]),
                            "flagged": bool(m[i] >= (self.thresholds or {}).get(f, float("inf")))}
                           for f, m in mass.items()]} for i in range(len(s))]


def shard_vectors(shard, first_key: int, count: int) -> np.ndarray:
    """(count, D) float32 unit vectors a usearch shard stores for keys first_key .. first_key + count - 1 (jobs.index
    keys rows in order), so that a task over the index needs no other copy of the vectors."""
    if count == 0:
        return np.zeros((0, shard.ndim), np.float32)
    got = shard.get(np.arange(first_key, first_key + count, dtype=np.uint64), dtype=np.float32)
    return unit_rows(np.stack(got) if isinstance(got, tuple) else np.asarray(got, np.float32))
