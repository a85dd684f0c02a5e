"""Reading and validating a catalogue (DESIGN.md "Catalogue"): every row is either used or quarantined.

A catalogue root (local path, ``file://`` or ``s3://``) holds ``products.parquet`` or a folder ``products/`` of
parquet files with columns product_id, title, attributes, category_path, image.

Validation rules (each quarantined row gets one of these reasons):
- ``missing product_id``: null or blank id.
- ``duplicate product_id (N rows)``: every row of an id that appears more than once. We cannot tell which row is
  right, so none is used; the data owner fixes it.
- ``empty category_path`` / ``blank name in category_path``.
- ``missing image``: null or blank image location.
- ``<column> has type T, expected E (file F)``: a file whose column cannot be read as the contract's type; all its
  rows are quarantined, other files still load.
Lenient on purpose: a null title reads as "", null attributes as [], null entries inside attributes are skipped,
numeric ids are read as strings. A missing column is one clear error (CatalogError), not quarantine.
"""
from __future__ import annotations

import io
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

from clipita import storage

COLUMNS = ("product_id", "title", "attributes", "category_path", "image")
SCHEMA = pa.schema([
    ("product_id", pa.string()),
    ("title", pa.string()),
    ("attributes", pa.list_(pa.string())),
    ("category_path", pa.list_(pa.string())),
    ("image", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([("product_id", pa.string()), ("reason", pa.string()), ("source", pa.string())])
REJECTS_FILE = "conversion_rejects.parquet"  # a converter's (jobs.xmarket, jobs.icons) rows it did not take


def write_converted(out: str, products: list[dict], rejects: list[dict], extra: tuple[str, ...] = ()) -> None:
    """A converter's output: ``<out>/products.parquet`` (SCHEMA, and the optional string columns ``extra`` such as
    ``group_id``) and ``<out>/REJECTS_FILE`` (QUARANTINE_SCHEMA)."""
    schema = SCHEMA
    for name in extra:
        schema = schema.append(pa.field(name, pa.string()))
    storage.write_parquet(storage.join(out, "products.parquet"), pa.Table.from_pylist(products, schema=schema))
    storage.write_parquet(storage.join(out, REJECTS_FILE), pa.Table.from_pylist(rejects, schema=QUARANTINE_SCHEMA))


class CatalogError(ValueError):
    """A catalogue that cannot be read at all; the message is one line."""


def product_files(root: str) -> list[str]:
    """URIs of the catalogue's parquet files, sorted (a stable order makes every run the same)."""
    fs, path = storage.filesystem(root)
    single = f"{path}/products.parquet"
    folder = f"{path}/products"
    prefix = root.split("://", 1)[0] + "://" if storage.is_remote(root) else ""
    try:
        if fs.isfile(single):
            return [prefix + single]
        if fs.isdir(folder):
            files = sorted(p for p in fs.find(folder) if p.endswith(".parquet"))
            if files:
                return [prefix + p for p in files]
    except (PermissionError, OSError) as e:
        raise CatalogError(f"cannot read catalogue {root}: {type(e).__name__}: {e}") from None
    raise CatalogError(f"no products.parquet or products/*.parquet under {root}")


def read_file(uri: str) -> pa.Table:
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except (pa.ArrowInvalid, OSError) as e:
        raise CatalogError(f"cannot read {uri} as parquet: {str(e).splitlines()[0]}") from None


def check_columns(table: pa.Table, uri: str) -> None:
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise CatalogError(f"{uri} lacks required column {missing[0]!r} (has: {', '.join(table.column_names)})")


def _cast_column(table: pa.Table, name: str) -> tuple[pa.Array | None, str | None]:
    """The column as its contract type, or (None, reason) when it cannot be read as that type."""
    col = table.column(name).combine_chunks() if table.num_rows else pa.array([], SCHEMA.field(name).type)
    want = SCHEMA.field(name).type
    if col.type == want:
        return col, None
    if pa.types.is_list(want) != (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        return None, f"{name} has type {col.type}, expected {want}"
    try:
        return col.cast(want), None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None, f"{name} has type {col.type}, expected {want}"


def validate(table: pa.Table, source: str, duplicates: dict[str, int], offset: int = 0) -> tuple[pa.Table, pa.Table]:
    """Split rows of one file into (usable rows in SCHEMA, quarantine rows). ``duplicates``: id -> row count for
    ids that appear more than once in the whole catalogue; ``offset``: row number of the first row in its file."""
    cols, bad_type = {}, None
    for name in COLUMNS:
        cols[name], reason = _cast_column(table, name)
        bad_type = bad_type or reason
    ids = ids_of(table)
    if bad_type:
        q = {"product_id": ids, "reason": [f"{bad_type} (file {source.rsplit('/', 1)[-1]})"] * len(ids),
             "source": [f"{source}#{offset + i}" for i in range(len(ids))]}
        return SCHEMA.empty_table(), pa.table(q, schema=QUARANTINE_SCHEMA)

    titles = cols["title"].to_pylist()
    attrs = cols["attributes"].to_pylist()
    paths = cols["category_path"].to_pylist()
    images = cols["image"].to_pylist()
    good: dict[str, list] = {c: [] for c in COLUMNS}
    quarantine: dict[str, list] = {"product_id": [], "reason": [], "source": []}
    for i, pid in enumerate(ids):
        path, image = paths[i], images[i]
        if pid is None or not pid.strip():
            reason = "missing product_id"
        elif pid in duplicates:
            reason = f"duplicate product_id ({duplicates[pid]} rows)"
        elif not path:
            reason = "empty category_path"
        elif any(p is None or not p.strip() for p in path):
            reason = "blank name in category_path"
        elif image is None or not image.strip():
            reason = "missing image"
        else:
            reason = None
        if reason:
            quarantine["product_id"].append(pid)
            quarantine["reason"].append(reason)
            quarantine["source"].append(f"{source}#{offset + i}")
            continue
        good["product_id"].append(pid)
        good["title"].append(titles[i] or "")
        good["attributes"].append([a for a in (attrs[i] or []) if a is not None and a.strip()])
        good["category_path"].append([p.strip() for p in path])
        good["image"].append(image.strip())
    return pa.table(good, schema=SCHEMA), pa.table(quarantine, schema=QUARANTINE_SCHEMA)


def ids_of(table: pa.Table) -> list[str | None]:
    try:
        return table.column("product_id").cast(pa.string()).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return [None] * table.num_rows


def duplicate_ids(tables: list[pa.Table]) -> dict[str, int]:
    """id -> row count, for ids that appear more than once across all the tables."""
    counts = Counter(v for t in tables for v in ids_of(t) if v is not None)
    return {k: n for k, n in counts.items() if n > 1}
