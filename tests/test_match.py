"""jobs.match: second listings found from index neighbours, every product accounted for, the threshold chosen on
validation, group ids from the features or the catalogue (or none), one-line errors; its numpy pieces."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipita import storage
from clipita.stages import match
from clipita.tree import split_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, SEED, SHARE = 3000, 5, 0.1
ARGS = dict(levels=3, branching=4, image_dim=32, text_dim=64, part_rows=1000, log=lambda line: None)
QUIET = dict(log=lambda *_: None)


def _cfg(**sets):
    from clipita.config import load_config

    # builder_mb 1: shards of ~900 products, so that searches and group names cross shards
    return load_config(None, {"index.builder_mb": 1, **{f"match.{k}": v for k, v in sets.items()}})


@pytest.fixture(scope="module")
def workdir(ray_session, tmp_path_factory) -> str:
    from clipita.sources.synth_features import write_features
    from clipita.stages.index import build_indexes

    out = str(tmp_path_factory.mktemp("match") / "work")
    write_features(out, N, seed=SEED, workers=1, duplicates=SHARE, **ARGS)
    build_indexes(out, _cfg(), **QUIET)
    return out


def _truth(workdir: str) -> dict[str, str]:
    t = pq.read_table(f"{workdir}/features/products", columns=["product_id", "group_id"])
    return dict(zip(t.column("product_id").to_pylist(), t.column("group_id").to_pylist()))


def _groups(workdir: str) -> pa.Table:
    folder = f"{workdir}/match/groups"
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return pa.concat_tables([pq.read_table(f"{folder}/{f}") for f in files]) if files else \
        pa.table({"product_id": pa.array([], pa.string()), "group": pa.array([], pa.string()),
                  "size": pa.array([], pa.int32())})


def test_finds_second_listings_and_accounts_for_every_product(workdir):
    truth = _truth(workdir)
    stats = match.run_match(workdir, _cfg(), **QUIET)
    shards = storage.read_json(f"{workdir}/index/all/clip/manifest.json")["shards"]
    assert len(shards) >= 3 and stats["shards"] == len(shards)
    assert stats["products"] == len(truth) > N
    assert stats["products_in_groups"] + stats["singletons"] == stats["products"]
    assert stats["threshold_from"] == "val" and 0.5 <= stats["threshold"] < 1
    rows = {r["split"]: r for r in storage.read_json(f"{workdir}/match/metrics.json")}
    assert set(rows) == {"test", "val", "all"} and all(r["task"] == "match" for r in rows.values())
    test = rows["test"]
    assert test["F1"] >= 90 and test["precision"] >= 90 and test["recall"] >= 90 and test["purity"] >= 90
    # split by group: about a tenth of the listings each for val and test, every second listing with its original
    expected = sum(split_of(g, 0, 0.1, 0.1) == "test" for g in truth.values())
    assert test["products"] == expected and 0.05 * len(truth) < expected < 0.15 * len(truth)
    dups = sum(p.endswith("-2") for p in truth)
    assert rows["all"]["groups"] == dups
    assert rows["test"]["groups"] == sum(p.endswith("-2") and split_of(truth[p], 0, 0.1, 0.1) == "test"
                                         for p in truth)
    # the files: every product in a group of 2+ once, named by a member, sizes as listed
    groups = _groups(workdir)
    ids, names, sizes = (groups.column(c).to_pylist() for c in ("product_id", "group", "size"))
    assert len(ids) == len(set(ids)) == stats["products_in_groups"]
    members: dict[str, list[str]] = {}
    for p, g in zip(ids, names):
        members.setdefault(g, []).append(p)
    assert len(members) == stats["predicted_groups"]
    assert all(g in m and len(m) >= 2 for g, m in members.items())
    assert all(s == len(members[g]) for g, s in zip(names, sizes))
    right = sum(truth[p] == truth[g] for p, g in zip(ids, names))
    assert right >= 0.95 * len(ids)  # the groups are the true ones, not just any neighbours
    assert stats["predicted_groups"] >= 0.9 * dups
    md = storage.read_bytes(f"{workdir}/metrics.md").decode()
    assert "## Matching" in md and "val (threshold chosen here)" in md
    assert any(r.get("task") == "match" for r in storage.read_json(f"{workdir}/metrics.json"))


def test_an_explicit_threshold_is_used_and_scored(workdir):
    tuned = match.run_match(workdir, _cfg(), **QUIET)
    # above every second listing's cosine; ef 0: the walk of the index's own ef
    strict = match.run_match(workdir, _cfg(threshold=0.99, ef=0), **QUIET)
    assert strict["threshold"] == 0.99 != tuned["threshold"] and strict["threshold_from"] == "match.threshold"
    manifest = storage.read_json(f"{workdir}/index/all/clip/manifest.json")
    assert tuned["ef"] == 32 and strict["ef"] == manifest["expansion_search"] == 128
    test = next(r for r in storage.read_json(f"{workdir}/match/metrics.json") if r["split"] == "test")
    assert test["threshold"] == 0.99 and test["recall"] < 20 and test["F1"] < 30
    assert strict["products_in_groups"] < 0.2 * tuned["products_in_groups"]
    assert strict["products_in_groups"] + strict["singletons"] == strict["products"]
    assert len(_groups(workdir)) == strict["products_in_groups"]  # a re-run replaced the groups files
    loose = match.run_match(workdir, _cfg(threshold=0.5), **QUIET)
    assert loose["products_in_groups"] >= tuned["products_in_groups"]
    match.run_match(workdir, _cfg(), **QUIET)  # leave the tuned run for any later reader


def test_group_ids_from_the_catalogue_or_none(workdir, tmp_path):
    """Features without group_id: the catalogue's column when it has one; else groups still written, no scores."""
    work = tmp_path / "nogroups"
    shutil.copytree(f"{workdir}/index", work / "index")
    os.makedirs(work / "features" / "products")
    for f in sorted(os.listdir(f"{workdir}/features/products")):
        t = pq.read_table(f"{workdir}/features/products/{f}")
        pq.write_table(t.drop_columns(["group_id"]), work / "features" / "products" / f)
    storage.write_json(str(work / "catalog.json"), {"catalog": str(tmp_path / "catalog"), "features_only": True})
    stats = match.run_match(str(work), _cfg(), **QUIET)
    assert stats["group_ids"] == "none" and stats["threshold_from"] == "default: no group ids"
    assert stats["products_in_groups"] > 0 and len(_groups(str(work))) == stats["products_in_groups"]
    assert stats["products_in_groups"] + stats["singletons"] == stats["products"]
    rows = storage.read_json(str(work / "metrics.json"))
    assert [r["split"] for r in rows] == ["test", "val", "all"]
    assert all(r["groups"] == 0 and r["F1"] is None and r["precision"] is None for r in rows)
    assert "No group_id" in storage.read_bytes(str(work / "metrics.md")).decode()

    truth = _truth(workdir)  # now a catalogue with the column (only the columns jobs.match reads)
    os.makedirs(tmp_path / "catalog")
    pq.write_table(pa.table({"product_id": list(truth), "group_id": list(truth.values())}),
                   tmp_path / "catalog" / "products.parquet")
    stats = match.run_match(str(work), _cfg(), **QUIET)
    assert stats["group_ids"] == "catalogue" and stats["threshold_from"] == "val"
    assert next(r for r in storage.read_json(str(work / "metrics.json")) if r["split"] == "test")["F1"] >= 90


def test_errors_are_one_line(workdir, tmp_path):
    empty = tmp_path / "empty"
    shutil.copytree(f"{workdir}/features", empty / "features")
    with pytest.raises(FileNotFoundError, match="no all-products index of clip .*run jobs.index"):
        match.run_match(str(empty), _cfg(), **QUIET)
    with pytest.raises(FileNotFoundError, match="clip-ita-specific"):  # a trained model: its setting's group
        match.run_match(workdir, _cfg(model="clip-ita"), **QUIET)
    with pytest.raises(ValueError, match="match.model must be a dense model"):
        match.run_match(workdir, _cfg(model="bm25"), **QUIET)
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-m", "jobs.match", "--workdir", str(empty)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("jobs.match: error: no all-products index of clip")


def test_components_join_chains_and_name_them_by_their_first_row():
    label = match.components(7, np.array([5, 1, 2]), np.array([6, 2, 0]))
    assert label.tolist() == [0, 0, 0, 3, 4, 5, 5]
    rng = np.random.default_rng(0)  # a long random chain in shuffled order, against a plain union-find
    a, b = rng.integers(0, 300, 400), rng.integers(0, 300, 400)
    parent = list(range(300))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = find(x), find(y)
        parent[max(rx, ry)] = min(rx, ry)
    assert match.components(300, a, b).tolist() == [find(x) for x in range(300)]


def test_pair_metrics_and_threshold_by_hand():
    pred = np.array([0, 0, 0, 3, 4, 4])  # predicted groups {0,1,2}, {3}, {4,5}
    truth = np.array([7, 7, 8, 8, 9, 9])  # true groups {0,1}, {2,3}, {4,5}
    m = match.split_metrics(pred, truth, True)
    # predicted pairs 3 + 1 = 4, true pairs 3, right: (0,1), (4,5)
    assert (m["precision"], m["recall"], m["groups"], m["predicted_groups"]) == (50.0, round(200 / 3, 4), 3, 2)
    assert m["F1"] == round(100 * 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3), 4)
    assert m["purity"] == 80.0  # 2 of {0,1,2} and both of {4,5}: 4 of 5 grouped products
    assert match.split_metrics(pred, truth, False)["F1"] is None
    # three positives of which the search found two (0.9, 0.8); a negative at 0.85 and one at 0.6
    t, f1 = match.best_threshold(np.array([0.9, 0.85, 0.8, 0.6]), np.array([True, False, True, False]), 3, 0.5)
    assert f1 == pytest.approx(2 * 2 / (3 + 3)) and t == pytest.approx(0.7)  # midway between 0.8 and 0.6
    t, f1 = match.best_threshold(np.array([0.95, 0.93]), np.array([True, True]), 2, 0.5)
    assert f1 == 1.0 and t == pytest.approx(0.715)  # nothing left out: midway down to the candidates' floor
    assert match.best_threshold(np.array([0.9]), np.array([False]), 0, 0.5) == (None, 0.0)
    assert match.code("s1-0000000001") == match.code("s1-0000000001") < 2**63
