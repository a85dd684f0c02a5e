"""The evaluation stage: every model on every setting and split, through the USearch index, as in PAPER.md.

Per setting: queries are the test products' categories in that setting, candidates the test products, and a
product is relevant when its label equals the query (exact node). Splits: all queries, ``seen`` (the category
labels some training product) and ``unseen``. A hierarchy-aware relevance (the product's path passes through the
query category) is reported beside the paper's, under the row's ``hierarchy`` key and in its own table.

Streaming, for catalogues no process can hold: the driver keeps the tree, the per-category counts of a
``census`` (R of every query, seen or unseen) and the query vectors. The test-scope shards that jobs.index built
are cut into partitions of at most ``evaluate.ranker_rows`` products; a ``QueryRanker`` actor per partition holds
its rows (labels as integers) and memory-maps its shards. Each batch of queries goes to every partition, which
returns its exact top-k as deep as the batch's deepest R (bm25 through the inverted index of clipita.bm25 with the
whole split's idf, dense models by usearch's exact scan, so metrics never depend on the graph); a ``merge_top_k``
task merges them (ties: global row, or product id for bm25, as one actor would rank) into per-query metrics, which
the driver averages per split. The HNSW walk that serving uses is checked against that exact ranking on a sample
of queries (recall@10 at index.expansion_search).

Outputs: metrics.json (DESIGN.md rows), metrics.md (Table 1 layout with the paper's numbers), metrics.png.
"""
from __future__ import annotations

import time

import numpy as np

from clipita import storage
from clipita.bm25 import BM25Corpus, SparseBM25
from clipita.census import census
from clipita.features import labeler_for, load_categories, load_tree, recorded_encoders
from clipita.index import IndexIntegrityError, ShardedIndex, read_rows
from clipita.metrics import per_query_metrics
from clipita.models import MODELS, REGISTRY, ROWS_GROUP
from clipita.rankers import Queries, load_ranker
from clipita.stages.report import (METRICS, SPLITS, add_base_to_new, alignment_rows, clean, metrics_markdown,
                                   metrics_png, publish)
from clipita.tree import SEP, SETTINGS
from clipita.workdir import align_dir, group_dir, metrics_file, stage_stats

CHUNK_ENTRIES = 1 << 21  # queries x depth ranked in one call: bounds an actor's result arrays (~16 MB)


def ancestor_matrix(paths: list[list[str]], index: dict[str, int], depth: int | None = None) -> np.ndarray:
    """(N, depth) ids of every node on each product's path, -1 padded (depth: the longest path by default)."""
    depth = depth or max((len(p) for p in paths), default=1)
    out = np.full((len(paths), depth), -1, dtype=np.int32)
    for i, path in enumerate(paths):
        for d in range(len(path)):
            out[i, d] = index[SEP.join(path[: d + 1])]
    return out


def hierarchy_hits(ranked: np.ndarray, ancestors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(Q, L) hits when a product is relevant to every category on its path; -1 in ``ranked`` is no item."""
    return (ancestors[np.maximum(ranked, 0)] == queries[:, None, None]).any(-1) & (ranked >= 0)


class QueryRanker:
    """Ray actor: one partition of the test split's candidates (consecutive shards of the test-scope index; row
    positions count from ``base``), returning each query's top-k with what the merge needs."""

    def __init__(self, workdir: str, labeler, node_index: dict[str, int], shards: tuple[int, int], base: int):
        import pyarrow as pa
        import pyarrow.compute as pc

        self.workdir, self.shards, self.base = workdir, shards, base
        uri = group_dir(workdir, "test", ROWS_GROUP)
        manifest = storage.read_json(storage.join(uri, "manifest.json"))
        labels: dict[str, list[np.ndarray]] = {s: [] for s in SETTINGS}
        ancestors, ids, titles = [], [], []
        depth = max((n.count(SEP) + 1 for n in node_index), default=1)
        for entry in manifest["shards"][slice(*shards)]:  # a shard's rows at a time: Python objects stay per shard
            rows = read_rows(uri, dict(manifest, shards=[entry]), ["product_id", "title", "category_path"])
            pids, paths = rows.column("product_id").to_pylist(), rows.column("category_path").to_pylist()
            for s in SETTINGS:
                labels[s].append(np.array([node_index[labeler.label(p, path, s)] for p, path in zip(pids, paths)],
                                          dtype=np.int32))
            ancestors.append(ancestor_matrix(paths, node_index, depth))
            ids.append(rows.column("product_id"))
            titles.append(rows.column("title"))
        self.labels = {s: np.concatenate(v) if v else np.zeros(0, np.int32) for s, v in labels.items()}
        self.ancestors = np.concatenate(ancestors) if ancestors else np.zeros((0, depth), np.int32)
        self.count = len(self.ancestors)
        # bm25 ranks ties by product id (the first landing's order): its documents are the titles sorted by id,
        # and the merge breaks ties across partitions by id too
        ids_array = pa.chunked_array(ids, pa.string())
        self.by_id = pc.sort_indices(ids_array).to_numpy().astype(np.int64)
        self.sorted_ids = ids_array.take(pa.array(self.by_id)).combine_chunks()
        self.bm25 = SparseBM25(pa.chunked_array(titles, pa.string()).take(pa.array(self.by_id)).to_pylist()) \
            if self.count else None
        self.indexes: dict[str, ShardedIndex] = {}

    def size(self) -> int:
        return self.count

    def bm25_stats(self) -> dict | None:
        return self.bm25.stats(self.sorted_ids.to_pylist()) if self.bm25 else None

    def use_corpus(self, corpus) -> None:
        """Score bm25 with the whole test split's idf and mean title length (clipita.bm25.BM25Corpus)."""
        if self.bm25:
            self.bm25.use(corpus)

    def _index(self, group: str) -> ShardedIndex:
        if group not in self.indexes:
            index = ShardedIndex(group_dir(self.workdir, "test", group), columns=None, shards=self.shards)
            if len(index) != self.count:
                raise IndexIntegrityError(f"index test/{group} has {len(index)} products in shards {self.shards}, "
                                          f"test/{ROWS_GROUP} {self.count}: run jobs.index")
            self.indexes[group] = index
        return self.indexes[group]

    def top_k(self, setting: str, group: str | None, queries, nodes: np.ndarray, k: int, ef: int,
              sample: int) -> dict:
        """Exact top-k of this partition: a sparse model (``group`` None: its queries are words) through the BM25
        inverted index, a dense model (its index group, its query vectors) by usearch's brute-force scan of the
        shards (the metrics describe the model, not the approximation of a graph walk). Returns the scores, the
        merge's tie-break keys (global row; product id for BM25), exact and hierarchy hits, and for the first
        ``sample`` queries the HNSW walk serving would do (global rows, scores)."""
        import pyarrow as pa

        k = min(k, self.count)
        if group is None:
            rows, scores = self.bm25.top_k(queries, k)
            key = self.sorted_ids.take(pa.array(rows.ravel()))
            rows = self.by_id[rows]
        else:
            found = self._index(group).search(queries, k, exact=True)
            rows, scores = found.rows, found.scores
            key = np.where(rows >= 0, rows + self.base, -1)
        out = {"score": scores, "key": key, "hits": (self.labels[setting][np.maximum(rows, 0)] == nodes[:, None])
               & (rows >= 0), "hierarchy": hierarchy_hits(rows, self.ancestors, nodes), "walk": None}
        if group is not None and sample:
            top = min(10, self.count)
            walk = self._index(group).search(queries[:sample], top, ef=max(ef, top))
            out["walk"] = (np.where(walk.rows >= 0, walk.rows + self.base, -1), walk.scores)
        return out


def bm25_corpus(*stats):
    """Ray task: the partitions' bm25 statistics merged (idf over the whole test split)."""
    return BM25Corpus.merge([s for s in stats if s])


def _best_first(scores: np.ndarray, keys: np.ndarray, k: int) -> np.ndarray:
    """Column order of the top k per row: higher score first, then lower key (-1 keys, padding, last)."""
    keys = np.where(keys < 0, np.iinfo(np.int64).max, keys)
    return np.lexsort((keys, -scores), axis=1)[:, :k]


def merge_top_k(k: int, n_rel: np.ndarray, h_rel: np.ndarray, *parts: dict) -> dict:
    """Ray task: the partitions' top-k lists of one batch of queries merged into the global top-k, reduced to
    per-query metrics (and, where sampled, the HNSW walk's recall@10 against the exact top 10)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    score = np.concatenate([p["score"] for p in parts], axis=1)
    if isinstance(parts[0]["key"], np.ndarray):
        key = np.concatenate([p["key"] for p in parts], axis=1)
    else:  # bm25: product ids, ranked together so that ties break by id as in one index over the whole split
        ranks = pc.rank(pa.concat_arrays([p["key"] for p in parts]), sort_keys="ascending", tiebreaker="dense")
        ranks, widths = ranks.to_numpy().astype(np.int64), [p["score"].shape[1] for p in parts]
        offsets = np.cumsum([0] + [len(score) * w for w in widths])
        key = np.concatenate([ranks[a:b].reshape(len(score), w) for a, b, w in zip(offsets, offsets[1:], widths)],
                             axis=1)
    order = _best_first(score, key, k)
    out = {kind: per_query_metrics(np.take_along_axis(np.concatenate([p[kind] for p in parts], axis=1), order, 1),
                                   rel) for kind, rel in (("hits", n_rel), ("hierarchy", h_rel))}
    out["recall"] = None
    walks = [p["walk"] for p in parts if p["walk"] is not None]
    if walks:
        rows, scores = np.concatenate([w[0] for w in walks], 1), np.concatenate([w[1] for w in walks], 1)
        top = min(10, order.shape[1])
        walk = np.take_along_axis(rows, _best_first(scores, rows, top), 1)
        exact = np.take_along_axis(key, order, 1)[: len(walk), :top]
        out["recall"] = [len(set(a) & set(b)) / top for a, b in zip(walk, exact)]
    return out


def partitions(counts: list[int], max_rows: int) -> list[tuple[int, int, int]]:
    """Consecutive shard ranges (start, stop, first row) of at most ``max_rows`` rows, at least one shard each."""
    out, start, rows, base = [], 0, 0, 0
    for i, c in enumerate(counts):
        if i > start and rows + c > max_rows:
            out.append((start, i, base))
            start, base, rows = i, base + rows, 0
        rows += c
    return out + [(start, len(counts), base)] if counts else out


def _chunks(depth: np.ndarray, entries: int = 0) -> list[np.ndarray]:
    """Query positions in batches of similar depth, each batch's queries x depth at most ``entries``."""
    entries = entries or CHUNK_ENTRIES
    order = np.argsort(depth, kind="stable")
    out, start = [], 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop - start + 1) * depth[order[stop]] <= entries and stop - start < 512:
            stop += 1
        out.append(order[start:stop])
        start = stop
    return out


def _means(per_query: dict[str, np.ndarray], sel: np.ndarray) -> dict[str, float]:
    return {k: float(np.nanmean(v[sel])) if sel.any() else float("nan") for k, v in per_query.items()}


def evaluate(workdir: str, cfg, log=print) -> list[dict]:
    import ray

    t0 = time.time()
    workdir = storage.absolute(workdir)
    if not storage.exists(storage.join(group_dir(workdir, "test", ROWS_GROUP), "manifest.json")):
        raise FileNotFoundError(f"no index under {workdir}/index/test: run jobs.index first")
    tree, categories = load_tree(workdir), load_categories(workdir)
    labeler = labeler_for(workdir, cfg.data, tree)
    counts = census(workdir, labeler)
    node_index = {c: i for i, c in enumerate(categories.ids)}
    manifest = storage.read_json(storage.join(group_dir(workdir, "test", ROWS_GROUP), "manifest.json"))
    n_candidates = sum(e["count"] for e in manifest["shards"])
    if n_candidates == 0:
        raise ValueError("the test split is empty: raise data.test_fraction or add products")
    # Each partition of the shards is one actor; a batch of queries goes to every partition and a task merges
    # their top-k. Where CPUs allow, whole replicas of the partition set take batches in turn.
    parts = partitions([e["count"] for e in manifest["shards"]], cfg.evaluate.ranker_rows)
    cpus = ray.cluster_resources().get("CPU", 2)
    # one ranking actor per two CPUs (at most 8): the merges and the driver need the rest
    replicas = max(1, min(8, int(cpus) // 2) // len(parts))
    per_actor = round(max(0.01, min(1.0, max(1.0, cpus - 1) / (len(parts) * replicas))), 2)  # merges need a CPU
    groups = [[ray.remote(num_cpus=per_actor)(QueryRanker).remote(workdir, labeler, node_index, (a, b), base)
               for a, b, base in parts] for _ in range(replicas)]
    for group in groups:
        corpus = ray.remote(bm25_corpus).remote(*[a.bm25_stats.remote() for a in group])
        ray.get([a.use_corpus.remote(corpus) for a in group])
    merge = ray.remote(merge_top_k)
    log(f"evaluate: {n_candidates:,} test candidates in {len(parts)} partition(s) of at most "
        f"{cfg.evaluate.ranker_rows:,}, {len(parts) * replicas} ranking actor(s)")
    rows: list[dict] = []
    for setting in SETTINGS:
        test_labels = counts.labels.get((setting, "test"), {})
        query_ids = np.array(sorted(test_labels), dtype=object)
        n_rel = np.array([test_labels[q] for q in query_ids], dtype=np.int64)
        h_rel = np.array([counts.nodes["test"].get(q, 0) for q in query_ids], dtype=np.int64)
        train_labels = counts.labels.get((setting, "train"), {})
        seen = np.array([train_labels.get(q, 0) > 0 for q in query_ids], dtype=bool)
        queries = Queries.from_categories(categories, query_ids, cfg.data.query_text)
        nodes = np.array([node_index[q] for q in query_ids], dtype=np.int32)
        depth = np.minimum(n_candidates, np.maximum(10, np.maximum(n_rel, h_rel)))  # deep enough for R-precision
        batches = _chunks(depth, CHUNK_ENTRIES // len(parts))
        for model in MODELS:
            try:
                ranker = load_ranker(workdir, model, setting)
            except Exception as e:  # noqa: BLE001 - a model not trained yet is reported and skipped
                if REGISTRY[model].trained:
                    log(f"evaluate: {setting}/{model}: skipped ({str(e).splitlines()[0]})")
                    continue
                raise
            group_ = REGISTRY[model].index_group(setting)  # None: a sparse model, ranked from the words
            query_input = ranker.query_input(queries)
            per_query: dict[str, dict[str, np.ndarray]] = {"hits": {}, "hierarchy": {}}
            recall: list[float] = []

            def collect(ref, idx) -> None:
                out = ray.get(ref)
                for kind in per_query:
                    for key, v in out[kind].items():
                        per_query[kind].setdefault(key, np.full(len(query_ids), np.nan))[idx] = v
                recall.extend(out["recall"] or [])

            pending, budget = {}, cfg.evaluate.recall_queries
            for i, idx in enumerate(batches):
                if len(pending) >= 2 * replicas:  # bounds the top-k lists waiting in the object store
                    done, _ = ray.wait(list(pending), num_returns=1)
                    collect(done[0], pending.pop(done[0]))
                q = [query_input[j] for j in idx] if group_ is None else query_input[idx]
                sample = min(budget, len(idx))
                budget -= sample
                k = int(depth[idx].max())
                tops = [a.top_k.remote(setting, group_, q, nodes[idx], k, cfg.index.expansion_search, sample)
                        for a in groups[i % replicas]]
                pending[merge.remote(k, n_rel[idx], h_rel[idx], *tops)] = idx
            for ref, idx in pending.items():
                collect(ref, idx)
            how = "usearch exact" if group_ else "exact"  # both return the exact top-k
            index_recall = float(np.mean(recall)) if recall else None
            for split in SPLITS:
                sel = np.ones(len(query_ids), bool) if split == "all" else (seen if split == "seen" else ~seen)
                m, h = _means(per_query["hits"], sel), _means(per_query["hierarchy"], sel)
                rows.append({"setting": setting, "model": model, "split": split, "queries": int(sel.sum()),
                             "candidates": n_candidates, **{k_: clean(m[k_]) for k_ in (
                                 *METRICS, "mAP@5_std", "mAP@10_std")},
                             "retrieval": how, "index_recall@10": clean(index_recall),
                             "hierarchy": {k_: clean(h[k_]) for k_ in (*METRICS, "mAP@5_std", "mAP@10_std")}})
            top = rows[-3]
            log(f"evaluate: {setting:8s} {model:8s} P@10 {top['P@10']:6.2f}  mAP@10 {top['mAP@10']:6.2f}  "
                f"R-prec {top['R-prec']:6.2f}  ({how}"
                f"{'' if index_recall is None else f', recall@10 {index_recall:.3f}'})")
    for group in groups:
        for a in group:
            ray.kill(a)
    add_base_to_new(rows)
    encoders = recorded_encoders(workdir)
    note = encoders.zero_shot_note
    # features of aligned towers: their alignment section (jobs.align's scores of the same test split)
    aligned = align_dir(workdir, "metrics.json")
    alignment = storage.read_json(aligned) if encoders.image_pretrained.startswith(align_dir(workdir)) and \
        storage.exists(aligned) else None
    for r in rows:
        if note and REGISTRY[r["model"]].reads_clip_text:  # kept, and said why it is no baseline (metrics.md too)
            r["note"] = note
    publish(workdir, "evaluate", rows + (alignment_rows(alignment) if alignment else []),
            metrics_markdown(rows, alignment))
    storage.write_bytes(metrics_file(workdir, "png"), metrics_png(rows))
    storage.write_json(stage_stats(workdir, "evaluate"), {
        "stage": "evaluate", "rows": len(rows), "candidates": n_candidates,
        "unseen_queries": {s: next(r["queries"] for r in rows if r["setting"] == s and r["split"] == "unseen")
                           for s in SETTINGS if any(r["setting"] == s for r in rows)},
        "seconds": round(time.time() - t0, 2)})
    return rows
