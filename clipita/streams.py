"""The products' features as a Ray Data stream: a datasource of whole row groups read a batch at a time, blocks of
bounded size and an object-store budget per node (``data.stream_mb``), so no task, actor or driver holds the
catalogue."""
from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from clipita import storage
from clipita.ray_compat import idle_backoff

BLOCK_BYTES = 32 * 2**20  # Ray Data block size for the feature streams (Ray's default is 128 MiB)
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
