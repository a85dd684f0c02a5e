"""jobs.evaluate: the paper's table for every model, setting and split, through the USearch index."""
import json
import math
import os

import numpy as np
import pytest

from clipita import storage
from clipita.metrics import harmonic_mean
from clipita.models import MODELS
from clipita.stages.evaluate import METRICS, ancestor_matrix, evaluate, hierarchy_hits
from reference import reference_metrics

KEYS = {"setting", "model", "split", "queries", "candidates", "P@1", "P@5", "P@10", "mAP@5", "mAP@10", "R-prec",
        "mAP@5_std", "mAP@10_std"}


@pytest.fixture(scope="module")
def rows(trained_workdir, demo_config):
    return evaluate(trained_workdir, demo_config, log=lambda *_: None)


def test_every_setting_model_and_split_has_a_row(rows, trained_workdir):
    on_disk = json.loads(storage.read_bytes(f"{trained_workdir}/metrics.json"))
    assert on_disk == json.loads(json.dumps(rows))
    assert {(r["setting"], r["model"], r["split"]) for r in rows} == {
        (s, m, p) for s in ("all", "general", "specific") for m in MODELS for p in ("all", "seen", "unseen")}
    for r in rows:
        assert KEYS <= set(r) and r["queries"] > 0 and r["candidates"] > 0, r
        assert all(0 <= r[k] <= 100 for k in KEYS - {"setting", "model", "split", "queries", "candidates"})
    for s in ("all", "general", "specific"):
        split = {r["split"]: r["queries"] for r in rows if r["setting"] == s and r["model"] == "bm25"}
        assert split["seen"] + split["unseen"] == split["all"]


def test_dense_models_rank_exactly_over_the_shards_and_report_the_graphs_recall(rows):
    for r in rows:
        if r["model"] == "bm25":
            assert r["retrieval"] == "exact" and r["index_recall@10"] is None
        else:
            assert r["retrieval"] == "usearch exact" and 0 < r["index_recall@10"] <= 1, r
            if r["model"] == "mpnet":  # well-spread vectors: the graph walk finds the true neighbours
                assert r["index_recall@10"] >= 0.99, r


def test_clip_ita_beats_bm25_and_random_in_the_specific_setting(rows):
    get = {(r["model"], r["split"]): r for r in rows if r["setting"] == "specific"}
    ita, bm25 = get["clip-ita", "all"], get["bm25", "all"]
    assert ita["mAP@10"] > bm25["mAP@10"] and ita["R-prec"] > bm25["R-prec"]
    # a random ranking's expected R-precision is 100·R/N; specific categories have R of a few products here
    assert ita["R-prec"] > 10 * 100 * 3 / ita["candidates"]


def test_reports(trained_workdir, rows):
    md = storage.read_bytes(f"{trained_workdir}/metrics.md").decode()
    assert "| specific | clip-ita |" in md and "45.85 / 41.04" in md  # our numbers beside the paper's
    assert "Hierarchy-aware" in md and "## Seen / unseen categories and their harmonic mean" in md
    for r in rows:
        if r["split"] == "all":
            for m in ("R-prec", "P@10"):
                b = r["base_to_new"][m]
                seen = next(x[m] for x in rows if (x["setting"], x["model"], x["split"]) ==
                            (r["setting"], r["model"], "seen"))
                s, u = b["seen"], b["unseen"]  # the HM by hand, rounded as the rows are
                want = None if s is None or u is None else (0.0 if s + u == 0 else round(2 * s * u / (s + u), 4))
                assert b["seen"] == seen and b["hm"] == want
                if b["seen"] and b["unseen"]:
                    assert min(b["seen"], b["unseen"]) <= b["hm"] <= max(b["seen"], b["unseen"])
    assert storage.read_bytes(f"{trained_workdir}/metrics.png")[:8] == b"\x89PNG\r\n\x1a\n"
    # the offline image tower has no text tower aligned with it: zero-shot clip keeps its rows, says why, and
    # metrics.md marks it wherever it appears
    assert {r["model"] for r in rows if r.get("note")} == {"clip"}
    assert all("trained alone" in r["note"] for r in rows if r["model"] == "clip")
    assert "| specific | clip † |" in md and "| specific | clip |" not in md
    assert "† Not a baseline here: clip: the image tower (efficientnet-lite0" in md
    # hierarchy-aware relevance counts more products relevant, never fewer: the same ranking has at least as many
    # hits in its top K, and strictly more for some parent category of the all setting
    for r in rows:
        for m in ("P@1", "P@5", "P@10"):
            assert r[m] is None or r["hierarchy"][m] >= r[m], (r["setting"], r["model"], r["split"], m)
    assert any(r["hierarchy"]["P@10"] > r["P@10"] for r in rows if r["setting"] == "all" and r["P@10"] is not None)


def test_streaming_evaluation_equals_the_first_landings_in_memory_metrics(rows, trained_workdir, demo_config):
    """The regression test of the scale redesign: same workdir, same numbers as the whole-catalogue-in-one-process
    implementation (tests/reference.py, exact brute-force ranking) for every row and metric."""
    want = reference_metrics(trained_workdir, demo_config)
    assert len(rows) == len(want) == 54
    for r in rows:
        ref = want[r["setting"], r["model"], r["split"]]
        assert (r["queries"], r["candidates"]) == (ref["queries"], ref["candidates"]), r
        for key in (*METRICS, "mAP@5_std", "mAP@10_std"):
            expected = None if math.isnan(ref[key]) else round(ref[key], 4)
            assert r[key] == expected, (r["setting"], r["model"], r["split"], key, r[key], expected)
        for key in METRICS:
            assert r["hierarchy"][key] == round(ref["hierarchy"][key], 4), (r["setting"], r["model"], key)


def test_partitioned_ranking_equals_one_actor(trained_workdir, demo_config, tmp_path):
    """Candidates split over ranking actors (one per shard here), their top-k merged, give the same rows as one
    actor holding the whole test split (shards of 100 rows here): dense ties break by global row, bm25 by product id over the merged idf."""
    import dataclasses
    import shutil

    from clipita.config import load_config
    from clipita.stages.evaluate import partitions
    from clipita.stages.index import build_indexes
    from conftest import DEMO_SETTINGS, OFFLINE_CONFIG

    workdir = str(tmp_path / "work")
    shutil.copytree(trained_workdir, workdir, ignore=shutil.ignore_patterns("index", "metrics*", "evaluation"))
    cfg = load_config(OFFLINE_CONFIG, {**DEMO_SETTINGS, "index.builder_mb": 1})
    build_indexes(workdir, cfg, log=lambda *_: None)
    shards = storage.read_json(f"{workdir}/index/test/mpnet/manifest.json")["shards"]
    assert len(partitions([e["count"] for e in shards], 1)) == len(shards) >= 2
    whole = evaluate(workdir, cfg, log=lambda *_: None)
    split = evaluate(workdir, dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, ranker_rows=1)),
                     log=lambda *_: None)
    assert split == whole


def test_partitions_by_hand():
    from clipita.stages.evaluate import partitions

    assert partitions([5, 5, 5], 10) == [(0, 2, 0), (2, 3, 10)]
    assert partitions([12, 3], 10) == [(0, 1, 0), (1, 2, 12)]  # a shard larger than the bound is one partition
    assert partitions([], 10) == []


def test_harmonic_mean_by_hand():
    assert harmonic_mean(60.0, 40.0) == 48.0 and harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(None, 5.0) is None and harmonic_mean(5.0, float("nan")) is None  # a side without queries


def test_hierarchy_hits_by_hand():
    paths = [["A", "B", "C"], ["A", "D"], ["E"]]
    index = {c: i for i, c in enumerate(["A", "A > B", "A > B > C", "A > D", "E"])}
    anc = ancestor_matrix(paths, index)
    ranked = np.array([[2, 0, 1], [1, -1, -1]])
    hits = hierarchy_hits(ranked, anc, np.array([0, 1]))  # queries: A, A > B
    assert hits.tolist() == [[False, True, True], [False, False, False]]


# metrics.json of this module's trained workdir, written by 6577389 (the commit before issue 25's restructuring:
# flat modules, models compared by name). The same catalogue, encoders, training and index through today's stages
# must give the same table. Every row, model and metric is compared, the counts exactly; the metrics within 0.25
# points on average and each within 10. Not each within 0.5: on some hosts one trained run (clip-i, setting "all")
# differs from run to run (an AMD EPYC host on 2026-12-07, at the landed eb9ac1f too: its rows off by up to 6.8
# points, 1-3 of 44 queries, every other row within 0.5; mean 0.06 over the 1,125 metrics), while a changed
# pipeline moves the table as a whole.
GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "metrics_fixture.json")


def _numbers(row: dict, prefix: str = ""):
    for key, value in row.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", value


def test_metrics_equal_the_table_before_the_restructuring(rows):
    with open(GOLDEN, encoding="utf-8") as f:
        golden = json.load(f)
    key = lambda r: (r["setting"], r["model"], r["split"])  # noqa: E731
    assert sorted(map(key, rows)) == sorted(map(key, golden))
    by_key = {key(r): r for r in golden}
    diffs = []
    for r in rows:
        want = dict(_numbers(by_key[key(r)]))
        got = dict(_numbers(r))
        assert set(got) == set(want), key(r)
        assert (r["queries"], r["candidates"], r["retrieval"]) == (want["queries"], want["candidates"],
                                                                   by_key[key(r)]["retrieval"]), key(r)
        for name, value in want.items():
            assert got[name] == pytest.approx(value, abs=10), (key(r), name, got[name], value)
            diffs.append(abs(got[name] - value))
    mean = float(np.mean(diffs))
    print(f"golden metrics: largest difference {max(diffs):.4f} points, mean {mean:.4f} over {len(diffs)}")
    assert mean <= 0.25, mean
