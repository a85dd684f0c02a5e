"""The category tree, the paper's three labelling settings, the product split and seen/unseen categories.

Decisions later stages rely on:
- A category's identity is its full path joined with " > " (``Women > Shoes > Boots``), so equal names under
  different parents are different categories. Its query text is its name (the last element), or the full path.
- Labels and splits are functions of (seed, product_id) alone, through a keyed hash: stable across runs, machines,
  row order and catalogue growth, and computable one row at a time inside a streaming job.
  ``all`` = one node of the path chosen by that hash; ``general`` = the root; ``specific`` = the deepest node.
- Split: train / val / test by the hash's uniform value against (1 - val - test, 1 - test) cut points.
- Unseen categories: test-split labels in a setting that no train-split product has in that setting. Optionally
  (``data.unseen_fraction``) whole categories are held out of training, so that every setting has some: about
  that share of the *products* sits under held-out nodes and goes to the test split (``holdout_nodes``). A second,
  disjoint set (``data.unseen_val_fraction``) sends its products to the validation split instead, so model
  selection can measure generalisation to unseen categories without looking at the test split.
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
    """Categories held out of training whole, about ``fraction`` of the products under them (``holdout_sets``)."""
    return holdout_sets(tree, (fraction,), seed)[0]


def holdout_sets(tree: "CategoryTree", fractions: Sequence[float], seed: int = 0) -> list[set[str]]:
    """Disjoint sets of categories held out of training whole (the test set, then the validation set), so that
    about ``fractions[k]`` of the products (those whose path passes through a node of set k) are under set k.
    Needs only the tree's per-node product counts, never the products.

    - Whole subtrees: no held node is under or above another held node (of any set), so the shares add up.
    - Spread over depths, so every setting has unseen categories (general: a held root; specific: held leaves;
      all: any): depth by depth from the roots, each set gets an equal part of its budget still unspent, and at
      least one node of each depth with two or more free ones (the smallest of them when none fits: the only way
      to get an unseen root on a tree of a few large roots, at the cost of overshooting, but never past twice the
      set's fraction: a tree whose smallest root is larger has no unseen root in that set). The sets take turns
      within a depth: choosing one set whole first would leave its deep nodes under every root of the next.
      What the depths leave unspent is then filled with any free nodes that fit, so each realised share ends
      close below its fraction.
    - Chosen by a seeded hash of (seed, set, category): stable across runs, and each set orders nodes its own way.
    """
    held: list[set[str]] = [set() for _ in fractions]
    if all(f <= 0 for f in fractions):
        return held
    weight = {c: n.products for c, n in tree.nodes.items()}
    total = sum(weight[r] for r in tree.roots)
    if total <= 0:
        raise ValueError("the category tree has no product counts: cannot hold out a share of the products")
    budget, used = [f * total for f in fractions], [0] * len(fractions)
    any_held: set[str] = set()
    blocked: set[str] = set()  # held nodes and their ancestors: holding one would nest held subtrees

    def free(c: str) -> bool:
        return weight[c] > 0 and c not in blocked and not any(a in any_held for a in tree.ancestors(c))

    def hold(k: int, c: str) -> None:
        held[k].add(c)
        any_held.add(c)
        blocked.update(tree.ancestors(c))
        used[k] += weight[c]

    def by_hash(k: int, cs):
        purpose = "holdout" if k == 0 else f"holdout-{k}"
        return sorted(cs, key=lambda c: unit_hash(seed, purpose, c))

    by_depth: dict[int, list[str]] = {}
    for c, n in tree.nodes.items():
        by_depth.setdefault(n.depth, []).append(c)
    depths = sorted(by_depth)
    for i, depth in enumerate(depths):
        for k in range(len(fractions)):
            if budget[k] <= 0:
                continue
            target = (budget[k] - used[k]) / (len(depths) - i)  # an equal part of what is left, per depth to come
            free_here = by_hash(k, (c for c in by_depth[depth] if free(c)))
            if len(free_here) < 2:  # holding the only free node of a depth (a lone root) leaves nothing to train
                continue
            spent = 0
            for c in free_here:  # nodes of one depth never contain each other: all stay free while we add
                if spent + weight[c] <= target:
                    hold(k, c)
                    spent += weight[c]
            if not spent:  # this depth should have an unseen category: the hash-first that fits the set's budget,
                fits = [c for c in free_here if used[k] + weight[c] <= budget[k]]  # else the smallest, unless
                pick = fits[0] if fits else min(free_here, key=lambda c: weight[c])  # that passes twice the budget
                if used[k] + weight[pick] <= 2 * budget[k]:
                    hold(k, pick)
    for k in range(len(fractions)):  # spend what the depths left over, on any depth
        for c in by_hash(k, tree.nodes):
            if used[k] + weight[c] <= budget[k] and free(c):
                hold(k, c)
    return held


def held_share(tree: "CategoryTree", held: Iterable[str]) -> float:
    """Share of the tree's products under ``held`` (disjoint subtrees, as ``holdout_sets`` returns)."""
    total = sum(tree.nodes[r].products for r in tree.roots)
    return sum(tree.nodes[c].products for c in held) / total if total else 0.0


def val_holdout_fraction(unseen_fraction: float, unseen_val_fraction: float | None = None) -> float:
    """The share of products under categories held out for validation: ``unseen_val_fraction``, or half of
    ``unseen_fraction`` when it is None or negative (-1: DataConfig's default)."""
    return unseen_fraction / 2 if unseen_val_fraction is None or unseen_val_fraction < 0 else unseen_val_fraction


@dataclass(frozen=True)
class Labeler:
    """Split and labels of any product from its id and path alone, so they are computed where the rows are (a
    Ray task or actor over one block) with the same result everywhere. Built once on the driver from the tree."""

    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    held: frozenset = frozenset()  # categories held out of training whole (their products go to test)
    held_val: frozenset = frozenset()  # another, disjoint set held out of training (their products go to val)

    @classmethod
    def build(cls, tree: "CategoryTree", seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1,
              unseen_fraction: float = 0.0, *, unseen_val_fraction: float | None = None) -> "Labeler":
        """``unseen_fraction`` / ``unseen_val_fraction``: shares of the products under categories held out for
        the test / validation split; None = half of ``unseen_fraction`` (DataConfig's default)."""
        held, held_val = holdout_sets(tree, (unseen_fraction, val_holdout_fraction(unseen_fraction,
                                                                                  unseen_val_fraction)), seed)
        return cls(seed, val_fraction, test_fraction, frozenset(held), frozenset(held_val))

    def split(self, product_id: str, path: Sequence[str]) -> str:
        if self.held or self.held_val:
            for d in range(1, len(path) + 1):
                cid = category_id(path[:d])
                if cid in self.held:
                    return "test"
                if cid in self.held_val:
                    return "val"
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
                  val_fraction: float = 0.1, test_fraction: float = 0.1, unseen_fraction: float = 0.0, *,
                  unseen_val_fraction: float | None = None) -> Labels:
    """Labels of a whole product list in one process (small catalogues and tests; jobs use a Labeler per block)."""
    paths = list(paths)
    return Labeler.build(CategoryTree(paths), seed, val_fraction, test_fraction, unseen_fraction,
                         unseen_val_fraction=unseen_val_fraction)(product_ids, paths)


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
            self._add(path, 1)

    def _add(self, path: Sequence[str], products: int) -> None:
        parent = None
        for depth in range(1, len(path) + 1):
            cid = category_id(path[:depth])
            node = self.nodes.get(cid)
            if node is None:
                node = self.nodes[cid] = Node(cid, path[depth - 1], depth, parent)
                if parent is not None:
                    self.nodes[parent].children.append(cid)
            node.products += products
            parent = cid

    @classmethod
    def from_counts(cls, counts: dict) -> "CategoryTree":
        """The tree of ``{path: products}`` (a catalogue scan's path counts), as if built from every product."""
        tree = cls(())
        for path, n in counts.items():
            tree._add(path, n)
        return tree

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
