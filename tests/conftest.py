"""Shared fixtures: a real S3-protocol server on loopback (moto server mode, as s3fs's own tests do) and one
local Ray per test session. Fixtures that start servers are session-scoped: they cost seconds each."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

# Tests never reach a model hub: fail fast instead of retrying a closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE_CONFIG = os.path.join(ROOT, "configs", "offline.yaml")


def pytest_collection_modifyitems(items):
    """A test that needs the session's Ray (directly or through a fixture built on it) is slow: ``make test-fast``
    (``-m "not slow"``) runs every other test and starts no Ray."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_tests_start_no_ray(request, monkeypatch):
    """A test not marked slow that starts Ray in this process (ray.init, or a Ray call that would start one)
    fails at once, naming the fix. Tests that start Ray in a subprocess carry the slow mark by hand."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    import ray
    import ray._private.worker

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts Ray: use the ray_session fixture or mark it slow")

    if not ray.is_initialized():
        monkeypatch.setattr(ray, "init", refuse)
        monkeypatch.setattr(ray._private.worker, "init", refuse)
    yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server in its own process on 127.0.0.1; AWS_* env vars point every client (and Ray workers
    started afterwards) at it."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh, empty bucket; returns its ``s3://name`` URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One local Ray for the whole test session (ray.init costs ~5 s on this machine). Started after the S3
    server so that its workers inherit the AWS_* environment, as a user's would."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


# index.dtype f32: the regression test compares with the first landing's exact float32 ranking (f16 storage,
# the default, rounds scores and may reorder near-ties); the pipeline and serve tests run the default.
DEMO_SETTINGS = {"data.unseen_fraction": 0.1, "embed.part_rows": 128, "embed.batch_size": 64, "index.dtype": "f32"}


@pytest.fixture(scope="session")
def embedded_workdir(ray_session, tmp_path_factory):
    """A synthetic catalogue of 600 products run through jobs.embed with the offline encoders (~30 s, once)."""
    from clipita.config import load_config
    from clipita.sources.synth import write_catalog
    from clipita.stages.embed import run_embed

    base = tmp_path_factory.mktemp("demo")
    write_catalog(str(base / "catalog"), 600, seed=7, workers=1, progress=False)
    workdir = str(base / "work")
    run_embed(str(base / "catalog"), workdir, load_config(OFFLINE_CONFIG, DEMO_SETTINGS), log=lambda *_: None)
    return workdir


@pytest.fixture(scope="session")
def demo_config():
    from clipita.config import load_config

    return load_config(OFFLINE_CONFIG, DEMO_SETTINGS)


@pytest.fixture(scope="session")
def trained_workdir(embedded_workdir, tmp_path_factory):
    """embedded_workdir's features with all nine heads trained in-process (Ray Train local mode), indexed."""
    import shutil

    from clipita.config import load_config
    from clipita.stages.index import build_indexes
    from clipita.stages.train import train

    workdir = str(tmp_path_factory.mktemp("trained"))
    shutil.copytree(f"{embedded_workdir}/features", f"{workdir}/features")
    shutil.copy(f"{embedded_workdir}/catalog.json", f"{workdir}/catalog.json")
    cfg = load_config(OFFLINE_CONFIG, {**DEMO_SETTINGS, "train.workers": 0, "train.epochs": 10})
    for setting in ("all", "general", "specific"):
        for variant in ("i", "ia", "ita"):
            train(workdir, variant, setting, cfg, log=lambda *_: None)
    build_indexes(workdir, cfg, log=lambda *_: None)
    return workdir
