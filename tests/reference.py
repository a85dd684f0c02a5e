"""The first landing's in-memory evaluation (every test product in one process, exact brute-force ranking), kept
as the reference that the streaming evaluation (clipita.stages.evaluate) must reproduce on small workdirs."""
from __future__ import annotations

import numpy as np

from clipita.features import labels_for, load_categories, load_products
from clipita.metrics import count_relevant, hits_from_ranking, retrieval_metrics
from clipita.models import MODELS
from clipita.rankers import Queries, load_ranker
from clipita.stages.evaluate import METRICS, SPLITS, ancestor_matrix
from clipita.tree import SETTINGS


def reference_metrics(workdir: str, cfg) -> dict[tuple, dict]:
    """(setting, model, split) -> {metric: value, "hierarchy": {...}} exactly as the first landing computed them."""
    products, categories = load_products(workdir), load_categories(workdir)
    labels = labels_for(products, cfg.data)
    test = labels.split == "test"
    candidates = products.subset(test)
    node_index = {c: i for i, c in enumerate(categories.ids)}
    ancestors = ancestor_matrix(candidates.paths, node_index)
    out = {}
    for setting in SETTINGS:
        cand_labels = labels.by_setting[setting][test]
        query_ids = np.array(sorted(set(cand_labels)), dtype=object)
        n_rel = count_relevant(cand_labels, query_ids)
        seen = np.isin(query_ids, list(set(labels.by_setting[setting][labels.split == "train"])))
        queries = Queries.from_categories(categories, query_ids, cfg.data.query_text)
        q_nodes = np.array([node_index[q] for q in query_ids], dtype=np.int64)
        h_rel = (ancestors[None] == q_nodes[:, None, None]).any(-1).sum(1)
        k = min(len(candidates), max(10, int(n_rel.max()), int(h_rel.max())))
        for model in MODELS:
            ranking, _ = load_ranker(workdir, model, setting).rank(queries, candidates, k)
            hits = hits_from_ranking(ranking, cand_labels, query_ids)
            h_hits = (ancestors[np.maximum(ranking, 0)] == q_nodes[:, None, None]).any(-1) & (ranking >= 0)
            for split in SPLITS:
                sel = np.ones(len(query_ids), bool) if split == "all" else (seen if split == "seen" else ~seen)
                m, h = retrieval_metrics(hits[sel], n_rel[sel]), retrieval_metrics(h_hits[sel], h_rel[sel])
                out[setting, model, split] = {**{k_: m[k_] for k_ in (*METRICS, "mAP@5_std", "mAP@10_std")},
                                              "queries": int(sel.sum()), "candidates": len(candidates),
                                              "hierarchy": {k_: h[k_] for k_ in METRICS}}
    return out
