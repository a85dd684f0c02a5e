"""What every job process does the same way: start or join Ray, load its config, fail with one line."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from clipita.catalog import CatalogError
from clipita.config import Config, ConfigError, load_config
from clipita.ray_compat import DropMessages, filter_driver_stderr, quiet_driver_loggers, stale_ray_record
from clipita.storage import StorageError

# Errors a user can cause (bad arguments, unreadable inputs): reported as one line, exit code 2.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, ValueError, FileNotFoundError, PermissionError)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (configs/offline.yaml, configs/production.yaml); "
                                         "default: built-in defaults = production encoders")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set embed.batch_size=128 (repeatable)")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["embed.batch_size=128", ...]`` -> ``{"embed.batch_size": "128"}`` (load_config converts the types)."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must be SECTION.KEY=VALUE")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip()
    return overrides


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, parse_overrides(args.set))


class Every:
    """``every()`` is True at most once per ``seconds`` (``force`` for the last line): progress lines of long loops."""

    def __init__(self, seconds: float):
        import time

        self.seconds, self.clock = seconds, time.monotonic
        self.last = self.clock()

    def __call__(self, force: bool = False) -> bool:
        if force or self.clock() - self.last > self.seconds:
            self.last = self.clock()
            return True
        return False


def node_cores() -> int:
    """The cores this process may run on (its affinity; all of the machine's otherwise)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def rejects_line(stats: dict, rejects_uri: str) -> str:
    """``N rejected (n1 reason1, n2 reason2): see URI`` for a converter's summary (most frequent reason first)."""
    reasons = ", ".join(f"{n:,} {kind}" for kind, n in sorted(stats["reasons"].items(), key=lambda kv: -kv[1]))
    return f"{stats['rejected']:,} rejected" + (f" ({reasons}): see {rejects_uri}" if reasons else "")


# Worker lines that every healthy run prints and that tell a user nothing; the driver drops them from the console
# (Ray's documented RAY_DEDUP_LOGS_SKIP_REGEX, applied where log_to_driver prints worker output). Every one of them
# stays in the worker's and Ray's log files; RAY_DEDUP_LOGS=0 turns the filter off. Each is one exact message, so a
# worker's genuine warnings, errors and tracebacks still reach the console.
QUIET_WORKER_LINES = (
    # Ray core, once per process that creates a Ray Data actor pool (Ray Data passes ray.put refs of its transformer
    # and DataContext, max_restarts=-1) or Ray Train's PreemptionWatcher: not about our arguments, ray#53727
    r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store and max_restarts",
    # Ray Train's PlacementGroupCleaner polls the State API every second; a local Ray has no dashboard to answer it
    r"Failed to query Ray Train Controller actor state\. State API may be temporarily unavailable",
    # raylet: actor pools + Train workers + split coordinators start more workers than a 2-core node's cpu count
    r"PYTHON worker processes have been started on node: .* maximum expected startup concurrency",
    # Ray Data's INFO lines inside workers (split coordinators, Train workers): ray-data/*.log keeps them
    r"^Starting execution of Dataset \S+\.( Full logs are in .*)?$",
    r"^Execution plan of Dataset \S+: ",
    r"^Progress bars disabled\. To enable, set `ray\.data\.DataContext",
    r"^\u2714\ufe0f? +Dataset \S+ execution finished in [\d.]+ seconds$",
    # Ray Train's INFO lines (train/*.log keeps them)
    r"^Requesting resources: \{",
    r"^Attempting to start training worker group of size \d+",
    r"^Started training worker group of size \d+: ?$",
    r"^- \(ip=\S+, pid=\d+\) world_rank=\d+, local_rank=\d+, node_rank=\d+$",
    r"^Setting up process group for: ",
    r"^Moving model to device: ",
    r"^Reporting training result \d+: TrainingReport\(",
    # Ray Train's own DatasetManager calls a Ray Data option deprecated in the same release (a warning + its source)
    r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources` is deprecated",
    r"^  self\.exclude_resources = exclude_resources$",
)

# Set before Ray is imported (Ray reads them at import) and passed on to workers; a user's own value wins.
QUIET_ENV = {
    "RAY_DEDUP_LOGS_SKIP_REGEX": "|".join(f"(?:{p})" for p in QUIET_WORKER_LINES),
    # Ray Train V2 redirects print() in workers to a logger and also tees it to stdout when sys.stdout is not
    # sys.__stdout__ -- always so in a Ray worker -- so every worker line reached the driver twice. Train
    # propagates this variable from the driver to its controller and workers.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # A weight-loading progress bar per encoder actor drowns the job's own progress lines.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def quiet_console() -> None:
    """Environment of a quiet console; call before anything imports ray (start_ray does)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def _runtime_env(local: bool) -> dict:
    """The job's runtime_env: QUIET_ENV for every worker (a local Ray's workers inherit it anyway; a cluster's do
    not), leaving out what a submitted job's runtime_env already sets (ray.init refuses conflicting keys)."""
    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    taken = set((submitted.get("env_vars") or {}))
    env = {k: os.environ[k] for k in QUIET_ENV if k not in taken and k in os.environ}
    out: dict = {"env_vars": env} if env else {}
    if local and "worker_process_setup_hook" not in submitted:
        out["worker_process_setup_hook"] = "clipita.ray_compat.worker_setup"
    return out


def start_ray() -> None:
    """Join the cluster when there is one (``ray job submit`` sets RAY_ADDRESS), else start a local Ray; then print
    one line saying where Ray's full logs are. The console keeps our progress lines and genuine warnings and errors
    (ours and Ray's); what a healthy run's Ray prints besides goes to those log files only."""
    quiet_console()
    import ray

    if ray.is_initialized():
        return
    # ray.init logs at WARNING that token authentication is on, Ray's default for a new local cluster: not a problem
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        DropMessages("Token authentication is enabled for this Ray cluster."))
    address = os.environ.get("RAY_ADDRESS") or None
    stale = None if address else stale_ray_record()
    if stale:
        print(f"ray: {stale[0]} names {stale[1]}, where no Ray answers (a `ray start` that did not stop cleanly); "
              "starting a local Ray instead (`ray stop` or deleting the file clears it)", flush=True)
    info = ray.init(address="local" if stale else address, include_dashboard=False, log_to_driver=True,
                    configure_logging=False, runtime_env=_runtime_env(local=address is None) or None)
    progress_bars = sys.stderr.isatty()  # Ray Data's own bars on a terminal, our progress lines otherwise
    quiet_driver_loggers(progress_bars)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = progress_bars
    session = getattr(info, "address_info", {}).get("session_dir")
    logs = os.path.join(session, "logs") if session else "/tmp/ray/session_latest/logs"
    if os.environ.get("RAY_DEDUP_LOGS") != "0" and os.path.isdir(logs):
        filter_driver_stderr(logs, QUIET_WORKER_LINES[0])
    print(f"ray: {'joined ' + address if address else 'local Ray'}; full logs in {logs}", flush=True)


@contextmanager
def job(name: str) -> Iterator[None]:
    """Run a job's body; a user error ends the process with ``<name>: error: <one line>`` and exit code 2."""
    try:
        yield
    except (*USER_ERRORS, CatalogError, StorageError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{name}: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; finished parts are kept and a re-run resumes", file=sys.stderr)
        sys.exit(130)
