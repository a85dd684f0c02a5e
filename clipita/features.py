"""Reading what jobs.embed wrote (or a user brought): product features and category embeddings.

Products: ``features/products/*.parquet`` (product_id, title, attributes, category_path, image, image_emb,
title_emb, attr_emb, n_attributes), any number of files. Categories: ``features/categories.parquet`` (category,
name, depth, parent, products, text_name, text_path, clip_name, clip_path): every node of the tree, embedded once.

At marketplace scale no process holds the products: stages read them as a Ray dataset (``products_dataset``) or
one file per Ray task (``product_files``), and the driver keeps only the tree, a ``Labeler`` and per-category
counts (``census``). ``load_products`` (everything in one process) is for small catalogues and tests.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipita import storage
from clipita.config import DataConfig, EncoderConfig, section_from_dict
from clipita.ray_compat import idle_backoff
from clipita.tree import SETTINGS, CategoryTree, Labeler, Labels, assign_labels, category_id, unit_hash
from clipita.vectors import vectors
from clipita.workdir import categories_file, encoders_record, product_features_dir

BLOCK_BYTES = 32 * 2**20  # Ray Data block size for the feature streams (Ray's default is 128 MiB)
COLUMNS = {"image": "image_emb", "title": "title_emb", "attributes": "attr_emb"}  # model input -> its column


@dataclass
class Products:
    ids: np.ndarray  # (N,) object
    titles: np.ndarray  # (N,) object
    images: np.ndarray  # (N,) object: image location as in the catalogue
    paths: list[list[str]]
    image: np.ndarray  # (N, Di) CLIP image embedding, unit norm
    title: np.ndarray  # (N, Dt) sentence embedding of the title
    attributes: np.ndarray  # (N, Dt) mean of the attribute embeddings, zeros when none

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: np.ndarray) -> "Products":
        """Rows by boolean mask or integer index, same order."""
        idx = np.flatnonzero(index) if index.dtype == bool else index
        return Products(**{f.name: (np.asarray(getattr(self, f.name), dtype=object)[idx].tolist()
                                    if f.name == "paths" else getattr(self, f.name)[idx]) for f in fields(self)})

    @classmethod
    def from_table(cls, t: pa.Table) -> "Products":
        """One block of feature rows (a Ray Data batch, one file) as Products, in the table's order."""
        return cls(ids=np.asarray(t.column("product_id").to_pylist(), dtype=object),
                   titles=np.asarray(t.column("title").to_pylist(), dtype=object),
                   images=np.asarray(t.column("image").to_pylist(), dtype=object),
                   paths=t.column("category_path").to_pylist(),
                   image=vectors(t.column("image_emb")), title=vectors(t.column("title_emb")),
                   attributes=vectors(t.column("attr_emb")))

    def tensors(self) -> dict[str, np.ndarray]:
        """The model's input features (ClipIta batch keys)."""
        return {"image": self.image, "title": self.title, "attributes": self.attributes}


def load_products(workdir: str) -> Products:
    """Every product in this process, sorted by id: small catalogues and tests only (jobs stream instead)."""
    t = storage.read_parquet_dir(product_features_dir(workdir))
    return Products.from_table(t.sort_by("product_id"))  # a stable order whatever the order parts finished in


def product_files(workdir: str) -> list[str]:
    """URIs of the products' parquet files, in name order."""
    uri = product_features_dir(workdir)
    files = storage.parquet_files(uri)
    if not files:
        raise FileNotFoundError(f"no parquet files under {uri}: run jobs.embed (or bring features, README)")
    return files


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = storage.arrow_filesystem(uri)
    return pq.read_table(path, columns=columns, filesystem=fs)


def vector_width(workdir: str, column: str) -> int:
    """Width of a vector column (``image_emb``, ``title_emb``), from the first file's schema alone."""
    fs, path = storage.arrow_filesystem(product_files(workdir)[0])
    return pq.read_schema(path, filesystem=fs).field(column).type.list_size


READ_TASK_ROWS = 32768  # rows per read task of products_dataset (whole row groups; one group may be larger)
READ_BATCH_ROWS = 4096  # rows a read task decodes at a time
READ_BUFFER = 2**20  # bytes a read task buffers per column stream


def _read_row_groups(uri: str, row_groups: list[int], columns: list[str] | None, transform=None) -> Iterator:
    """One read task of products_dataset: row groups of one file, READ_BATCH_ROWS at a time through buffered
    column streams (no pre-buffering of whole row groups, no read-ahead): a task's memory is a few batches, whatever
    the row groups' size. ``transform``: table -> table or dict of numpy columns, applied to each batch."""
    from ray.data.block import BlockAccessor

    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f, buffer_size=READ_BUFFER, pre_buffer=False).iter_batches(
                batch_size=READ_BATCH_ROWS, row_groups=row_groups, columns=columns, use_threads=False):
            table = pa.Table.from_batches([batch])
            yield table if transform is None else BlockAccessor.batch_to_block(transform(table))


def _footer(uri: str) -> pq.FileMetaData:
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata


class FeatureSource:
    """Ray Data datasource of the products' parquet files: one read task per run of whole row groups of one file
    (about READ_TASK_ROWS rows), planned on the driver from the files' footers (per file and row group, never per
    product). Ray's own parquet reader pre-buffers whole row groups and reads batches ahead: 0.6-0.8 GB per read
    task on production-width rows; this one holds about READ_BATCH_ROWS rows (benchmarks/history/scale.md)."""

    def __init__(self, files: list[str], columns: list[str] | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.columns, self.units, self.bytes = columns, [], 0
        names = set(columns or [])
        with ThreadPoolExecutor(16) as pool:  # footers are small reads: on object storage, latency dominates
            metas = list(pool.map(_footer, files))
        for uri, meta in zip(files, metas):
            group, rows, size = [], 0, 0
            for i in range(meta.num_row_groups):
                rg = meta.row_group(i)
                group.append(i)
                rows += rg.num_rows
                size += sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
                            if not names or rg.column(c).path_in_schema.split(".")[0] in names)
                if rows >= READ_TASK_ROWS or i == meta.num_row_groups - 1:
                    self.units.append((uri, group, rows, size))
                    self.bytes += size
                    group, rows, size = [], 0, 0

    def datasource(self, transform=None):
        """The ray.data.Datasource, ``transform`` applied to each batch (built here: clipita.features imports
        without Ray). One plan serves several datasets (jobs.train's train and validation streams)."""
        from ray.data.block import BlockMetadata
        from ray.data.datasource import Datasource, ReadTask

        units, columns, total = self.units, self.columns, self.bytes

        class _Source(Datasource):
            def estimate_inmemory_data_size(self) -> int:
                return total

            def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
                return [ReadTask(lambda u=uri, g=groups: _read_row_groups(u, g, columns, transform),
                                 BlockMetadata(num_rows=rows, size_bytes=size, input_files=[uri], exec_stats=None),
                                 per_task_row_limit=per_task_row_limit)
                        for uri, groups, rows, size in units]

            def get_name(self) -> str:
                return "Features"

        return _Source()


def products_dataset(source: FeatureSource, stream_mb: int = 0, transform=None):
    """The products as a Ray dataset (blocks stream; nothing is gathered on the driver): FeatureSource read tasks,
    blocks of at most BLOCK_BYTES, so a task or actor holds a few of them whatever the files' layout.
    ``transform`` (a picklable function of a pyarrow table) runs on each batch in the read task itself: no second
    pass through the object store.
    ``stream_mb`` (data.stream_mb) caps the object-store memory the stream fills per node: a worker maps every
    object-store page a block passed through, so without a cap its RSS grows with the catalogue up to the size
    of the object store."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = min(ctx.target_max_block_size or BLOCK_BYTES, BLOCK_BYTES)
    if idle_backoff() not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes = [*ctx.custom_execution_callback_classes, idle_backoff()]
    if stream_mb:
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        ctx.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
            object_store_memory=stream_mb * 2**20 * max(1, nodes))
    return ray.data.read_datasource(source.datasource(transform))


@dataclass
class Categories:
    ids: np.ndarray  # (C,) object: full paths
    names: np.ndarray  # (C,) object
    text: dict[str, np.ndarray]  # "name" | "path" -> (C, Dt) sentence embeddings of the query text
    clip: dict[str, np.ndarray]  # "name" | "path" -> (C, Dc) CLIP text embeddings of the prompted query text

    def index(self, ids) -> np.ndarray:
        pos = {c: i for i, c in enumerate(self.ids)}
        return np.array([pos[c] for c in ids], dtype=np.int64)


def load_categories(workdir: str) -> Categories:
    uri = categories_file(workdir)
    t = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
    return Categories(
        ids=np.asarray(t.column("category").to_pylist(), dtype=object),
        names=np.asarray(t.column("name").to_pylist(), dtype=object),
        text={m: vectors(t.column(f"text_{m}")) for m in ("name", "path")},
        clip={m: vectors(t.column(f"clip_{m}")) for m in ("name", "path")},
    )


def recorded_encoders(workdir: str):
    """The EncoderConfig jobs.embed used for this workdir's features (queries must be embedded alike)."""
    return section_from_dict(EncoderConfig, storage.read_json(encoders_record(workdir)),
                             "encoders")


def load_tree(workdir: str) -> CategoryTree:
    uri = categories_file(workdir)
    columns = ["category", "name", "depth", "parent", "products"]
    return CategoryTree.from_table(pq.read_table(pa.BufferReader(storage.read_bytes(uri)), columns=columns))


def labeler_for(workdir: str, data: DataConfig, tree: CategoryTree | None = None) -> Labeler:
    """The workdir's split and labels as a function of (id, path): the held-out categories come from the tree."""
    return Labeler.build(tree or load_tree(workdir), data.seed, data.val_fraction, data.test_fraction,
                         data.unseen_fraction, unseen_val_fraction=data.val_holdout_fraction)


def labels_for(products: Products, data: DataConfig) -> Labels:
    """Labels of products held in memory (small catalogues and tests)."""
    return assign_labels(products.ids, products.paths, data.seed, data.val_fraction, data.test_fraction,
                         data.unseen_fraction, unseen_val_fraction=data.val_holdout_fraction)


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


def model_rows(batch: pa.Table, labeler: Labeler, node_index: dict[str, int], split: str,
               keep_fraction: float = 1.0) -> dict[str, np.ndarray]:
    """Ray Data stage of jobs.train (here, in a module without torch: read tasks start light). One block of
    feature rows -> the model inputs of its products in ``split``: features (float32, or float16 as stored) and, per
    setting, the label as a category number (``label_<setting>``). ``keep_fraction`` samples by a seeded hash."""
    ids, paths = batch.column("product_id").to_pylist(), batch.column("category_path").to_pylist()
    keep = np.array([labeler.split(p, path) == split and
                     (keep_fraction >= 1 or unit_hash(labeler.seed, "sample", p) < keep_fraction)
                     for p, path in zip(ids, paths)], dtype=bool)
    # float16 features stay float16 through the object store and the shuffle buffer (half the bytes; the worker
    # converts each batch to float32)
    out = {name: vectors(batch.column(column), keep_half=True)[keep] for name, column in COLUMNS.items()}
    for s in SETTINGS:
        out[f"label_{s}"] = np.array([node_index[labeler.label(p, path, s)] for p, path, k in zip(ids, paths, keep)
                                      if k], dtype=np.int64)
    return out
