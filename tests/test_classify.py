"""jobs.classify on a real local Ray: categorisation (zero-shot and kNN probe) from the all-products index,
mis-categorised listings against labels corrupted on purpose, k-means clusters, attribute values and flags."""
from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipita.config import load_config
from clipita.downstream import category_vectors, leaves
from clipita.features import load_products, load_tree
from clipita.rankers import load_ranker
from clipita.stages.classify import nmi_ari, run_classify
from clipita.stages.index import build_indexes
from clipita.tree import category_id
from conftest import DEMO_SETTINGS, OFFLINE_CONFIG

FLAG = "restricted: Beauty & Personal Care"
CORRUPTED = 0.1


@pytest.fixture(scope="module")
def classified(trained_workdir, tmp_path_factory):
    """A copy of the trained workdir whose catalogue put 10% of the listings under another root's leaf (the
    features, and the index built from them, carry the wrong path; the catalogue records the true one), then
    jobs.classify. The heads were trained before the corruption: what a detector is measured on is the labels."""
    work = str(tmp_path_factory.mktemp("classify"))
    for name in ("features", "checkpoints"):
        shutil.copytree(os.path.join(trained_workdir, name), os.path.join(work, name))
    rng = np.random.default_rng(0)
    tree = load_tree(work)
    moved = []
    for f in glob.glob(f"{work}/features/products/*.parquet"):
        t = pq.read_table(f)
        paths = t.column("category_path").to_pylist()
        for i, pid in enumerate(t.column("product_id").to_pylist()):
            if rng.random() < CORRUPTED:
                others = [leaf for leaf in tree.leaves if not leaf.startswith(paths[i][0])]
                moved.append({"product_id": pid, "category_path": paths[i]})
                paths[i] = others[int(rng.integers(len(others)))].split(" > ")
        t = t.set_column(t.schema.get_field_index("category_path"), "category_path",
                         pa.array(paths, pa.list_(pa.string())))
        pq.write_table(t, f)
    catalog = os.path.join(work, "catalog")
    os.makedirs(catalog)
    pq.write_table(pa.Table.from_pylist(moved), os.path.join(catalog, "mislabeled.parquet"))
    with open(os.path.join(work, "catalog.json"), "w") as f:
        json.dump({"catalog": catalog}, f)
    cfg = load_config(OFFLINE_CONFIG, {**DEMO_SETTINGS, "classify.flags": FLAG})
    build_indexes(work, cfg, log=lambda *_: None)
    lines: list[str] = []
    stats = run_classify(work, cfg, log=lines.append)
    with open(os.path.join(work, "metrics.json")) as f:
        rows = json.load(f)
    return work, cfg, stats, rows, lines, len(moved)


def test_every_product_is_predicted_once_with_the_models_own_ranking(classified):
    work, cfg, stats, _, _, _ = classified
    preds = pq.read_table(f"{work}/classify/predictions").to_pandas().set_index("product_id")
    products = load_products(work)
    assert sorted(preds.index) == sorted(products.ids) == sorted(set(preds.index))
    assert stats["model"] == "clip-ita" and stats["products"] == len(products)
    assert all(len(c) == cfg.classify.top_k for c in preds["zero_shot"])
    # zero-shot = the model's own product vector against its leaf category vectors, best first
    leaf_ids = leaves(load_tree(work))
    ranker = load_ranker(work, "clip-ita", "specific")
    scores = np.asarray(ranker.product_vectors(products)) @ category_vectors(work, "clip-ita", "specific",
                                                                            leaf_ids).T
    scores /= np.linalg.norm(np.asarray(ranker.product_vectors(products)), axis=1, keepdims=True)
    for i in range(0, len(products), 37):
        got = preds.loc[products.ids[i]]
        assert got["zero_shot"][0] == leaf_ids[int(np.argmax(scores[i]))]
        np.testing.assert_allclose(got["zero_shot_scores"][0], scores[i].max(), atol=2e-3)  # f16 index vectors
        assert list(got["zero_shot_scores"]) == sorted(got["zero_shot_scores"], reverse=True)


def test_accuracy_rows_agree_with_the_predictions_and_the_tree(classified):
    work, _, _, rows, _, _ = classified
    cls = [r for r in rows if r.get("task") == "classify"]
    models = {r["model"] for r in cls}
    assert {"mpnet", "clip", "clip-i", "clip-ia", "clip-ita"} <= models
    assert {r["mode"] for r in cls} == {"zero-shot", "probe"} and {r["split"] for r in cls} == {"all", "seen", "unseen"}
    for model in models:
        for mode in ("zero-shot", "probe"):
            for split in ("all", "seen", "unseen"):
                by_depth = {r["depth"]: r for r in cls if (r["model"], r["mode"], r["split"]) == (model, mode, split)}
                assert all(r["acc@5"] >= r["acc@1"] for r in by_depth.values())
                assert by_depth[None]["acc@1"] <= by_depth[1]["acc@1"] + 1e-9  # the exact leaf has the right root
    # the probe cannot name a category no train listing has
    assert all(r["acc@1"] == 0 for r in cls if r["mode"] == "probe" and r["split"] == "unseen" and r["depth"] is None)
    # the exact top-1 accuracy of clip-ita zero-shot recomputed from the predictions file
    preds = pq.read_table(f"{work}/classify/predictions").to_pandas()
    test = preds[preds["split"] == "test"]
    want = 100 * np.mean([z[0] == c for z, c in zip(test["zero_shot"], test["category"])])
    row = next(r for r in cls if (r["model"], r["mode"], r["split"], r["depth"]) == ("clip-ita", "zero-shot", "all", None))
    assert row["products"] == len(test) and row["acc@1"] == pytest.approx(want, abs=1e-3)
    assert 0 <= row["macro-F1"] <= 100 and 0 <= row["hierarchical"] <= 100
    root = lambda c: c.split(" > ")[0]  # noqa: E731
    want = 100 * np.mean([root(z[0]) == root(c) for z, c in zip(test["zero_shot"], test["category"])])
    row = next(r for r in cls if (r["model"], r["mode"], r["split"], r["depth"]) == ("clip-ita", "zero-shot", "all", 1))
    assert row["acc@1"] == pytest.approx(want, abs=1e-3)
    want = 100 * np.mean([any(root(p) == root(c) for p in z) for z, c in zip(test["zero_shot"], test["category"])])
    assert row["acc@5"] == pytest.approx(want, abs=1e-3)


def test_mis_categorised_listings_find_the_corrupted_labels(classified):
    work, _, _, rows, _, n_moved = classified
    sus = pq.read_table(f"{work}/classify/suspects.parquet").to_pandas()
    moved = set(pq.read_table(f"{work}/catalog/mislabeled.parquet").column("product_id").to_pylist())
    assert len(moved) == n_moved and list(sus["rank"][:3]) == [1, 2, 3]
    assert list(sus["suspicion"]) == sorted(sus["suspicion"], reverse=True)
    assert (sus["category"] != sus["suggested"]).head(50).all()
    top = [r for r in rows if r.get("task") == "suspects"]
    assert {(r["model"], r["mode"]) for r in top} >= {("clip-ita", "probe"), ("mpnet", "zero-shot")}
    best = next(r for r in top if (r["model"], r["mode"]) == ("clip-ita", "zero-shot"))
    assert best["corrupted"] == n_moved and best["random"] == pytest.approx(100 * n_moved / best["products"], abs=1e-3)
    assert best["P@100"] >= 3 * best["random"]  # far above picking listings at random
    assert best["P@100"] == pytest.approx(sum(p in moved for p in sus_top(work, "zero-shot")), abs=1e-6)


def sus_top(work: str, mode: str) -> list[str]:
    """The 100 most suspect ids of clip-ita's ``mode`` recomputed from the predictions file."""
    preds = pq.read_table(f"{work}/classify/predictions").to_pandas()
    col = "suspicion_zero_shot" if mode == "zero-shot" else "suspicion_probe"
    return list(preds.sort_values([col, "product_id"], ascending=[False, True], kind="stable")["product_id"][:100])


def test_clusters_flags_and_attributes(classified):
    work, cfg, _, rows, _, _ = classified
    clusters = [r for r in rows if r.get("task") == "cluster"]
    assert [r["depth"] for r in clusters] == [1, 2, 3, 4][:len(clusters)] and len(clusters) >= 3
    assert all(0 <= r["NMI"] <= 100 and -100 <= r["ARI"] <= 100 for r in clusters)
    assigned = pq.read_table(f"{work}/classify/clusters").to_pandas()
    assert assigned["product_id"].is_unique and len(assigned) == clusters[0]["products"]
    assert assigned["cluster"].nunique() > 1 and assigned["cluster"].max() < clusters[0]["clusters"]

    flags = json.load(open(f"{work}/classify/flags.json"))
    assert flags["model"] == "clip-ita" and flags["flags"]["restricted"]["subtrees"] == ["Beauty & Personal Care"]
    flag = next(r for r in rows if r.get("task") == "flag")
    assert flag["threshold"] == pytest.approx(flags["flags"]["restricted"]["threshold"])
    preds = pq.read_table(f"{work}/classify/predictions").to_pandas()
    test = preds[preds["split"] == "test"]
    truth = test["category"].str.startswith("Beauty & Personal Care")
    flagged = test["flag:restricted"] >= flag["threshold"] - 1e-3
    assert flag["positives"] == int(truth.sum()) > 0
    assert flag["precision"] == pytest.approx(100 * (truth & flagged).sum() / flagged.sum(), abs=3)

    attrs = [r for r in rows if r.get("task") == "attributes"]
    assert {"color", "pattern"} <= {r["key"] for r in attrs}
    assert {r["input"] for r in attrs} == {"image", "image+title"}
    assert all(0 <= r["acc"] <= 100 and 0 <= r["majority"] <= 100 and r["products"] > 0 for r in attrs)
    md = open(f"{work}/metrics.md").read()
    assert "## Categorisation" in md and "### Mis-categorised listings" in md and "### Flags" in md


def test_nmi_and_ari_match_scikit_learns_reference_values():
    # labels_true [0,0,0,1,1,1,2,2,2,2], labels_pred [0,0,1,1,2,2,2,3,3,0]: scikit-learn 1.9 gives
    # normalized_mutual_info_score 0.46301296975168893 and adjusted_rand_score 0.11016949152542373
    table = np.zeros((4, 3), int)
    for p, t in zip([0, 0, 1, 1, 2, 2, 2, 3, 3, 0], [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]):
        table[p, t] += 1
    nmi, ari = nmi_ari(table)
    assert nmi == pytest.approx(0.46301296975168893) and ari == pytest.approx(0.11016949152542373)
    assert nmi_ari(np.diag([3, 4, 5])) == (pytest.approx(1.0), pytest.approx(1.0))


def test_bad_settings_fail_with_one_line(classified):
    work, cfg, *_ = classified
    with pytest.raises(ValueError, match="no category 'Nowhere > Else' in the tree"):
        run_classify(work, load_config(OFFLINE_CONFIG, {**DEMO_SETTINGS, "classify.flags": "x: Nowhere > Else"}),
                     log=lambda *_: None)
    with pytest.raises(ValueError, match="classify.flags entries are 'NAME: Category > Path'"):
        load_config(OFFLINE_CONFIG, {"classify.flags": "no colon"})
    with pytest.raises(FileNotFoundError, match="run jobs.index"):
        run_classify(str(os.path.dirname(work)) + "/nowhere", cfg, log=lambda *_: None)
    assert category_id(["a", "b"]) == "a > b"
