"""The embedding stage: catalogue rows -> frozen image/title/attribute features, streamed with Ray Data.

The unit of work, of output and of resume is a *part*: a slice of ``part_rows`` rows of one catalogue file, named
``f<file>-r<first row>``. Its outputs are ``quarantine/<part>.parquet`` then ``features/products/<part>.parquet``;
a part whose features file exists is finished (an object store PUT is atomic), so a re-run skips it and never
duplicates a product.

Pipeline, with nothing per product on the driver:
1. plan: parts from the files' parquet footers; duplicate ids and the category tree from one Ray task per file
   (ids hashed into buckets, one reduce task per bucket keeps the ids seen twice; paths counted per file);
2. the tree is embedded in a Ray task (``embed_tree``) that runs beside the stream;
3. ``ReadParts`` (CPU workers: read the part's rows, validate them, fetch image bytes with a thread pool, decode
   and resize to uint8) -> ``EmbedParts`` (an autoscaling actor pool, GPU when configured: image + title +
   attribute encoders over a whole part, which it then writes itself) -> the driver reads one small stats row
   per part. Quarantined rows travel with the others (``reason`` set, no pixels) so every row of a part is
   accounted for before it is written;
4. ``features/categories.parquet``: the embedded tree with the product counts of the features (Ray tasks).
"""
from __future__ import annotations

import dataclasses
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipita import catalog, storage
from clipita.config import Config, EmbedConfig, EncoderConfig
from clipita.images import ImageError, load_image
from clipita.runtime import Every, node_cores
from clipita.tree import CategoryTree, category_id, query_text
from clipita.vectors import vector_column, vectors
from clipita.workdir import (align_dir, catalog_record, categories_file, encoders_record, features_dir,
                             product_features_dir, quarantine_dir, stage_stats)

IDS_PER_BUCKET = 2_000_000  # ids one duplicate-finding reduce task holds


@dataclass(frozen=True)
class Part:
    name: str
    file: str
    start: int
    stop: int


def plan_parts(root: str, part_rows: int) -> list[Part]:
    """All parts of the catalogue, from the files' footers (row counts) and schemas."""
    parts = []
    for fi, uri in enumerate(catalog.product_files(root)):
        fs, path = storage.arrow_filesystem(uri)
        try:
            meta = pq.read_metadata(path, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as e:
            raise catalog.CatalogError(f"cannot read {uri} as parquet: {str(e).splitlines()[0]}") from None
        catalog.check_columns(meta.schema.to_arrow_schema().empty_table(), uri)
        for start in range(0, meta.num_rows, part_rows):
            parts.append(Part(f"f{fi:05d}-r{start:09d}", uri, start, min(start + part_rows, meta.num_rows)))
    return parts


def _bucket(product_id: str, buckets: int) -> int:
    return zlib.crc32(product_id.encode()) % buckets  # stable across processes (Python's hash() is not)


def _scan_file(uri: str, buckets: int) -> list:
    """Map side of the catalogue scan: the file's ids split into buckets, and its valid paths counted."""
    fs, path = storage.arrow_filesystem(uri)
    table = pq.read_table(path, columns=["product_id", "category_path"], filesystem=fs)
    out: list = [[] for _ in range(buckets)]
    for pid in catalog.ids_of(table):
        if pid is not None:
            out[_bucket(pid, buckets)].append(pid)
    paths: Counter = Counter()
    try:
        for p in table.column("category_path").to_pylist():
            if p and all(isinstance(n, str) and n.strip() for n in p):
                paths[tuple(n.strip() for n in p)] += 1
    except (TypeError, pa.ArrowInvalid):  # a file with a malformed path column: its rows are quarantined later
        pass
    return [*out, paths]


def _duplicates(*id_lists: list) -> dict[str, int]:
    """Reduce side: ids of one bucket seen more than once (with their row count)."""
    counts = Counter(i for ids in id_lists for i in ids)
    return {k: n for k, n in counts.items() if n > 1}


def scan_catalog(parts: list[Part]) -> tuple[dict[str, int], Counter]:
    """Duplicated ids (id -> rows) over the whole catalogue, and the count of every category path, by Ray tasks:
    no process holds every id (the reduce tasks hold a bucket of ~IDS_PER_BUCKET each)."""
    import ray

    files = sorted({p.file for p in parts})
    rows = sum(p.stop - p.start for p in parts)
    buckets = max(1, -(-rows // IDS_PER_BUCKET))
    scan = ray.remote(num_cpus=1, num_returns=buckets + 1)(_scan_file)
    outs = [scan.remote(f, buckets) for f in files]  # each: buckets id lists + the file's path counts
    reduce = ray.remote(num_cpus=1)(_duplicates)
    dups: dict[str, int] = {}
    for d in ray.get([reduce.remote(*[o[b] for o in outs]) for b in range(buckets)]):
        dups.update(d)
    paths: Counter = Counter()
    for counter in ray.get([o[buckets] for o in outs]):
        paths.update(counter)
    return dups, paths


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
        self._groups: tuple | None = None  # (uri, row groups, first row, table) of the last read

    def rows(self, uri: str, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) of a catalogue file, reading only the row groups that hold them. Parts of one file
        arrive in order, so the last row groups read are kept (metadata only, no images): a file written as one
        large row group is read once per worker, not once per part."""
        fs, path = storage.arrow_filesystem(uri)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            wanted, offset, first = [], 0, None
            for i in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                if offset + n > start and offset < stop:
                    wanted.append(i)
                    first = offset if first is None else first
                offset += n
            if self._groups is None or self._groups[:2] != (uri, tuple(wanted)):
                self._groups = (uri, tuple(wanted), first or 0, pf.read_row_groups(wanted))
        return self._groups[3].slice(start - self._groups[2], stop - start)

    def load(self, location: str) -> tuple[np.ndarray | None, str]:

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


class CachedParts:
    """CPU stage replacing ReadParts where jobs.align cached the part with its locked image trunk's outputs: one
    part in -> its rows (the cache's usable ones, then its quarantined ones with their reasons), the trunk outputs
    in a ``trunk`` column instead of pixels. No image is fetched or decoded again."""

    def __init__(self, workdir: str):
        self.workdir = workdir

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        tables = []
        for name in batch["name"]:
            uri = align_dir(self.workdir, "cache", f"{name}.parquet")
            cache = pq.read_table(storage.filesystem(uri)[1], filesystem=storage.arrow_filesystem(uri)[0])
            bad = storage.read_json(align_dir(self.workdir, "cache", f"{name}.json"))["quarantine"]
            n, width = cache.num_rows, cache.schema.field("image_in").type.list_size
            out = {c: cache.column(c).to_pylist() for c in PRODUCT_COLUMNS}
            for row in bad:
                row = dict(row, title="", attributes=[], category_path=[], image="")
                for c in PRODUCT_COLUMNS:
                    out[c].append(row[c])
            out.update(part=[name] * (n + len(bad)), reason=[""] * n + [r["reason"] for r in bad],
                       source=[""] * n + [r["source"] for r in bad])
            trunk = np.concatenate([vectors(cache.column("image_in")), np.zeros((len(bad), width), np.float32)])
            tables.append(pa.table(out, schema=ROW_SCHEMA).append_column("trunk", vector_column(trunk)))
        return pa.concat_tables(tables)


def from_align_cache(workdir: str, enc: EncoderConfig, todo: list[Part]) -> bool:
    """Whether every part to embed is in jobs.align's cache with the outputs of the locked image trunk of the
    towers embed runs (align/best of this workdir, trained with align.image_train=lock on a timm trunk)."""
    import json

    from clipita.aligned import CONFIG_FILE, aligned_folder

    folder = aligned_folder(enc.image_pretrained) if enc.image_pretrained == align_dir(workdir, "best") else None
    if not folder:
        return False
    with open(f"{folder}/{CONFIG_FILE}") as f:
        record = json.load(f)
    if record["clipita"].get("align", {}).get("image_train") != "lock" or \
            "timm_model_name" not in record["model_cfg"]["vision_cfg"]:
        return False
    return all(storage.exists(align_dir(workdir, "cache", f"{p.name}.parquet")) for p in todo)


PRODUCT_COLUMNS = ("product_id", "title", "attributes", "category_path", "image")
ROW_SCHEMA = catalog.SCHEMA.append(pa.field("part", pa.string())).append(pa.field("reason", pa.string())) \
    .append(pa.field("source", pa.string()))


def _append(out: dict[str, list], row: dict) -> None:
    for c in out:
        out[c].append(row[c])


def torch_threads(cfg: EmbedConfig) -> int:
    """Threads of a CPU encoder: ``embed.torch_threads``, else this node's cores shared by the encoder actors (the
    read actors reserve little CPU and mostly wait on storage, so the cores they leave idle go to the encoder)."""
    return cfg.torch_threads or max(1, int(cfg.cpus_per_actor), node_cores() // cfg.max_actors)


class EmbedParts:
    """Actor stage: whole parts in -> the frozen encoders over their usable rows -> each part written (quarantine
    first, then features) -> one stats row per part out. Writing here, not on the driver, keeps every product off
    the driver."""

    def __init__(self, workdir: str, enc: EncoderConfig, cfg: EmbedConfig, expected: dict[str, int]):
        import torch

        from clipita.encoders import ImageEncoder, TextEncoder

        if cfg.gpus_per_actor == 0:
            torch.set_num_threads(torch_threads(cfg))
        self.workdir, self.expected, self.batch_size = workdir, expected, cfg.batch_size
        self.image_batch = cfg.image_batch
        self.image, self.text = ImageEncoder(enc), TextEncoder(enc)
        self.dtype = np.dtype(cfg.dtype)

    def encode(self, rows: pa.Table) -> pa.Table:
        ok = np.asarray(rows.column("reason").to_pylist()) == ""
        n = len(ok)
        image = np.zeros((n, self.image.dim), self.dtype)
        title = np.zeros((n, self.text.dim), self.dtype)
        attrs = np.zeros((n, self.text.dim), self.dtype)
        if ok.any() and "trunk" in rows.column_names:  # CachedParts: the locked trunk ran in jobs.align
            image[ok] = self.image.encode_trunk(vectors(rows.column("trunk"))[ok])
        elif ok.any():
            pixels = rows.column("pixels").combine_chunks().to_numpy()
            image[ok] = self.image.encode(pixels[ok], self.image_batch)
        if ok.any():
            title[ok] = self.text.encode([t for t, k in zip(rows.column("title").to_pylist(), ok) if k],
                                         self.batch_size)
            attrs[ok] = self.text.encode_attributes(
                [a for a, k in zip(rows.column("attributes").to_pylist(), ok) if k], self.batch_size)
        out = rows.drop_columns([c for c in ("pixels", "trunk") if c in rows.column_names])
        for name, values in (("image_emb", image), ("title_emb", title), ("attr_emb", attrs)):
            out = out.append_column(name, vector_column(values))
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats: dict[str, list] = {"part": [], "used": [], "quarantined": []}
        for part in pc.unique(batch.column("part")).to_pylist():
            rows = batch.filter(pc.equal(batch.column("part"), part))
            if rows.num_rows != self.expected[part]:  # a part split across blocks would be written incomplete
                raise RuntimeError(f"embed: part {part} arrived with {rows.num_rows} of {self.expected[part]} rows")
            used, quarantined = write_part(self.workdir, part, self.encode(rows))
            for k, v in (("part", part), ("used", used), ("quarantined", quarantined)):
                stats[k].append(v)
        return pa.table(stats, schema=pa.schema([("part", pa.string()), ("used", pa.int64()),
                                                 ("quarantined", pa.int64())]))


def write_part(workdir: str, part: str, rows: pa.Table) -> tuple[int, int]:
    """Write one finished part: quarantine first, then features (whose existence marks the part done)."""
    ok = pc.equal(rows.column("reason"), "")
    bad = rows.filter(pc.invert(ok))
    storage.write_parquet(storage.join(quarantine_dir(workdir), f"{part}.parquet"),
                   bad.select(["product_id", "reason", "source"]).cast(catalog.QUARANTINE_SCHEMA))
    good = rows.filter(ok).drop_columns(["part", "reason", "source"])
    good = good.append_column("n_attributes", pc.cast(pc.list_value_length(good.column("attributes")), pa.int32()))
    storage.write_parquet(storage.join(product_features_dir(workdir), f"{part}.parquet"), good)
    return good.num_rows, bad.num_rows


def finished_parts(workdir: str) -> set[str]:
    return {p.rsplit("/", 1)[-1][: -len(".parquet")] for p in storage.parquet_files(storage.join(features_dir(workdir),
                                                                                           "products"))}


def embed_tree(paths: list[tuple[str, ...]], cfg: Config) -> pa.Table:
    """Every node of the tree of ``paths``: name and full-path texts embedded with the sentence encoder (for the
    trained heads and MPNet) and the CLIP text tower (for zero-shot CLIP). Runs as a Ray task beside the stream."""
    from clipita.encoders import ImageEncoder, TextEncoder

    tree = CategoryTree(paths)
    ids = sorted(tree.nodes)
    names = [query_text(c, "name") for c in ids]
    text, image = TextEncoder(cfg.encoders), ImageEncoder(cfg.encoders)
    prompt = cfg.encoders.clip_prompt
    return pa.table({
        "category": ids, "name": names, "depth": [tree.depth(c) for c in ids],
        "parent": [tree.parent(c) for c in ids],
        "text_name": vector_column(text.encode(names)), "text_path": vector_column(text.encode(ids)),
        "clip_name": vector_column(image.encode_text([prompt.format(n) for n in names])),
        "clip_path": vector_column(image.encode_text([prompt.format(c) for c in ids])),
    })


def _count_outputs(features: list[str], quarantine: list[str]) -> tuple[int, Counter, Counter]:
    """Rows of feature files (from their footers), their category nodes, and the quarantine reasons."""
    used, nodes, reasons = 0, Counter(), Counter()
    afs = None
    for f in features:
        afs = afs or storage.arrow_filesystem(f)[0]
        t = pq.read_table(storage.filesystem(f)[1], columns=["category_path"], filesystem=afs)
        used += t.num_rows
        for path in t.column("category_path").to_pylist():
            nodes.update(category_id(path[:d]) for d in range(1, len(path) + 1))
    for f in quarantine:
        afs = afs or storage.arrow_filesystem(f)[0]
        reasons.update(pq.read_table(storage.filesystem(f)[1], columns=["reason"], filesystem=afs)
                       .column("reason").to_pylist())
    return used, nodes, reasons


def count_outputs(workdir: str, files_per_task: int = 64) -> tuple[int, Counter, Counter]:
    """Products written, products per category node and quarantine reasons over every finished part (this run's
    and earlier ones'), by Ray tasks over the files."""
    import ray

    feats = storage.parquet_files(product_features_dir(workdir))
    quarantine = storage.parquet_files(quarantine_dir(workdir))
    task = ray.remote(num_cpus=1)(_count_outputs)
    refs = [task.remote(feats[i:i + files_per_task], []) for i in range(0, len(feats), files_per_task)]
    refs += [task.remote([], quarantine[i:i + files_per_task]) for i in range(0, len(quarantine), files_per_task)]
    used, nodes, reasons = 0, Counter(), Counter()
    for u, n, r in ray.get(refs):
        used, nodes, reasons = used + u, nodes + n, reasons + r
    return used, nodes, reasons


def with_aligned_towers(workdir: str, cfg: Config, log=print) -> Config:
    """cfg with the workdir's aligned towers (jobs.align's ``align/best``) as the image model, unless
    align.enabled is false (the paper's frozen towers) or encoders.image_pretrained names aligned towers itself."""
    from clipita.aligned import CONFIG_FILE, aligned_folder

    best = align_dir(workdir, "best")
    if not cfg.align.enabled or aligned_folder(cfg.encoders.image_pretrained) or \
            not storage.exists(storage.join(best, CONFIG_FILE)):
        return cfg
    log(f"embed: image and zero-shot text towers: the aligned ones in {best} (jobs.align; align.enabled=false "
        "keeps the frozen ones)")
    return dataclasses.replace(cfg, encoders=dataclasses.replace(cfg.encoders, image_pretrained=best))


def run_embed(catalog_root: str, workdir: str, cfg: Config, log=print) -> dict:
    """The whole stage; returns the stats it also writes to features/stats.json."""
    import ray
    import ray.data

    from clipita.encoders import image_preprocess_spec

    t0 = time.time()
    ec = cfg.embed
    catalog_root, workdir = storage.absolute(catalog_root), storage.absolute(workdir)
    cfg = with_aligned_towers(workdir, cfg, log)
    parts = plan_parts(catalog_root, ec.part_rows)
    storage.write_json(catalog_record(workdir), {"catalog": catalog_root})
    recorded = encoders_record(workdir)
    if storage.exists(recorded) and storage.read_json(recorded) != dataclasses.asdict(cfg.encoders):
        raise ValueError(f"{workdir} holds features of other encoders ({recorded}): use a new workdir or the "
                         f"same encoders config")
    storage.write_json(recorded, dataclasses.asdict(cfg.encoders))  # serving embeds queries with the same ones
    done = finished_parts(workdir)
    todo = [p for p in parts if p.name not in done]
    log(f"embed: {len(parts)} parts ({sum(p.stop - p.start for p in parts)} rows) in {catalog_root}; "
        f"{len(parts) - len(todo)} already finished, {len(todo)} to do")
    categories_uri = categories_file(workdir)
    tree_ref = None
    used = quarantined = 0
    if todo or not storage.exists(categories_uri):
        dups, paths = scan_catalog(parts)
        if paths:  # the tree is embedded beside the stream, on the encoders' device
            tree_ref = ray.remote(num_cpus=min(1.0, ec.cpus_per_actor), num_gpus=ec.gpus_per_actor or None)(
                embed_tree).remote(sorted(paths), cfg)
    if todo:
        image_size, _, _ = image_preprocess_spec(cfg.encoders)
        ctx = ray.data.DataContext.get_current()
        # a part must reach EmbedParts as one block: never split a block below a whole part's pixels
        ctx.target_max_block_size = max(ctx.target_max_block_size or 0, 2 * ec.part_rows * image_size ** 2 * 3)
        items = [{"name": p.name, "file": p.file, "start": p.start, "stop": p.stop} for p in todo]
        expected = {p.name: p.stop - p.start for p in todo}
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        readers = ray.data.ActorPoolStrategy(min_size=1, max_size=min(ec.read_workers, len(todo)))
        if from_align_cache(workdir, cfg.encoders, todo):
            log("embed: image features from jobs.align's cache of the locked image trunk (no image decoded again)")
            ds = ds.map_batches(CachedParts, batch_size=1, fn_constructor_args=(workdir,), compute=readers,
                                num_cpus=0.25)
        else:
            ds = ds.map_batches(ReadParts, batch_size=1, fn_constructor_args=(catalog_root, dups, image_size, ec),
                                compute=readers, num_cpus=ec.read_cpus or (1.0 if ec.gpus_per_actor else 0.25))
        ds = ds.map_batches(EmbedParts, batch_size=None, fn_constructor_args=(workdir, cfg.encoders, ec, expected),
                            batch_format="pyarrow",
                            compute=ray.data.ActorPoolStrategy(min_size=ec.min_actors, max_size=ec.max_actors),
                            num_cpus=ec.cpus_per_actor, num_gpus=ec.gpus_per_actor or None)
        every, total = Every(10), sum(expected.values())
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            used += pc.sum(batch.column("used")).as_py() or 0
            quarantined += pc.sum(batch.column("quarantined")).as_py() or 0
            if every():
                log(f"embed: {used + quarantined}/{total} rows, {used / (time.time() - t0):.1f} products/s")
    seconds = time.time() - t0
    n_used, nodes, reasons = count_outputs(workdir)
    n_categories = None
    if tree_ref is not None:
        tree = ray.get(tree_ref)
        keep = pa.array([nodes.get(c, 0) > 0 for c in tree.column("category").to_pylist()])
        tree = tree.filter(keep)  # nodes of quarantined rows only: not part of the embedded catalogue's tree
        tree = tree.add_column(4, "products", pa.array([nodes[c] for c in tree.column("category").to_pylist()],
                                                       pa.int64()))
        storage.write_parquet(categories_uri, tree)
        n_categories = tree.num_rows
    stats = {"stage": "embed", "read": sum(p.stop - p.start for p in parts), "used": n_used,
             "quarantined": sum(reasons.values()), "reasons": dict(reasons), "parts": len(parts),
             "parts_this_run": len(todo), "seconds": round(seconds, 2), "embedded_this_run": used,
             "products_per_s": round(used / seconds, 2) if seconds > 0 else None, "categories": n_categories}
    storage.write_json(stage_stats(workdir, "embed"), stats)
    return stats
