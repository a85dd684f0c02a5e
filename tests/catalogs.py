"""A whole catalogue read and validated in one process, with the library's own checks (clipita.catalog): the
reference the converters' and the synthesiser's tests compare their output with. The jobs stream instead."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from clipita.catalog import (QUARANTINE_SCHEMA, SCHEMA, check_columns, duplicate_ids, product_files, read_file,
                             validate)


@dataclass
class Catalog:
    root: str
    products: pa.Table  # usable rows, SCHEMA
    quarantine: pa.Table  # QUARANTINE_SCHEMA
    files: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {"read": self.products.num_rows + self.quarantine.num_rows, "used": self.products.num_rows,
                "quarantined": self.quarantine.num_rows}

    def reasons(self) -> dict[str, int]:
        return dict(Counter(self.quarantine.column("reason").to_pylist()))


def read_catalog(root: str) -> Catalog:
    """Read and validate a whole catalogue's product table (metadata only; images are read by the jobs)."""
    files = product_files(root)
    tables = []
    for uri in files:
        t = read_file(uri)
        check_columns(t, uri)
        tables.append(t)
    dups = duplicate_ids(tables)
    goods, bads = [], []
    for uri, t in zip(files, tables):
        g, b = validate(t, uri, dups)
        goods.append(g)
        bads.append(b)
    return Catalog(root, pa.concat_tables(goods) if goods else SCHEMA.empty_table(),
                   pa.concat_tables(bads) if bads else QUARANTINE_SCHEMA.empty_table(), files)
