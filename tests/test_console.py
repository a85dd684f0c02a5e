"""The console of a healthy job: our progress lines, one line per training epoch, no ERROR / WARNING lines and no
duplicated lines (Ray's own chatter stays in /tmp/ray/session_*/logs); an unhealthy run still shows its errors."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's Python logging (``... WARNING file.py:1 -- ``), Ray core's C++ logs (``[date E pid tid] file.cc``),
# Python warnings and the root logger's default format, tracebacks
BAD = re.compile(r"\b(ERROR|WARNING|CRITICAL)\b|^\S*\s*\[[\d :,-]+ [EWF] \d+ \d+\]|Warning:|Traceback \(most recent")


def run(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for key in ("RAY_ADDRESS", "RAY_DEDUP_LOGS", "RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_TRAIN_ENABLE_PRINT_PATCH"):
        env.pop(key, None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def console(proc: subprocess.CompletedProcess) -> list[str]:
    return [ANSI.sub("", line) for line in (proc.stdout + proc.stderr).splitlines()]


def test_healthy_train_console_is_clean(tmp_path):
    work = str(tmp_path / "work")
    synth = run("-m", "jobs.synth", "--features-only", "--out", work, "--products", "300", "--workers", "1")
    assert synth.returncode == 0, synth.stderr
    proc = run("-m", "jobs.train", "--workdir", work, "--variant", "ita", "--setting", "all", "--workers", "1",
               "--epochs", "2", "--batch-size", "32", "--set", "train.val_rows=64")
    lines = console(proc)
    text = "\n".join(lines)
    assert proc.returncode == 0, text
    # progress: where Ray's logs are (once), the job's plan, one line per epoch, its result
    assert sum(line.startswith("ray: local Ray; full logs in /") for line in lines) == 1, text
    epochs = [line for line in lines if re.search(r"train: epoch \d+/2 ", line)]
    assert len(epochs) == 2 and "epoch 1/2" in epochs[0] and "epoch 2/2" in epochs[1], text
    assert any(line.startswith("jobs.train:") for line in lines), text
    bad = [line for line in lines if BAD.search(line)]
    assert not bad, text
    repeated = [a for a, b in zip(lines, lines[1:]) if a == b and a.strip()]
    assert not repeated, text
    assert len(set(epochs)) == len(epochs) and len(lines) < 25, text


def test_errors_still_reach_the_console(tmp_path):
    # a user error: one line, exit code 2
    proc = run("-m", "jobs.train", "--workdir", str(tmp_path / "missing"), "--variant", "ita", "--setting", "all",
               "--workers", "1")
    assert proc.returncode == 2 and re.search(r"^jobs\.train: error: ", proc.stderr, re.M), proc.stderr
    # a worker's warning and exception, and Ray's error log about it, under the same console settings
    script = (
        "import logging, ray\n"
        "from clipita import runtime\n"
        "runtime.start_ray()\n"
        "@ray.remote\n"
        "def bad():\n"
        "    logging.getLogger('clipita').warning('worker warning: disk almost full')\n"
        "    raise RuntimeError('worker exploded')\n"
        "try:\n"
        "    ray.get(bad.remote())\n"
        "except ray.exceptions.RayTaskError as e:\n"
        "    print('driver caught:', type(e.cause).__name__, e.cause)\n"
        "import os\n"  # what native code writes to the driver's fd 2 passes the quiet filter, a partial line too
        "os.write(2, b'[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:1: a genuine core error\\n')\n"
        "os.write(2, b'no newline at the end')\n"
    )
    proc = run("-c", script, timeout=120)
    text = "\n".join(console(proc))
    assert proc.returncode == 0, text
    assert "worker warning: disk almost full" in text, text
    assert "driver caught: RuntimeError worker exploded" in text, text
    # (the partial line comes through; worker lines forwarded later may follow it on the same line)
    assert "a genuine core error\n" in proc.stderr and "no newline at the end" in proc.stderr, proc.stderr


def test_a_ray_data_actor_pool_keeps_the_console_clean():
    """Ray core's false alarm about an actor pool's constructor arguments (printed by the driver's own core worker
    to its file descriptor 2) goes to the log folder, not the console."""
    script = (
        "import ray\n"
        "from clipita import runtime\n"
        "runtime.start_ray()\n"
        "class Double:\n"
        "    def __call__(self, batch):\n"
        "        return {'id': batch['id'] * 2}\n"
        "rows = ray.data.range(64).map_batches(Double, compute=ray.data.ActorPoolStrategy(size=1)).take_all()\n"
        "print('sum', sum(r['id'] for r in rows))\n"
    )
    proc = run("-c", script, timeout=120)
    lines = console(proc)
    text = "\n".join(lines)
    assert proc.returncode == 0 and "sum 4032" in text, text
    assert not [line for line in lines if BAD.search(line)], text


def test_serve_run_console_is_readable(tmp_path, trained_workdir, embedded_workdir):
    """`serve run serve/config.yaml`: Serve's INFO lines and its request log, no WARNING or ERROR from our replicas
    (before: transformers' "Loading weights" bar and open_clip's random-init warning, once per replica). The one
    warning left is Ray's own, printed by the serve CLI's ray.init before any of our code runs."""
    import shutil
    import signal
    import socket
    import time

    import requests
    import yaml

    if not os.path.exists(os.path.join(trained_workdir, "catalog.json")):  # the fixture copies features/ only
        shutil.copy(os.path.join(embedded_workdir, "catalog.json"), trained_workdir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(os.path.join(ROOT, "serve", "config.yaml")) as f:
        config = yaml.safe_load(f)
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["workdir"] = trained_workdir
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for key in ("RAY_ADDRESS", "RAY_DEDUP_LOGS_SKIP_REGEX", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(key, None)
    with open(tmp_path / "console.txt", "w") as out:
        proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "serve"), "run",
                                 str(tmp_path / "serve.yaml")], cwd=ROOT, env=env, stdout=out, stderr=out)
        try:
            url, deadline = f"http://127.0.0.1:{port}", time.time() + 180
            while time.time() < deadline:
                try:
                    if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                time.sleep(1)
            assert requests.get(f"{url}/search", params={"category": "Boots", "k": 3}, timeout=30).status_code == 200
            time.sleep(2)  # the replicas' request log reaches the console
        finally:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: serve run shuts Serve and its local Ray down
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    lines = [ANSI.sub("", line) for line in (tmp_path / "console.txt").read_text().splitlines()]
    text = "\n".join(lines)
    assert any("GET /search 200" in line for line in lines), text
    bad = [line for line in lines if BAD.search(line) and "Token authentication is enabled" not in line]
    assert not bad, text
    assert "Loading weights" not in text and "No pretrained weights" not in text, text
