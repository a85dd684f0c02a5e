"""What every catalogue converter (jobs.xmarket, jobs.icons) does the same way: a source record becomes a catalogue
row or a reject with a one-line reason, files are fetched or rendered in threads (one row's failure is that row's
reject, not the job's), and the output is the catalogue plus its rejects (clipita/catalog.py
``write_converted``), every record accounted for: products + rejected = read."""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable


class Reject(ValueError):
    """A source record that cannot become a catalogue row; the message is the reason."""


def failure(e: Exception, what: str) -> str:
    """``<what> failed: <Type>: <first line>``, at most 300 characters: a row's reason for an unexpected error."""
    return f"{what} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def threaded(work: Callable[[Any], str | None], items: list, workers: int) -> Iterable[str | None]:
    """``work(item)`` for every item in ``workers`` threads (I/O: object storage, rendering), in order: None, or
    the item's reject reason."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        yield from pool.map(work, items)


def reason_counts(rejects: list[dict[str, Any]]) -> dict[str, int]:
    """Rejects per kind of reason (the text before its first colon)."""
    return dict(Counter(r["reason"].split(":")[0] for r in rejects))
