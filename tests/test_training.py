"""jobs.train on a real local Ray: 1 and 2 workers, resume after a worker dies, no re-training when finished."""
import shutil

import numpy as np
import pytest

from clipita import storage
from clipita.checkpoint import load_model
from clipita.config import load_config
from clipita.training import best_checkpoint, run_dir, train
from conftest import DEMO_SETTINGS, OFFLINE_CONFIG

pytestmark = pytest.mark.slow
SMALL = {**DEMO_SETTINGS, "train.hidden_dim": 64, "train.output_dim": 32, "train.lr": 1e-3, "train.tau": 0.1}


def workdir_with_features(embedded, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(f"{embedded}/features", dst / "features")
    return str(dst)


def config(**train):
    return load_config(OFFLINE_CONFIG, {**SMALL, **{f"train.{k}": v for k, v in train.items()}})


def test_two_workers_equal_one_worker_with_the_global_batch_and_rerun_skips(ray_session, embedded_workdir, tmp_path):
    one = workdir_with_features(embedded_workdir, tmp_path, "one")
    two = workdir_with_features(embedded_workdir, tmp_path, "two")
    s1 = train(one, "ita", "specific", config(epochs=4, workers=1, batch_size=32), log=lambda *_: None)
    s2 = train(two, "ita", "specific", config(epochs=4, workers=2, batch_size=16), log=lambda *_: None)
    c1 = storage.read_json(f"{run_dir(one, 'ita', 'specific')}/curve.json")
    c2 = storage.read_json(f"{run_dir(two, 'ita', 'specific')}/curve.json")
    l1, l2 = np.array([h["train_loss"] for h in c1]), np.array([h["train_loss"] for h in c2])
    assert len(l1) == len(l2) == 4
    assert l1[-1] < l1[0]  # the loss falls
    np.testing.assert_allclose(l2, l1, rtol=2e-4)  # 2 x 16 trains the same model as 1 x 32 (gathered loss)
    np.testing.assert_allclose([h["val_loss"] for h in c2], [h["val_loss"] for h in c1], rtol=2e-4)
    assert s1["epochs"] == s2["epochs"] == 4 and storage.exists(f"{run_dir(one, 'ita', 'specific')}/curve.png")
    model = load_model(best_checkpoint(two, "ita", "specific"))
    assert model.config.variant == "ita" and model.config.hidden_dim == 64

    lines = []
    again = train(two, "ita", "specific", config(epochs=4, workers=2, batch_size=16), log=lines.append)
    assert "not training again" in lines[0] and again == s2


def test_a_killed_worker_is_survived_and_the_run_resumes(ray_session, embedded_workdir, tmp_path):
    work = workdir_with_features(embedded_workdir, tmp_path, "killed")
    marker = str(tmp_path / "killed-once")
    stats = train(work, "ia", "all", config(epochs=4, workers=2, batch_size=16, max_failures=2),
                  log=lambda *_: None, fail_at_epoch=2, fail_marker=marker)
    assert storage.exists(marker)  # the worker did die at epoch 3
    curve = storage.read_json(f"{run_dir(work, 'ia', 'all')}/curve.json")
    assert [h["epoch"] for h in curve] == [1, 2, 3, 4] and stats["epochs"] == 4
    # the restarted worker group began from a checkpoint (epoch 1 or 2, depending on whether the epoch-2 report
    # had landed when the worker died), not from scratch
    assert curve[0]["attempt_start_epoch"] == 0 and curve[-1]["attempt_start_epoch"] in (1, 2)


def test_too_small_a_split_is_one_clear_error(ray_session, embedded_workdir, tmp_path):
    work = workdir_with_features(embedded_workdir, tmp_path, "small")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(work, "i", "general", config(epochs=1, workers=2, batch_size=4096))
