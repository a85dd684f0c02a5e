"""jobs.train on a real local Ray: equal streaming shards, several runs in one worker group, resume after a worker
dies, no re-training when finished. That the gathered loss of R workers equals the full-batch loss exactly is
tested in test_loss.py; here, what still holds with streamed shards: 2 workers reach 1 worker's validation loss."""
import shutil

import numpy as np
import pytest

from clipita import storage
from clipita.checkpoint import load_model
from clipita.config import load_config
from clipita.stages.train import FAIL_AT_EPOCH_ENV, FAIL_MARKER_ENV, train, train_runs
from clipita.workdir import best_checkpoint, run_dir
from conftest import DEMO_SETTINGS, OFFLINE_CONFIG

# The distribution tests compare validation losses: the paper recipe's (selection on that loss, a fixed τ); the
# residual recipe has its own test below.
SMALL = {**DEMO_SETTINGS, "train.recipe": "paper", "train.hidden_dim": 64, "train.output_dim": 32, "train.lr": 1e-3,
         "train.tau": 0.1, "train.checkpoint_every": 1, "data.val_fraction": 0.2}
# Relative, on the best validation loss: shards and shuffles (so batches) differ between runs, and ~60 validation
# products make a loss that moves by ~10% from epoch to epoch; a broken gather or split is off by far more.
VAL_TOLERANCE = 0.15


def workdir_with_features(embedded, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(f"{embedded}/features", dst / "features")
    return str(dst)


def config(data: dict | None = None, **train):
    return load_config(OFFLINE_CONFIG, {**SMALL, **(data or {}), **{f"train.{k}": v for k, v in train.items()}})


# The loss-based tests compare validation losses: without held-out validation categories, whose loss need not fall
# while the heads learn the seen ones (the residual recipe's tests use them).
SEEN_VAL = {"data.unseen_val_fraction": 0.0}


def curve(work, variant, setting):
    return storage.read_json(f"{run_dir(work, variant, setting)}/curve.json")


def test_two_workers_reach_one_workers_validation_loss_and_rerun_skips(ray_session, embedded_workdir, tmp_path):
    one = workdir_with_features(embedded_workdir, tmp_path, "one")
    two = workdir_with_features(embedded_workdir, tmp_path, "two")
    s1 = train(one, "ita", "specific", config(SEEN_VAL, epochs=6, workers=1, batch_size=32), log=lambda *_: None)
    s2 = train(two, "ita", "specific", config(SEEN_VAL, epochs=6, workers=2, batch_size=16), log=lambda *_: None)
    c1, c2 = curve(one, "ita", "specific"), curve(two, "ita", "specific")
    assert len(c1) == len(c2) == 6
    v1, v2 = np.array([h["val_loss"] for h in c1]), np.array([h["val_loss"] for h in c2])
    assert v1.min() < v1[0] - 0.1 and v2.min() < v2[0] - 0.1  # both learn
    assert abs(v2.min() - v1.min()) <= VAL_TOLERANCE * v1.min(), (v1, v2)
    assert s1["epochs"] == s2["epochs"] == 6 and storage.exists(f"{run_dir(one, 'ita', 'specific')}/curve.png")
    model = load_model(best_checkpoint(two, "ita", "specific"))
    assert model.config.variant == "ita" and model.config.hidden_dim == 64

    lines = []
    again = train(two, "ita", "specific", config(SEEN_VAL, epochs=6, workers=2, batch_size=16), log=lines.append)
    assert "not training again" in lines[0] and again == s2


def test_runs_share_one_group_and_a_streamed_shard_trains_like_a_cached_one(ray_session, embedded_workdir, tmp_path):
    cached = workdir_with_features(embedded_workdir, tmp_path, "cached")
    streamed = workdir_with_features(embedded_workdir, tmp_path, "streamed")
    runs = [("ia", "all"), ("ita", "general")]
    lines: list[str] = []
    stats = train_runs(cached, runs, config(SEEN_VAL, epochs=4, workers=1, batch_size=16), log=lines.append)
    assert set(stats) == {"ia-all", "ita-general"} and all(s["runs_in_group"] == 2 for s in stats.values())
    assert "cached in memory" in lines[-1]
    lines.clear()
    train_runs(streamed, runs, config(SEEN_VAL, epochs=4, workers=1, batch_size=16, cache_mb=0), log=lines.append)
    assert "streamed every epoch" in lines[-1]
    for variant, setting in runs:  # a shuffle buffer instead of a permutation: other batches, the same learning
        a, b = curve(cached, variant, setting), curve(streamed, variant, setting)
        va, vb = min(h["val_loss"] for h in a), min(h["val_loss"] for h in b)
        assert len(a) == len(b) == 4 and vb < b[0]["val_loss"]
        assert abs(va - vb) <= VAL_TOLERANCE * va, (a, b)


def test_a_killed_worker_is_survived_and_the_run_resumes(ray_session, embedded_workdir, tmp_path, monkeypatch):
    work = workdir_with_features(embedded_workdir, tmp_path, "killed")
    marker = str(tmp_path / "killed-once")
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "2")
    monkeypatch.setenv(FAIL_MARKER_ENV, marker)
    stats = train(work, "ia", "all", config(epochs=4, workers=2, batch_size=16, max_failures=2),
                  log=lambda *_: None)
    assert storage.exists(marker)  # the worker did die at epoch 3
    c = curve(work, "ia", "all")
    assert [h["epoch"] for h in c] == [1, 2, 3, 4] and stats["epochs"] == 4
    # the restarted worker group began from the last checkpoint (epoch 2), not from scratch
    assert c[0]["attempt_start_epoch"] == 0 and c[-1]["attempt_start_epoch"] == 2


def test_too_small_a_split_is_one_clear_error(ray_session, embedded_workdir, tmp_path):
    work = workdir_with_features(embedded_workdir, tmp_path, "small")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(work, "i", "general", config(epochs=1, workers=2, batch_size=4096))


def test_residual_recipe_selects_on_validation_retrieval_and_picks_alpha(ray_session, embedded_workdir, tmp_path):
    from clipita.checkpoint import load_metadata
    from clipita.rankers import load_ranker
    from clipita.stages.index import vector_dims

    work = workdir_with_features(embedded_workdir, tmp_path, "residual")
    cfg = config(recipe="residual", tau=None, epochs=3, workers=1, batch_size=16)
    lines: list[str] = []
    stats = train_runs(work, [("ita", "specific"), ("i", "specific")], cfg, log=lines.append)
    c = curve(work, "ita", "specific")
    # held-out validation categories (data.unseen_val_fraction: half of unseen_fraction) give an unseen R-prec
    assert all(not np.isnan(h["val_rprec_seen"]) and not np.isnan(h["val_rprec_unseen"]) for h in c), c
    best = load_metadata(best_checkpoint(work, "ita", "specific"))
    assert c[best["epoch"] - 1]["val_rprec_hm"] == max(h["val_rprec_hm"] for h in c)  # selected on it, not loss
    assert best["alpha"] in cfg.train.alphas and set(best["alpha_val_rprec_hm"]) == {str(a) for a in cfg.train.alphas}
    assert best["alpha_val_rprec_hm"][str(best["alpha"])] == max(best["alpha_val_rprec_hm"].values())
    assert stats["ita-specific"]["alpha"] == best["alpha"] and stats["ita-specific"]["recipe"] == "residual"
    # the rankers (index, evaluate, serve) load the residual model, α included, in the text encoder's space
    ranker = load_ranker(work, "clip-ita", "specific")
    assert ranker.heads.config.residual and ranker.heads.residual_scale.item() == best["alpha"]
    assert ranker.heads.config.output_dim == vector_dims(work, "clip-ita", "specific") == \
        vector_dims(work, "mpnet", None)
    # CLIP-I has no text to pass through: a plain head, no α, the same selection
    plain = load_model(best_checkpoint(work, "i", "specific"))
    assert not plain.config.residual and plain.config.output_dim == 32
    assert "alpha" not in load_metadata(best_checkpoint(work, "i", "specific"))
    lines.clear()
    train_runs(work, [("ita", "specific"), ("i", "specific")], cfg, log=lines.append)
    assert all("not training again" in line for line in lines) and len(lines) == 2


def test_residual_heads_with_loss_selection_and_no_alpha_search(ray_session, embedded_workdir, tmp_path):
    """The ablation's knobs (benchmarks/recipes.py): residual heads, best/ on the validation loss, α fixed at 1,
    KgCoOp's regulariser on (the validation loss leaves it out, so the two recipes' losses stay comparable)."""
    from clipita.checkpoint import load_metadata

    work = workdir_with_features(embedded_workdir, tmp_path, "ablation")
    cfg = config(recipe="residual", tau=1.0, learnable_tau=False, label_mask=False, select="loss", alphas="1.0",
                 kg_weight=1.0, epochs=3, workers=1, batch_size=16)
    train_runs(work, [("ita", "specific")], cfg, log=lambda _: None)
    c = curve(work, "ita", "specific")
    best = load_metadata(best_checkpoint(work, "ita", "specific"))
    assert c[best["epoch"] - 1]["val_loss"] == min(h["val_loss"] for h in c)  # selected on the loss
    assert best["alpha"] == 1.0 and list(best["alpha_val_rprec_hm"]) == ["1.0"]
    assert all(h["tau"] == pytest.approx(1.0) for h in c)  # fixed
    assert load_model(best_checkpoint(work, "ita", "specific")).config.residual


def test_a_run_stops_early_on_every_worker_and_counts_as_finished(ray_session, embedded_workdir, tmp_path):
    """train.patience: rank 0 alone scores validation, so its decision must reach the other worker (else the
    group hangs in a collective); the stopped run is finished for a re-run, and its α is still chosen. Also: two
    workers that would reserve all 4 CPUs of the session (and starve the reads feeding them) reserve less."""
    from clipita.checkpoint import load_metadata

    work = workdir_with_features(embedded_workdir, tmp_path, "patience")
    cfg = config(recipe="residual", tau=None, patience=1, epochs=8, workers=2, batch_size=16, cpus_per_worker=2)
    log: list[str] = []
    stats = train(work, "ita", "specific", cfg, log=log.append)
    assert any("would leave no CPU" in line and "reserves 1.5" in line for line in log), log
    hm = [h["val_rprec_hm"] for h in curve(work, "ita", "specific")]
    best = 0  # replay the rule on the curve: stop at the first epoch that does not beat the best so far
    for e in range(1, len(hm)):
        if hm[e] > hm[best]:
            best = e
        else:
            break
    assert len(hm) == min(8, e + 1) and stats["epochs"] == len(hm), hm
    assert stats["stopped_early"] == (len(hm) < 8)
    assert "alpha" in load_metadata(best_checkpoint(work, "ita", "specific"))
    lines: list[str] = []
    again = train(work, "ita", "specific", cfg, log=lines.append)
    assert "not training again" in lines[0] and again == stats
