"""jobs.match: listings of the same product (e-CLIP's product matching) from the all-products index's neighbours.

Streaming on Ray; the driver holds int and float arrays only (8-12 bytes per product or candidate pair), never a
string per product:

1. **Group codes** (the truth, never used to predict): one Ray task per file of the group-id source (a
   ``group_id`` column of features/products, else of the catalogue, else none) hashes (product_id, group_id) to
   int64 (``code``: a stable 63-bit blake2b of the group id, a product without one being its own group) and
   gives each group its split (``clipita.tree.split_of`` of the group id: every listing of a product shares it).
2. **Candidates**: one Ray task per pair of index shards (i, j >= i), ``match.tasks`` at once, takes shard i's
   stored vectors (``shard_vectors``) and searches them in shard j (two shards memory-mapped: a task's pages stay
   two shards' worth) for the k + 1 nearest (``ShardedIndex.search``, HNSW at ``match.ef``: 32 by default, 0 for
   the index's own), drops the row itself and keeps the pairs (a < b) of cosine >= ``match.min_score``; the
   (i, i) task also looks shard i's rows' group codes up in those sorted arrays (shared through the object
   store). Never all pairs. Each pair of shards is searched once, from
   the earlier one: M (M + 1) / 2 shard searches instead of M² (0.54x at 1M products, 12 shards), in tasks of
   equal size that keep every CPU busy to the end. A pair is found when one listing is among the other's k + 1
   nearest of its shard (listings of one product are each other's nearest), so a row may get up to k + 1
   candidates from each shard, not k overall.
3. **Threshold** (``match.threshold`` 0): the pair-F1-best cosine over the candidate pairs whose two ends are
   validation-split products (the recall's denominator counts every same-group pair among them, found or not).
4. **Groups**: connected components (a numpy union-find) of the pairs at or above the threshold; each group is
   named by its first row's product id. Ray tasks (one per shard) write ``match/groups/<shard>.parquet``.
5. **Metrics** (percent) on the test split's products, and on the validation split's (where the threshold was
   chosen: not held out) and all products: pair precision / recall / F1 of the predicted groups against the true
   ones, cluster purity; published to metrics.json / metrics.md (``report.publish``).
"""
from __future__ import annotations

import hashlib
import time

import numpy as np
import pyarrow as pa

from clipita import storage
from clipita.runtime import Every
from clipita.workdir import catalog_record, group_dir, match_dir, stage_stats

SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
MASK63 = (1 << 63) - 1
BATCH = 4096  # queries per search call
NO_TRUTH_THRESHOLD = 0.9  # match.threshold 0 without any group id to choose one on


def code(text: str) -> int:
    """A stable 63-bit hash of a string (a product or group id): the same on every machine and run."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & MASK63


def codes(strings) -> np.ndarray:
    return np.fromiter((code(s) for s in strings), np.int64, count=len(strings))


# --- 1. group ids ---------------------------------------------------------------------------------------------

def group_source(workdir: str) -> tuple[str, list[str]]:
    """(where, files) of the group ids: features/products when its files have a group_id column, else the
    catalogue's files when they have one, else ("none", [])."""
    import pyarrow.parquet as pq

    from clipita import catalog
    from clipita.features import product_files

    def has_group(files: list[str]) -> bool:
        for f in files[:1]:
            fs, path = storage.arrow_filesystem(f)
            with fs.open_input_file(path) as fh:
                return "group_id" in pq.ParquetFile(fh).schema_arrow.names
        return False

    files = product_files(workdir)
    if has_group(files):
        return "features", files
    try:
        root = storage.read_json(catalog_record(workdir))["catalog"]
        files = catalog.product_files(root)
    except (storage.StorageError, catalog.CatalogError, KeyError, TypeError):
        return "none", []
    try:
        return ("catalogue", files) if has_group(files) else ("none", [])
    except (OSError, storage.StorageError):
        return "none", []


def _file_codes(uri: str, data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ray task: (product-id hash, group code, group split code) of every product of one file with a group_id."""
    import pyarrow.parquet as pq

    from clipita.tree import split_of

    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        t = pq.ParquetFile(f).read(columns=["product_id", "group_id"])
    ids, groups = t.column("product_id").to_pylist(), t.column("group_id").to_pylist()
    keep = [i for i, p in enumerate(ids) if p is not None]
    gid = [groups[i] if groups[i] not in (None, "") else ids[i] for i in keep]
    unique = {g: (code(g), SPLIT_CODES[split_of(g, data.seed, data.val_fraction, data.test_fraction)])
              for g in set(gid)}
    return (codes([ids[i] for i in keep]), np.array([unique[g][0] for g in gid], np.int64),
            np.array([unique[g][1] for g in gid], np.int8))


def group_lookup(files: list[str], data) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted product-id hashes and their group codes and splits, from every file (Ray tasks, ints back)."""
    import ray

    task = ray.remote(num_cpus=1)(_file_codes)
    refs = [task.remote(f, data) for f in files]
    parts = ray.get(refs)
    keys = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.argsort(keys, kind="stable")
    return (keys[order], np.concatenate([p[1] for p in parts])[order] if parts else np.zeros(0, np.int64),
            np.concatenate([p[2] for p in parts])[order] if parts else np.zeros(0, np.int8))


def row_codes(ids: list[str], lookup, data) -> tuple[np.ndarray, np.ndarray]:
    """Group code and split code of each product id: its group's from the lookup, else its own (own group)."""
    from clipita.tree import split_of

    keys, gcode, gsplit = lookup
    h = codes(ids)
    pos = np.minimum(np.searchsorted(keys, h), max(len(keys) - 1, 0))
    found = (keys[pos] == h) if len(keys) else np.zeros(len(h), bool)
    out_code, out_split = np.where(found, gcode[pos] if len(keys) else 0, h), np.empty(len(h), np.int8)
    if len(keys):
        out_split[found] = gsplit[pos[found]]
    for i in np.flatnonzero(~found):
        out_split[i] = SPLIT_CODES[split_of(ids[i], data.seed, data.val_fraction, data.test_fraction)]
    return out_code.astype(np.int64), out_split


# --- 2. candidates --------------------------------------------------------------------------------------------

def _pair_candidates(uri: str, i: int, j: int, k: int, min_score: float, ef: int, threads: int, lookup,
                     data) -> dict:
    """Ray task: shard i's rows against shard j (j >= i) -> candidate pairs (row_a < row_b, global row positions,
    as int64 keys a * N + b) with their float32 cosines: each row's k + 1 nearest in shard j, itself dropped,
    cosine >= min_score. The (i, i) task also gives shard i's group codes and splits. Two shards memory-mapped."""
    from clipita.downstream import shard_vectors
    from clipita.index import ShardedIndex, read_rows

    t0 = time.time()
    manifest = storage.read_json(storage.join(uri, "manifest.json"))
    entries = manifest["shards"]
    n = int(sum(e["count"] for e in entries))
    offsets = np.concatenate([[0], np.cumsum([e["count"] for e in entries])]).astype(np.int64)
    out: dict = {"i": i, "j": j}
    if i == j:
        ids = read_rows(uri, dict(manifest, shards=[entries[i]]), ["product_id"]).column("product_id").to_pylist()
        out["code"], out["split"] = row_codes(ids, lookup, data)
        del ids
    own = ShardedIndex(uri, view=True, columns=None, shards=(i, i + 1))
    other = own if j == i else ShardedIndex(uri, view=True, columns=None, shards=(j, j + 1))
    count, first = int(entries[i]["count"]), int(entries[i]["first_key"])
    take = min(k + 1, len(other))  # in its own shard, a row is (almost always) its own nearest
    found_a, found_b, found_s = [], [], []
    for a in range(0, count, BATCH):
        q = shard_vectors(own.shards[0], first + a, min(BATCH, count - a))
        m = other.search(q, take, ef=ef, threads=threads)
        rows = np.where(m.rows >= 0, m.rows + offsets[j], -1)
        me = offsets[i] + a + np.arange(len(q), dtype=np.int64)[:, None]
        keep = (rows >= 0) & (rows != me) & (m.scores >= min_score)
        found_a.append(np.broadcast_to(me, rows.shape)[keep])
        found_b.append(rows[keep])
        found_s.append(m.scores[keep].astype(np.float32))
    del other, own
    a, b, s = np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s)
    pair, first_at = np.unique(np.minimum(a, b) * n + np.maximum(a, b), return_index=True)
    out.update(pairs=pair, scores=s[first_at], seconds=time.time() - t0)
    return out


# --- 3-5. threshold, components, metrics ----------------------------------------------------------------------

def pairs_within(labels: np.ndarray) -> int:
    """Pairs of items that share a label: sum over labels of C(size, 2)."""
    if len(labels) == 0:
        return 0
    _, c = np.unique(labels, return_counts=True)
    return int((c * (c - 1) // 2).sum())


def best_threshold(scores: np.ndarray, same: np.ndarray, positives: int,
                   floor: float) -> tuple[float | None, float]:
    """(cosine, F1) of the pair-F1-best threshold over candidate pairs' ``scores`` (``same``: both ends of one
    group); ``positives`` is every same-group pair among the products, found or not. Every cosine between the
    lowest kept pair and the highest left out gives that F1: the threshold is their midpoint (``floor``, the
    lowest cosine a candidate can have, when none is left out), not the kept pair's own score, which would fit
    the validation pairs' margin exactly. (None, 0) without any same-group pair."""
    if positives == 0 or not same.any():
        return None, 0.0
    order = np.argsort(-scores, kind="stable")
    s, tp = scores[order], np.cumsum(same[order])
    last = np.r_[s[1:] != s[:-1], True]  # a threshold keeps every pair of its score: ends of runs of ties
    predicted = np.arange(1, len(s) + 1)
    f1 = np.where(last, 2 * tp / (predicted + positives), -1.0)
    i = int(np.argmax(f1))
    below = float(s[i + 1]) if i + 1 < len(s) else float(floor)
    return (float(s[i]) + below) / 2, float(f1[i])


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of n nodes and edges (a, b): each node's label is the smallest node of its component
    (union-find by hooking roots to the smaller one and pointer jumping, numpy only)."""
    parent = np.arange(n, dtype=np.int64)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
        live = lo != hi
        if not live.any():
            break
        a, b, lo, hi = a[live], b[live], lo[live], hi[live]
        np.minimum.at(parent, hi, lo)  # hi is a root: hook it to the smallest root it meets
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


def _contingency(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Sizes of every non-empty (predicted group, true group) cell."""
    if len(pred) == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((truth, pred))
    p, t = pred[order], truth[order]
    new = np.r_[True, (p[1:] != p[:-1]) | (t[1:] != t[:-1])]
    return np.diff(np.r_[np.flatnonzero(new), len(p)])


def split_metrics(pred: np.ndarray, truth: np.ndarray, has_truth: bool) -> dict:
    """Pair precision / recall / F1 (percent) of predicted groups against true ones over the same products, and
    purity: the share of products in predicted groups of 2+ whose group's most common true group is theirs."""
    tp_cells = _contingency(pred, truth)
    tp = int((tp_cells * (tp_cells - 1) // 2).sum())
    predicted, true = pairs_within(pred), pairs_within(truth)
    _, inverse, sizes = np.unique(pred, return_inverse=True, return_counts=True) if len(pred) else (None, [], [])
    multi = np.asarray(sizes)[inverse] >= 2 if len(pred) else np.zeros(0, bool)
    out = {"products": int(len(pred)), "groups": 0, "predicted_groups": int((np.asarray(sizes) >= 2).sum()),
           "precision": None, "recall": None, "F1": None, "purity": None, "true_pairs": true,
           "predicted_pairs": predicted}
    if not has_truth:
        return out
    _, tsizes = np.unique(truth, return_counts=True)
    out["groups"] = int((tsizes >= 2).sum())
    if out["groups"] == 0:
        return out
    p = tp / predicted if predicted else 0.0
    r = tp / true
    out.update(precision=round(100 * p, 4), recall=round(100 * r, 4),
               F1=round(100 * (2 * p * r / (p + r) if p + r else 0.0), 4))
    if multi.any():
        mp, mt = pred[multi], truth[multi]
        order = np.lexsort((mt, mp))
        mp, mt = mp[order], mt[order]
        new = np.r_[True, (mp[1:] != mp[:-1]) | (mt[1:] != mt[:-1])]
        starts = np.flatnonzero(new)
        cell = np.diff(np.r_[starts, len(mp)])
        best = np.maximum.reduceat(cell, np.flatnonzero(np.r_[True, mp[starts][1:] != mp[starts][:-1]]))
        out["purity"] = round(100 * float(best.sum()) / int(multi.sum()), 4)
    return out


def _write_groups(uri: str, out_uri: str, shard_no: int, label: np.ndarray, size: np.ndarray) -> int:
    """Ray task: match/groups/<shard>.parquet, product_id / group (the product id of its group's first row) /
    size of this shard's products in predicted groups of 2+; the label rows' ids are read from their shards."""
    from clipita.index import read_rows

    manifest = storage.read_json(storage.join(uri, "manifest.json"))
    entries = manifest["shards"]
    offsets = np.concatenate([[0], np.cumsum([e["count"] for e in entries])]).astype(np.int64)
    keep = np.flatnonzero(size >= 2)
    if len(keep) == 0:
        return 0
    own = read_rows(uri, dict(manifest, shards=[entries[shard_no]]), ["product_id"]).column("product_id")
    label = label[keep]
    owner = np.searchsorted(offsets, label, side="right") - 1
    names: list = [None] * len(keep)
    for j in np.unique(owner):
        col = own if j == shard_no else read_rows(uri, dict(manifest, shards=[entries[j]]),
                                                  ["product_id"]).column("product_id")
        at = np.flatnonzero(owner == j)
        for i, v in zip(at.tolist(), col.take(pa.array(label[at] - offsets[j])).to_pylist()):
            names[i] = v
    table = pa.table({"product_id": own.take(pa.array(keep)), "group": pa.array(names, pa.string()),
                      "size": pa.array(size[keep].astype(np.int32))})
    storage.write_parquet(storage.join(out_uri, f"{entries[shard_no]['name']}.parquet"), table)
    return len(keep)


def markdown(rows: list[dict], model: str, source: str, stats: dict) -> str:
    out = ["## Matching (jobs.match)", ""]
    out.append(f"Listings of the same product: pairs of {model} index neighbours (k = {stats['k']}, cosine >= "
               f"{stats['min_score']}) at or above the threshold {stats['threshold']:.4f} "
               f"({stats['threshold_from']}), joined into connected components. {stats['products']:,} products, "
               f"{stats['pairs']:,} candidate pairs, {stats['predicted_groups']:,} predicted groups of 2+ holding "
               f"{stats['products_in_groups']:,} products.")
    out.append("")
    if source == "none":
        out += ["No group_id (neither in features/products nor in the catalogue): groups are written, nothing to "
                "score them against.", ""]
        return "\n".join(out)
    out += [f"Truth: the group_id column of the {source}. Pair precision / recall / F1 of the predicted groups and "
            "purity (share of grouped products whose group's most common true group is theirs), in %. The "
            "threshold was chosen on val: only test is held out.", "",
            "| split | products | true groups | predicted groups | candidates | precision | recall | F1 | purity |",
            "|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "–" if v is None else f"{v:.2f}"

    for r in rows:
        name = f"{r['split']} (threshold chosen here)" if r["split"] == "val" and stats["threshold_from"] == \
            "val" else r["split"]
        out.append(f"| {name} | {r['products']:,} | {r['groups']:,} | {r['predicted_groups']:,} | "
                   f"{r['candidates']:,} | {f(r['precision'])} | {f(r['recall'])} | {f(r['F1'])} | "
                   f"{f(r['purity'])} |")
    return "\n".join(out + [""])


def run_match(workdir: str, cfg, log=print) -> dict:
    """jobs.match: predicted groups of listings under match/groups/, match/stats.json, and the match rows of
    metrics.json / metrics.md. Returns the stats."""
    import ray

    from clipita.index import recorded_ef
    from clipita.models import REGISTRY
    from clipita.stages.report import publish

    t0 = time.time()
    mc = cfg.match
    workdir = storage.absolute(workdir)
    if mc.model not in REGISTRY or not REGISTRY[mc.model].dense:
        raise ValueError(f"match.model must be a dense model ({', '.join(n for n, s in REGISTRY.items() if s.dense)})"
                         f", got {mc.model!r}")
    group = REGISTRY[mc.model].index_group(mc.setting)
    uri = group_dir(workdir, "all", group)
    try:
        manifest = storage.read_json(storage.join(uri, "manifest.json"))
    except storage.StorageError:
        raise FileNotFoundError(f"no all-products index of {group} at {uri} (manifest.json missing): run "
                                f"jobs.index first") from None
    entries = manifest["shards"]
    n = int(manifest["count"])
    if n == 0 or not entries:
        raise ValueError(f"the all-products index of {group} at {uri} is empty: nothing to match")
    offsets = np.concatenate([[0], np.cumsum([e["count"] for e in entries])]).astype(np.int64)
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    # every pair of shards once, from the earlier one: M (M + 1) / 2 searches of a shard's rows, not M²
    plan = [(i, j) for i in range(len(entries)) for j in range(i, len(entries))]
    parallel = min(mc.tasks or cpus, len(plan))
    threads = max(1, cpus // parallel)
    # HNSW ef of the walk: match.ef, or 0 for the index's own (what serving searches with)
    ef = max(mc.ef or recorded_ef(manifest), mc.k + 1)

    source, files = group_source(workdir)
    lookup = group_lookup(files, cfg.data) if files else (np.zeros(0, np.int64), np.zeros(0, np.int64),
                                                          np.zeros(0, np.int8))
    log(f"match: {n:,} products of index {group} in {len(entries)} shards ({len(plan)} shard pairs); group ids: "
        f"{source}"
        f"{f' ({len(lookup[0]):,} rows)' if files else ''}; k {mc.k}, ef {ef}, cosine >= {mc.min_score}, "
        f"{parallel} tasks at once")
    lookup_ref = ray.put(lookup)
    del lookup
    task = ray.remote(num_cpus=threads)(_pair_candidates)
    code_of, split_of_row = np.zeros(n, np.int64), np.zeros(n, np.int8)
    pair_parts, score_parts = [], []
    pending, started, every = {}, 0, Every(30)
    while started < len(plan) or pending:
        while started < len(plan) and len(pending) < parallel:
            i, j = plan[started]
            pending[task.remote(uri, i, j, mc.k, mc.min_score, ef, threads, lookup_ref, cfg.data)] = started
            started += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        pending.pop(done[0])
        r = ray.get(done[0])
        if "code" in r:
            i = r["i"]
            code_of[offsets[i]:offsets[i + 1]], split_of_row[offsets[i]:offsets[i + 1]] = r["code"], r["split"]
        pair_parts.append(r["pairs"])
        score_parts.append(r["scores"])
        finished = started - len(pending)
        if every(force=finished == len(plan)):
            log(f"match: {finished}/{len(plan)} shard pairs searched, {sum(len(p) for p in pair_parts):,} "
                f"candidate pairs so far ({time.time() - t0:.0f} s)")
        del r
    del lookup_ref
    pairs = np.concatenate(pair_parts) if pair_parts else np.zeros(0, np.int64)
    scores = np.concatenate(score_parts) if score_parts else np.zeros(0, np.float32)
    del pair_parts, score_parts
    pairs, first = np.unique(pairs, return_index=True)  # a pair both ends found once
    scores = scores[first]
    a, b = pairs // n, pairs % n
    del pairs, first
    t1 = time.time()

    # 3. the threshold, on validation products only
    has_truth = source != "none"
    val = split_of_row == SPLIT_CODES["val"]
    if mc.threshold > 0:
        threshold, chosen = float(mc.threshold), "match.threshold"
    else:
        both = val[a] & val[b]
        t, f1 = best_threshold(scores[both], (code_of[a] == code_of[b])[both], pairs_within(code_of[val]),
                               mc.min_score)
        if t is None:
            threshold = NO_TRUTH_THRESHOLD
            chosen = "default: no group ids" if not has_truth else "default: no same-group pair in val"
        else:
            threshold, chosen = t, "val"
            log(f"match: threshold {t:.4f} (validation pair F1 {100 * f1:.1f} over {int(both.sum()):,} pairs)")

    # 4. predicted groups
    edge = scores >= threshold
    label = components(n, a[edge], b[edge])
    _, inverse, sizes = np.unique(label, return_inverse=True, return_counts=True)
    size = sizes[inverse].astype(np.int64)
    del inverse
    grouped = int((size >= 2).sum())
    out_uri = match_dir(workdir, "groups")
    fs, path = storage.filesystem(out_uri)
    if fs.exists(path):  # a re-run replaces every shard's groups
        fs.rm(path, recursive=True)
    writer = ray.remote(num_cpus=1)(_write_groups)
    written = sum(ray.get([writer.remote(uri, out_uri, j, label[offsets[j]:offsets[j + 1]],
                                         size[offsets[j]:offsets[j + 1]]) for j in range(len(entries))]))
    assert written == grouped, (written, grouped)

    # 5. metrics
    rows = []
    for split in ("test", "val", "all"):
        sel = np.ones(n, bool) if split == "all" else split_of_row == SPLIT_CODES[split]
        m = split_metrics(label[sel], code_of[sel], has_truth)
        rows.append({"task": "match", "model": mc.model, **({"setting": mc.setting} if REGISTRY[mc.model].trained
                                                             else {}),
                     "split": split, "precision": m["precision"], "recall": m["recall"], "F1": m["F1"],
                     "purity": m["purity"], "threshold": round(threshold, 6), "threshold_from": chosen,
                     "products": m["products"], "groups": m["groups"], "predicted_groups": m["predicted_groups"],
                     "candidates": int((sel[a] & sel[b]).sum()), "true_pairs": m["true_pairs"],
                     "predicted_pairs": m["predicted_pairs"]})
    stats = {"stage": "match", "model": mc.model, "group": group, "group_ids": source, "products": n,
             "pairs": int(len(a)), "pairs_at_threshold": int(edge.sum()), "threshold": round(threshold, 6),
             "threshold_from": chosen, "predicted_groups": int((sizes >= 2).sum()), "products_in_groups": grouped,
             "singletons": int((sizes == 1).sum()), "k": mc.k, "ef": ef, "min_score": mc.min_score,
             "shards": len(entries),
             "search_seconds": round(t1 - t0, 2), "seconds": round(time.time() - t0, 2)}
    publish(workdir, "match", rows, markdown(rows, mc.model, source, stats))
    storage.write_json(stage_stats(workdir, "match"), stats)
    test = rows[0]
    log(f"match: {stats['predicted_groups']:,} groups of 2+ ({grouped:,} products, {stats['singletons']:,} "
        f"singletons) at threshold {threshold:.4f} ({chosen}); test "
        + (f"P/R/F1 {test['precision']:.1f} / {test['recall']:.1f} / {test['F1']:.1f}" if test["F1"] is not None
           else "not scored (no group ids)") + f" ({stats['seconds']:.0f} s)")
    return stats
