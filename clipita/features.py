"""Reading what jobs.embed wrote: product features and category embeddings as numpy arrays, with labels.

Products: ``features/products/*.parquet`` (product_id, title, attributes, category_path, image, image_emb,
title_emb, attr_emb, n_attributes). Categories: ``features/categories.parquet`` (category, name, depth, parent,
products, text_name, text_path, clip_name, clip_path): every node of the tree, embedded once.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipita import storage
from clipita.config import DataConfig
from clipita.embed import features_dir, read_parquet_dir
from clipita.tree import Labels, assign_labels


def vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list column as a float32 (N, D) matrix."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(arr) == 0:
        return np.zeros((0, arr.type.list_size), np.float32)
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), -1).astype(np.float32)


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

    def tensors(self) -> dict[str, np.ndarray]:
        """The model's input features (ClipIta batch keys)."""
        return {"image": self.image, "title": self.title, "attributes": self.attributes}


def load_products(workdir: str) -> Products:
    t = read_parquet_dir(storage.join(features_dir(workdir), "products"))
    t = t.sort_by("product_id")  # a stable order whatever the order the parts finished in
    return Products(
        ids=np.asarray(t.column("product_id").to_pylist(), dtype=object),
        titles=np.asarray(t.column("title").to_pylist(), dtype=object),
        images=np.asarray(t.column("image").to_pylist(), dtype=object),
        paths=t.column("category_path").to_pylist(),
        image=vectors(t.column("image_emb")), title=vectors(t.column("title_emb")),
        attributes=vectors(t.column("attr_emb")),
    )


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
    uri = storage.join(features_dir(workdir), "categories.parquet")
    t = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
    return Categories(
        ids=np.asarray(t.column("category").to_pylist(), dtype=object),
        names=np.asarray(t.column("name").to_pylist(), dtype=object),
        text={m: vectors(t.column(f"text_{m}")) for m in ("name", "path")},
        clip={m: vectors(t.column(f"clip_{m}")) for m in ("name", "path")},
    )


def recorded_encoders(workdir: str):
    """The EncoderConfig jobs.embed used for this workdir's features (queries must be embedded alike)."""
    from clipita.config import EncoderConfig, section_from_dict

    return section_from_dict(EncoderConfig, storage.read_json(storage.join(features_dir(workdir), "encoders.json")),
                             "encoders")


def labels_for(products: Products, data: DataConfig) -> Labels:
    return assign_labels(products.ids, products.paths, data.seed, data.val_fraction, data.test_fraction,
                         data.unseen_fraction)
