"""The category tree, the paper's three labelling settings, the product split and seen/unseen categories.

Decisions later stages rely on:
- A category's identity is its full path joined with " > " (``Women > Shoes > Boots``), so equal names under
  different parents are different categories. Its query text is its name (the last element), or the full path.
- Labels and splits are functions of (seed, product_id) alone, through a keyed hash: stable across runs, machines,
  row order and catalogue growth, and computable one row at a time inside a streaming job.
  ``all`` = one node of the path chosen by that hash; ``general`` = the root; ``specific`` = the deepest node.
- Split: train / val / test by the hash's uniform value against (1 - val - test, 1 - test) cut points.
- Unseen categories: test-split labels in a setting that no train-split product has in that setting. Optionally
  (``data.unseen_fraction``) whole categories are held out of training, so that every setting has some.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

SEP = " > "
SETTINGS = ("all", "general", "specific")
SPLITS = ("train", "val", "test")


def category_id(path: Sequence[str]) -> str:
    return SEP.join(path)


def category_name(cid: str) -> str:
    return cid.rsplit(SEP, 1)[-1]


def query_text(cid: str, mode: str = "name") -> str:
    """Text that stands for a category in a query: its name (the paper) or its full path."""
    return category_name(cid) if mode == "name" else cid


def unit_hash(seed: int, purpose: str, product_id: str) -> float:
    """A uniform value in [0, 1) fixed by (seed, purpose, product_id)."""
    digest = hashlib.blake2b(f"{seed}\x1f{purpose}\x1f{product_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def label(path: Sequence[str], setting: str, product_id: str, seed: int = 0) -> str:
    """The category a product is labelled with in a setting (PAPER.md: all / most general / most specific)."""
    if not path:
        raise ValueError(f"product {product_id!r} has an empty category path")
    if setting == "general":
        depth = 1
    elif setting == "specific":
        depth = len(path)
    elif setting == "all":
        depth = 1 + int(unit_hash(seed, "label", product_id) * len(path))
    else:
        raise ValueError(f"unknown setting {setting!r}: use one of {', '.join(SETTINGS)}")
    return category_id(path[:depth])


def split_of(product_id: str, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1) -> str:
    u = unit_hash(seed, "split", product_id)
    if u < 1.0 - val_fraction - test_fraction:
        return "train"
    return "val" if u < 1.0 - test_fraction else "test"


@dataclass
class Labels:
    """Per-product split and labels for every setting, aligned with ``product_ids``."""

    product_ids: np.ndarray  # (N,) object
    split: np.ndarray  # (N,) object: train | val | test
    by_setting: dict[str, np.ndarray] = field(default_factory=dict)  # setting -> (N,) object category ids

    def unseen(self, setting: str) -> set[str]:
        """Test categories of a setting that no training product carries."""
        lab = self.by_setting[setting]
        return set(lab[self.split == "test"]) - set(lab[self.split == "train"])


def holdout_nodes(tree: "CategoryTree", fraction: float, seed: int = 0) -> set[str]:
    """Categories held out of training whole: at every depth, ``fraction`` of the nodes not already under a held
    node (at least one where a depth has two or more), chosen by the seeded hash. Their products all go to the
    test split, so every setting has unseen categories to measure (the product promise: categories never seen
    in training). Needs only the tree (per-category state), never the products."""
    if fraction <= 0:
        return set()
    held: set[str] = set()
    for depth in range(1, max((n.depth for n in tree.nodes.values()), default=0) + 1):
        free = [c for c, n in tree.nodes.items() if n.depth == depth and not (set(tree.ancestors(c)) & held)]
        if len(free) < 2:
            continue
        free.sort(key=lambda c: unit_hash(seed, "holdout", c))
        held.update(free[: max(1, round(fraction * len(free)))])
    return held


@dataclass(frozen=True)
class Labeler:
    """Split and labels of any product from its id and path alone, so they are computed where the rows are (a
    Ray task or actor over one block) with the same result everywhere. Built once on the driver from the tree."""

    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    held: frozenset = frozenset()  # categories held out of training whole (their products go to test)

    @classmethod
    def build(cls, tree: "CategoryTree", seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1,
              unseen_fraction: float = 0.0) -> "Labeler":
        return cls(seed, val_fraction, test_fraction, frozenset(holdout_nodes(tree, unseen_fraction, seed)))

    def split(self, product_id: str, path: Sequence[str]) -> str:
        if self.held and any(category_id(path[:d]) in self.held for d in range(1, len(path) + 1)):
            return "test"
        return split_of(product_id, self.seed, self.val_fraction, self.test_fraction)

    def label(self, product_id: str, path: Sequence[str], setting: str) -> str:
        return label(path, setting, product_id, self.seed)

    def __call__(self, product_ids: Sequence[str], paths: Sequence[Sequence[str]]) -> Labels:
        ids = np.asarray(list(product_ids), dtype=object)
        out = Labels(ids, np.array([self.split(p, path) for p, path in zip(ids, paths)], dtype=object))
        for s in SETTINGS:
            out.by_setting[s] = np.array([label(path, s, p, self.seed) for p, path in zip(ids, paths)], dtype=object)
        return out


def assign_labels(product_ids: Sequence[str], paths: Sequence[Sequence[str]], seed: int = 0,
                  val_fraction: float = 0.1, test_fraction: float = 0.1, unseen_fraction: float = 0.0) -> Labels:
    """Labels of a whole product list in one process (small catalogues and tests; jobs use a Labeler per block)."""
    paths = list(paths)
    return Labeler.build(CategoryTree(paths), seed, val_fraction, test_fraction, unseen_fraction)(product_ids, paths)


@dataclass
class Node:
    id: str
    name: str
    depth: int  # 1 for a root
    parent: str | None
    children: list[str] = field(default_factory=list)
    products: int = 0  # products whose path passes through this node


class CategoryTree:
    """All nodes that appear on the products' paths, with parent/children links and product counts."""

    def __init__(self, paths: Iterable[Sequence[str]]):
        self.nodes: dict[str, Node] = {}
        for path in paths:
            parent = None
            for depth in range(1, len(path) + 1):
                cid = category_id(path[:depth])
                node = self.nodes.get(cid)
                if node is None:
                    node = self.nodes[cid] = Node(cid, path[depth - 1], depth, parent)
                    if parent is not None:
                        self.nodes[parent].children.append(cid)
                node.products += 1
                parent = cid

    @classmethod
    def from_table(cls, table) -> "CategoryTree":
        """The tree of ``features/categories.parquet`` (one row per node, product counts included), so that no
        stage needs the products' paths to know the tree."""
        tree = cls(())
        rows = sorted(zip(*(table.column(c).to_pylist() for c in ("category", "name", "depth", "parent",
                                                                      "products"))), key=lambda r: r[2])
        for cid, name, depth, parent, products in rows:  # parents first
            tree.nodes[cid] = Node(cid, name, depth, parent, products=products)
            if parent is not None:
                tree.nodes[parent].children.append(cid)
        return tree

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, cid: str) -> bool:
        return cid in self.nodes

    @property
    def roots(self) -> list[str]:
        return [n.id for n in self.nodes.values() if n.parent is None]

    @property
    def leaves(self) -> list[str]:
        return [n.id for n in self.nodes.values() if not n.children]

    def depth(self, cid: str) -> int:
        return self.nodes[cid].depth

    def parent(self, cid: str) -> str | None:
        return self.nodes[cid].parent

    def children(self, cid: str) -> list[str]:
        return list(self.nodes[cid].children)

    def ancestors(self, cid: str) -> list[str]:
        """Root first, ``cid`` last."""
        out = []
        node: str | None = cid
        while node is not None:
            out.append(node)
            node = self.nodes[node].parent
        return out[::-1]

    def find(self, text: str) -> list[str]:
        """Categories matching a full path, or else a name (several when the name repeats under other parents)."""
        text = text.strip()
        if text in self.nodes:
            return [text]
        normalised = category_id([p.strip() for p in text.split(">")])
        if normalised in self.nodes:
            return [normalised]
        low = text.lower()
        return [n.id for n in self.nodes.values() if n.name.lower() == low]

    def summary(self) -> dict:
        depths = [n.depth for n in self.nodes.values()]
        return {"categories": len(self.nodes), "roots": len(self.roots), "leaves": len(self.leaves),
                "max_depth": max(depths, default=0)}
