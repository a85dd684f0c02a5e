"""Vector columns: fixed-size-list Arrow columns to and from (N, D) matrices, and unit rows (cosine = dot)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa


def vector_column(rows: np.ndarray) -> pa.FixedSizeListArray:
    """An (N, D) matrix as a fixed-size-list column (its dtype kept: float32, or float16 for the index's files)."""
    rows = np.asarray(rows)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])


def vectors(column: pa.ChunkedArray | pa.Array, keep_half: bool = False) -> np.ndarray:
    """A fixed-size-list column as a float32 (N, D) matrix (float16 stays float16 with ``keep_half``)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dtype = np.float16 if keep_half and arr.type.value_type == pa.float16() else np.float32
    if len(arr) == 0:
        return np.zeros((0, arr.type.list_size), dtype)
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1).astype(dtype, copy=False)


def unit_rows(x: np.ndarray, block: int = 8192) -> np.ndarray:
    """Rows scaled to unit length, float32 and contiguous (all-zero rows stay zero). In blocks of rows, so no
    temporary as large as ``x`` is made (a whole-array norm cost 0.15-0.5 s at 100k x 512, blocks 0.09 s)."""
    out = np.empty(x.shape, dtype=np.float32)
    for start in range(0, len(x), block):
        rows = np.asarray(x[start:start + block], dtype=np.float32)
        norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        np.divide(rows, np.maximum(norms, np.float32(1e-12))[:, None], out=out[start:start + block])
    return out
