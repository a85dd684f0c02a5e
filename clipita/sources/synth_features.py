"""A features workdir written directly: synthetic product and category embeddings, no images and no encoders.

``write_features`` writes what ``jobs.embed`` would (``features/products/part-XXXXX.parquet``,
``features/categories.parquet``, ``features/encoders.json``, ``features/stats.json``, ``catalog.json``) for
100k-1M products in seconds, for scale benchmarks and tests. No image files exist: ``catalog.json`` names a
catalogue folder that is never written and says ``"features_only": true``, so nothing that needs the pixels
(the gallery's images) works on such a workdir.

The signal imitates real encoders, so that training is worthwhile and the zero-shot baselines work partly:
- a full tree ``levels`` deep with ``branching`` roots and children per node, unique pronounceable names; every
  node has a unit *concept* in text space and in image space, child = normalize(parent + own), so siblings share
  their parent's direction (siblings' cosine 0.5). A node's own image part is a fixed random projection of its
  own text part plus an independent part, so a head can learn text -> image and carry it to unseen categories;
- category embeddings are the concepts moved by a random offset of norm ``QUERY_OFFSET`` (cosine 0.96);
- a product has one leaf (Zipf-like popularity, exponent ``ZIPF``); its ``title_emb`` / ``attr_emb`` /
  ``image_emb`` are the leaf's concept plus noise, normalised. The noise is given per coordinate, so the score
  noise of a product against any category vector has std sigma whatever the width: a leaf's products score 1
  against its concept, its siblings' 0.5, its cousins' 0.25. sigma = 0.25 (titles) puts a sibling's product
  above a relevant one 8% of the time; over thousands of distractors, ranking a leaf's products by
  title_emb . text_name (zero-shot) measured R-precision 0.45 at 200k products (chance 0.0002); images
  (0.3: 0.26) and attributes (0.35: 0.14) are weaker views, and the plain sum of the three cosines reaches 0.72:
  clearly learnable, far from solved, and fusing views is what a trained model gains.
- titles hold the leaf's name (80%; 10% a sibling's, 10% none), often the parent's name, and filler words, so
  BM25 has signal but is not an oracle; 0-5 ``key: value`` attributes with leaf-typical values.

``duplicates`` (a share, default 0) lists a seeded share of the products a second time, as another seller would
(jobs.match's truth): the second listing ``<id>-2`` follows its original's row, with the same category, title
(and a seller's name), attributes, and every embedding the original's moved by a random offset of norm
``DUP_OFFSET`` (cosine 0.90-0.97 to the original: a re-shot photo, a rewritten title); every row then gets a
``group_id`` (its own id, or the original's for a second listing). With 0 nothing changes: no column, no row.

Each part is drawn from an RNG seeded by (seed, part index) (its duplicates from another, seeded by (seed, 3, part
index)) and the tree from one seeded by the seed alone, so the same arguments give byte-identical files whatever
``workers`` is.
"""
from __future__ import annotations

import dataclasses
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing import get_context
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipita import storage
from clipita.config import EncoderConfig
from clipita.stages.embed import finished_parts
from clipita.tree import SEP
from clipita.vectors import vector_column, vectors
from clipita.workdir import catalog_record, categories_file, encoders_record, product_features_dir, stage_stats

PART_ROWS = 50_000  # products per output file
ROW_GROUP = 8192  # rows per parquet row group (~32 MB at production widths)
CHUNK = 1024  # rows per block of vector work: keeps the float32 temporaries in cache
MAX_NODES = 100_000  # concepts are held in memory by every worker

SIGMA_TITLE = 0.25  # noise per coordinate, see the module docstring
SIGMA_ATTR = 0.35
SIGMA_IMAGE = 0.3
QUERY_OFFSET = 0.3  # norm of the random offset between a category's embeddings and its concept
IMAGE_OWN = 0.5  # weight of a node's independent image part beside the projection of its text part
ZIPF = 0.5  # leaf popularity ~ 1 / rank^ZIPF: the largest leaf has sqrt(leaves) times the smallest one's products
P_LEAF_WORD, P_SIBLING_WORD, P_PARENT_WORD, P_BRAND = 0.8, 0.1, 0.5, 0.5
P_TYPICAL = 0.6  # an attribute takes its leaf's typical value, else a random one
DUP_OFFSET = (0.25, 0.48)  # norm of a second listing's offset from its original: cosine 1/sqrt(1 + r^2), 0.97-0.90
SELLERS = ("Northwind", "Contoso", "Fabrikam", "Tailspin", "Litware")  # as clipita/sources/synth.py's

_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_SYLLABLES = [c + v for c in _CONSONANTS for v in _VOWELS]
# No filler word is made of consonant-vowel syllables only, so none can equal a category name.
_ADJECTIVES = ["classic", "premium", "soft", "compact", "vintage", "modern", "lightweight", "elegant",
               "essential", "sturdy", "slim", "original", "new", "organic", "smart", "practical"]
_NOUNS = ["set", "pack", "edition", "model", "kit", "bundle", "collection", "series", "item", "design"]
_BRANDS = ["Northwind", "Globex", "Initech", "Acmecorp", "Hooli", "Vandelay", "Stark", "Wayne", "Umbrella",
           "Oscorp", "Tyrell", "Cyberdyne"]
_ATTRIBUTES = {
    "color": ["red", "blue", "green", "black", "white", "grey", "beige", "navy"],
    "material": ["cotton", "leather", "steel", "wood", "plastic", "wool", "glass", "ceramic"],
    "size": ["xs", "s", "m", "l", "xl", "small", "medium", "large"],
    "style": ["casual", "formal", "sporty", "retro", "minimal", "rustic", "boho", "classic"],
    "pattern": ["solid", "striped", "checked", "floral", "dotted", "plain", "printed", "camo"],
    "finish": ["matte", "glossy", "satin", "brushed", "polished", "textured", "raw", "coated"],
}
_KEYS = list(_ATTRIBUTES)
_N_VALUES = len(_ATTRIBUTES["color"])
_ATTRIBUTE_STRINGS = [f"{k}: {v}" for k in _KEYS for v in _ATTRIBUTES[k]]  # index key * _N_VALUES + value


@dataclass(frozen=True)
class Shape:
    levels: int
    branching: int
    text_dim: int
    image_dim: int


@dataclass
class Tree:
    """All nodes in level order (roots first); node i of level k has parent i // branching of level k - 1."""

    names: list[str]
    ids: list[str]  # full paths
    depth: np.ndarray  # (C,) 1 for roots
    parent: np.ndarray  # (C,) node index, -1 for roots
    text: np.ndarray  # (C, Dt) unit concepts
    image: np.ndarray  # (C, Di)
    leaf_first: int  # leaves are nodes leaf_first..C-1
    leaf_cdf: np.ndarray  # (L,) cumulative popularity
    typical: np.ndarray  # (L, keys) each leaf's typical attribute value
    leaf_paths: pa.ListArray  # (L,) category_path of each leaf

    @property
    def n_leaves(self) -> int:
        return len(self.names) - self.leaf_first


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x


def _random_units(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return _unit(rng.standard_normal((n, d), dtype=np.float32))


def _names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct capitalised consonant-vowel words, drawn sparsely from all words of their length."""
    length = 3
    while len(_SYLLABLES) ** length < 4 * n:
        length += 1
    out = []
    for code in rng.choice(len(_SYLLABLES) ** length, size=n, replace=False).tolist():
        syllables = []
        for _ in range(length):
            code, s = divmod(code, len(_SYLLABLES))
            syllables.append(_SYLLABLES[s])
        out.append("".join(syllables).capitalize())
    return out


@lru_cache(maxsize=2)
def build_tree(seed: int, shape: Shape) -> Tree:
    """The tree, its concepts and the leaves' popularity: a function of (seed, shape), rebuilt by each worker."""
    rng = np.random.default_rng([seed, 0])
    b = shape.branching
    sizes = [b ** (k + 1) for k in range(shape.levels)]
    n = sum(sizes)
    names = _names(rng, n)
    proj = rng.standard_normal((shape.text_dim, shape.image_dim), dtype=np.float32)
    text = np.empty((n, shape.text_dim), np.float32)
    image = np.empty((n, shape.image_dim), np.float32)
    depth = np.empty(n, np.int64)
    parent = np.full(n, -1, np.int64)
    ids: list[str] = []
    first = 0
    for k, m in enumerate(sizes):
        own_t = _random_units(rng, m, shape.text_dim)
        own_i = _unit(_unit(own_t @ proj) + IMAGE_OWN * _random_units(rng, m, shape.image_dim))
        rows = slice(first, first + m)
        depth[rows] = k + 1
        if k == 0:
            text[rows], image[rows] = own_t, own_i
            ids += names[rows]
        else:
            par = first - sizes[k - 1] + np.arange(m) // b
            parent[rows] = par
            text[rows] = _unit(text[par] + own_t)
            image[rows] = _unit(image[par] + own_i)
            ids += [f"{ids[p]}{SEP}{name}" for p, name in zip(par.tolist(), names[rows])]
        first += m
    leaf_first = n - sizes[-1]
    leaves = sizes[-1]
    weights = np.empty(leaves)
    weights[rng.permutation(leaves)] = 1.0 / np.arange(1, leaves + 1) ** ZIPF
    paths = [ids[i].split(SEP) for i in range(leaf_first, n)]
    return Tree(names, ids, depth, parent, text, image, leaf_first, np.cumsum(weights) / weights.sum(),
                rng.integers(_N_VALUES, size=(leaves, len(_KEYS))), pa.array(paths, pa.list_(pa.string())))


def _vectors(rng: np.random.Generator, concepts: np.ndarray, leaf: np.ndarray, sigma: float) -> np.ndarray:
    """normalize(concept of each row's leaf + noise of std ``sigma`` per coordinate), float32 math, float16 out.
    The noise is uniform, not Gaussian: three times cheaper to draw, and its projection on any direction (all that
    a cosine sees) is Gaussian all the same, being a sum of hundreds of independent terms."""
    out = np.empty((len(leaf), concepts.shape[1]), np.float16)
    buf = np.empty((CHUNK, concepts.shape[1]), np.float32)
    for a in range(0, len(leaf), CHUNK):
        x = rng.random(dtype=np.float32, out=buf[:min(CHUNK, len(leaf) - a)])
        x -= 0.5
        x *= sigma * 12 ** 0.5  # U(-0.5, 0.5) has variance 1/12
        x += concepts[leaf[a:a + len(x)]]
        out[a:a + len(x)] = _unit(x)
    return out


def _lists(counts: np.ndarray, values: pa.Array) -> pa.ListArray:
    offsets = np.zeros(len(counts) + 1, np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _titles(rng: np.random.Generator, tree: Tree, leaf: np.ndarray, branching: int) -> pa.Array:
    """Brand? adjective leaf-or-sibling-name? parent-name? noun: words picked by index from one vocabulary."""
    n = len(leaf)
    vocab = pa.array(_BRANDS + _ADJECTIVES + _NOUNS + tree.names)
    base = len(_BRANDS) + len(_ADJECTIVES) + len(_NOUNS)  # node i is word base + i
    u = rng.random(n)
    sibling = leaf // branching * branching + rng.integers(branching, size=n)
    node = tree.leaf_first + np.where(u < P_LEAF_WORD, leaf, sibling)
    parent = tree.parent[tree.leaf_first + leaf]
    words = np.stack([rng.integers(len(_BRANDS), size=n),
                      len(_BRANDS) + rng.integers(len(_ADJECTIVES), size=n),
                      base + node, base + parent,
                      len(_BRANDS) + len(_ADJECTIVES) + rng.integers(len(_NOUNS), size=n)], axis=1)
    present = np.stack([rng.random(n) < P_BRAND, np.ones(n, bool), u < P_LEAF_WORD + P_SIBLING_WORD,
                        (rng.random(n) < P_PARENT_WORD) & (parent >= 0), np.ones(n, bool)], axis=1)
    return pc.binary_join(_lists(present.sum(axis=1), vocab.take(pa.array(words[present]))), " ")


def _attributes(rng: np.random.Generator, tree: Tree, leaf: np.ndarray) -> tuple[pa.ListArray, np.ndarray]:
    """0-5 distinct keys per product, consecutive from a random one; values typical of the leaf or random."""
    count = rng.integers(len(_KEYS), size=len(leaf))  # 0 for a sixth of the products
    row = np.repeat(np.arange(len(leaf)), count)
    starts = np.cumsum(count) - count
    key = (rng.integers(len(_KEYS), size=len(leaf))[row] + np.arange(len(row)) - starts[row]) % len(_KEYS)
    value = np.where(rng.random(len(row)) < P_TYPICAL, tree.typical[leaf[row], key],
                     rng.integers(_N_VALUES, size=len(row)))
    return _lists(count, pa.array(_ATTRIBUTE_STRINGS).take(pa.array(key * _N_VALUES + value))), count


def _write_parquet(uri: str, table: pa.Table) -> None:
    try:
        storage.makedirs(uri.rsplit("/", 1)[0])
        fs, path = storage.arrow_filesystem(uri)  # straight to the file: no 200 MB copy through bytes
        # float16 is stored as 2-byte fixed-length binary: dictionaries and min/max statistics over random-looking
        # values triple the write time and save nothing.
        # row groups of ROW_GROUP rows: readers (Ray Data tasks) can take a part in pieces of a few tens of MB
        pq.write_table(table, path, filesystem=fs, use_dictionary=False, write_statistics=False,
                       row_group_size=ROW_GROUP)
    except Exception as e:  # noqa: BLE001 - any storage failure is one line naming the file
        raise storage.StorageError(f"cannot write {uri}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def _near(rng: np.random.Generator, v: np.ndarray) -> np.ndarray:
    """float16 rows ``v`` moved by random offsets orthogonal to them, of norms in DUP_OFFSET, normalised (so the
    cosine to the row is 1/sqrt(1 + r^2) at any width); zero rows stay zero."""
    x = v.astype(np.float32)
    zero = ~x.any(axis=1)
    x[zero] = 1.0  # any non-zero row: set back to zero below
    x = _unit(x)
    u = _random_units(rng, *x.shape)
    u = _unit(u - np.einsum("ij,ij->i", u, x)[:, None] * x)  # orthogonal to the row: cosine 1/sqrt(1 + r^2)
    x += u * rng.uniform(*DUP_OFFSET, size=(len(x), 1)).astype(np.float32)
    out = _unit(x).astype(np.float16)
    out[zero] = 0
    return out


def _with_duplicates(table: pa.Table, share: float, seed: int, part: int) -> tuple[pa.Table, np.ndarray, int]:
    """The part's rows, each chosen one (a seeded ``share``) followed by its second listing, with a group_id
    column; returns the table, each output row's source row and the number of second listings."""
    rng = np.random.default_rng([seed, 3, part])
    n = table.num_rows
    chosen = rng.random(n) < share
    src = np.repeat(np.arange(n), 1 + chosen)
    second = np.zeros(len(src), bool)
    second[np.cumsum(1 + chosen)[chosen] - 1] = True  # the copy right after its original
    dup = np.flatnonzero(chosen)
    ids = table.column("product_id").take(pa.array(src))
    mask = pa.array(second)
    cols = {"product_id": pc.if_else(mask, pc.binary_join_element_wise(ids, "-2", ""), ids)}
    sellers = pa.array(SELLERS).take(pa.array(rng.integers(len(SELLERS), size=len(src))))
    titles = table.column("title").take(pa.array(src))
    cols["title"] = pc.if_else(mask, pc.binary_join_element_wise(titles, sellers, " - "), titles)
    for name in ("attributes", "category_path"):
        cols[name] = table.column(name).take(pa.array(src))
    cols["image"] = pc.binary_join_element_wise("images/", cols["product_id"], ".jpg", "")
    for name in ("image_emb", "title_emb", "attr_emb"):
        v = vectors(table.column(name), keep_half=True)
        out = v[src]
        out[second] = _near(rng, v[dup])
        cols[name] = vector_column(out)
    cols["n_attributes"] = table.column("n_attributes").take(pa.array(src))
    cols["group_id"] = ids
    return pa.table(cols), src, len(dup)


def _write_part(workdir: str, seed: int, shape: Shape, part: int, start: int, stop: int,
                duplicates: float = 0.0) -> tuple[np.ndarray, int]:
    """Write products [start, stop) (and their second listings) as one part file; returns the products per leaf
    and the number of second listings."""
    tree = build_tree(seed, shape)
    rng = np.random.default_rng([seed, 1, part])
    n = stop - start
    leaf = np.minimum(np.searchsorted(tree.leaf_cdf, rng.random(n), side="right"), tree.n_leaves - 1)
    ids = pa.array([f"s{seed}-{i:010d}" for i in range(start, stop)])
    titles = _titles(rng, tree, leaf, shape.branching)
    attributes, n_attributes = _attributes(rng, tree, leaf)
    leaf_text, leaf_image = tree.text[tree.leaf_first:], tree.image[tree.leaf_first:]
    image_emb = _vectors(rng, leaf_image, leaf, SIGMA_IMAGE)
    title_emb = _vectors(rng, leaf_text, leaf, SIGMA_TITLE)
    attr_emb = _vectors(rng, leaf_text, leaf, SIGMA_ATTR)
    attr_emb[n_attributes == 0] = 0  # as jobs.embed: no attributes, zero vector
    table = pa.table({
        "product_id": ids, "title": titles, "attributes": attributes,
        "category_path": tree.leaf_paths.take(pa.array(leaf)),
        "image": pc.binary_join_element_wise("images/", ids, ".jpg", ""),
        "image_emb": vector_column(image_emb), "title_emb": vector_column(title_emb),
        "attr_emb": vector_column(attr_emb), "n_attributes": pa.array(n_attributes.astype(np.int32)),
    })
    dups = 0
    if duplicates > 0:
        table, src, dups = _with_duplicates(table, duplicates, seed, part)
        leaf = leaf[src]
    _write_parquet(storage.join(product_features_dir(workdir), f"part-{part:05d}.parquet"), table)
    return np.bincount(leaf, minlength=tree.n_leaves), dups


def _perturbed(rng: np.random.Generator, concepts: np.ndarray) -> np.ndarray:
    return _unit(concepts + QUERY_OFFSET * _random_units(rng, *concepts.shape))


def _write_categories(workdir: str, seed: int, shape: Shape, leaf_counts: np.ndarray) -> int:
    """Every node that some product's path passes through (as jobs.embed's tree), sorted by category id."""
    tree = build_tree(seed, shape)
    counts = np.zeros(len(tree.names), np.int64)
    counts[tree.leaf_first:] = leaf_counts
    path_text, path_image = tree.text.copy(), tree.image.copy()  # sums of the ancestors' concepts
    for depth in range(2, int(tree.depth.max()) + 1):  # parents before children
        rows = np.flatnonzero(tree.depth == depth)
        path_text[rows] += path_text[tree.parent[rows]]
        path_image[rows] += path_image[tree.parent[rows]]
    for depth in range(int(tree.depth.max()), 1, -1):  # children before parents
        rows = np.flatnonzero(tree.depth == depth)
        np.add.at(counts, tree.parent[rows], counts[rows])
    rng = np.random.default_rng([seed, 2])
    vectors = {"text_name": _perturbed(rng, tree.text), "text_path": _perturbed(rng, _unit(path_text)),
               "clip_name": _perturbed(rng, tree.image), "clip_path": _perturbed(rng, _unit(path_image))}
    keep = [i for i in sorted(range(len(tree.ids)), key=tree.ids.__getitem__) if counts[i] > 0]
    table = pa.table({
        "category": [tree.ids[i] for i in keep], "name": [tree.names[i] for i in keep],
        "depth": tree.depth[keep], "parent": [tree.ids[tree.parent[i]] if tree.parent[i] >= 0 else None for i in keep],
        "products": counts[keep],
        **{name: vector_column(v[keep]) for name, v in vectors.items()},
    })
    _write_parquet(categories_file(workdir), table)
    return len(keep)


def write_features(workdir: str, products: int, seed: int = 0, workers: int | None = None, levels: int = 4,
                   branching: int = 8, image_dim: int = 512, text_dim: int = 768, part_rows: int = PART_ROWS,
                   log: Callable[[str], None] = print, duplicates: float = 0.0) -> dict:
    """Write a synthetic features workdir of ``products`` products; returns the stats written to
    ``features/stats.json``. Raises ValueError for bad arguments or a workdir that already holds features, and
    StorageError for an unusable workdir. With ``workers`` > 1 it starts processes with "spawn": a calling
    script needs the usual ``if __name__ == "__main__":`` guard."""
    for name, value, least in (("number of products", products, 1), ("seed", seed, 0), ("levels", levels, 1),
                               ("branching", branching, 2), ("image_dim", image_dim, 2), ("text_dim", text_dim, 2),
                               ("part_rows", part_rows, 1)):
        if value < least:
            raise ValueError(f"the {name} must be at least {least}, got {value}")
    if not 0.0 <= duplicates <= 1.0:
        raise ValueError(f"the share of duplicated products must be in [0, 1], got {duplicates}")
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers < 1:
        raise ValueError(f"the number of workers must be at least 1, got {workers}")
    shape = Shape(levels, branching, text_dim, image_dim)
    nodes = sum(branching ** (k + 1) for k in range(levels))
    if nodes > MAX_NODES:
        raise ValueError(f"a tree of {levels} levels and branching {branching} has {nodes:,} nodes; at most "
                         f"{MAX_NODES:,}")
    t0 = time.perf_counter()
    workdir = storage.absolute(workdir)
    storage.filesystem(workdir)  # a bad scheme fails here, before any work
    if finished_parts(workdir):  # stale parts of another run would mix with this one's
        raise ValueError(f"{workdir} already holds features: use a new workdir")
    parts = [(i, a, min(a + part_rows, products)) for i, a in enumerate(range(0, products, part_rows))]
    workers = min(workers, len(parts))
    log(f"synth: {products:,} products in {len(parts)} parts, {workers} workers, a tree of {nodes:,} nodes")
    if workers == 1:
        results = [_write_part(workdir, seed, shape, *p, duplicates) for p in parts]
    else:
        # spawn, not fork: the caller may have threads (Ray, s3fs's event loop) that fork would copy broken.
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_write_part, workdir, seed, shape, *p, duplicates) for p in parts]
            build_tree(seed, shape)  # the categories' copy, built while the workers start
            try:
                results = [f.result() for f in futures]
            except BaseException:
                pool.shutdown(cancel_futures=True)  # fail now, not after writing every queued part
                raise
    counts, dups = [c for c, _ in results], sum(d for _, d in results)
    categories = _write_categories(workdir, seed, shape, np.sum(counts, axis=0))
    storage.write_json(encoders_record(workdir), dataclasses.asdict(EncoderConfig()))
    storage.write_json(catalog_record(workdir),
                       {"catalog": storage.join(workdir, "catalog"), "features_only": True})
    seconds = time.perf_counter() - t0
    listed = products + dups  # rows written: every product and its second listing
    stats = {"stage": "embed", "synthetic": True, "seed": seed, "read": listed, "used": listed,
             "quarantined": 0, "reasons": {}, "parts": len(parts), "categories": categories,
             "seconds": round(seconds, 2), "products_per_s": round(listed / seconds, 1)}
    if duplicates > 0:
        stats.update(duplicates=dups, share=duplicates)
    storage.write_json(stage_stats(workdir, "embed"), stats)
    return stats
