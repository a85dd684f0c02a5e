"""Scale: peak memory per process and wall time of train, index and evaluate on features-only workdirs of growing
size (``jobs.synth --features-only``: production widths, 4-level tree of 4,096 leaves), and of embed on synthetic
image catalogues. Every stage runs as its own job process (``python -m jobs.NAME``, which starts its own local
Ray), sampled every 0.5 s with its whole process tree: the driver (the job process) and every Ray worker
(``ray::`` processes: tasks, actors, Ray Train workers). Ray's own daemons (raylet, GCS, dashboard agent) are
reported apart.

    python benchmarks/scale.py                                   # 100k, 300k, 1M products (about an hour here)
    python benchmarks/scale.py --products 100000 --stages train,index,evaluate
    python benchmarks/scale.py --embed 5000,20000 --products ""  # embed only: driver RSS over catalogue size

Goal (issue "no process holds the catalogue"): the driver's and the largest worker's peak memory flat in N (at most
1.5 GB, within 25% from 100k to 1M) and wall time at most linear. RSS counts every page a process has mapped, the
pages of Ray's shared-memory object store it read blocks from included: the same pages count again in every
worker that maps them, and stay counted after the objects are freed. Ray's memory guide measures a worker's heap
as RSS minus shared memory for that reason, and so does the ``heap`` column here (RSS - RssShmem: the process's
own memory and its libraries' code). Each cell gives RSS (private / object store): RssAnon, the process's own
memory, and RssShmem, object-store pages it has mapped; the rest of RSS is libraries' code.

Prints the machine, the date, the command and one markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared machine.py beside this script
from machine import cpu  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAEMONS = ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py", "agent")


def _descendants(root: int) -> list[int]:
    """root and every process under it (Linux /proc: parent ids from /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _memory(pid: int) -> tuple[int, int, int, str] | None:
    """(RSS, its anonymous part, its shared-memory part (Ray's object store), command) from /proc/PID."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if v.strip().endswith("kB")}
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            name = f.read().split(b"\0")[0].decode(errors="replace")
        name = name[:60] if name.startswith("ray::") else os.path.basename(name.split()[0] if name else "")
    except (OSError, ValueError):
        return None
    rss = kb.get("VmRSS", 0) * 1024
    return rss, kb.get("RssAnon", 0) * 1024, kb.get("RssShmem", 0) * 1024, name


class Sampler(threading.Thread):
    """Peak RSS, and the peaks of its private (anonymous) and object-store (shared-memory) parts, of every process
    under ``pid``, by role, until stopped."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.stop = pid, every, threading.Event()
        self.peak: dict[int, tuple[int, int, int, str, int]] = {}  # pid -> (rss, private, shmem, name, heap)

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in _descendants(self.pid):
                m = _memory(pid)
                if m is None:
                    continue
                old = self.peak.get(pid, (0, 0, 0, m[3], 0))
                self.peak[pid] = (max(m[0], old[0]), max(m[1], old[1]), max(m[2], old[2]), m[3],
                                  max(m[0] - m[2], old[4]))
            time.sleep(self.every)

    def roles(self) -> dict[str, tuple[int, int, int, str]]:
        """Per role, the process of the highest peak RSS; for workers also ``worker_heap``, the one of the highest
        peak of RSS minus object-store pages (not always the same process)."""
        out: dict[str, tuple[int, int, int, str]] = {}
        for pid, peak in self.peak.items():
            name = peak[3]
            role = "driver" if pid == self.pid else ("worker" if name.startswith("ray::") else
                                                      "daemon" if any(d in name for d in DAEMONS) else "other")
            if role not in out or peak[0] > out[role][0]:
                out[role] = peak
            if role == "worker" and ("worker_heap" not in out or peak[4] > out["worker_heap"][4]):
                out["worker_heap"] = peak
        return out


def run_stage(args: list[str], log_path: str) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid)
        sampler.start()
        rc = proc.wait()
        sampler.stop.set()
        sampler.join()
    if rc != 0:
        raise SystemExit(f"scale: {' '.join(args[:1])} failed (exit {rc}); see {log_path}")
    top = sorted(sampler.peak.values(), key=lambda p: -p[0])[:5]  # the five largest processes, for the logs
    return {"seconds": time.time() - t0, **sampler.roles(),
            "top": ", ".join(f"{p[3].removeprefix('ray::')[:40]} {p[0] / 2**30:.2f}" for p in top)}


def gb(x: tuple | None) -> str:
    """RSS (private / object store) in GB."""
    return "-" if x is None else f"{x[0] / 2**30:.2f} ({x[1] / 2**30:.2f} / {x[2] / 2**30:.2f})"


def heap(x: tuple | None) -> str:
    """Peak RSS minus object-store pages, in GB."""
    return "-" if x is None else f"{x[4] / 2**30:.2f}"


def who(x: tuple | None) -> str:
    return x[3].removeprefix("ray::") if x else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--products", default="100000,300000,1000000", help="features-only workdir sizes ('' = none)")
    p.add_argument("--stages", default="train,index,evaluate", help="stages on each features workdir")
    p.add_argument("--embed", default="", help="image catalogue sizes for jobs.embed, e.g. 5000,20000")
    p.add_argument("--root", default="/tmp/clipita-scale", help="where the workdirs go (kept between runs)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override for every stage, after the benchmark's own index.dtype=f16 and "
                        "data.unseen_fraction=0.1")
    p.add_argument("--keep", action="store_true", help="keep the workdirs (they are reused if present)")
    args = p.parse_args()
    sets = ["index.dtype=f16", "data.unseen_fraction=0.1", *args.set]  # a later --set of the same key wins
    overrides = [a for s in sets for a in ("--set", s)]
    os.makedirs(args.root, exist_ok=True)
    rows = []
    for n in [int(x) for x in args.products.split(",") if x]:
        work = os.path.join(args.root, f"features-{n}")
        if not os.path.exists(os.path.join(work, "features", "categories.parquet")):
            shutil.rmtree(work, ignore_errors=True)
            r = run_stage(["jobs.synth", "--features-only", "--out", work, "--products", str(n)],
                          os.path.join(args.root, f"synth-{n}.log"))
            rows.append((n, "synth --features-only", r))
        for stage in args.stages.split(","):
            cmd = {"train": ["jobs.train", "--workdir", work, "--variant", "ita", "--setting", "specific",
                             "--epochs", "1", "--workers", "1"],
                   "index": ["jobs.index", "--workdir", work],
                   "evaluate": ["jobs.evaluate", "--workdir", work]}[stage]
            if stage == "train":
                shutil.rmtree(os.path.join(work, "checkpoints"), ignore_errors=True)
            r = run_stage(cmd + overrides, os.path.join(args.root, f"{stage}-{n}.log"))
            rows.append((n, stage, r))
            print(f"scale: {n:,} {stage}: {r['seconds']:.0f} s, driver {gb(r.get('driver'))} GB, "
                  f"largest worker {gb(r.get('worker'))} GB ({who(r.get('worker'))}), largest heap "
                  f"{heap(r.get('worker_heap'))} GB ({who(r.get('worker_heap'))})", flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for n in [int(x) for x in args.embed.split(",") if x]:
        catalog, work = os.path.join(args.root, f"catalog-{n}"), os.path.join(args.root, f"embed-{n}")
        if not os.path.exists(os.path.join(catalog, "products.parquet")):
            run_stage(["jobs.synth", "--out", catalog, "--products", str(n)], os.path.join(args.root, "synth.log"))
        shutil.rmtree(work, ignore_errors=True)
        r = run_stage(["jobs.embed", "--catalog", catalog, "--workdir", work, "--config", "configs/offline.yaml"],
                      os.path.join(args.root, f"embed-{n}.log"))
        rows.append((n, "embed (offline encoders)", r))
        print(f"scale: {n:,} embed: {r['seconds']:.0f} s, driver {gb(r.get('driver'))} GB", flush=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"machine: {cpu()}; load average {os.getloadavg()[0]:.1f}; {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"command: python benchmarks/scale.py {' '.join(sys.argv[1:])}")
    print()
    print("GB: peak RSS (private / object store); private = RssAnon, object store = RssShmem (Ray's shared memory); "
          "heap = peak of RSS - RssShmem.")
    print()
    print("| products | stage | wall s | s per 100k | driver | largest worker | that worker | "
          "largest worker heap | that worker | Ray daemons |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, stage, r in rows:
        print(f"| {n:,} | {stage} | {r['seconds']:.0f} | {r['seconds'] / n * 1e5:.1f} | {gb(r.get('driver'))} | "
              f"{gb(r.get('worker'))} | {who(r.get('worker'))} | {heap(r.get('worker_heap'))} | "
              f"{who(r.get('worker_heap'))} | {gb(r.get('daemon'))} |")


if __name__ == "__main__":
    main()
