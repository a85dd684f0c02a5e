"""The model registry: every model clipita ranks with, what kind it is, what it reads and where its parts live.

Evaluation, the index build and serving ask this module and never compare a model's name. Adding a model is one
entry here (and a ranker class in clipita/rankers.py only if it is a new kind).

    bm25      sparse: BM25 over product titles; query = the category's words
    mpnet     zero-shot: title embedding vs the sentence-encoder embedding of the category text (cosine)
    clip      zero-shot: image embedding vs the CLIP text-tower embedding of the prompted category text
    clip-i    trained heads over [image]                      (PAPER.md ablations)
    clip-ia   trained heads over [image, attributes]
    clip-ita  trained heads over [image, title, attributes]   (CLIP-ITA)

The name is the one spelling in metrics, URLs and the index (``index/<scope>/<group>``: the name, and for trained
heads ``<name>-<setting>``). Trained heads' checkpoints keep jobs.train's ``checkpoints/<variant>-<setting>/``.
"""
from __future__ import annotations

from dataclasses import dataclass

from clipita.workdir import best_checkpoint

SPARSE, ZERO_SHOT, TRAINED = "sparse", "zero-shot", "trained"
# what the query side of a model needs (clipita.rankers.Queries): the words, or one of the stored embeddings
QUERY_WORDS, QUERY_SENTENCE, QUERY_CLIP = "words", "sentence", "clip"


@dataclass(frozen=True)
class Model:
    name: str
    kind: str  # SPARSE | ZERO_SHOT | TRAINED
    reads: tuple[str, ...]  # product fields (clipita.features.Products): titles, or the image / title /
    #                         attributes embeddings
    query: str  # QUERY_WORDS | QUERY_SENTENCE | QUERY_CLIP
    variant: str = ""  # trained heads: the ClipIta variant (clipita.model.VARIANT_INPUTS), jobs.train --variant

    @property
    def dense(self) -> bool:
        """Ranks by cosine over stored vectors, so it has an index group."""
        return self.kind != SPARSE

    @property
    def trained(self) -> bool:
        return self.kind == TRAINED

    @property
    def reads_clip_text(self) -> bool:
        """Its queries are the CLIP text tower's: no baseline when that tower is aligned with no image tower."""
        return self.query == QUERY_CLIP

    def index_group(self, setting: str | None = None) -> str | None:
        """Its group under index/<scope>/ (trained heads: one per setting); None for a sparse model."""
        if not self.dense:
            return None
        return f"{self.name}-{setting}" if self.trained else self.name

    def checkpoint(self, workdir: str, setting: str) -> str:
        """A trained model's best checkpoint of ``setting``."""
        if not self.trained:
            raise ValueError(f"model {self.name} has no checkpoint: it is not trained")
        return best_checkpoint(workdir, self.variant, setting)


REGISTRY: dict[str, Model] = {m.name: m for m in (
    Model("bm25", SPARSE, ("titles",), QUERY_WORDS),
    Model("mpnet", ZERO_SHOT, ("title",), QUERY_SENTENCE),
    Model("clip", ZERO_SHOT, ("image",), QUERY_CLIP),
    Model("clip-i", TRAINED, ("image",), QUERY_SENTENCE, "i"),
    Model("clip-ia", TRAINED, ("image", "attributes"), QUERY_SENTENCE, "ia"),
    Model("clip-ita", TRAINED, ("image", "title", "attributes"), QUERY_SENTENCE, "ita"),
)}
MODELS = tuple(REGISTRY)
BASELINES = tuple(n for n, m in REGISTRY.items() if not m.trained)
TRAINED_MODELS = tuple(n for n, m in REGISTRY.items() if m.trained)
DENSE = tuple(n for n, m in REGISTRY.items() if m.dense)
VARIANTS = tuple(REGISTRY[n].variant for n in TRAINED_MODELS)  # jobs.train --variant; checkpoints/<variant>-<setting>
# Every jobs.index run builds this group (it needs no training); the rows files of a scope, which every group of
# it shares, are found through its manifest.
ROWS_GROUP = next(n for n, m in REGISTRY.items() if m.kind == ZERO_SHOT)


def get(name: str) -> Model:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join(MODELS)}") from None


def index_groups(setting: str) -> dict[str, str]:
    """model -> its index group for ``setting``, every dense model."""
    return {n: REGISTRY[n].index_group(setting) for n in DENSE}
