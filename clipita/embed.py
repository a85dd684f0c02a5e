"""The embedding stage: catalogue rows -> frozen image/title/attribute features, streamed with Ray Data.

The unit of work, of output and of resume is a *part*: a slice of ``part_rows`` rows of one catalogue file, named
``f<file>-r<first row>``. Its outputs are ``quarantine/<part>.parquet`` then ``features/products/<part>.parquet``;
a part whose features file exists is finished (an object store PUT is atomic), so a re-run skips it and never
duplicates a product.

Pipeline: plan parts on the driver (reads only the product_id column, to find duplicates) -> ``ReadParts`` (CPU
tasks: read the file slice, validate rows, fetch image bytes with a thread pool, decode and resize to uint8) ->
``ProductEmbedder`` (an autoscaling actor pool, GPU when configured: image + title + attribute encoders) -> the
driver gathers rows by part and writes each part as soon as all its rows have arrived. Quarantined rows travel
with the others (``reason`` set, no pixels) so every row of a part is accounted for before it is written.
Finally every category of the tree is embedded once (``features/categories.parquet``).
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipita import catalog, storage
from clipita.config import Config, EmbedConfig, EncoderConfig
from clipita.tree import CategoryTree, query_text

PRODUCT_COLUMNS = ("product_id", "title", "attributes", "category_path", "image")


def features_dir(workdir: str) -> str:
    return storage.join(workdir, "features")


@dataclass(frozen=True)
class Part:
    name: str
    file: str
    start: int
    stop: int


def plan_parts(root: str, part_rows: int) -> tuple[list[Part], dict[str, int]]:
    """All parts of the catalogue, and the duplicated ids (id -> rows) across all its files."""
    files = catalog.product_files(root)
    parts, id_tables = [], []
    for fi, uri in enumerate(files):
        fs, path = storage.arrow_filesystem(uri)
        try:
            schema = pq.read_schema(path, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as e:
            raise catalog.CatalogError(f"cannot read {uri} as parquet: {str(e).splitlines()[0]}") from None
        catalog.check_columns(schema.empty_table(), uri)
        ids = pq.read_table(path, columns=["product_id"], filesystem=fs)
        id_tables.append(ids)
        for start in range(0, ids.num_rows, part_rows):
            stop = min(start + part_rows, ids.num_rows)
            parts.append(Part(f"f{fi:05d}-r{start:09d}", uri, start, stop))
    return parts, catalog.duplicate_ids(id_tables)


def _fetch(uri: str, max_bytes: int) -> bytes:
    fs, path = storage.filesystem(uri)
    size = fs.size(path)
    if size is not None and size > max_bytes:
        raise ValueError(f"image file too large ({size} bytes)")
    with fs.open(path, "rb") as f:
        return f.read()


class ReadParts:
    """CPU stage: one part in -> its rows out, images decoded to uint8 (S, S, 3), bad rows with a reason."""

    def __init__(self, root: str, duplicates: dict[str, int], image_size: int, cfg: EmbedConfig):
        self.root, self.duplicates, self.size, self.cfg = root, duplicates, image_size, cfg
        self.pool = ThreadPoolExecutor(cfg.fetch_threads)
        self._file: tuple[str, pa.Table] | None = None

    def rows(self, uri: str, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) of a catalogue file. Parts of one file arrive in order, so keeping the last file's
        product table (metadata only, no images) reads each file once per worker instead of once per part."""
        if self._file is None or self._file[0] != uri:
            fs, path = storage.arrow_filesystem(uri)
            self._file = (uri, pq.read_table(path, filesystem=fs))
        return self._file[1].slice(start, stop - start)

    def load(self, location: str) -> tuple[np.ndarray | None, str]:
        from clipita.encoders import ImageError, load_image

        uri = storage.resolve(self.root, location)
        try:
            data = _fetch(uri, self.cfg.max_image_bytes)
        except FileNotFoundError:
            return None, "image not found"
        except ValueError as e:
            return None, str(e)
        except Exception as e:  # noqa: BLE001 - any storage failure is this row's problem, not the job's
            return None, f"image unreadable ({type(e).__name__})"
        try:
            return load_image(data, self.size), ""
        except ImageError as e:
            return None, str(e)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        out: dict[str, list] = {c: [] for c in (*PRODUCT_COLUMNS, "part", "reason", "source")}
        pixels: list[np.ndarray | None] = []
        for name, uri, start, stop in zip(batch["name"], batch["file"], batch["start"], batch["stop"]):
            good, bad = catalog.validate(self.rows(uri, int(start), int(stop)), uri, self.duplicates,
                                         offset=int(start))
            for row in bad.to_pylist():
                row.update(title="", attributes=[], category_path=[], image="", part=name,
                           product_id=row["product_id"] or "")
                _append(out, row)
                pixels.append(None)
            rows = good.to_pylist()
            for row, (image, reason) in zip(rows, self.pool.map(self.load, [r["image"] for r in rows])):
                _append(out, dict(row, part=name, reason=reason, source=""))
                pixels.append(image)
        from ray.data.extensions import ArrowTensorArray

        blank = np.zeros((self.size, self.size, 3), np.uint8)
        table = pa.table(out, schema=ROW_SCHEMA)
        return table.append_column("pixels", ArrowTensorArray.from_numpy(
            np.stack([blank if p is None else p for p in pixels]) if pixels else
            np.zeros((0, self.size, self.size, 3), np.uint8)))


ROW_SCHEMA = catalog.SCHEMA.append(pa.field("part", pa.string())).append(pa.field("reason", pa.string())) \
    .append(pa.field("source", pa.string()))


def _append(out: dict[str, list], row: dict) -> None:
    for c in out:
        out[c].append(row[c])


class ProductEmbedder:
    """Actor stage: frozen image, title and attribute encoders over a batch of rows (rows with a reason skip)."""

    def __init__(self, enc: EncoderConfig, cfg: EmbedConfig):
        import torch

        from clipita.encoders import ImageEncoder, TextEncoder

        if cfg.gpus_per_actor == 0 and cfg.cpus_per_actor >= 1:
            torch.set_num_threads(int(cfg.cpus_per_actor))
        self.image, self.text = ImageEncoder(enc), TextEncoder(enc)
        self.dtype = np.dtype(cfg.dtype)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = np.asarray(batch.column("reason").to_pylist()) == ""
        n = len(ok)
        image = np.zeros((n, self.image.dim), self.dtype)
        title = np.zeros((n, self.text.dim), self.dtype)
        attrs = np.zeros((n, self.text.dim), self.dtype)
        if ok.any():
            pixels = batch.column("pixels").combine_chunks().to_numpy()
            image[ok] = self.image.encode(pixels[ok])
            title[ok] = self.text.encode([t for t, k in zip(batch.column("title").to_pylist(), ok) if k])
            attrs[ok] = self.text.encode_attributes(
                [a for a, k in zip(batch.column("attributes").to_pylist(), ok) if k])
        out = batch.drop_columns(["pixels"])
        for name, values in (("image_emb", image), ("title_emb", title), ("attr_emb", attrs)):
            out = out.append_column(name, _vector_column(values))
        return out


def _vector_column(rows: np.ndarray) -> pa.Array:
    flat = pa.array(rows.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])


def _write_parquet(uri: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def write_part(workdir: str, part: str, rows: pa.Table) -> tuple[int, int]:
    """Write one finished part: quarantine first, then features (whose existence marks the part done)."""
    ok = pc.equal(rows.column("reason"), "")
    bad = rows.filter(pc.invert(ok))
    _write_parquet(storage.join(workdir, "quarantine", f"{part}.parquet"),
                   bad.select(["product_id", "reason", "source"]).cast(catalog.QUARANTINE_SCHEMA))
    good = rows.filter(ok).drop_columns(["part", "reason", "source"])
    good = good.append_column("n_attributes", pc.cast(pc.list_value_length(good.column("attributes")), pa.int32()))
    _write_parquet(storage.join(features_dir(workdir), "products", f"{part}.parquet"), good)
    return good.num_rows, bad.num_rows


def finished_parts(workdir: str) -> set[str]:
    fs, path = storage.filesystem(storage.join(features_dir(workdir), "products"))
    try:
        return {p.rsplit("/", 1)[-1][: -len(".parquet")] for p in fs.ls(path, detail=False) if p.endswith(".parquet")}
    except FileNotFoundError:
        return set()


def read_parquet_dir(uri: str, columns: list[str] | None = None) -> pa.Table:
    """All parquet files of a folder (local or s3) as one table, files in name order."""
    fs, path = storage.filesystem(uri)
    try:
        files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        files = []
    if not files:
        raise FileNotFoundError(f"no parquet files under {uri}")
    afs, _ = storage.arrow_filesystem(uri)
    return pa.concat_tables([pq.read_table(f, columns=columns, filesystem=afs) for f in files])


def embed_categories(workdir: str, cfg: Config) -> int:
    """Embed every node of the category tree of the embedded products: name and full-path texts, with the
    sentence encoder (for the trained heads and MPNet) and the CLIP text tower (for zero-shot CLIP)."""
    from clipita.encoders import ImageEncoder, TextEncoder

    paths = read_parquet_dir(storage.join(features_dir(workdir), "products"), ["category_path"])
    tree = CategoryTree(paths.column("category_path").to_pylist())
    ids = sorted(tree.nodes)
    if not ids:  # nothing usable was embedded: there is no tree to embed
        return 0
    names = [query_text(c, "name") for c in ids]
    text, image = TextEncoder(cfg.encoders), ImageEncoder(cfg.encoders)
    prompt = cfg.encoders.clip_prompt
    table = pa.table({
        "category": ids, "name": names, "depth": [tree.depth(c) for c in ids],
        "parent": [tree.parent(c) for c in ids], "products": [tree.nodes[c].products for c in ids],
        "text_name": _vector_column(text.encode(names)), "text_path": _vector_column(text.encode(ids)),
        "clip_name": _vector_column(image.encode_text([prompt.format(n) for n in names])),
        "clip_path": _vector_column(image.encode_text([prompt.format(c) for c in ids])),
    })
    _write_parquet(storage.join(features_dir(workdir), "categories.parquet"), table)
    return len(ids)


def run_embed(catalog_root: str, workdir: str, cfg: Config, log=print) -> dict:
    """The whole stage; returns the stats it also writes to features/stats.json."""
    import ray
    import ray.data

    from clipita.encoders import image_preprocess_spec

    t0 = time.time()
    ec = cfg.embed
    catalog_root, workdir = storage.absolute(catalog_root), storage.absolute(workdir)
    parts, dups = plan_parts(catalog_root, ec.part_rows)
    storage.write_json(storage.join(workdir, "catalog.json"), {"catalog": catalog_root})
    recorded = storage.join(features_dir(workdir), "encoders.json")
    if storage.exists(recorded) and storage.read_json(recorded) != dataclasses.asdict(cfg.encoders):
        raise ValueError(f"{workdir} holds features of other encoders ({recorded}): use a new workdir or the "
                         f"same encoders config")
    storage.write_json(recorded, dataclasses.asdict(cfg.encoders))  # serving embeds queries with the same ones
    done = finished_parts(workdir)
    todo = [p for p in parts if p.name not in done]
    log(f"embed: {len(parts)} parts ({sum(p.stop - p.start for p in parts)} rows) in {catalog_root}; "
        f"{len(parts) - len(todo)} already finished, {len(todo)} to do")
    expected = {p.name: p.stop - p.start for p in todo}
    used = quarantined = 0
    if todo:
        image_size, _, _ = image_preprocess_spec(cfg.encoders)
        items = [{"name": p.name, "file": p.file, "start": p.start, "stop": p.stop} for p in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(ReadParts, batch_size=1, fn_constructor_args=(catalog_root, dups, image_size, ec),
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(ec.read_workers, len(todo))),
                            num_cpus=1)
        ds = ds.map_batches(ProductEmbedder, batch_size=ec.batch_size, fn_constructor_args=(cfg.encoders, ec),
                            batch_format="pyarrow", udf_modifying_row_count=False,
                            compute=ray.data.ActorPoolStrategy(min_size=ec.min_actors, max_size=ec.max_actors),
                            num_cpus=ec.cpus_per_actor, num_gpus=ec.gpus_per_actor or None)
        pending: dict[str, list[pa.Table]] = {}
        counts: dict[str, int] = {}
        last = time.time()
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for part in pc.unique(batch.column("part")).to_pylist():
                rows = batch.filter(pc.equal(batch.column("part"), part))
                pending.setdefault(part, []).append(rows)
                counts[part] = counts.get(part, 0) + rows.num_rows
                if counts[part] == expected[part]:
                    u, q = write_part(workdir, part, pa.concat_tables(pending.pop(part)))
                    used, quarantined = used + u, quarantined + q
            if time.time() - last > 10:
                last = time.time()
                n = used + quarantined
                log(f"embed: {n}/{sum(expected.values())} rows, {used / (last - t0):.1f} products/s")
        if pending:
            raise RuntimeError(f"embed: parts {sorted(pending)[:3]} did not receive all their rows")
    seconds = time.time() - t0
    n_categories = embed_categories(workdir, cfg) if todo or not storage.exists(
        storage.join(features_dir(workdir), "categories.parquet")) else None
    stats = summarise(workdir, parts, seconds, used, len(todo))
    stats["categories"] = n_categories
    storage.write_json(storage.join(features_dir(workdir), "stats.json"), stats)
    return stats


def summarise(workdir: str, parts: list[Part], seconds: float, embedded_now: int, parts_now: int) -> dict:
    """Counts over all finished parts (this run and earlier ones), so a resumed run reports the whole catalogue."""
    used = read_parquet_dir(storage.join(features_dir(workdir), "products"), ["product_id"]).num_rows
    try:
        q = read_parquet_dir(storage.join(workdir, "quarantine"), ["reason"]).column("reason").to_pylist()
    except FileNotFoundError:
        q = []
    reasons: dict[str, int] = {}
    for r in q:
        reasons[r] = reasons.get(r, 0) + 1
    return {"stage": "embed", "read": sum(p.stop - p.start for p in parts), "used": used, "quarantined": len(q),
            "reasons": reasons, "parts": len(parts), "parts_this_run": parts_now, "seconds": round(seconds, 2),
            "embedded_this_run": embedded_now,
            "products_per_s": round(embedded_now / seconds, 2) if seconds > 0 else None}
