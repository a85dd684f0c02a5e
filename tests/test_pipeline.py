"""jobs.pipeline submitted with `ray job submit` to a real local cluster started by `ray start --head`."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipita.sources.synth import write_catalog
from conftest import OFFLINE_CONFIG, ROOT, _free_port

pytestmark = pytest.mark.slow
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def break_rows(root: str) -> int:
    """Three rows a real feed would have: an undecodable image, a missing image file, an empty path."""
    table = pq.read_table(f"{root}/products.parquet")
    rows = table.to_pylist()
    with open(f"{root}/{rows[0]['image']}", "wb") as f:
        f.write(b"not an image")
    os.remove(f"{root}/{rows[1]['image']}")
    rows[2]["category_path"] = []
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), f"{root}/products.parquet")
    return 3


@pytest.fixture
def cluster():
    """A throwaway head node on loopback, in its own process group and temp dir (nothing else is touched)."""
    temp = tempfile.mkdtemp(prefix="cr-", dir="/tmp")
    port, dash = _free_port(), _free_port()
    # as a user with the virtual environment activated: a job's `python` is the one on the head's PATH
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    # every port of its own: the test session's Ray already holds the default agent and metrics ports
    ports = [f"--{name}={_free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", f"--temp-dir={temp}", "--disable-usage-stats", *ports],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("the Ray head did not start")
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def test_pipeline_via_ray_job_submit(cluster, tmp_path):
    address, env = cluster
    catalog, workdir = str(tmp_path / "catalog"), str(tmp_path / "work")
    write_catalog(catalog, 240, seed=3, workers=1, progress=False)
    broken = break_rows(catalog)
    runtime_env = {"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ROOT,
           "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "jobs.pipeline", "--catalog", catalog, "--workdir", workdir, "--config", OFFLINE_CONFIG,
           "--set", "train.epochs=2", "--set", "train.workers=0", "--set", "train.batch_size=16", "--set", "data.unseen_fraction=0.1",
           "--set", "embed.part_rows=64"]
    for _ in range(10):  # the dashboard answers a few seconds before its job agent accepts jobs
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        if "No available agent to submit job" not in done.stdout + done.stderr:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr

    rows = json.load(open(f"{workdir}/metrics.json"))
    aligned = [r for r in rows if r.get("task") == "align"]  # align ran first, by default
    assert {r["model"] for r in aligned} == {"aligned", "unaligned"} and "## Alignment" in open(
        f"{workdir}/metrics.md").read()
    # e-CLIP's downstream tasks ran last, their rows and sections gathered with the retrieval's
    assert {"classify", "cluster", "attributes", "flag", "match"} <= {r.get("task") for r in rows}
    assert "## Categorisation" in open(f"{workdir}/metrics.md").read()
    rows = [r for r in rows if "task" not in r]
    models = {r["model"] for r in rows}
    assert models == {"bm25", "mpnet", "clip", "clip-i", "clip-ia", "clip-ita"}
    assert {r["setting"] for r in rows} == {"all", "general", "specific"}
    summary = json.load(open(f"{workdir}/pipeline.json"))
    assert summary["products_read"] == 240 and summary["quarantined"] == broken
    assert set(summary["seconds"]) >= {"align", "embed", "train", "index", "evaluate", "classify", "match", "total"}
    assert os.path.exists(f"{workdir}/metrics.png") and os.path.exists(f"{workdir}/metrics.md")
