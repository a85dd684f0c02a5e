"""jobs.classify: e-CLIP's downstream tasks on the product vectors (PAPER.md): categorise every product, find
mis-categorised listings, cluster the catalogue, extract attribute values, flag policy subtrees.

Everything streams through Ray tasks, one per shard of the all-products index (``index/all/<group>``, what
jobs.index built and the endpoint serves): a task memory-maps the model's shards, reads its own rows' vectors back
from its shard, and returns aggregates. The driver holds the tree, two small integer arrays per product (its
category's node and its split), the category vectors and the sums; never a product's strings or vectors.

- **Categorise** (every dense model of the registry with an index, trained heads of ``classify.setting``), into
  the tree's leaves: ``zero-shot`` by cosine against the category vectors (works for categories no product
  trained on) and ``probe``, a kNN over the index: the ``classify.probe_k`` nearest listings of the train split
  vote for their categories (weights exp(cos / T)). Scored on the test split: accuracy@1/@5 per depth (the
  prediction's ancestor at that depth is the product's) and of the exact category (``depth`` null),
  hierarchical accuracy (mean of deepest correct depth / the category's depth) and macro-F1 over categories, for
  seen / unseen categories (seen: some train product is labelled with it).
- **Mis-categorised listings**: every product ranked by suspicion = 1 - the probability its own category gets
  (zero-shot: softmax of the cosines; probe: the share of neighbour votes, zero-shot's where no train listing has
  the category, which the probe cannot know); ``classify/suspects.parquet`` keeps the
  top ``classify.suspects`` of ``classify.model``'s probe. Where the catalogue records labels corrupted on
  purpose (``mislabeled.parquet`` beside products.parquet: ``jobs.synth --mislabel``), precision@100 of every
  model and mode, against the corrupted share (random).
- **Clusters**: spherical k-means (``classify.clusters``, default one per leaf) of ``classify.model``'s vectors,
  one Ray task per shard per iteration; NMI / ARI against the categories at each depth; ``classify/clusters/``.
- **Attributes**: keys with a closed set of values (``classify.attribute_max_values``) predicted zero-shot from
  the image (CLIP text tower on ``classify.attribute_prompt``) and from image + title (the sentence encoder on the
  value), never from the attributes themselves; test-split accuracy against the train split's majority value.
- **Flags** (``classify.flags``): the mass ``classify.model``'s zero-shot softmax puts under each flag's
  subtrees; the threshold is the F1-best on validation products, precision / recall reported on test;
  ``classify/flags.json`` (what the endpoint flags with).

Outputs: ``classify/predictions/<shard>.parquet`` (``classify.model``: top-k categories and scores of both modes,
suspicion, flag mass), ``suspects.parquet``, ``clusters/``, ``flags.json``, ``stats.json`` and the rows / report
section gathered into metrics.json / metrics.md (``"task"``: classify, suspects, cluster, attributes, flag).
"""
from __future__ import annotations

import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipita import storage
from clipita.census import census
from clipita.downstream import (category_vectors, flag_columns, leaves, parse_flags, shard_vectors, softmax,
                                top_k)
from clipita.features import labeler_for, load_tree, product_files, recorded_encoders
from clipita.index import ShardedIndex, read_rows, recorded_ef
from clipita.models import DENSE, REGISTRY
from clipita.runtime import Every
from clipita.sources.synth import MISLABELED_FILE
from clipita.stages.report import clean, publish
from clipita.tree import category_id
from clipita.workdir import catalog_record, classify_dir, group_dir, stage_stats

SPLITS = {"train": 0, "val": 1, "test": 2}
MODES = ("zero-shot", "probe")
GROUPS = ("all", "seen", "unseen")
CHUNK = 4096  # rows of a shard scored at once: bounds a task's (rows x categories) arrays
BINS = 1000  # flag mass histogram bins (thresholds are chosen at this resolution)


class Space:
    """The label space every task shares: the tree's nodes (categories.parquet order), their ancestors per depth,
    the leaves products are put into, which are seen in training, and the flags' leaves."""

    def __init__(self, tree, seen: set[str], flags: dict[str, list[str]]):
        self.node_ids = sorted(tree.nodes)
        self.pos = {c: i for i, c in enumerate(self.node_ids)}
        self.depth = np.array([tree.depth(c) for c in self.node_ids], np.int32)
        self.max_depth = int(self.depth.max())
        self.ancestors = np.full((len(self.node_ids) + 1, self.max_depth), -1, np.int32)  # last row: "none"
        for i, c in enumerate(self.node_ids):
            for d, a in enumerate(tree.ancestors(c)):
                self.ancestors[i, d] = self.pos[a]
        self.leaf_ids = leaves(tree)
        self.leaf_nodes = np.array([self.pos[c] for c in self.leaf_ids], np.int32)
        self.seen = np.array([c in seen for c in self.node_ids] + [False], bool)
        # leaves under each node (the mass of a node: its leaves' probabilities)
        self.under = np.zeros((len(self.node_ids), len(self.leaf_ids)), bool)
        for j, leaf in enumerate(self.leaf_nodes):
            for a in self.ancestors[leaf]:
                if a >= 0:
                    self.under[a, j] = True
        self.flag_leaves = flag_columns(flags, self.leaf_ids)
        self.flag_nodes = {f: self.under[:, cols].any(axis=1) & ~self.under[:, ~cols].any(axis=1)
                           for f, cols in self.flag_leaves.items()}


def _row_labels(uri: str, manifest: dict, shard: int, labeler, pos: dict) -> tuple[np.ndarray, np.ndarray]:
    """Ray task: (node, split) codes of one shard's rows, in row order."""
    rows = read_rows(uri, dict(manifest, shards=[manifest["shards"][shard]]), ["product_id", "category_path"])
    ids, paths = rows.column("product_id").to_pylist(), rows.column("category_path").to_pylist()
    node = np.array([pos.get(category_id(p), -1) for p in paths], np.int32)
    split = np.array([SPLITS[labeler.split(i, p)] for i, p in zip(ids, paths)], np.int8)
    return node, split


def _score(acc: dict, key: tuple, pred: np.ndarray, true: np.ndarray, space: Space) -> None:
    """Add test products' predictions (top-k node ids, -1 none) to the accumulator ``acc[key]``."""
    if not len(true):
        return
    a = acc.setdefault(key, {"n": 0, "at1": np.zeros(space.max_depth + 1), "at5": np.zeros(space.max_depth + 1),
                             "den": np.zeros(space.max_depth + 1), "hier": 0.0,
                             "tp": np.zeros(len(space.node_ids)), "fp": np.zeros(len(space.node_ids)),
                             "fn": np.zeros(len(space.node_ids))})
    none = len(space.node_ids)
    pred = np.where(pred < 0, none, pred)
    anc_t = space.ancestors[true]  # (n, D)
    anc_p = space.ancestors[pred]  # (n, k, D)
    match = (anc_p == anc_t[:, None, :]) & (anc_t[:, None, :] >= 0)  # (n, k, D)
    a["n"] += len(true)
    a["den"][:-1] += (anc_t >= 0).sum(axis=0)
    a["den"][-1] += len(true)
    a["at1"][:-1] += match[:, 0].sum(axis=0)
    a["at5"][:-1] += match.any(axis=1).sum(axis=0)
    exact = pred == true[:, None]
    a["at1"][-1] += exact[:, 0].sum()
    a["at5"][-1] += exact.any(axis=1).sum()
    a["hier"] += float((match[:, 0].sum(axis=1) / space.depth[true]).sum())
    hit = exact[:, 0]
    np.add.at(a["tp"], true[hit], 1)
    np.add.at(a["fn"], true[~hit], 1)
    wrong = pred[~hit, 0]
    np.add.at(a["fp"], wrong[wrong < none], 1)


def _merge(into: dict, part: dict) -> None:
    for key, a in part.items():
        if key not in into:
            into[key] = a
        else:
            for k, v in a.items():
                into[key][k] = into[key][k] + v


def _classify_shard(workdir: str, groups: dict[str, str], shard: int, vectors: dict[str, np.ndarray],
                    space: Space, node: np.ndarray, split: np.ndarray, primary: str, params: dict) -> dict:
    """Ray task: one shard of every model's index/all group: both modes' predictions, the test products' scores,
    the shard's most suspect listings and the flag-mass histograms; ``primary``'s predictions file."""
    k, T, probe_k, keep = params["top_k"], params["temperature"], params["probe_k"], params["suspects"]
    out: dict = {"acc": {}, "suspects": {}, "flags": {}}
    rows = None
    written: dict[str, list] = {"zero-shot": [], "zero-shot_scores": [], "probe": [], "probe_scores": [],
                                "suspicion_zero_shot": [], "suspicion_probe": []}
    flag_mass: dict[str, list] = {f: [] for f in space.flag_leaves}
    node_ids = np.array(space.node_ids + [""], dtype=object)
    for model, uri in groups.items():
        index = ShardedIndex(uri, view=True, columns=None)
        entry = index.manifest["shards"][shard]
        if rows is None:
            rows = read_rows(uri, dict(index.manifest, shards=[entry]), ["product_id", "category_path"])
        base, count = int(index.offsets[shard]), int(entry["count"])
        suspects = {m: ([], [], []) for m in MODES}  # (row, suspicion, predicted node) per chunk
        for a in range(0, count, CHUNK):
            b = min(count, a + CHUNK)
            v = shard_vectors(index.shards[shard], int(entry["first_key"]) + a, b - a)
            true, spl = node[base + a: base + b], split[base + a: base + b]
            safe_true = np.where(true < 0, len(space.node_ids), true)
            # zero-shot: leaves by cosine
            s = v @ vectors[model].T
            idx, top = top_k(s, max(k, 5))
            zs_pred = space.leaf_nodes[idx]
            p = softmax(s, T)
            own = np.where(true >= 0, (p * space.under[np.maximum(true, 0)]).sum(axis=1), 0.0)
            # probe: the nearest train-split listings vote (the product itself never)
            found = index.search(v, probe_k + 1, ef=recorded_ef(index.manifest))  # search: ef >= k
            nb = found.rows
            ok = (nb >= 0) & (nb != (base + a + np.arange(b - a))[:, None])
            ok &= split[np.maximum(nb, 0)] == SPLITS["train"]
            ok &= node[np.maximum(nb, 0)] >= 0
            ok[np.cumsum(ok, axis=1) > probe_k] = False
            w = np.where(ok, np.exp((found.scores - 1.0) / T), 0.0)
            votes = np.zeros((b - a, len(space.node_ids) + 1))
            np.add.at(votes, (np.repeat(np.arange(b - a), nb.shape[1]), np.where(ok, node[np.maximum(nb, 0)],
                                                                                  len(space.node_ids)).ravel()),
                      w.ravel())
            votes = votes[:, :-1]
            total = votes.sum(axis=1)
            share = votes / np.maximum(total, 1e-30)[:, None]
            pidx, ptop = top_k(share, max(k, 5))
            pr_pred = np.where(ptop > 0, pidx, -1)
            pr_own = np.where(true >= 0, share[np.arange(b - a), np.maximum(true, 0)], 0.0)
            test = spl == SPLITS["test"]
            labelled = test & (true >= 0)
            for mode, pred in (("zero-shot", zs_pred), ("probe", pr_pred)):
                for g in GROUPS:
                    sel = labelled if g == "all" else labelled & (space.seen[safe_true] == (g == "seen"))
                    _score(out["acc"], (model, mode, g), pred[sel, :5], true[sel], space)
            # the probe knows only categories some train listing has: elsewhere its suspicion is zero-shot's
            known = space.seen[safe_true]
            pr_sus = np.where(known, 1.0 - pr_own, 1.0 - own)
            pr_sug = np.where(known & (pr_pred[:, 0] >= 0), pr_pred[:, 0], zs_pred[:, 0])
            for mode, sus, pred in (("zero-shot", 1.0 - own, zs_pred[:, 0]), ("probe", pr_sus, pr_sug)):
                sus = np.where(true >= 0, sus, -1.0)
                best = np.argsort(-sus, kind="stable")[:keep]
                for lst, vals in zip(suspects[mode], (base + a + best, sus[best], pred[best])):
                    lst.append(vals)
            if model == primary:
                written["zero-shot"] += [list(r) for r in node_ids[zs_pred[:, :k]]]
                written["zero-shot_scores"] += top[:, :k].astype(np.float32).tolist()
                written["probe"] += [[c for c in r if c] for r in node_ids[np.where(pr_pred[:, :k] < 0, -1, pr_pred[:, :k])]]
                written["probe_scores"] += [[float(x) for x, q in zip(r, c) if q >= 0]
                                            for r, c in zip(ptop[:, :k], pr_pred[:, :k])]
                written["suspicion_zero_shot"] += (1.0 - own).astype(np.float32).tolist()
                written["suspicion_probe"] += pr_sus.astype(np.float32).tolist()
                for f, cols in space.flag_leaves.items():
                    mass = p[:, cols].sum(axis=1)
                    flag_mass[f].append(mass.astype(np.float32))
                    truth = space.flag_nodes[f][safe_true[:len(mass)].clip(max=len(space.node_ids) - 1)] & (true >= 0)
                    for name, code in (("val", SPLITS["val"]), ("test", SPLITS["test"])):
                        sel = spl == code
                        h = out["flags"].setdefault((f, name), np.zeros((2, BINS + 1)))
                        bins = np.minimum((mass[sel] * BINS).astype(int), BINS)
                        np.add.at(h, (truth[sel].astype(int), bins), 1)
        for mode, (r, sus, pred) in suspects.items():
            r, sus, pred = np.concatenate(r), np.concatenate(sus), np.concatenate(pred)
            best = np.argsort(-sus, kind="stable")[:keep]
            local = r[best] - base
            out["suspects"][(model, mode)] = {
                "rows": r[best], "suspicion": sus[best],
                "product_id": rows.column("product_id").take(pa.array(local)).to_pylist(),
                "category": [category_id(p) for p in rows.column("category_path").take(pa.array(local)).to_pylist()],
                "suggested": [space.node_ids[q] if q >= 0 else "" for q in pred[best]]}
    table = pa.table({"product_id": rows.column("product_id"),
                      "category": pa.array([category_id(p) for p in rows.column("category_path").to_pylist()]),
                      "split": pa.array([("train", "val", "test")[s] for s in split[base: base + count]]),
                      "zero_shot": pa.array(written["zero-shot"], pa.list_(pa.string())),
                      "zero_shot_scores": pa.array(written["zero-shot_scores"], pa.list_(pa.float32())),
                      "probe": pa.array(written["probe"], pa.list_(pa.string())),
                      "probe_scores": pa.array(written["probe_scores"], pa.list_(pa.float32())),
                      "suspicion_zero_shot": pa.array(written["suspicion_zero_shot"], pa.float32()),
                      "suspicion_probe": pa.array(written["suspicion_probe"], pa.float32()),
                      **{f"flag:{f}": pa.array(np.concatenate(m) if m else np.zeros(0, np.float32))
                         for f, m in flag_mass.items()}})
    storage.write_parquet(classify_dir(workdir, "predictions", f"{entry['name']}.parquet"), table)
    return out


# ---------------------------------------------------------------------------------------------- clusters

def _kmeans_step(uri: str, shard: int, centroids: np.ndarray | None, sample: np.ndarray | None = None):
    """Ray task: the shard's rows assigned to the nearest centroid (cosine): per-cluster sums and counts; or, with
    ``sample`` (row positions in the shard), those rows' vectors (the initial centroids)."""
    index = ShardedIndex(uri, view=True, columns=None, shards=(shard, shard + 1))
    entry = index.manifest["shards"][0]
    if sample is not None:
        got = [shard_vectors(index.shards[0], int(entry["first_key"]) + int(r), 1) for r in sample]
        return np.concatenate(got) if got else np.zeros((0, index.dims), np.float32)
    sums, counts, inertia = np.zeros_like(centroids), np.zeros(len(centroids)), 0.0
    for a in range(0, entry["count"], CHUNK):
        v = shard_vectors(index.shards[0], int(entry["first_key"]) + a, min(CHUNK, entry["count"] - a))
        s = v @ centroids.T
        c = s.argmax(axis=1)
        np.add.at(sums, c, v)
        counts += np.bincount(c, minlength=len(centroids))
        inertia += float((1.0 - s[np.arange(len(c)), c]).sum())
    return sums, counts, inertia


def _cluster_shard(workdir: str, uri: str, shard: int, centroids: np.ndarray, node: np.ndarray, base: int,
                   space: Space) -> np.ndarray:
    """Ray task: final assignment of a shard's rows -> clusters/<shard>.parquet and the (depth, cluster, node)
    contingency counts."""
    index = ShardedIndex(uri, view=True, columns=None, shards=(shard, shard + 1))
    entry = index.manifest["shards"][0]
    assign = []
    for a in range(0, entry["count"], CHUNK):
        v = shard_vectors(index.shards[0], int(entry["first_key"]) + a, min(CHUNK, entry["count"] - a))
        assign.append((v @ centroids.T).argmax(axis=1).astype(np.int32))
    c = np.concatenate(assign) if assign else np.zeros(0, np.int32)
    rows = read_rows(uri, dict(index.manifest), ["product_id"])
    storage.write_parquet(classify_dir(workdir, "clusters", f"{entry['name']}.parquet"),
                          pa.table({"product_id": rows.column("product_id"), "cluster": pa.array(c)}))
    true = node[base: base + len(c)]
    table = np.zeros((space.max_depth, len(centroids), len(space.node_ids) + 1), np.int64)
    anc = space.ancestors[np.where(true < 0, len(space.node_ids), true)]
    for d in range(space.max_depth):
        np.add.at(table[d], (c, np.where(anc[:, d] < 0, len(space.node_ids), anc[:, d])), 1)
    return table


def nmi_ari(table: np.ndarray) -> tuple[float, float]:
    """NMI (arithmetic normalisation, as scikit-learn's default) and ARI of a (clusters x classes) contingency."""
    n = table.sum()
    if n == 0:
        return float("nan"), float("nan")
    a, b = table.sum(axis=1), table.sum(axis=0)
    nz = table > 0
    mi = float((table[nz] / n * np.log(table[nz] * n / np.outer(a, b)[nz])).sum())
    h = [float(-(x[x > 0] / n * np.log(x[x > 0] / n)).sum()) for x in (a, b)]
    nmi = 1.0 if h[0] == h[1] == 0 else (mi / (sum(h) / 2) if sum(h) else 0.0)
    comb = lambda x: (x * (x - 1) / 2).sum()  # noqa: E731
    index, ea, eb = comb(table.astype(float)), comb(a.astype(float)), comb(b.astype(float))
    expected = ea * eb / (n * (n - 1) / 2) if n > 1 else 0.0
    top = (ea + eb) / 2 - expected
    ari = 1.0 if top == 0 else (index - expected) / top
    return nmi, float(ari)


def kmeans(workdir: str, uri: str, manifest: dict, space: Space, node, k: int, iterations: int, seed: int,
           log=print) -> list[dict]:
    """Spherical k-means of a group's vectors, one Ray task per shard per iteration; returns the cluster rows."""
    import ray

    counts = [e["count"] for e in manifest["shards"]]
    n = sum(counts)
    k = max(1, min(k, n))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(n, size=k, replace=False))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    step = ray.remote(num_cpus=1)(_kmeans_step)
    init = [step.remote(uri, s, None, chosen[(chosen >= offsets[s]) & (chosen < offsets[s + 1])] - offsets[s])
            for s in range(len(counts))]
    centroids = np.concatenate(ray.get(init))
    for it in range(iterations):
        ref = ray.put(centroids)
        parts = ray.get([step.remote(uri, s, ref) for s in range(len(counts))])
        sums, sizes = sum(p[0] for p in parts), sum(p[1] for p in parts)
        empty = sizes == 0
        centroids = np.where(empty[:, None], centroids, sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True),
                                                                          1e-12))
        log(f"classify: k-means iteration {it + 1}/{iterations}: mean 1 - cos {sum(p[2] for p in parts) / n:.4f}, "
            f"{int(empty.sum())} empty clusters")
    task = ray.remote(num_cpus=1)(_cluster_shard)
    ref, node_ref, space_ref = ray.put(centroids), ray.put(node), ray.put(space)
    table = sum(ray.get([task.remote(workdir, uri, s, ref, node_ref, int(offsets[s]), space_ref)
                         for s in range(len(counts))]))
    rows = []
    for d in range(space.max_depth):
        t = table[d][:, :-1]  # products deeper than d only
        nmi, ari = nmi_ari(t)
        rows.append({"task": "cluster", "depth": d + 1, "clusters": int(k), "products": int(t.sum()),
                     "NMI": clean(100 * nmi), "ARI": clean(100 * ari)})
    return rows


# ---------------------------------------------------------------------------------------------- attributes

class EncodersUnavailable(RuntimeError):
    """The towers the features were made with cannot be loaded (attribute values need their text sides)."""


def _key_value(attribute: str) -> tuple[str, str] | None:
    key, sep, value = attribute.partition(":")
    return (key.strip().lower(), value.strip().lower()) if sep and key.strip() and value.strip() else None


def _attribute_counts(uri: str, labeler) -> tuple[Counter, Counter]:
    """Ray task: (key, value) counts of one features file, all products and the train split's."""
    fs, path = storage.arrow_filesystem(uri)
    t = pq.read_table(path, columns=["product_id", "category_path", "attributes"], filesystem=fs)
    every, train = Counter(), Counter()
    for pid, path, attrs in zip(*(t.column(c).to_pylist() for c in ("product_id", "category_path", "attributes"))):
        pairs = {kv[0]: kv for kv in map(_key_value, attrs or []) if kv}  # one value per key and product
        every.update(pairs.values())
        if labeler.split(pid, path) == "train":
            train.update(pairs.values())
    return every, train


def _embed_values(enc, clip_texts: list[str], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Ray task: the CLIP text tower's and the sentence encoder's embeddings of the value texts."""
    from clipita.encoders import ImageEncoder, TextEncoder

    return ImageEncoder(enc).encode_text(clip_texts), TextEncoder(enc).encode(texts)


def _zscore(s: np.ndarray) -> np.ndarray:
    return (s - s.mean(axis=1, keepdims=True)) / np.maximum(s.std(axis=1, keepdims=True), 1e-6)


def _attribute_file(uri: str, labeler, keys: dict) -> dict:
    """Ray task: test products' hidden attribute values predicted from the image and from image + title."""
    from clipita.vectors import vectors

    fs, path = storage.arrow_filesystem(uri)
    t = pq.read_table(path, columns=["product_id", "category_path", "attributes", "image_emb", "title_emb"],
                      filesystem=fs)
    ids, paths = t.column("product_id").to_pylist(), t.column("category_path").to_pylist()
    test = np.array([labeler.split(i, p) == "test" for i, p in zip(ids, paths)], bool)
    out = {}
    if not test.any():
        return out
    t = t.filter(pa.array(test))
    image, title = vectors(t.column("image_emb")), vectors(t.column("title_emb"))
    truth = [{kv[0]: kv[1] for kv in map(_key_value, a or []) if kv} for a in t.column("attributes").to_pylist()]
    for key, (values, clip_v, text_v, majority) in keys.items():
        pos = {v: i for i, v in enumerate(values)}
        rows = np.array([i for i, tr in enumerate(truth) if tr.get(key) in pos], np.int64)
        if not len(rows):
            continue
        want = np.array([pos[truth[i][key]] for i in rows])
        si, st = image[rows] @ clip_v.T, title[rows] @ text_v.T
        out[key] = {"products": len(rows), "image": int((si.argmax(1) == want).sum()),
                    "image+title": int(((_zscore(si) + _zscore(st)).argmax(1) == want).sum()),
                    "majority": int((want == pos.get(majority, -1)).sum())}
    return out


def attributes(workdir: str, cfg, labeler, log=print) -> list[dict]:
    import ray

    cc = cfg.classify
    files = product_files(workdir)
    every, train = Counter(), Counter()
    for e, t in ray.get([ray.remote(num_cpus=1)(_attribute_counts).remote(f, labeler) for f in files]):
        every.update(e)
        train.update(t)
    by_key: dict[str, Counter] = {}
    for (key, value), n in every.items():
        by_key.setdefault(key, Counter())[value] += n
    closed = {k: sorted(v) for k, v in sorted(by_key.items())
              if 2 <= len(v) <= cc.attribute_max_values and sum(v.values()) >= cc.attribute_min_products}
    if not closed:
        log("classify: no attribute key with a closed set of values")
        return []
    values = [(k, v) for k, vs in closed.items() for v in vs]
    try:
        clip_v, text_v = ray.get(ray.remote(num_cpus=1)(_embed_values).remote(
            recorded_encoders(workdir), [cc.attribute_prompt.format(v) for _, v in values], [v for _, v in values]))
    except ray.exceptions.RayTaskError as e:  # the towers of features/encoders.json cannot load here
        raise EncodersUnavailable(str(e).strip().splitlines()[-1]) from None
    keys, at = {}, 0
    for k, vs in closed.items():
        majority = max(vs, key=lambda v: (train.get((k, v), 0), v))
        keys[k] = (vs, clip_v[at: at + len(vs)], text_v[at: at + len(vs)], majority)
        at += len(vs)
    keys_ref = ray.put(keys)
    totals: dict[str, Counter] = {}
    for part in ray.get([ray.remote(num_cpus=1)(_attribute_file).remote(f, labeler, keys_ref) for f in files]):
        for k, c in part.items():
            totals.setdefault(k, Counter()).update(c)
    rows = []
    for k, c in totals.items():
        for inp in ("image", "image+title"):
            rows.append({"task": "attributes", "key": k, "model": "clip", "input": inp, "split": "test",
                         "values": len(closed[k]), "products": c["products"],
                         "acc": clean(100 * c[inp] / c["products"]),
                         "majority": clean(100 * c["majority"] / c["products"])})
    log(f"classify: attributes: {len(rows) // 2} closed-set keys scored on the test split")
    return rows


# ---------------------------------------------------------------------------------------------- the job

def _best_threshold(hist: np.ndarray) -> tuple[float, dict]:
    """The F1-best threshold of a (negatives, positives) x bins histogram, and the counts at it."""
    neg, pos = hist[0][::-1].cumsum()[::-1], hist[1][::-1].cumsum()[::-1]  # flagged at or above each bin
    f1 = 2 * pos / np.maximum(pos + neg + hist[1].sum(), 1)
    b = int(np.argmax(f1))
    return b / BINS, {"tp": pos[b], "fp": neg[b], "fn": hist[1].sum() - pos[b]}


def _prf(tp: float, fp: float, fn: float) -> dict:
    p = tp / (tp + fp) if tp + fp else float("nan")
    r = tp / (tp + fn) if tp + fn else float("nan")
    f = 2 * p * r / (p + r) if tp else 0.0
    return {"precision": clean(100 * p), "recall": clean(100 * r), "F1": clean(100 * f)}


def _mislabeled(workdir: str) -> set[str] | None:
    """Ids whose catalogue category jobs.synth corrupted on purpose (None: the catalogue records none)."""
    if not storage.exists(catalog_record(workdir)):
        return None
    uri = storage.join(storage.read_json(catalog_record(workdir))["catalog"], MISLABELED_FILE)
    if not storage.exists(uri):
        return None
    return set(pq.read_table(pa.BufferReader(storage.read_bytes(uri)), columns=["product_id"])
               .column("product_id").to_pylist())


def classification_rows(acc: dict, space: Space) -> list[dict]:
    rows = []
    for (model, mode, group), a in sorted(acc.items()):
        cats = (a["tp"] + a["fn"] > 0) & (space.seen[:-1] if group == "seen" else
                                           ~space.seen[:-1] if group == "unseen" else True)
        f1 = 2 * a["tp"][cats] / np.maximum(2 * a["tp"][cats] + a["fp"][cats] + a["fn"][cats], 1)
        for d in [None, *range(1, space.max_depth + 1)]:
            i = -1 if d is None else d - 1
            if not a["den"][i]:
                continue
            row = {"task": "classify", "model": model, "mode": mode, "split": group, "depth": d,
                   "products": int(a["den"][i]), "acc@1": clean(100 * a["at1"][i] / a["den"][i]),
                   "acc@5": clean(100 * a["at5"][i] / a["den"][i])}
            if d is None:
                row.update({"hierarchical": clean(100 * a["hier"] / a["n"]),
                            "macro-F1": clean(100 * float(f1.mean())) if cats.any() else None,
                            "categories": int(cats.sum())})
            rows.append(row)
    return rows


def _table(rows: list[dict], cols: list[str]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join("–" if r.get(c) is None else f"{r[c]:.1f}" if isinstance(r[c], float)
                                     else str(r[c]) for c in cols) + " |")
    return out


def classify_markdown(rows: list[dict], primary: str, mislabeled: int | None) -> str:
    md = ["## Categorisation (jobs.classify, test split)", "",
          "Exact category (leaf) accuracy; `hier.`: mean deepest correct depth / depth; probe: kNN over the "
          "train split's listings (it cannot name a category no train product has).", ""]
    exact = [dict(r, hier=r["hierarchical"]) for r in rows if r["task"] == "classify" and r["depth"] is None]
    md += _table(exact, ["model", "mode", "split", "products", "acc@1", "acc@5", "hier", "macro-F1"])
    sus = [r for r in rows if r["task"] == "suspects"]
    if sus:
        md += ["", f"### Mis-categorised listings ({mislabeled} labels corrupted on purpose)", ""]
        md += _table(sus, ["model", "mode", "P@100", "random"])
    for task, title, cols in (("cluster", f"### Clusters (k-means of {primary})", ["depth", "clusters", "NMI", "ARI"]),
                              ("attributes", "### Attribute values (zero-shot, attribute hidden)",
                               ["key", "input", "values", "products", "acc", "majority"]),
                              ("flag", f"### Flags ({primary}, threshold chosen on validation)",
                               ["flag", "threshold", "positives", "products", "precision", "recall", "F1"])):
        part = [r for r in rows if r["task"] == task]
        if part:
            md += ["", title, ""] + _table(part, cols)
    return "\n".join(md) + "\n"


def run_classify(workdir: str, cfg, log=print) -> dict:
    """jobs.classify (module docstring). Returns the stats written to classify/stats.json."""
    import ray

    t0 = time.time()
    cc = cfg.classify
    workdir = storage.absolute(workdir)
    groups = {m: group_dir(workdir, "all", REGISTRY[m].index_group(cc.setting)) for m in DENSE}
    groups = {m: u for m, u in groups.items() if storage.exists(storage.join(u, "manifest.json"))}
    if not groups:
        raise FileNotFoundError(f"no index under {workdir}/index/all: run jobs.index first")
    tree = load_tree(workdir)
    labeler = labeler_for(workdir, cfg.data, tree)
    primary = cc.model or ("clip-ita" if "clip-ita" in groups else "mpnet" if "mpnet" in groups else next(iter(groups)))
    if primary not in groups:
        raise ValueError(f"classify.model {primary}: no index/all group for it (setting {cc.setting}): "
                         f"use one of {', '.join(groups)}")
    manifest = storage.read_json(storage.join(groups[primary], "manifest.json"))
    query_text = manifest.get("query_text", cfg.data.query_text)
    counts = census(workdir, labeler)
    seen = {c for c, n in counts.labels.get(("specific", "train"), {}).items() if n}
    space = Space(tree, seen, parse_flags(cc.flags, tree))
    shards = len(manifest["shards"])
    log(f"classify: {sum(e['count'] for e in manifest['shards']):,} products in {shards} shard(s), "
        f"{len(space.leaf_ids)} leaf categories ({len(seen & set(space.leaf_ids))} seen), models {', '.join(groups)}")

    labels = ray.get([ray.remote(num_cpus=1)(_row_labels).remote(groups[primary], manifest, s, labeler, space.pos)
                      for s in range(shards)])
    node = np.concatenate([x[0] for x in labels])
    split = np.concatenate([x[1] for x in labels])
    vectors = {m: category_vectors(workdir, m, cc.setting, space.leaf_ids, query_text) for m in groups}
    fs, path = storage.filesystem(classify_dir(workdir))
    if fs.exists(path):  # predictions of an older run would mix with this one's
        fs.rm(path, recursive=True)
    params = {"top_k": cc.top_k, "temperature": cc.temperature, "probe_k": cc.probe_k, "suspects": cc.suspects}
    task = ray.remote(num_cpus=1)(_classify_shard)
    refs = [ray.put(x) for x in (vectors, space, node, split)]
    pending = [task.remote(workdir, groups, s, *refs, primary, params) for s in range(shards)]
    acc, suspects, flag_hist, every, done = {}, {}, {}, Every(30), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        out = ray.get(ready[0])
        _merge(acc, out["acc"])
        for key, h in out["flags"].items():
            flag_hist[key] = flag_hist.get(key, 0) + h
        for key, s in out["suspects"].items():
            suspects.setdefault(key, []).append(s)
        done += 1
        if every(force=not pending):
            log(f"classify: {done}/{shards} shards categorised ({time.time() - t0:.0f} s)")
    rows = classification_rows(acc, space)
    for r in rows:
        if r["depth"] is None and r["split"] != "all":
            log(f"classify: {r['model']:8s} {r['mode']:9s} {r['split']:6s} acc@1 {r['acc@1']:6.2f}  "
                f"acc@5 {r['acc@5']:6.2f}  macro-F1 {r['macro-F1'] if r['macro-F1'] is not None else float('nan'):6.2f}")

    # mis-categorised listings: the shards' most suspect, merged
    merged = {}
    for key, parts in suspects.items():
        cols = {c: [x for p in parts for x in (p[c].tolist() if isinstance(p[c], np.ndarray) else p[c])]
                for c in parts[0]}
        order = np.argsort(-np.array(cols["suspicion"]), kind="stable")[:cc.suspects]
        merged[key] = {c: [v[i] for i in order] for c, v in cols.items()}
    best = merged[(primary, "probe")]
    storage.write_parquet(classify_dir(workdir, "suspects.parquet"), pa.table({
        "rank": pa.array(np.arange(1, len(best["product_id"]) + 1, dtype=np.int32)),
        "product_id": pa.array(best["product_id"], pa.string()), "category": pa.array(best["category"], pa.string()),
        "suggested": pa.array(best["suggested"], pa.string()),
        "suspicion": pa.array(best["suspicion"], pa.float32())}))
    corrupted = _mislabeled(workdir)
    n_products = len(node)
    if corrupted is not None:
        share = len(corrupted) / max(1, n_products)
        for (model, mode), m in sorted(merged.items()):
            top = m["product_id"][:100]
            rows.append({"task": "suspects", "model": model, "mode": mode, "products": n_products,
                         "corrupted": len(corrupted), "P@100": clean(100 * sum(p in corrupted for p in top) / max(1, len(top))),
                         "random": clean(100 * share)})

    # flags: the F1-best threshold on validation, precision / recall on test
    thresholds = {}
    for f in space.flag_leaves:
        val, test = flag_hist.get((f, "val")), flag_hist.get((f, "test"))
        if val is None or test is None:
            continue
        thr, _ = _best_threshold(val)
        b = int(round(thr * BINS))
        tp, fp = test[1][b:].sum(), test[0][b:].sum()
        thresholds[f] = thr
        rows.append({"task": "flag", "flag": f, "model": primary, "split": "test", "threshold": round(thr, 4),
                     "positives": int(test[1].sum()), "products": int(test.sum()),
                     **_prf(tp, fp, test[1].sum() - tp)})
    flags = parse_flags(cc.flags, tree)
    storage.write_json(classify_dir(workdir, "flags.json"), {
        "model": primary, "setting": cc.setting, "temperature": cc.temperature,
        "flags": {f: {"subtrees": flags[f], "threshold": thresholds.get(f, 1.0)} for f in flags}})

    log(f"classify: k-means of {primary}'s vectors")
    rows += [dict(r, model=primary) for r in kmeans(workdir, groups[primary], manifest, space, node,
                                                    cc.clusters or len(space.leaf_ids), cc.kmeans_iterations,
                                                    cfg.data.seed, log)]
    try:
        rows += attributes(workdir, cfg, labeler, log)
        skipped = None
    except EncodersUnavailable as e:  # e.g. a features-only workdir whose encoders this machine cannot load
        skipped = str(e)
        log(f"classify: attribute values skipped: the encoders do not load: {skipped}")
    publish(workdir, "classify", rows, classify_markdown(rows, primary, None if corrupted is None else len(corrupted)))
    stats = {"stage": "classify", "products": n_products, "models": list(groups), "model": primary,
             "leaves": len(space.leaf_ids), "rows": len(rows), "attributes_skipped": skipped, "corrupted": None if corrupted is None else len(corrupted),
             "seconds": round(time.time() - t0, 2)}
    storage.write_json(stage_stats(workdir, "classify"), stats)
    return stats
