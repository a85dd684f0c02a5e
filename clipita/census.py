"""Per-category counts of the whole catalogue by split, one Ray task per products file: what the driver may hold
(R of every query, seen or unseen categories)."""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq

from clipita import storage
from clipita.features import product_files
from clipita.tree import SETTINGS, Labeler, category_id


@dataclass
class Census:
    """Per-category counts of the whole catalogue, reduced from one Ray task per file: what the driver may hold.
    ``labels[(setting, split)][category]`` = products of that split labelled with that category;
    ``nodes[split][category]`` = products of that split whose path passes through the category."""

    labels: dict
    nodes: dict

    def split_size(self, split: str) -> int:
        return sum(self.labels.get(("general", split), {}).values())


def _count_file(uri: str, labeler: Labeler, batch_rows: int = 8192) -> tuple[dict, dict]:
    """Label and node counts of one products file, read ``batch_rows`` at a time (Python objects of one batch only)."""
    from collections import Counter

    fs, path = storage.arrow_filesystem(uri)
    by_label: dict = {(setting, split): Counter() for split in ("train", "val", "test") for setting in SETTINGS}
    nodes: dict = {split: Counter() for split in ("train", "val", "test")}
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=["product_id", "category_path"]):
            paths = batch.column("category_path").to_pylist()
            labels = labeler(batch.column("product_id").to_pylist(), paths)
            for split in ("train", "val", "test"):
                mask = labels.split == split
                for setting in SETTINGS:
                    by_label[(setting, split)].update(labels.by_setting[setting][mask].tolist())
            for split, p in zip(labels.split, paths):
                nodes[split].update(category_id(p[:d]) for d in range(1, len(p) + 1))
    return by_label, nodes


def census(workdir: str, labeler: Labeler) -> Census:
    """Label and node counts per split, one Ray task per products file, summed on the driver."""
    import ray

    task = ray.remote(num_cpus=1)(_count_file)
    refs = [task.remote(f, labeler) for f in product_files(workdir)]
    labels: dict = {}
    nodes: dict = {}
    while refs:  # sum as tasks finish: the driver holds one file's counts at a time besides the totals
        done, refs = ray.wait(refs, num_returns=1)
        by_label, by_node = ray.get(done[0])
        _add(labels, by_label)
        _add(nodes, by_node)
    return Census(labels, nodes)


def _add(totals: dict, counters: dict) -> None:
    for key, counter in counters.items():
        into = totals.setdefault(key, {})
        for c, n in counter.items():
            into[c] = into.get(c, 0) + n
