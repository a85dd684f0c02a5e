"""The alignment stage (jobs.align): e-CLIP's contrastive alignment of the image and text towers on the
catalogue's own image-title pairs (clipita/align.py), before jobs.embed.

1. plan and scan (stages.embed): parts, duplicate ids and the catalogue's path counts, which decide the split;
   ``split.json`` records it, so every later stage holds out the same categories whatever quarantine removes.
2. Ray Data, with nothing per product on the driver: ``ReadParts`` (decode, quarantine reasons, as embed) ->
   ``AlignParts`` (an actor: split, group key, tokens; a locked trunk's output is computed here once, not every
   epoch) -> ``align/cache/<part>.json`` (the part's counts) then ``<part>.parquet`` (its usable rows of every
   split; the parquet file marks the part done, so a re-run skips it).
3. Ray Train: TorchTrainer workers over the train rows (``streaming_split``), one GradCacheStep per global batch
   (``align.batch_size`` over ``align.workers``); rank 0 scores the val pairs after each epoch and writes
   ``resume.pt`` (the trained parameters, the best epoch's and the optimiser: FailureConfig restarts a failed
   group from it, as does a re-run); after the last epoch ``last/`` and ``best/`` (the best val title -> image
   Recall@10), open_clip ``local-dir:`` checkpoints.
4. ``align/metrics.json``: title <-> image Recall@1/5/10 and zero-shot classification (top-1/5 by depth) on test
   products, for ``best/`` and for the towers before alignment; ``curve.png``, ``stats.json``.

Only the train split's pairs train: the val pairs choose ``best/`` and the test pairs are scored at the end.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipita import catalog, storage
from clipita.config import AlignConfig, Config, EncoderConfig
from clipita.features import split_params, write_split
from clipita.runtime import Every, node_cores
from clipita.streams import FeatureSource, products_dataset
from clipita.tree import CategoryTree, Labeler, category_id, unit_hash
from clipita.vectors import vector_column
from clipita.workdir import align_dir, stage_stats

SPLITS = ("train", "val", "test")
KS = (1, 5, 10)
ACTOR_MEMORY = 4 * 2**30  # what an AlignParts actor reserves: both towers and a part's pixels (3.1 GB measured)
CACHE_MB = 1024  # a worker holds its train shard in memory below this, else streams it every epoch


def pair_text(title: str, attributes: list[str] | None, mode: str) -> str:
    """The text side of a pair (align.text): the title, or the title with its attributes."""
    if mode == "title" or not attributes:
        return title
    return f"{title}. {'; '.join(attributes)}"


def _group_ids(uri: str) -> dict[str, str]:
    """product_id -> group_id of a catalogue file with the optional group_id column ({} without it): two columns."""
    fs, path = storage.arrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        if "group_id" not in pf.schema_arrow.names:
            return {}
        t = pf.read(columns=["product_id", "group_id"])
    return {str(p): str(g) for p, g in zip(t.column("product_id").to_pylist(), t.column("group_id").to_pylist())
            if p is not None and g not in (None, "")}


class AlignParts:
    """Actor stage: whole parts (ReadParts' rows) in -> each part's usable rows with their split, group key and
    model inputs (the locked trunks' outputs, else pixels / token ids) written to the cache -> one counts row."""

    def __init__(self, workdir: str, enc: EncoderConfig, ac: AlignConfig, labeler: Labeler, parts: dict,
                 threads: int):
        import torch

        from clipita import align
        from clipita.encoders import PixelNormalizer

        torch.set_num_threads(threads)
        self.workdir, self.ac, self.labeler, self.parts = workdir, ac, labeler, parts
        self._groups: tuple[str, dict] | None = None  # (file, its product_id -> group_id) of the last part
        self.model = align.build_model(enc, ac)
        self.tokenize = align.tokenizer(enc, ac)
        self.cached = {"image": align.cacheable(self.model, "image", ac.image_train),
                       "text": align.cacheable(self.model, "text", ac.text_train)}
        self.normalize = PixelNormalizer(enc)

    def inputs(self, pixels: np.ndarray, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from clipita import align

        tokens = self.tokenize(texts)
        if self.cached["text"]:
            pad = self.model.text.config.pad_token_id
            tokens = np.concatenate([align.trunk_features(self.model, "text", align.trim_padding(
                tokens[i:i + 128], pad)).numpy() for i in range(0, len(texts), 128)])
        else:
            tokens = tokens.numpy().astype(np.int32)  # the context length: one width in every part
        if not self.cached["image"]:
            return pixels.reshape(len(pixels), -1), tokens
        feats = []
        for i in range(0, len(pixels), 64):
            x = self.normalize(torch.tensor(pixels[i:i + 64]))
            feats.append(align.trunk_features(self.model, "image", x).numpy())
        return np.concatenate(feats), tokens

    def write(self, part: str, rows: pa.Table) -> dict:
        from clipita import align

        reasons = rows.column("reason").to_pylist()
        ok = np.array([r == "" for r in reasons], dtype=bool)
        good = rows.filter(pa.array(ok))
        ids, paths = good.column("product_id").to_pylist(), good.column("category_path").to_pylist()
        titles = good.column("title").to_pylist()
        uri = self.parts[part][0]
        if self._groups is None or self._groups[0] != uri:  # parts of one file arrive in order: read it once
            self._groups = (uri, _group_ids(uri))
        groups = self._groups[1]
        texts = [pair_text(t, a, self.ac.text) for t, a in zip(titles, good.column("attributes").to_pylist())]
        split = [self.labeler.split(p, path) for p, path in zip(ids, paths)]
        pixels = rows.column("pixels").combine_chunks().to_numpy()[ok] if good.num_rows else np.zeros((0, 1))
        image_in, text_in = self.inputs(pixels, texts) if good.num_rows else (np.zeros((0, 1), np.uint8),
                                                                              np.zeros((0, 1), np.int32))
        counts = {"part": part, "read": rows.num_rows, **{s: split.count(s) for s in SPLITS},
                  "quarantined": int((~ok).sum()), "grouped": sum(p in groups for p in ids),
                  "reasons": dict(Counter(r for r in reasons if r)),
                  "quarantine": rows.filter(pa.array(~ok)).select(["product_id", "reason", "source"]).to_pylist()}
        storage.write_json(align_dir(self.workdir, "cache", f"{part}.json"), counts)
        table = pa.table({"product_id": ids, "split": split, "category_path": paths, "text": texts, "title": titles,
                          "attributes": good.column("attributes"), "image": good.column("image"),
                          "group": pa.array([align.group_key(groups.get(p), t) for p, t in zip(ids, titles)],
                                            pa.int64()),
                          "image_in": vector_column(image_in), "text_in": vector_column(text_in)})
        storage.write_parquet(align_dir(self.workdir, "cache", f"{part}.parquet"), table)
        return counts

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for part in pc.unique(batch.column("part")).to_pylist():
            rows = batch.filter(pc.equal(batch.column("part"), part))
            _, start, stop = self.parts[part]
            if rows.num_rows != stop - start:  # a part split across blocks would be cached incomplete
                raise RuntimeError(f"align: part {part} arrived with {rows.num_rows} of {stop - start} rows")
            out.append(json.dumps(self.write(part, rows)))
        return pa.table({"counts": pa.array(out, pa.string())})


def cache_parts(catalog_root: str, workdir: str, cfg: Config, log=print) -> tuple[Labeler, CategoryTree, dict]:
    """Steps 1-2: the split from the catalogue scan (written to split.json) and every part's rows in the cache.
    Returns the labeler, the catalogue's tree and the counts over every part (this run's and earlier ones')."""
    import ray
    import ray.data

    from clipita.encoders import image_preprocess_spec
    from clipita.stages.embed import ReadParts, plan_parts, scan_catalog

    ec, ac = cfg.embed, cfg.align
    parts = plan_parts(catalog_root, ec.part_rows)
    dups, paths = scan_catalog(parts)
    if not paths:
        raise catalog.CatalogError(f"no product of {catalog_root} has a valid category_path: nothing to align")
    tree = CategoryTree.from_counts(paths)
    d = cfg.data
    labeler = Labeler.build(tree, d.seed, d.val_fraction, d.test_fraction, d.unseen_fraction,
                            unseen_val_fraction=d.val_holdout_fraction)
    write_split(workdir, labeler, d)
    # what the cached rows depend on: a re-run with other towers, text or modes must not mix them with these
    from clipita import align

    mc = align.model_config(cfg.encoders, ac)
    record = {"encoders": dataclasses.asdict(cfg.encoders), "text": ac.text, "text_tower": align.text_tower(
        cfg.encoders, ac), "embed_dim": ac.embed_dim, "part_rows": ec.part_rows, "split": split_params(d),
        "image_cached": ac.image_train == "lock" and "timm_model_name" in mc["vision_cfg"],
        "text_cached": ac.text_train == "lock" and bool(mc.get("custom_text"))}
    recorded = align_dir(workdir, "cache", "config.json")
    if storage.exists(recorded) and storage.read_json(recorded) != record:
        raise ValueError(f"{align_dir(workdir)} holds alignment of other towers, texts or modes ({recorded}): use a "
                         "new workdir, or delete its align/ folder")
    storage.write_json(recorded, record)
    done = {f.rsplit("/", 1)[-1][:-len(".parquet")] for f in storage.parquet_files(align_dir(workdir, "cache"))}
    todo = [p for p in parts if p.name not in done]
    log(f"align: {len(parts)} parts ({sum(p.stop - p.start for p in parts)} rows) in {catalog_root}; "
        f"{len(parts) - len(todo)} already cached, {len(todo)} to read")
    if todo:
        image_size, _, _ = image_preprocess_spec(cfg.encoders)
        ctx = ray.data.DataContext.get_current()
        ctx.target_max_block_size = max(ctx.target_max_block_size or 0, 2 * ec.part_rows * image_size ** 2 * 3)
        items = [{"name": p.name, "file": p.file, "start": p.start, "stop": p.stop} for p in todo]
        spans = {p.name: (p.file, p.start, p.stop) for p in todo}
        actors = max(1, min(ec.max_actors, len(todo)))
        threads = ec.torch_threads or max(1, node_cores() // actors)
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(ReadParts, batch_size=1, fn_constructor_args=(catalog_root, dups, image_size, ec),
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(ec.read_workers, len(todo))),
                            num_cpus=ec.read_cpus or 0.25)
        ds = ds.map_batches(AlignParts, batch_size=None, batch_format="pyarrow",
                            fn_constructor_args=(workdir, cfg.encoders, ac, labeler, spans, threads),
                            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                            num_cpus=ec.cpus_per_actor, memory=ACTOR_MEMORY)
        every, rows, t0 = Every(10), 0, time.time()
        total = sum(p.stop - p.start for p in todo)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows += sum(json.loads(c)["read"] for c in batch.column("counts").to_pylist())
            if every():
                log(f"align: cached {rows}/{total} rows, {rows / (time.time() - t0):.1f} rows/s")
    totals: Counter = Counter()
    reasons: Counter = Counter()
    for p in parts:  # one small json per part
        c = storage.read_json(align_dir(workdir, "cache", f"{p.name}.json"))
        reasons.update(c.pop("reasons"))
        c.pop("part"), c.pop("quarantine")
        totals.update(c)
    counts = {**{k: totals[k] for k in ("read", *SPLITS, "quarantined", "grouped")}, "reasons": dict(reasons)}
    if counts["read"] != sum(counts[s] for s in SPLITS) + counts["quarantined"]:
        raise RuntimeError(f"align: rows not accounted for: {counts}")
    return labeler, tree, counts


# ------------------------------------------------------------------------------------------- the workers

def _keep(batch: pa.Table, split: str, keep_fraction: float = 1.0, seed: int = 0) -> np.ndarray:
    """Rows of one split (a seeded sample of ``keep_fraction``, the same one in every process)."""
    return np.array([s == split and (keep_fraction >= 1 or unit_hash(seed, "align", p) < keep_fraction)
                     for s, p in zip(batch.column("split").to_pylist(), batch.column("product_id").to_pylist())],
                    dtype=bool)


def _arrays(batch: pa.Table, keep: np.ndarray, categories: dict[str, int] | None = None,
            depths: int = 0) -> dict[str, np.ndarray]:
    """Cache rows as the workers' numpy inputs: image_in / text_in (N, width), group (N,); with ``categories``
    (category -> its number among its depth's), ``depth<d>`` (N,): the number of each row's category at depth d
    (-1: its path is shorter)."""
    out = {k: batch.column(k).combine_chunks().flatten().to_numpy(zero_copy_only=False)
           .reshape(batch.num_rows, -1)[keep] for k in ("image_in", "text_in")}
    out["group"] = batch.column("group").to_numpy()[keep]
    if categories is not None:
        paths = [p for p, k in zip(batch.column("category_path").to_pylist(), keep) if k]
        for d in range(1, depths + 1):
            out[f"depth{d}"] = np.array([categories[category_id(p[:d])] if len(p) >= d else -1 for p in paths],
                                        dtype=np.int64)
    return out


def _rows(split: str, keep_fraction: float = 1.0, seed: int = 0, categories: dict | None = None, depths: int = 0):
    """Read-task transform: the cache rows of one split as numpy."""
    return lambda batch: _arrays(batch, _keep(batch, split, keep_fraction, seed), categories, depths)


class _Towers:
    """The model's two sides as GradCacheStep encoders of cache rows: a cached side through its projection only,
    the other through its whole tower (pixels normalised on the device, as embed does)."""

    def __init__(self, model, enc: EncoderConfig, cached: dict, device, image_size: int):
        from clipita.encoders import PixelNormalizer

        self.model, self.cached, self.device, self.size = model, cached, device, image_size
        self.normalize = PixelNormalizer(enc, device)

    def tensors(self, rows: dict) -> tuple:
        import torch

        img = torch.as_tensor(np.array(rows["image_in"]), device=self.device)
        if not self.cached["image"]:
            img = img.view(-1, self.size, self.size, 3)
        txt = torch.as_tensor(np.array(rows["text_in"], dtype=np.float32 if self.cached["text"] else np.int64),
                              device=self.device)
        return img, txt, torch.as_tensor(np.array(rows["group"]), device=self.device)

    def image(self, x):
        from clipita import align

        if self.cached["image"]:
            return align.head(self.model, "image", x.float())
        return self.model.encode_image(self.normalize(x), normalize=True)

    def text(self, x):
        from clipita import align

        if self.cached["text"]:
            return align.head(self.model, "text", x)
        if hasattr(getattr(self.model, "text", None), "pooler"):  # a masked HF tower (a CLIP tower needs all 77)
            x = align.trim_padding(x, self.model.text.config.pad_token_id)
        return self.model.encode_text(x, normalize=True)

    def embed(self, rows: dict, batch: int = 256) -> tuple:
        """(image, text, group) of rows, without a graph, in the model's current state."""
        import torch

        img, txt, grp = self.tensors(rows)
        with torch.no_grad():
            return (torch.cat([self.image(img[i:i + batch]) for i in range(0, len(img), batch)]).float(),
                    torch.cat([self.text(txt[i:i + batch]) for i in range(0, len(txt), batch)]).float(), grp)


def recall(queries, keys, query_groups, key_groups, ks=KS) -> dict[int, float]:
    """Recall@k (%) of each query's pair: a hit when a key of the query's group (its own pair, or a listing of the
    same product) is among its k most similar keys."""
    if not len(queries):
        return {k: float("nan") for k in ks}
    top = (queries @ keys.T).topk(min(max(ks), len(keys)), dim=1).indices
    hit = key_groups[top] == query_groups[:, None]
    return {k: round(100 * float(hit[:, :k].any(dim=1).float().mean()), 2) for k in ks}


def _save(model, uri: str, enc: EncoderConfig, ac: AlignConfig, extra: dict, optimizer=None) -> None:
    """An open_clip checkpoint folder at ``uri`` (local or object storage), the optimiser's state beside it."""
    import torch

    from clipita import align

    with tempfile.TemporaryDirectory() as tmp:
        local = uri if not storage.is_remote(uri) else tmp
        align.save_checkpoint(model, local, enc, ac, extra)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), os.path.join(local, "optimizer.pt"))
        if storage.is_remote(uri):
            for name in sorted(os.listdir(tmp), key=lambda n: n == align.CONFIG_FILE):  # the record last
                with open(os.path.join(tmp, name), "rb") as f:
                    storage.write_bytes(storage.join(uri, name), f.read())


def align_loop(config: dict) -> None:
    """Runs in every Ray Train worker: epochs of GradCache steps over this worker's shard of the train pairs."""
    import ray.train
    import ray.train.torch
    import torch

    from clipita import align
    from clipita.loss import ContrastiveLoss
    from clipita.stages.train import _fail_if_asked, _load_all

    enc, ac = EncoderConfig(**config["encoders"]), AlignConfig(**config["align"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = ac.use_gpu and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if not use_gpu:
        torch.set_num_threads(max(1, node_cores() // ctx.get_local_world_size()))
    model = align.build_model(enc, ac, seed=config["seed"])
    trainable = align.set_trainable(model, ac.image_train, ac.text_train)
    align.train_mode(model).to(device)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}  # the unaligned towers
    if rank == 0:
        print(f"align: trainable parameters: image {trainable['image']:,}, text {trainable['text']:,}", flush=True)
    optimizer = align.make_optimizer(model, ac)
    history, best, start = [], -1.0, 0

    def trained() -> dict:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    best_state = trained()
    if storage.exists(config["resume"]):  # a restarted group or a re-run: on from the last finished epoch
        state = torch.load(io.BytesIO(storage.read_bytes(config["resume"])), map_location=device, weights_only=True)
        _load_trained(model, state["trained"])
        optimizer.load_state_dict(state["optimizer"])
        best_state, history, best, start = state["best_trained"], state["history"], state["best"], state["epoch"]
        if rank == 0:
            print(f"align: resuming after epoch {start}", flush=True)
    towers = _Towers(model, enc, config["cached"], device, config["image_size"])
    loss_fn = ContrastiveLoss(0.5, label_mask=ac.groups == "mask", gather=True)
    step = align.GradCacheStep(model, loss_fn, ac.chunk, towers.image, towers.text)
    shard = ray.train.get_dataset_shard("train")
    cached = _load_all(shard) if config["in_memory"] else None
    val = _load_all(ray.train.get_dataset_shard("val")) if rank == 0 else {}
    per_worker = config["batch"] // world
    autocast = torch.autocast("cuda", torch.bfloat16) if use_gpu else None
    for epoch in range(start, ac.epochs):
        _fail_if_asked(config, epoch, rank, world)
        t0, losses = time.time(), []
        if cached is not None:
            perm = np.random.default_rng([config["seed"], epoch, rank]).permutation(len(cached["group"]))
            batches = ({k: v[perm[s:s + per_worker]] for k, v in cached.items()}
                       for s in range(0, len(perm) - per_worker + 1, per_worker))
        else:
            batches = shard.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True,
                                         local_shuffle_buffer_size=4 * per_worker,
                                         local_shuffle_seed=config["seed"] + epoch)
        for rows in batches:
            losses.append(align.train_step(model, step, optimizer, *towers.tensors(rows), autocast=autocast))
        seconds = time.time() - t0
        if rank == 0:
            vi, vt, vg = towers.embed(val)
            with torch.no_grad():
                val_loss = float(ContrastiveLoss(0.5, label_mask=ac.groups == "mask", gather=False)(
                    vi, vt, model.logit_scale, vg))
            t2i, i2t = recall(vt, vi, vg, vg), recall(vi, vt, vg, vg)
            h = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                 "val_loss": val_loss, "val_r10": t2i[10], "val_r10_i2t": i2t[10], "steps": len(losses),
                 "samples_per_s": round(len(losses) * config["batch"] / seconds, 1) if seconds > 0 else None,
                 "temperature": round(1 / model.logit_scale.exp().item(), 4), "seconds": round(seconds, 2)}
            history.append(h)
            improved = h["val_r10"] > best
            best = max(best, h["val_r10"])
            if improved:
                best_state = trained()
            # what trains and the optimiser only (the towers' frozen weights are the build's): a few MB an epoch
            buf = io.BytesIO()
            torch.save({"trained": trained(), "best_trained": best_state, "optimizer": optimizer.state_dict(),
                        "history": history, "best": best, "epoch": epoch + 1}, buf)
            storage.write_bytes(config["resume"], buf.getvalue())
            print(f"align: epoch {epoch + 1}/{ac.epochs} {seconds:.1f} s, {len(losses)} steps, "
                  f"{h['samples_per_s']} pairs/s; train/val loss {h['train_loss']:.3f}/{val_loss:.3f}, val "
                  f"title->image R@10 {t2i[10]:.1f} (image->title {i2t[10]:.1f}){' best' if improved else ''}",
                  flush=True)
        ray.train.report({"epoch": epoch + 1})
    if rank != 0:
        return
    extra = {"epoch": len(history), "history": history, "best": best, "align": dataclasses.asdict(ac)}
    _save(model, config["last"], enc, ac, extra, optimizer)  # the open_clip checkpoints, once per run
    _load_trained(model, best_state)
    _save(model, config["best"], enc, ac, dict(extra, epoch=max(history, key=lambda h: h["val_r10"])["epoch"]))
    # step 4: the test pairs, best/ against the towers before alignment
    test = _load_all(ray.train.get_dataset_shard("test")) if config["test_rows"] else {}
    tokenize = align.tokenizer(enc, ac)
    metrics = {"test_pairs": len(test.get("group", [])), "pool": "test products"}
    for name, state in (("aligned", best_state), ("unaligned", before)):
        _load_trained(model, state)
        metrics[name] = score_towers(towers, test, config["prompts"], tokenize) if metrics["test_pairs"] else {}
    storage.write_json(config["metrics"], metrics)


def _load_trained(model, state: dict) -> None:
    """Copy the trained parameters of ``state`` (name -> tensor) into ``model``."""
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


def finished(workdir: str, epochs: int) -> bool:
    last = align_dir(workdir, "last", "open_clip_config.json")
    return (storage.exists(align_dir(workdir, "best", "open_clip_config.json")) and storage.exists(last)
            and storage.read_json(last)["clipita"]["epoch"] >= epochs)


def train_towers(workdir: str, cfg: Config, tree: CategoryTree, counts: dict, log=print) -> None:
    """Steps 3-4: Ray Train over the cached train pairs, to align.epochs (resuming from resume.pt); then rank 0 scores
    the test pairs into align/metrics.json."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from clipita.encoders import image_preprocess_spec
    from clipita.stages.train import FAIL_AT_EPOCH_ENV, FAIL_MARKER_ENV

    ac, enc = cfg.align, cfg.encoders
    n_train, n_val = counts["train"], counts["val"]
    batch = min(ac.batch_size, n_train) // ac.workers * ac.workers
    if batch < 2 or n_val < 2:
        raise ValueError(f"align: {n_train} train / {n_val} val pairs: too few to align {ac.workers} workers "
                         f"(each needs two pairs a batch); add products or set align.enabled=false")
    if batch < ac.batch_size:
        log(f"align: the train split has {n_train} pairs: global batch {batch} (align.batch_size {ac.batch_size})")
    # parts with no usable row hold an empty file whose vector columns have no width: left out of the streams
    files = [f for f in storage.parquet_files(align_dir(workdir, "cache"))
             if pq.read_metadata(storage.filesystem(f)[1], filesystem=storage.arrow_filesystem(f)[0]).num_rows]
    source = FeatureSource(files, ["product_id", "split", "group", "image_in", "text_in", "category_path"])
    record = storage.read_json(align_dir(workdir, "cache", "config.json"))  # what cache_parts cached
    cached = {"image": record["image_cached"], "text": record["text_cached"]}
    depths = max(n.depth for n in tree.nodes.values())
    by_depth = [sorted(c for c, n in tree.nodes.items() if n.depth == d) for d in range(1, depths + 1)]
    number = {c: i for cats in by_depth for i, c in enumerate(cats)}
    row_bytes = source.bytes / max(1, counts["train"] + counts["val"] + counts["test"])
    in_memory = n_train / ac.workers * row_bytes <= CACHE_MB * 2**20
    train_ds = products_dataset(source, cfg.data.stream_mb, _rows("train"))
    val_ds = products_dataset(source, cfg.data.stream_mb, _rows("val", min(1.0, ac.eval_rows / n_val), cfg.data.seed))
    test_share = min(1.0, ac.eval_rows / max(1, counts["test"]))
    test_ds = products_dataset(source, cfg.data.stream_mb, _rows("test", test_share, cfg.data.seed, number, depths))
    log(f"align: {ac.image_train}/{ac.text_train} (image/text), {'cached' if cached['image'] else 'streamed'} "
        f"image inputs, {n_train} train / "
        f"{min(n_val, ac.eval_rows)} val pairs, {ac.workers} workers x batch {batch // ac.workers}, {ac.epochs} epochs")
    fs, path = storage.arrow_filesystem(align_dir(workdir))
    cpus = ray.cluster_resources().get("CPU", 0)
    worker_cpus = ac.cpus_per_worker if ac.use_gpu or not cpus else min(ac.cpus_per_worker,
                                                                        max(0.1, (cpus - 1) / ac.workers))
    trainer = TorchTrainer(
        align_loop,
        train_loop_config={"encoders": dataclasses.asdict(enc), "align": dataclasses.asdict(ac), "seed": cfg.data.seed,
                           "cached": cached, "image_size": image_preprocess_spec(enc)[0], "batch": batch,
                           "in_memory": in_memory, "last": align_dir(workdir, "last"),
                           "best": align_dir(workdir, "best"), "resume": align_dir(workdir, "resume.pt"),
                           "metrics": align_dir(workdir, "metrics.json"),
                           "test_rows": counts["test"] > 0,
                           "prompts": [[enc.clip_prompt.format(tree.nodes[c].name) for c in cats] for cats in by_depth],
                           "fail_at_epoch": int(os.environ.get(FAIL_AT_EPOCH_ENV, -1)),
                           "fail_marker": os.environ.get(FAIL_MARKER_ENV)},
        scaling_config=ray.train.ScalingConfig(num_workers=ac.workers, use_gpu=ac.use_gpu,
                                               resources_per_worker=None if ac.use_gpu else {"CPU": worker_cpus}),
        run_config=ray.train.RunConfig(
            name="ray-train", storage_path=path, storage_filesystem=fs if storage.is_remote(workdir) else None,
            failure_config=ray.train.FailureConfig(max_failures=ac.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets={"train": train_ds, "val": val_ds, "test": test_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    trainer.fit()


# ---------------------------------------------------------------------------------------------- scoring

def score_towers(towers: _Towers, rows: dict, prompts: list[list[str]], tokenize) -> dict:
    """Title <-> image Recall@k over ``rows`` (test pairs) and zero-shot classification of their images against
    ``prompts[d - 1]`` (the prompted category names of depth d): top-1 / top-5 accuracy by depth."""
    import torch

    img, txt, grp = towers.embed(rows)
    out = {"title_to_image": recall(txt, img, grp, grp), "image_to_title": recall(img, txt, grp, grp)}
    for d, names in enumerate(prompts, start=1):
        with torch.no_grad():
            cat = torch.cat([towers.model.encode_text(tokenize(names[i:i + 256]).to(towers.device), normalize=True)
                             for i in range(0, len(names), 256)]).float()
        truth = torch.as_tensor(rows[f"depth{d}"], device=img.device)
        have = truth >= 0
        hits = (img[have] @ cat.T).topk(min(5, len(names)), dim=1).indices == truth[have][:, None]
        out[f"zero_shot_depth{d}"] = {"top1": round(100 * float(hits[:, 0].float().mean()), 2) if len(hits) else None,
                                      "top5": round(100 * float(hits.any(dim=1).float().mean()), 2) if len(hits)
                                      else None, "categories": len(names), "products": int(have.sum())}
    return out


def run_align(catalog_root: str, workdir: str, cfg: Config, log=print) -> dict:
    """The whole stage; returns the stats it also writes to align/stats.json."""
    from clipita.stages.train import write_curve_png

    t0 = time.time()
    catalog_root, workdir = storage.absolute(catalog_root), storage.absolute(workdir)
    _, tree, counts = cache_parts(catalog_root, workdir, cfg, log)
    t_cache = time.time() - t0
    if finished(workdir, cfg.align.epochs) and storage.exists(align_dir(workdir, "metrics.json")):
        log(f"align: {align_dir(workdir)} is aligned already ({cfg.align.epochs} epochs); not training again")
    else:
        train_towers(workdir, cfg, tree, counts, log)
    history = storage.read_json(align_dir(workdir, "last", "open_clip_config.json"))["clipita"]["history"]
    write_curve_png(align_dir(workdir, "curve.png"), history, "align",
                    right={"val_r10": "title->image R@10", "val_r10_i2t": "image->title R@10"}, right_label="val %")
    metrics = storage.read_json(align_dir(workdir, "metrics.json"))
    best = max(history, key=lambda h: h["val_r10"])
    rates = [h["samples_per_s"] for h in history if h["samples_per_s"]]
    stats = {"stage": "align", **counts, "held_out": counts["val"] + counts["test"],
             "mode": f"{cfg.align.image_train}/{cfg.align.text_train}", "epochs": len(history),
             "best_epoch": best["epoch"], "best_val_r10": best["val_r10"],
             "pairs_per_s": float(np.median(rates)) if rates else None, "cache_seconds": round(t_cache, 2),
             "seconds": round(time.time() - t0, 2),
             "test_title_to_image_r10": {k: metrics[k].get("title_to_image", {}).get("10")
                                         for k in ("aligned", "unaligned")}}
    storage.write_json(stage_stats(workdir, "align"), stats)
    return stats
