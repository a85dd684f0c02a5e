"""Every use of Ray internals and every workaround of a Ray behaviour, each saying what it works around.

Checked against Ray 2.60 (``RAY_TESTED``; tests/test_ray_compat.py fails first on another release). Each one is
driven by a test against a real Ray, so an upgrade that changes the behaviour fails the suite instead of silently
undoing the workaround:
- ``stale_ray_record``: a dead ``ray start`` record makes ray.init() retry for minutes (tests/test_ray_compat.py);
- ``idle_backoff``: Ray Data's scheduling loop spins while a stream is held back, ray#65060 (test_ray_compat.py);
- ``quiet_driver_loggers``, ``filter_driver_stderr``, ``worker_setup``: Ray's healthy-run chatter and false alarms
  kept off the console, into Ray's log folder (tests/test_console.py runs real jobs and reads their console).
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import time

RAY_TESTED = "2.60"


def ray_record_file() -> str:
    """Ray's record of the last ``ray start`` on this machine (``$RAY_TMPDIR``/ray/ray_current_cluster, /tmp by
    default): the address a ``ray.init()`` without one joins."""
    base = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    base = base or "/tmp"
    return os.path.join(base, "ray", "ray_current_cluster")


def stale_ray_record(timeout: float = 2.0) -> tuple[str, str] | None:
    """``(file, address)`` when Ray's record names an address that nobody answers, else None.

    Works around: a ``ray start --head`` stopped by a signal leaves its record behind, and every later
    ``ray.init()`` without an address joins the dead GCS and retries for more than ten minutes before raising
    ConnectionError (Ray 2.60, measured here). Ray does not check that the address answers before joining
    (``ray._private.services.get_ray_address_from_environment``)."""
    path = ray_record_file()
    try:
        with open(path) as f:
            address = f.read().strip()
    except OSError:
        return None
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return None
    except (OSError, ValueError):
        return path, address


IDLE_SLEEP_S = 0.02  # the idle backoff's pause after a scheduling step in which nothing moved


@functools.cache
def idle_backoff():
    """A Ray Data execution callback class, built on first use (this module does not import Ray at import time).

    Ray 2.60's scheduling loop spins while a stream is held back by its object-store budget (``data.stream_mb``):
    ray.wait returns at once for tasks whose next output is ready but may not be read yet (ray#65060 describes
    the spin). While its consumer trains or builds an index, that burned 0.6-0.7 core of a 2-core node in the
    streaming_split coordinator (benchmarks/history/scale.md). This sleeps 20 ms after a loop step in which
    nothing moved: negligible latency against read tasks of a second or more. A local class: Ray pickles it by
    value into the executor's process. ``sleeps`` counts its pauses in this process (the test's evidence that the
    internals it reads still exist: another layout turns the backoff off, and the count stays 0)."""
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    class IdleBackoff(ExecutionCallback):
        last = None
        sleeps = 0

        def on_execution_step(self, executor) -> None:
            try:  # Ray 2.60's executor internals: another layout turns the backoff off, never the stream
                state = [(op.metrics.num_outputs_taken, op.metrics.num_task_outputs_generated,
                          op.metrics.num_tasks_submitted, s.total_enqueued_input_blocks(),
                          s.total_enqueued_output_blocks()) for op, s in (executor._topology or {}).items()]
            except (AttributeError, TypeError):
                return
            if state == self.last:  # nothing moved since the last step: held back, or waiting on tasks
                type(self).sleeps += 1
                time.sleep(IDLE_SLEEP_S)
            self.last = state

    return IdleBackoff


class DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes`` (a console handler's filter)."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_driver_loggers(progress_bars: bool) -> None:
    """The driver's Ray Data logger: its INFO lines (execution plans, "finished in") go to logs/ray-data/ray-data.log
    only; its console handler keeps warnings and errors. The logger's own level is untouched, so the file keeps
    everything. Reads Ray Data's private SessionFileHandler (Ray 2.60) to tell the file handler from the console's."""
    import ray.data  # noqa: F401  (configures the ray.data logger and its handlers)
    from ray.data._internal.logging import SessionFileHandler

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, SessionFileHandler):
            handler.setLevel(logging.WARNING)
            if not progress_bars:  # turned off on purpose, see start_ray
                handler.addFilter(DropMessages("Progress bars disabled."))


def worker_setup() -> None:
    """worker_process_setup_hook of a local Ray (runtime.start_ray). Ray Train's PlacementGroupCleaner looks its
    cluster up without an address; on a machine running more than one Ray (CI, shared hosts) that raises
    ConnectionError in its monitor thread, a 20-line traceback on every Train run. That one exception goes to the
    worker's .err file in Ray's log folder (not forwarded to the console); any other thread exception is printed
    as usual. Reads the worker's private ``ray._private.worker._global_node`` for the log folder."""
    import threading
    import traceback

    default = threading.excepthook

    def hook(args) -> None:
        if (args.thread is not None and args.thread.name == "PlacementGroupCleanerMonitor"
                and isinstance(args.exc_value, ConnectionError)
                and "multiple active Ray instances" in str(args.exc_value)):
            try:
                import ray

                logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
                with open(os.path.join(logs, f"placement-group-cleaner-{os.getpid()}.err"), "a") as f:
                    traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback, file=f)
                return
            except Exception:  # noqa: BLE001 - fall back to Ray's usual printing
                pass
        default(args)

    threading.excepthook = hook


def filter_driver_stderr(logs: str, quiet_line: str) -> None:
    """Ray core (C++) in the driver writes its ERROR lines to file descriptor 2 itself, past Python's logging and
    the log_to_driver filter. One of them is a false alarm on every healthy run (``quiet_line``, a regex:
    runtime.QUIET_WORKER_LINES[0], ray#53727: Ray Data keeps the referenced constructor arguments alive for as long
    as its actor pools live). Route fd 2 through a pipe whose reader moves that line to
    ``<logs>/driver-<pid>.quiet.err`` and passes every other byte on as it comes (a partial line, such as a progress
    bar's, after 0.1 s). The original stderr is back at exit."""
    import atexit
    import re
    import select
    import threading

    quiet = re.compile(quiet_line.encode())
    sys.stderr.flush()
    original = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)

    def forward(data: bytes) -> None:
        while data:
            data = data[os.write(original, data):]

    def pump() -> None:
        pending = b""
        try:
            while True:
                ready, _, _ = select.select([read], [], [], 0.1 if pending else None)
                chunk = os.read(read, 65536) if ready else b""
                if ready and not chunk:  # EOF: every writer closed
                    break
                *lines, pending = (pending + chunk).split(b"\n")
                out = b""
                for line in lines:
                    if quiet.search(line):
                        with open(os.path.join(logs, f"driver-{os.getpid()}.quiet.err"), "ab") as f:
                            f.write(line + b"\n")
                    else:
                        out += line + b"\n"
                if not ready:  # nothing more within 0.1 s: a partial line goes out as it is
                    out, pending = out + pending, b""
                forward(out)
            forward(pending)
        except Exception:  # noqa: BLE001 - never leave writers blocked on a pipe nobody reads
            os.dup2(original, 2)
            forward(pending)
            raise

    thread = threading.Thread(target=pump, name="clipita-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(original, 2)  # the pipe's write end closes; the reader drains it and ends
        thread.join(timeout=2)

    atexit.register(restore)
