"""What every job process does the same way: start or join Ray, load its config, fail with one line."""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from clipita.config import Config, ConfigError, load_config

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


def rejects_line(stats: dict, rejects_uri: str) -> str:
    """``N rejected (n1 reason1, n2 reason2): see URI`` for a converter's summary (most frequent reason first)."""
    reasons = ", ".join(f"{n:,} {kind}" for kind, n in sorted(stats["reasons"].items(), key=lambda kv: -kv[1]))
    return f"{stats['rejected']:,} rejected" + (f" ({reasons}): see {rejects_uri}" if reasons else "")


def start_ray() -> None:
    """Join the cluster when there is one (``ray job submit`` sets RAY_ADDRESS), else start a local Ray."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A weight-loading progress bar per encoder actor drowns the job's own progress lines; workers inherit this.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if ray.is_initialized():
        return
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
             log_to_driver=True, configure_logging=False)
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()


@contextmanager
def job(name: str) -> Iterator[None]:
    """Run a job's body; a user error ends the process with ``<name>: error: <one line>`` and exit code 2."""
    from clipita.catalog import CatalogError
    from clipita.storage import StorageError

    try:
        yield
    except (*USER_ERRORS, CatalogError, StorageError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"{name}: error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; finished parts are kept and a re-run resumes", file=sys.stderr)
        sys.exit(130)
