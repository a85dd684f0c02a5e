"""One interface for every model of the registry (clipita/models.py): score category queries against products,
return ranked products.

Dense models also expose ``product_vectors`` / ``query_vectors`` (unit norm, cosine = dot), which is what the USearch
index stores; evaluation and serving call ``rank`` / ``scores`` / ``query_input`` and never branch on the model.

BM25 tokenisation: lower-cased Unicode word characters (``\\w+``), no stemming, no stop words: titles and category
names are short, and the paper's BM25 baseline states no more.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipita.bm25 import SparseBM25, tokenize
from clipita.features import Categories, Products
from clipita.metrics import rank_scores
from clipita.vectors import unit_rows
from clipita.models import (QUERY_CLIP, QUERY_SENTENCE, QUERY_WORDS, REGISTRY, SPARSE, ZERO_SHOT, Model, get)



@dataclass
class Queries:
    """Category queries: their text, and their embeddings where a model needs them."""

    texts: list[str]
    text: np.ndarray | None = None  # (Q, Dt) sentence-encoder embeddings
    clip: np.ndarray | None = None  # (Q, Dc) CLIP text-tower embeddings

    def side(self, query: str):
        """What a model's query side reads (clipita.models: QUERY_WORDS / QUERY_SENTENCE / QUERY_CLIP)."""
        return {QUERY_WORDS: self.texts, QUERY_SENTENCE: self.text, QUERY_CLIP: self.clip}[query]

    @classmethod
    def from_categories(cls, categories: Categories, ids, mode: str = "name") -> "Queries":
        """Queries for known categories, from the embeddings jobs.embed computed once."""
        idx = categories.index(ids)
        texts = [str(t) for t in (categories.names[idx] if mode == "name" else categories.ids[idx])]
        return cls(texts, categories.text[mode][idx], categories.clip[mode][idx])


class QueryEncoder:
    """Embeds arbitrary query text (serving: categories never seen before) with the frozen encoders."""

    def __init__(self, encoders):
        from clipita.encoders import ImageEncoder, TextEncoder

        self.text, self.clip, self.prompt = TextEncoder(encoders), ImageEncoder(encoders), encoders.clip_prompt

    def __call__(self, texts: list[str]) -> Queries:
        return Queries(list(texts), self.text.encode(list(texts)),
                       self.clip.encode_text([self.prompt.format(t) for t in texts]))


class Ranker:
    model: Model

    def scores(self, queries: Queries, products: Products) -> np.ndarray:
        """(Q, N) float32, higher is better."""
        raise NotImplementedError

    def rank(self, queries: Queries, products: Products, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k product indices (Q, k) best first (ties: lower index first) and their scores."""
        s = self.scores(queries, products)
        idx = rank_scores(s, k)
        return idx, np.take_along_axis(s, idx, axis=1)

    def query_input(self, queries: Queries):
        """What this model ranks a batch of queries from: their words (sparse) or their unit query vectors."""
        return queries.texts


def _require(array: np.ndarray | None, query: str, model: str) -> np.ndarray:
    if array is None:
        raise ValueError(f"model {model} needs the {query} embeddings of the queries")
    return array


class DenseRanker(Ranker):
    """Cosine similarity between query vectors and product vectors."""

    def product_vectors(self, products: Products) -> np.ndarray:
        raise NotImplementedError

    def query_vectors(self, queries: Queries) -> np.ndarray:
        raise NotImplementedError

    def query_input(self, queries: Queries) -> np.ndarray:
        return self.query_vectors(queries)

    def scores(self, queries: Queries, products: Products) -> np.ndarray:
        return self.query_vectors(queries) @ self.product_vectors(products).T


class ZeroShotRanker(DenseRanker):
    """A zero-shot model: one stored product embedding against one stored query embedding (models.ZERO_SHOT)."""

    def __init__(self, model: Model):
        self.model = model

    def product_vectors(self, products: Products) -> np.ndarray:
        return unit_rows(getattr(products, self.model.reads[0]))

    def query_vectors(self, queries: Queries) -> np.ndarray:
        return unit_rows(_require(queries.side(self.model.query), self.model.query, self.model.name))


class HeadRanker(DenseRanker):
    """A trained CLIP-I / CLIP-IA / CLIP-ITA model (clipita.model.ClipIta) applied to the frozen features."""

    def __init__(self, heads, batch_size: int = 4096):
        self.heads = heads.eval()
        self.model = next(m for m in REGISTRY.values() if m.variant == heads.config.variant)
        self.batch_size = batch_size

    def _apply(self, fn, inputs: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        n = len(next(iter(inputs.values())))
        device = next(self.heads.parameters()).device  # a GPU when the caller moved the model there (to())
        out = []
        with torch.inference_mode():
            for s in range(0, n, self.batch_size):
                out.append(fn({k: torch.from_numpy(np.ascontiguousarray(v[s:s + self.batch_size], np.float32))
                               .to(device) for k, v in inputs.items()}).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.heads.config.output_dim), np.float32)

    def to(self, device) -> "HeadRanker":
        self.heads.to(device)
        return self

    def product_vectors(self, products: Products) -> np.ndarray:
        return self._apply(self.heads.encode_products, products.tensors())

    def query_vectors(self, queries: Queries) -> np.ndarray:
        text = _require(queries.side(self.model.query), self.model.query, self.model.name)
        return self._apply(lambda b: self.heads.encode_categories(b["category"]), {"category": text})


class BM25Ranker(Ranker):
    """BM25 Okapi over titles. ``rank`` goes through clipita.bm25's inverted index (the exact top-k, touching
    only the titles that share a word with the query); ``scores`` is rank_bm25's dense scoring, the reference.
    The index is built once per product set (kept for the last set seen)."""

    def __init__(self, model: Model):
        self.model = model
        self._built_for: tuple[int, int] | None = None
        self._index = None

    def _sparse(self, products: Products):
        key = (id(products), len(products))
        if self._built_for != key:
            self._index, self._built_for = SparseBM25([str(t) for t in products.titles]), key
        return self._index

    def scores(self, queries: Queries, products: Products) -> np.ndarray:
        from rank_bm25 import BM25Okapi

        # rank_bm25 divides by the mean document length: keep an empty title from making it zero.
        bm25 = BM25Okapi([tokenize(str(t)) or ["\x00"] for t in products.titles])
        return np.stack([bm25.get_scores(tokenize(q)) for q in queries.texts]).astype(np.float32) \
            if queries.texts else np.zeros((0, len(products)), np.float32)

    def rank(self, queries: Queries, products: Products, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not queries.texts:
            return np.zeros((0, min(k, len(products))), np.int64), np.zeros((0, min(k, len(products))), np.float32)
        return self._sparse(products).top_k(queries.texts, k)


def load_ranker(workdir: str, model: str, setting: str | None = None) -> Ranker:
    """Any model of the registry; trained ones load the best checkpoint of their setting from the workdir."""
    spec = get(model)
    if spec.kind == SPARSE:
        return BM25Ranker(spec)
    if spec.kind == ZERO_SHOT:
        return ZeroShotRanker(spec)
    from clipita.checkpoint import load_model  # torch: loaded only where heads run

    return HeadRanker(load_model(spec.checkpoint(workdir, setting)))
