"""The training stage: CLIP-I / CLIP-IA / CLIP-ITA heads on the frozen features, with Ray Train (DDP).

Runs are named ``<variant>-<setting>`` and stored under ``<workdir>/checkpoints/<name>/``: ``last/`` (model,
optimizer and history, every ``train.checkpoint_every`` epochs and at the end: what a restart or a re-run resumes
from), ``best/`` (the selected model, safetensors + config.json), ``curve.json`` / ``curve.png`` (train and val
loss and validation R-precision per epoch) and ``stats.json``. A run whose curve holds every epoch (and, for
residual heads, whose best/ has its α) is not trained again.

Model selection (``train.select``, default from ``train.recipe``: clipita/config.py RECIPES). Each epoch worker 0
ranks the validation sample's products for every category that labels one of them, and reports the R-precision
of *seen* categories (some train product carries them) and of *unseen* ones (the held-out validation categories,
data.unseen_val_fraction, plus any other the train split lacks). ``loss`` (the paper's): best/ = the epoch of the
lowest validation loss, as in PAPER.md. ``retrieval`` (residual's): best/ = the epoch of the highest harmonic mean
of the two (the base-to-new convention; the mean of the one that exists when the other has no query; the loss
when neither). Then, for residual heads, after the last epoch the residual scale α of best/ is chosen from
``train.alphas`` on that harmonic mean (WiSE-FT; α = 0 is the zero-shot model; ``alphas=1.0`` keeps the model as
trained) and saved in best/ (its metadata records every α's score). Only the validation split is ever read: the
test split (and its held-out categories) never informs a choice. ``train.kg_weight`` (residual heads; the residual
recipe's default 5) adds KgCoOp's 1 - cos(trained, frozen category vector) to the training loss (model.py
``knowledge_distance``); the validation loss and retrieval leave it out.

One worker group trains every requested run at once (``train_runs``): the group starts once, and each epoch
reads the features once for all runs (every run sees the same products; each takes its own labels and its own
batch size out of the shared loader batch). A run stops early once ``train.patience`` epochs in a row have not
improved its selection (residual recipe: 5; paper: 0, every epoch); the group ends when every run has stopped.

Data, bounded per worker: the train split streams from the features' parquet files through Ray Data
(labels computed in the read tasks) and is cut by ``streaming_split`` into equal shards, one per worker. A worker
whose shard fits ``train.cache_mb`` keeps it in memory after the first pass and reshuffles it each epoch; a
larger shard is re-read every epoch through a local shuffle buffer. The loss is gathered across workers
(clipita.loss), so R workers × B rows train on global batches of R·B. The validation split (a seeded sample of at
most ``train.val_rows`` products) is read by worker 0 only.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time

import numpy as np
import pyarrow as pa

from clipita import metrics, plots, storage
from clipita.census import census
from clipita.config import Config, TrainConfig
from clipita.features import COLUMNS, labeler_for, load_categories, load_tree, product_files, vector_width
from clipita.metrics import count_relevant, hits_from_ranking, per_query_metrics, rank_scores
from clipita.runtime import node_cores
from clipita.streams import FeatureSource, products_dataset
from clipita.tree import SETTINGS, Labeler, unit_hash
from clipita.vectors import vectors
from clipita.workdir import checkpoints_dir, run_dir, run_name

INPUTS = ("image", "title", "attributes")
RELEASE_EVERY = 32  # streamed loader batches between returns of freed Arrow memory to the OS (_epoch_batches)


def finished(workdir: str, variant: str, setting: str, epochs: int) -> bool:
    """Whether the run has trained every epoch or stopped early, and (residual heads) has its α."""
    rd = run_dir(workdir, variant, setting)
    curve, best = storage.join(rd, "curve.json"), storage.join(rd, "best", "config.json")
    if not (storage.exists(curve) and storage.exists(best)):
        return False
    if len(storage.read_json(curve)) < epochs:  # unless it stopped early (train.patience)
        last = storage.join(rd, "last", "config.json")
        if not (storage.exists(last) and storage.read_json(last).get("metadata", {}).get("stopped")):
            return False
    saved = storage.read_json(best)  # residual heads are done once their α is chosen (after the last epoch)
    return not saved["head"].get("residual") or "alpha" in saved.get("metadata", {})


def model_rows(batch: pa.Table, labeler: Labeler, node_index: dict[str, int], split: str,
               keep_fraction: float = 1.0) -> dict[str, np.ndarray]:
    """Ray Data stage of jobs.train, run in the read tasks (this module imports torch only where models run, so
    they start light). One block of feature rows -> the model inputs of its products in ``split``: features
    (float32, or float16 as stored) and, per setting, the label as a category number (``label_<setting>``).
    ``keep_fraction`` samples by a seeded hash."""
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


def head_config(tc: TrainConfig, variant: str, image_dim: int, text_dim: int):
    """The heads of one run. recipe=paper: plain heads exactly as PAPER.md (and this project before issue 12);
    recipe=residual: residual heads in the text space (output_dim = text_dim), except CLIP-I, which has no text
    input to pass through and keeps a plain head (with the recipe's learnt τ, label mask and selection)."""
    from clipita.model import ZERO_SHOT_FIELD, HeadConfig

    residual = tc.recipe == "residual" and variant in ZERO_SHOT_FIELD
    return HeadConfig(variant=variant, image_dim=image_dim, text_dim=text_dim, hidden_dim=tc.hidden_dim,
                      output_dim=text_dim if residual else tc.output_dim, dropout=tc.dropout, tau=tc.tau,
                      learnable_tau=tc.learnable_tau, residual=residual,
                      lock_category=residual and tc.lock_category)


@dataclasses.dataclass
class Run:
    """One (variant, setting) model inside the shared training loop."""

    name: str
    setting: str
    batch: int
    run_dir: str
    model: object
    optimizer: object
    history: list
    best: float
    start: int
    seconds: float = 0.0
    losses: list = dataclasses.field(default_factory=list)
    kg_weight: float = 0.0  # train.kg_weight where the heads are residual (KgCoOp needs the text space), else 0
    stale: int = 0  # epochs since the selection last improved (train.patience)
    stopped: bool = False  # stopped early: trains no more epochs


def _load_all(shard, batch_size: int = 8192) -> dict[str, np.ndarray]:
    batches = list(shard.iter_batches(batch_size=batch_size, batch_format="numpy"))
    if not batches:
        return {}
    out = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    del batches
    pa.default_memory_pool().release_unused()
    return out


def _epoch_batches(tc: TrainConfig, shard, cached: dict | None, loader_batch: int, epoch: int, rank: int):
    """This worker's loader batches of one epoch (numpy dicts of loader_batch rows, the last one shorter). Shards
    are equal (streaming_split(equal=True)), so every rank gets the same batches' sizes and each run, taking only
    whole batches of its own size (``_slices``), the same number of steps: the gathered loss needs that."""
    if cached is not None:
        n = len(cached["label_general"])
        perm = np.random.default_rng([tc.seed, epoch, rank]).permutation(n)
        for s in range(0, n, loader_batch):
            idx = perm[s:s + loader_batch]
            yield {k: v[idx] for k, v in cached.items()}
        return
    # Arrow's allocator keeps the shuffle buffer's freed blocks unless asked: handing them back now and then keeps
    # the worker's private memory flat (a probe over 128k streamed rows: +86 MB without, +5 MB with)
    pool = pa.default_memory_pool()
    for i, rows in enumerate(shard.iter_batches(batch_size=loader_batch, batch_format="numpy",
                                                local_shuffle_buffer_size=tc.shuffle_rows,
                                                local_shuffle_seed=tc.seed + epoch)):
        if i % RELEASE_EVERY == 0:
            pool.release_unused()
        yield rows
    pool.release_unused()


def _tensors(rows: dict[str, np.ndarray], setting: str, categories):
    import torch

    # copies (np.array): a streamed batch's arrays are read-only views of the object store, which torch warns about
    labels = torch.from_numpy(np.array(rows[f"label_{setting}"], dtype=np.int64))
    out = {k: torch.from_numpy(np.array(rows[k], dtype=np.float32)) for k in INPUTS}
    return dict(out, category=categories[labels], label=labels)


def _slices(rows: dict[str, np.ndarray], size: int, drop_last: bool = True):
    n = len(rows["label_general"])
    for s in range(0, n - size + 1 if drop_last else n, size):
        yield {k: v[s:s + size] for k, v in rows.items()}


def val_retrieval(model, val: dict[str, np.ndarray], setting: str, categories, seen: np.ndarray,
                  batch_size: int = 256) -> dict[str, float]:
    """R-precision (%) of ranking the validation sample's products (exactly, dense) for each category labelling
    one of them in ``setting``, over seen (``seen[category]``: some train product carries it) and unseen queries,
    and their harmonic mean ``hm``. ``model`` is a ClipIta (not DDP-wrapped); its train/eval mode is kept."""
    import torch

    labels = val[f"label_{setting}"]
    queries = np.unique(labels)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        p = np.concatenate([model.encode_products({k: torch.from_numpy(np.ascontiguousarray(
            val[k][s:s + batch_size], np.float32)).to(device) for k in INPUTS}).cpu().numpy()
            for s in range(0, len(labels), batch_size)])
        c = model.encode_categories(categories[torch.from_numpy(queries)].to(device)).cpu().numpy()
    model.train(was_training)
    n_rel = count_relevant(labels, queries)  # >= 1: every query labels some validation product
    rprec = np.empty(len(queries))
    for s in range(0, len(queries), batch_size):  # bounds the dense (queries x products) score matrix
        q = slice(s, s + batch_size)
        hits = hits_from_ranking(rank_scores(c[q] @ p.T, int(n_rel[q].max())), labels, queries[q])
        rprec[q] = per_query_metrics(hits, n_rel[q], (), ())["R-prec"]
    out = {}
    for name, mask in (("seen", seen[queries]), ("unseen", ~seen[queries])):
        out[name] = float(rprec[mask].mean()) if mask.any() else float("nan")
    out["hm"] = metrics.harmonic_mean(out["seen"], out["unseen"], fallback=True)
    return out


def choose_alpha(model, alphas, score) -> tuple[float, dict[str, float]]:
    """WiSE-FT for residual heads: the residual scale of ``alphas`` with the best ``score(model)`` (ties: the
    smaller, closer to zero-shot); 1.0 (as trained) when no α has a score. Leaves the model at that scale."""
    scores = {}
    for a in sorted(alphas):
        model.set_residual_scale(a)
        scores[a] = float(score(model))
    finite = {a: v for a, v in scores.items() if not np.isnan(v)}
    alpha = max(finite, key=lambda a: (finite[a], -a)) if finite else 1.0
    model.set_residual_scale(alpha)
    return alpha, {str(a): v for a, v in scores.items()}


def _worker_threads(tc: TrainConfig, ctx, use_gpu: bool) -> None:
    """Torch's threads in a CPU worker. Ray sets one OpenMP thread per reserved CPU; the reads feeding the workers
    mostly wait (and a cached shard is read once), so the node's cores go to the workers on it. Local mode
    (train.workers 0) keeps the driver's threads."""
    import torch

    if not use_gpu and tc.workers > 0:
        torch.set_num_threads(tc.torch_threads or max(1, int(tc.cpus_per_worker),
                                                      node_cores() // ctx.get_local_world_size()))


def _resume_runs(config: dict, tc: TrainConfig) -> list[Run]:
    """Every run of the group, from its ``last/`` checkpoint where one exists (a restarted group, or a re-run)."""
    import torch
    from ray.train.torch import prepare_model

    from clipita.checkpoint import load_metadata, load_model, load_optimizer
    from clipita.model import ClipIta, HeadConfig, make_optimizer

    runs: list[Run] = []
    for spec in config["runs"]:
        torch.manual_seed(tc.seed)
        model = ClipIta(HeadConfig(**spec["head"]))
        optimizer = make_optimizer(model, tc.lr, tc.weight_decay)
        history, best, start, meta = [], float("inf"), 0, {}
        last = storage.join(spec["run_dir"], "last")
        if storage.exists(storage.join(last, "config.json")):
            model.load_state_dict(load_model(last).state_dict())
            load_optimizer(last, optimizer)
            meta = load_metadata(last)
            history, best, start = meta["history"], meta["best"], meta["epoch"]
        runs.append(Run(spec["name"], spec["setting"], spec["batch"], spec["run_dir"], prepare_model(model),
                        optimizer, history, best, start, kg_weight=tc.kg_weight if model.config.residual else 0.0,
                        stale=meta.get("stale", 0), stopped=meta.get("stopped", False)))
    return runs


def _fail_if_asked(config: dict, epoch: int, rank: int, world: int) -> None:
    """The resume tests' failure (FAIL_AT_EPOCH_ENV): the last worker dies once; FailureConfig restarts the group
    from the last checkpoint."""
    marker = config["fail_marker"]
    if marker and config["fail_at_epoch"] == epoch and rank == world - 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def _train_epoch(active: list[Run], batches, loss_fn, categories, autocast) -> int:
    """One pass over this worker's loader batches, every active run stepping on its own slices of each; returns
    the number of loader batches."""
    from clipita.model import train_step

    steps = 0
    for r in active:
        r.losses, r.seconds = [], 0.0
    for rows in batches:
        steps += 1
        for r in active:
            t0 = time.time()
            for part in _slices(rows, r.batch):
                r.losses.append(train_step(r.model, loss_fn, r.optimizer, _tensors(part, r.setting, categories),
                                           autocast_dtype=autocast, kg_weight=r.kg_weight))
            r.seconds += time.time() - t0
    return steps


def _end_epoch(r: Run, epoch: int, tc: TrainConfig, val: dict, val_loss_fn, categories, seen, rank: int,
               world: int, device) -> str:
    """After one epoch of run ``r``: the global train loss, validation (rank 0), the selection figure and its
    history row, the early-stop decision (rank 0's, broadcast to every rank) and the checkpoints (rank 0).
    Returns the run's part of the epoch's progress line."""
    import torch
    import torch.distributed as dist

    from clipita.checkpoint import save_checkpoint
    from clipita.model import evaluate_loss, unwrap

    train_loss = torch.tensor(float(np.mean(r.losses)) if r.losses else float("nan"))
    if world > 1:  # the mean of the ranks' local losses is the loss of the global batch (clipita.loss)
        dist.all_reduce(train_loss)
        train_loss /= world
    inner = unwrap(r.model)
    val_loss, rp = float("nan"), {"seen": float("nan"), "unseen": float("nan"), "hm": float("nan")}
    if rank == 0 and val and len(val["label_general"]) >= 2:
        size = min(r.batch * world, len(val["label_general"]))
        val_loss = evaluate_loss(inner, val_loss_fn, (_tensors(p, r.setting, categories)
                                                      for p in _slices(val, size, drop_last=False)))
        rp = val_retrieval(inner, val, r.setting, categories, seen[r.setting])
    # what best/ minimises (train.select): the validation loss (paper), or minus the validation R-precision's
    # harmonic mean (retrieval; residual's default)
    if tc.select == "retrieval" and not np.isnan(rp["hm"]):
        selection = -rp["hm"]
    else:
        selection = val_loss if not np.isnan(val_loss) else train_loss.item()
    samples = len(r.losses) * r.batch * world
    r.history.append({"epoch": epoch + 1, "train_loss": train_loss.item(), "val_loss": val_loss,
                      "val_rprec_seen": rp["seen"], "val_rprec_unseen": rp["unseen"],
                      "val_rprec_hm": rp["hm"], "seconds": round(r.seconds, 3),
                      "samples_per_s": round(samples / r.seconds, 1) if r.seconds else None,
                      "tau": (1 / inner.logit_scale.detach().exp()).item(),
                      "attempt_start_epoch": r.start})  # where this (possibly restarted) group began
    improved = selection < r.best
    r.best = min(r.best, selection)
    r.stale = 0 if improved else r.stale + 1
    # rank 0 alone scores the validation split: its decision to stop a run is every rank's
    stop = torch.tensor([float(tc.patience > 0 and r.stale >= tc.patience)], device=device)
    if world > 1:
        dist.broadcast(stop, src=0)
    r.stopped = bool(stop.item())
    if rank == 0:
        meta = {"epoch": epoch + 1, "history": r.history, "best": r.best, "name": r.name,
                "stale": r.stale, "stopped": r.stopped}
        if improved:
            save_checkpoint(storage.join(r.run_dir, "best"), inner, None, meta)
        if (epoch + 1) % tc.checkpoint_every == 0 or epoch + 1 == tc.epochs or r.stopped:
            save_checkpoint(storage.join(r.run_dir, "last"), inner, r.optimizer, meta)
        storage.write_json(storage.join(r.run_dir, "curve.json"), r.history)
    return f"{r.name} {train_loss.item():.3f}/{val_loss:.3f} {rp['seen']:.1f}/{rp['unseen']:.1f}/{rp['hm']:.1f}"


def _choose_alphas(runs: list[Run], tc: TrainConfig, val: dict, categories, seen) -> None:
    """Rank 0, after the last epoch: each residual run's α on validation retrieval, saved into best/ (once; a
    group restarted after the last epoch still does it, and finished() checks for it)."""
    from clipita.checkpoint import load_metadata, load_model, save_checkpoint
    from clipita.model import unwrap

    for r in runs:
        best = storage.join(r.run_dir, "best")
        if not (unwrap(r.model).config.residual and storage.exists(storage.join(best, "config.json"))):
            continue
        meta = load_metadata(best)
        if "alpha" in meta:
            continue
        model = load_model(best).to(next(unwrap(r.model).parameters()).device)
        has_val = bool(val) and len(val["label_general"]) >= 2
        alpha, scores = choose_alpha(model, tc.alphas, lambda m: val_retrieval(
            m, val, r.setting, categories, seen[r.setting])["hm"] if has_val else float("nan"))
        save_checkpoint(best, model, None, dict(meta, alpha=alpha, alpha_val_rprec_hm=scores))
        print(f"train: {r.name}: residual scale α = {alpha} (val R-prec HM by α: "
              f"{', '.join(f'{a}: {v:.1f}' for a, v in scores.items())})", flush=True)


def train_loop(config: dict) -> dict:
    """Runs in every Ray Train worker: every run of ``config["runs"]``, epoch by epoch."""
    import ray.train
    import torch

    from clipita.loss import ContrastiveLoss

    tc = TrainConfig(**config["train"])
    seen = config["seen"]  # setting -> (C,) bool: categories some train product is labelled with
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = tc.use_gpu and torch.cuda.is_available()
    _worker_threads(tc, ctx, use_gpu)
    categories = torch.from_numpy(np.array(config["categories"], dtype=np.float32))  # writable copy: no warning
    runs = _resume_runs(config, tc)
    if rank == 0 and any(r.start for r in runs):
        print(f"train: resuming {', '.join(f'{r.name} after epoch {r.start}' for r in runs if r.start)}")
    device = next(runs[0].model.parameters()).device
    autocast = torch.bfloat16 if use_gpu else None
    loss_fn = ContrastiveLoss(tc.lam, tc.label_mask, gather=True)
    val_loss_fn = ContrastiveLoss(tc.lam, tc.label_mask, gather=False)
    shard = ray.train.get_dataset_shard("train")
    cached = _load_all(shard) if config["cache"] else None
    val = _load_all(ray.train.get_dataset_shard("val")) if rank == 0 else {}

    for epoch in range(min(r.start for r in runs), tc.epochs):
        _fail_if_asked(config, epoch, rank, world)
        active = [r for r in runs if r.start <= epoch and not r.stopped]
        if not active:
            break
        t_epoch = time.time()
        steps = _train_epoch(active, _epoch_batches(tc, shard, cached, config["loader_batch"], epoch, rank),
                             loss_fn, categories, autocast)
        line = [_end_epoch(r, epoch, tc, val, val_loss_fn, categories, seen, rank, world, device) for r in active]
        if rank == 0:
            print(f"train: epoch {epoch + 1}/{tc.epochs} {time.time() - t_epoch:.1f} s, {steps} steps; "
                  f"train/val loss, val R-prec seen/unseen/HM: {', '.join(line)}", flush=True)
            done = [r for r in active if r.stopped]
            if done:
                print(f"train: {', '.join(r.name for r in done)} stopped early: no better validation "
                      f"{tc.select} for {tc.patience} epochs (train.patience)", flush=True)
        ray.train.report({"epoch": epoch + 1})
    if rank == 0:
        _choose_alphas(runs, tc, val, categories, seen)
    return {r.name: {"history": r.history, "best": r.best} for r in runs}


# Failure injection for the resume tests: with both set, the last worker exits once at the start of that epoch
# (0-based), leaving the marker file so that the restarted group trains on (read by the driver, so a Ray started
# before they were set still gets them).
FAIL_AT_EPOCH_ENV, FAIL_MARKER_ENV = "CLIPITA_TEST_FAIL_AT_EPOCH", "CLIPITA_TEST_FAIL_MARKER"


def train_runs(workdir: str, runs: list[tuple[str, str]], cfg: Config, log=print) -> dict[str, dict]:
    """Train every (variant, setting) run to cfg.train.epochs in one worker group, resuming or skipping what is
    already done; returns each run's stats."""
    import ray.train
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    workdir = storage.absolute(workdir)
    out, todo = {}, []
    for variant, setting in runs:
        rd = run_dir(workdir, variant, setting)
        if finished(workdir, variant, setting, tc.epochs):
            log(f"train: {run_name(variant, setting)} is already trained in {rd}; not training again")
            out[run_name(variant, setting)] = storage.read_json(storage.join(rd, "stats.json"))
        else:
            todo.append((variant, setting))
    if not todo:
        return out
    t0 = time.time()
    tree, categories = load_tree(workdir), load_categories(workdir)
    labeler = labeler_for(workdir, cfg.data, tree)
    counts = census(workdir, labeler)
    n_train, n_val = counts.split_size("train"), counts.split_size("val")
    workers = max(1, tc.workers)
    batches = {s: tc.batch_for(s) for _, s in todo}
    loader_batch = max(batches.values())
    for setting, b in batches.items():
        if n_train < b * workers:
            raise ValueError(f"train split of {setting} has {n_train} products, fewer than one global batch "
                             f"({tc.workers} workers x {b}); lower train.batch_size or add products")
        if loader_batch % b:
            raise ValueError(f"train: batch sizes {sorted(set(batches.values()))} of one group must divide the "
                             f"largest; train them in separate jobs")
    if n_train < loader_batch * workers:
        raise ValueError(f"train split has {n_train} products, fewer than one loader batch of {loader_batch} per "
                         f"worker x {tc.workers}; lower train.batch_size or add products")
    text = categories.text[cfg.data.query_text]
    node_index = {c: i for i, c in enumerate(categories.ids)}
    # per category (never per product): which ones the train split labels, for the seen/unseen validation R-prec
    seen = {s: np.isin(categories.ids, list(counts.labels.get((s, "train"), {}))) for _, s in todo}
    dims = {k: vector_width(workdir, COLUMNS[k]) for k in ("image", "title")}
    specs = []
    for variant, setting in todo:
        head = head_config(tc, variant, dims["image"], dims["title"])
        specs.append({"name": run_name(variant, setting), "setting": setting, "batch": batches[setting],
                      "run_dir": run_dir(workdir, variant, setting), "head": dataclasses.asdict(head)})
    row_bytes = 4 * (dims["image"] + 2 * dims["title"]) + 8 * len(SETTINGS)
    cache = n_train / workers * row_bytes <= tc.cache_mb * 2**20
    columns = ["product_id", "category_path", *COLUMNS.values()]
    rows_fn = dict(labeler=labeler, node_index=node_index)
    # labels computed in the read tasks, a batch of streams.READ_BATCH_ROWS at a time, whatever the files' size
    source = FeatureSource(product_files(workdir), columns)  # one plan (the files' footers) for both streams
    train_ds = products_dataset(source, cfg.data.stream_mb, functools.partial(model_rows, **rows_fn, split="train"))
    val_ds = products_dataset(source, cfg.data.stream_mb, functools.partial(
        model_rows, **rows_fn, split="val", keep_fraction=min(1.0, tc.val_rows / max(1, n_val))))
    log(f"train: {', '.join(s['name'] for s in specs)}: {n_train:,} train / {min(n_val, tc.val_rows):,} val "
        f"products, {tc.workers} workers x batch {'/'.join(map(str, sorted(set(batches.values()))))}, "
        f"{tc.epochs} epochs, shards {'cached in memory' if cache else 'streamed every epoch'}")
    # CPU workers that reserve every CPU of the cluster starve the read tasks feeding them (a hang, not an error):
    # keep one CPU free for the reads. Torch threads are train.torch_threads (train_loop).
    worker_cpus = tc.cpus_per_worker
    cpus = ray.cluster_resources().get("CPU", 0)
    if tc.workers and not tc.use_gpu and cpus and tc.workers * worker_cpus > cpus - 1:
        worker_cpus = max(0.1, (cpus - 1) / tc.workers)
        log(f"train: {tc.workers} workers x {tc.cpus_per_worker:g} CPUs would leave no CPU of this "
            f"{cpus:g}-CPU cluster to read the features; each worker reserves {worker_cpus:.2g}")
    fs, path = storage.arrow_filesystem(checkpoints_dir(workdir))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": dataclasses.asdict(tc), "runs": specs, "loader_batch": loader_batch,
                           "categories": np.ascontiguousarray(text, np.float32), "cache": cache, "seen": seen,
                           "fail_at_epoch": int(os.environ.get(FAIL_AT_EPOCH_ENV, -1)),
                           "fail_marker": os.environ.get(FAIL_MARKER_ENV)},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.workers, use_gpu=tc.use_gpu,
                                               resources_per_worker=None if tc.use_gpu or not tc.workers else
                                               {"CPU": worker_cpus}),
        run_config=ray.train.RunConfig(
            name="ray-train", storage_path=path, storage_filesystem=fs if storage.is_remote(workdir) else None,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),  # its INFO lines stay in the log files
        datasets={"train": train_ds, "val": val_ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    trainer.fit()
    for spec in specs:
        rd = spec["run_dir"]
        history = storage.read_json(storage.join(rd, "curve.json"))
        write_curve_png(storage.join(rd, "curve.png"), history, spec["name"])
        rates = [h["samples_per_s"] for h in history if h["samples_per_s"]]
        from clipita.checkpoint import load_metadata

        best = load_metadata(storage.join(rd, "best"))
        stats = {"stage": "train", "run": spec["name"], "recipe": tc.recipe, "epochs": len(history),
                 "stopped_early": len(history) < tc.epochs,
                 "train_products": n_train, "batch_size": spec["batch"], "workers": tc.workers,
                 "best_epoch": best.get("epoch"), "alpha": best.get("alpha"),
                 "best_val_rprec_hm": next((h.get("val_rprec_hm") for h in history if h["epoch"] == best.get("epoch")),
                                           None),
                 "best_val_loss": min(h["val_loss"] for h in history),
                 "final_train_loss": history[-1]["train_loss"], "seconds": round(time.time() - t0, 2),
                 "runs_in_group": len(specs), "samples_per_s": float(np.median(rates)) if rates else None}
        storage.write_json(storage.join(rd, "stats.json"), stats)
        out[spec["name"]] = stats
    return out


def train(workdir: str, variant: str, setting: str, cfg: Config, log=print) -> dict:
    """One (variant, setting) run (``train_runs`` with a single run)."""
    return train_runs(workdir, [(variant, setting)], cfg, log)[run_name(variant, setting)]


RPREC_CURVES = {"val_rprec_seen": "R-prec seen", "val_rprec_unseen": "R-prec unseen", "val_rprec_hm": "R-prec hm"}


def write_curve_png(uri: str, history: list[dict], title: str, right: dict[str, str] | None = None,
                    right_label: str = "val R-prec (%)") -> None:
    """Train and val loss per epoch, and on a second axis the validation metrics ``right`` names (key -> label;
    default the R-precisions)."""
    right = RPREC_CURVES if right is None else right
    fig, ax = plots.pyplot().subplots(figsize=(5, 3.2))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.legend(loc="upper left")
    keys = [k for k in right if any(k in h for h in history)]  # curves written before a metric have none
    if keys:
        ax2 = ax.twinx()
        for key, style in zip(keys, (":", "--", "-")[-len(keys):]):
            ax2.plot(epochs, [h.get(key, float("nan")) for h in history], style, color="tab:green", label=right[key])
        ax2.set(ylabel=right_label)
        ax2.legend(loc="upper right", fontsize="small")
    storage.write_bytes(uri, plots.png(fig))
