"""The evaluation stage: every model on every setting and split, through the USearch index, as in PAPER.md.

Per setting: queries are the test products' categories in that setting, candidates the test products, and a
product is relevant when its label equals the query (exact node). Splits: all queries, ``seen`` (the category
labels some training product) and ``unseen``. Dense models are ranked through the test-scope USearch index when
jobs.index built one, and always also exactly (brute force): the index's recall@10 against the exact ranking is
reported. A hierarchy-aware relevance (the product's path passes through the query category) is reported beside
the paper's, under the row's ``hierarchy`` key and in its own table.

Outputs: metrics.json (DESIGN.md rows), metrics.md (Table 1 layout with the paper's numbers), metrics.png.
"""
from __future__ import annotations

import io
import math
import time

import numpy as np

from clipita import storage
from clipita.features import Products, labels_for, load_categories, load_products
from clipita.index import IndexIntegrityError, ShardedIndex, group_dir, group_name
from clipita.metrics import count_relevant, hits_from_ranking, rank_scores, retrieval_metrics
from clipita.rankers import MODELS, TRAINED, DenseRanker, Queries, load_ranker
from clipita.tree import SEP, SETTINGS

METRICS = ("P@1", "P@5", "P@10", "mAP@5", "mAP@10", "R-prec")
SPLITS = ("all", "seen", "unseen")
# Table 1 of the paper (XMarket US), for reference beside our numbers.
PAPER_TABLE = {
    "all": {"bm25": (0.01, 0.01, 0.01, 0.01, 0.01, 0.01), "clip": (0.01, 0.02, 0.02, 0.03, 0.04, 0.02),
            "mpnet": (0.01, 0.06, 0.06, 0.07, 0.09, 0.05), "clip-i": (3.30, 3.80, 3.79, 6.81, 7.25, 3.67),
            "clip-ia": (2.50, 3.34, 3.29, 5.95, 6.24, 3.27), "clip-ita": (9.90, 13.27, 13.43, 20.30, 20.53, 13.42)},
    "general": {"bm25": (2.94, 4.71, 4.71, 8.33, 8.28, 4.48), "clip": (11.76, 12.35, 11.76, 16.12, 15.18, 9.47),
                "mpnet": (14.70, 15.80, 15.01, 18.44, 18.78, 9.35),
                "clip-i": (17.85, 17.14, 16.78, 19.88, 20.14, 13.02),
                "clip-ia": (21.42, 21.91, 22.78, 25.59, 26.29, 20.74),
                "clip-ita": (35.71, 30.95, 30.95, 35.51, 34.28, 25.79)},
    "specific": {"bm25": (0.02, 0.02, 0.01, 0.01, 0.01, 0.01), "clip": (11.92, 9.81, 9.23, 15.12, 14.95, 8.14),
                 "mpnet": (33.36, 28.56, 26.93, 37.43, 36.77, 25.29),
                 "clip-i": (14.06, 12.11, 11.53, 18.24, 17.90, 11.22),
                 "clip-ia": (35.30, 30.21, 29.32, 39.93, 39.27, 28.86),
                 "clip-ita": (45.85, 41.04, 40.02, 50.04, 49.87, 39.69)},
}


def ancestor_matrix(paths: list[list[str]], index: dict[str, int]) -> np.ndarray:
    """(N, max depth) ids of every node on each product's path, -1 padded."""
    depth = max((len(p) for p in paths), default=1)
    out = np.full((len(paths), depth), -1, dtype=np.int64)
    for i, path in enumerate(paths):
        for d in range(len(path)):
            out[i, d] = index[SEP.join(path[: d + 1])]
    return out


def hierarchy_relevance(ranked: np.ndarray, ancestors: np.ndarray, queries: np.ndarray,
                        chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Hits (Q, L) and relevant counts (Q,) when a product is relevant to every category on its path."""
    hits = np.zeros(ranked.shape, dtype=bool)
    n_rel = np.zeros(len(queries), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        q = queries[s:s + chunk, None, None]
        n_rel[s:s + chunk] = (ancestors[None] == q).any(-1).sum(1)
        r = ranked[s:s + chunk]
        hits[s:s + chunk] = (ancestors[np.maximum(r, 0)] == q).any(-1) & (r >= 0)
    return hits, n_rel


def _rank(ranker, queries: Queries, products: Products, k: int, index_uri: str, ef: int) -> tuple:
    """(ranking used for the metrics, how it was retrieved, recall@10 of the index against the exact ranking)."""
    exact, _ = ranker.rank(queries, products, k)
    if not isinstance(ranker, DenseRanker) or not storage.exists(storage.join(index_uri, "manifest.json")):
        return exact, "exact", None
    index = ShardedIndex(index_uri)
    if not np.array_equal(index.ids, products.ids):
        raise IndexIntegrityError(f"index {index_uri} holds other products than the test split: run jobs.index")
    found = index.search(ranker.query_vectors(queries), k, ef=max(ef, k)).rows
    top = min(10, k)
    recall = np.mean([len(set(a[:top]) & set(b[:top])) / top for a, b in zip(found, exact)])
    return found, "usearch", float(recall)


def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else (round(v, 4) if isinstance(v, float) else v)


def evaluate(workdir: str, cfg, log=print) -> list[dict]:
    t0 = time.time()
    products, categories = load_products(workdir), load_categories(workdir)
    labels = labels_for(products, cfg.data)
    test = labels.split == "test"
    candidates = products.subset(test)
    node_index = {c: i for i, c in enumerate(categories.ids)}
    ancestors = ancestor_matrix(candidates.paths, node_index)
    rows: list[dict] = []
    for setting in SETTINGS:
        cand_labels = labels.by_setting[setting][test]
        query_ids = np.array(sorted(set(cand_labels)), dtype=object)
        if len(query_ids) == 0:
            raise ValueError("the test split is empty: raise data.test_fraction or add products")
        n_rel = count_relevant(cand_labels, query_ids)
        seen = np.isin(query_ids, list(set(labels.by_setting[setting][labels.split == "train"])))
        queries = Queries.from_categories(categories, query_ids, cfg.data.query_text)
        q_nodes = np.array([node_index[q] for q in query_ids], dtype=np.int64)
        _, h_rel = hierarchy_relevance(np.zeros((len(q_nodes), 0), np.int64), ancestors, q_nodes)
        # rank deep enough for R-precision under both relevances (R may exceed 10)
        k = min(len(candidates), max(10, int(n_rel.max()), int(h_rel.max())))
        for model in MODELS:
            try:
                ranker = load_ranker(workdir, model, setting)
            except Exception as e:  # noqa: BLE001 - a model not trained yet is reported and skipped
                if model in TRAINED:
                    log(f"evaluate: {setting}/{model}: skipped ({str(e).splitlines()[0]})")
                    continue
                raise
            name = group_name(model, setting if model in TRAINED else None)
            ranking, how, recall = _rank(ranker, queries, candidates, k, group_dir(workdir, "test", name),
                                         cfg.index.expansion_search)
            hits = hits_from_ranking(ranking, cand_labels, query_ids)
            h_hits, _ = hierarchy_relevance(ranking, ancestors, q_nodes)
            for split in SPLITS:
                sel = np.ones(len(query_ids), bool) if split == "all" else (seen if split == "seen" else ~seen)
                m = retrieval_metrics(hits[sel], n_rel[sel])
                h = retrieval_metrics(h_hits[sel], h_rel[sel])
                rows.append({"setting": setting, "model": model, "split": split, "queries": int(sel.sum()),
                             "candidates": len(candidates), **{k_: _clean(m[k_]) for k_ in (
                                 *METRICS, "mAP@5_std", "mAP@10_std")},
                             "retrieval": how, "index_recall@10": _clean(recall),
                             "hierarchy": {k_: _clean(h[k_]) for k_ in (*METRICS, "mAP@5_std", "mAP@10_std")}})
            top = rows[-3]
            log(f"evaluate: {setting:8s} {model:8s} P@10 {top['P@10']:6.2f}  mAP@10 {top['mAP@10']:6.2f}  "
                f"R-prec {top['R-prec']:6.2f}  ({how}{'' if recall is None else f', recall@10 {recall:.3f}'})")
    storage.write_json(storage.join(workdir, "metrics.json"), rows)
    storage.write_bytes(storage.join(workdir, "metrics.md"), metrics_markdown(rows).encode())
    storage.write_bytes(storage.join(workdir, "metrics.png"), metrics_png(rows))
    storage.write_json(storage.join(workdir, "evaluation", "stats.json"), {
        "stage": "evaluate", "rows": len(rows), "candidates": len(candidates),
        "unseen_queries": {s: next(r["queries"] for r in rows if r["setting"] == s and r["split"] == "unseen")
                           for s in SETTINGS if any(r["setting"] == s for r in rows)},
        "seconds": round(time.time() - t0, 2)})
    return rows


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.2f}"


def metrics_markdown(rows: list[dict]) -> str:
    out = ["# clipita evaluation", "",
           "Metrics in %. mAP@K is the paper's hits-normalised AP (PAPER.md); `_std` columns divide by min(R, K).",
           "Paper: Table 1 of CLIP-ITA (ECIR 2022) on XMarket US, for reference: different data, same protocol.", ""]
    for split in SPLITS:
        out += [f"## Exact-match relevance, {split} queries", "",
                "| setting | model | queries | " + " | ".join(METRICS) + " | mAP@10_std | paper " +
                " / ".join(METRICS) + " |", "|---|---|---|" + "---|" * (len(METRICS) + 2)]
        for r in (r for r in rows if r["split"] == split):
            paper = PAPER_TABLE[r["setting"]].get(r["model"]) if split == "all" else None
            out.append(f"| {r['setting']} | {r['model']} | {r['queries']} | " +
                       " | ".join(_fmt(r[m]) for m in METRICS) + f" | {_fmt(r['mAP@10_std'])} | " +
                       (" / ".join(f"{p:.2f}" for p in paper) if paper else "") + " |")
        out.append("")
    out += ["## Hierarchy-aware relevance (a product is relevant to every category on its path), all queries", "",
            "| setting | model | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for r in (r for r in rows if r["split"] == "all"):
        out.append(f"| {r['setting']} | {r['model']} | " + " | ".join(_fmt(r["hierarchy"][m]) for m in METRICS) + " |")
    return "\n".join(out) + "\n"


def metrics_png(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 3.8), squeeze=False)
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    width = 0.8 / max(1, len(models))
    for ax, setting in zip(axes[0], settings):
        for j, model in enumerate(models):
            r = next((r for r in rows if r["setting"] == setting and r["model"] == model and r["split"] == "all"),
                     None)
            if r is None:
                continue
            ax.bar(np.arange(len(METRICS)) + j * width, [r[m] or 0 for m in METRICS], width, label=model,
                   color=plt.cm.tab10(MODELS.index(model)))
        ax.set_xticks(np.arange(len(METRICS)) + 0.4 - width / 2, METRICS)
        ax.set(title=f"setting: {setting}", ylabel="%")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
