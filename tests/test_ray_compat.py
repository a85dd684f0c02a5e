"""clipita.ray_compat against the Ray it works around: the record Ray reads is the one we check, and a job whose
record points at a dead address starts a local Ray within seconds instead of retrying for minutes."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from clipita.ray_compat import ray_record_file, stale_ray_record
from conftest import ROOT


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_tmp(monkeypatch):
    # short: Ray's socket paths live under it and AF_UNIX paths are limited to ~107 characters
    path = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", path)
    os.makedirs(os.path.join(path, "ray"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _write_record(address: str) -> str:
    with open(ray_record_file(), "w") as f:
        f.write(address)
    return ray_record_file()


def test_the_record_we_check_is_the_one_ray_joins(ray_tmp):
    from ray._private.services import get_ray_address_from_environment

    address = f"127.0.0.1:{_closed_port()}"
    _write_record(address)
    # Ray itself would join the dead address: the workaround is still needed, and looks where Ray looks
    assert get_ray_address_from_environment(None, None) == address


def test_stale_record_is_told_from_a_live_one(ray_tmp):
    assert stale_ray_record() is None  # no record
    address = f"127.0.0.1:{_closed_port()}"
    path = _write_record(address)
    assert stale_ray_record() == (path, address)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        _write_record(f"127.0.0.1:{listener.getsockname()[1]}")
        assert stale_ray_record() is None
    _write_record("not-an-address")
    assert stale_ray_record() == (path, "not-an-address")


@pytest.mark.slow
def test_a_job_with_a_stale_record_starts_a_local_ray(ray_tmp):
    address = f"127.0.0.1:{_closed_port()}"
    path = _write_record(address)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    code = ("from clipita.runtime import start_ray; start_ray(); import ray; "
            "print('cpus', int(ray.cluster_resources()['CPU']))")
    # without the workaround this call retries the dead address for over ten minutes
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"ray: {path} names {address}, where no Ray answers" in proc.stdout
    assert "cpus " in proc.stdout and "local Ray" in proc.stdout


def test_ray_is_the_release_the_workarounds_were_checked_against():
    import ray

    from clipita.ray_compat import RAY_TESTED

    # an upgrade fails here first: re-run this file's tests, check each workaround's Ray issue, then move RAY_TESTED
    assert ray.__version__.startswith(RAY_TESTED + "."), (ray.__version__, RAY_TESTED)


def test_the_idle_backoff_sleeps_only_after_a_scheduling_step_in_which_nothing_moved(monkeypatch):
    """Ray 2.60's scheduling loop spins while a budget holds the stream back; clipita.streams.products_dataset's callback sleeps
    after a step that changed nothing, and never after one that moved (a task submitted, an output taken)."""
    from types import SimpleNamespace

    from clipita import ray_compat

    slept = []
    monkeypatch.setattr(ray_compat.time, "sleep", slept.append)
    metrics = SimpleNamespace(num_outputs_taken=0, num_task_outputs_generated=3, num_tasks_submitted=1)
    queued = {"in": 0, "out": 2}
    state = SimpleNamespace(total_enqueued_input_blocks=lambda: queued["in"],
                            total_enqueued_output_blocks=lambda: queued["out"])

    class Op:  # hashable, as operators are (topology keys)
        pass

    op = Op()
    op.metrics = metrics
    executor = SimpleNamespace(_topology={op: state})
    callback = ray_compat.idle_backoff()()
    callback.on_execution_step(executor)  # the first step: nothing to compare with
    assert slept == []
    callback.on_execution_step(executor)  # held back: nothing moved
    assert slept == [ray_compat.IDLE_SLEEP_S]
    for change in (lambda: setattr(metrics, "num_outputs_taken", 1), lambda: queued.update(out=1),
                   lambda: setattr(metrics, "num_tasks_submitted", 2)):
        change()
        callback.on_execution_step(executor)
        assert len(slept) == 1
    callback.on_execution_step(executor)
    assert len(slept) == 2
    callback.on_execution_step(SimpleNamespace())  # an executor of another layout: no backoff, no error
    assert len(slept) == 2


@pytest.mark.slow
def test_the_idle_backoff_pauses_a_real_stream_that_waits_on_its_consumer(ray_session, tmp_path):
    """A real Ray Data stream whose consumer is slower than its reads: the executor's loop steps with nothing to
    do, and the backoff pauses in them. If Ray's executor stops exposing what the backoff reads, it turns itself
    off and this count stays at 0."""
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipita.streams import FeatureSource, products_dataset
    from clipita.ray_compat import idle_backoff

    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f"part-{i:05d}.parquet"))
        pq.write_table(pa.table({"product_id": [f"p{i}-{j}" for j in range(50)]}), paths[-1])
    before = idle_backoff().sleeps
    seen = 0
    for batch in products_dataset(FeatureSource(paths, ["product_id"]), stream_mb=1).iter_batches(batch_size=50):
        seen += len(batch["product_id"])
        time.sleep(0.3)  # the consumer is busy (training, building an index)
    assert seen == 400
    assert idle_backoff().sleeps > before
