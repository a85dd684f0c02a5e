"""Reading what jobs.embed wrote (or a user brought): product features and category embeddings.

Products: ``features/products/*.parquet`` (product_id, title, attributes, category_path, image, image_emb,
title_emb, attr_emb, n_attributes), any number of files. Categories: ``features/categories.parquet`` (category,
name, depth, parent, products, text_name, text_path, clip_name, clip_path): every node of the tree, embedded once.

At marketplace scale no process holds the products: stages read them as a Ray dataset (clipita/streams.py) or one
file per Ray task (``product_files``), and the driver keeps only the tree, a ``Labeler`` and per-category counts
(clipita/census.py). ``load_products`` (everything in one process) is for small catalogues, benchmarks' bare loops
and tests.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipita import storage
from clipita.config import DataConfig, EncoderConfig, section_from_dict
from clipita.tree import CategoryTree, Labeler, Labels, assign_labels
from clipita.vectors import vectors
from clipita.workdir import categories_file, encoders_record, product_features_dir, split_record

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


def split_params(data: DataConfig) -> dict:
    """What decides the split (DataConfig), as split.json records it."""
    return {"seed": data.seed, "val_fraction": data.val_fraction, "test_fraction": data.test_fraction,
            "unseen_fraction": data.unseen_fraction, "unseen_val_fraction": data.val_holdout_fraction}


def write_split(workdir: str, labeler: Labeler, data: DataConfig) -> None:
    """Record the held-out categories (jobs.align, which runs first, decides them from the catalogue scan), so
    that every later stage holds out the same ones whatever quarantine later removes."""
    storage.write_json(split_record(workdir), {"data": split_params(data), "held": sorted(labeler.held),
                                               "held_val": sorted(labeler.held_val)})


def labeler_for(workdir: str, data: DataConfig, tree: CategoryTree | None = None) -> Labeler:
    """The workdir's split and labels as a function of (id, path): the held-out categories of split.json where
    jobs.align recorded them for this data config, else from the features' tree."""
    if storage.exists(split_record(workdir)):
        saved = storage.read_json(split_record(workdir))
        if saved["data"] == split_params(data):
            return Labeler(data.seed, data.val_fraction, data.test_fraction, frozenset(saved["held"]),
                           frozenset(saved["held_val"]))
    return Labeler.build(tree or load_tree(workdir), data.seed, data.val_fraction, data.test_fraction,
                         data.unseen_fraction, unseen_val_fraction=data.val_holdout_fraction)


def labels_for(products: Products, data: DataConfig) -> Labels:
    """Labels of products held in memory (small catalogues and tests)."""
    return assign_labels(products.ids, products.paths, data.seed, data.val_fraction, data.test_fraction,
                         data.unseen_fraction, unseen_val_fraction=data.val_holdout_fraction)
