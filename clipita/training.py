"""The training stage: CLIP-I / CLIP-IA / CLIP-ITA heads on the frozen features, with Ray Train (DDP).

One run per (variant, setting), named ``<variant>-<setting>``, stored under ``<workdir>/checkpoints/<name>/``:
Ray Train's own per-epoch checkpoints (model + optimizer + history; what a restart resumes from), ``best/`` (the
model of the lowest validation loss, safetensors + config.json), ``curve.json`` / ``curve.png`` (train and val
loss per epoch) and ``stats.json``. Constructing the trainer again with the same name resumes the latest
checkpoint (Ray 2.60: no ``Trainer.restore``); a run whose curve already holds every epoch is not trained again.

Data: the train and val splits of one setting become two small Ray datasets of feature tensors (about 3 KB a
product) that every worker loads whole (``datasets_to_split=[]``). Each epoch every worker draws the same seeded
permutation and takes its rank's B rows of each global batch of R·B rows, so the global batches are exactly those
one worker with batch R·B would see: with the gathered loss (clipita.loss) R workers × B train the same model as
1 × R·B, and a resumed run replays the same order. The last, partial global batch of an epoch is dropped.
Known limit: a catalogue whose features do not fit in one worker's memory needs streaming_split shards instead.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time

import numpy as np

from clipita import storage
from clipita.config import Config, TrainConfig
from clipita.features import Categories, Products, labels_for, load_categories, load_products
from clipita.model import HeadConfig
from clipita.tree import Labels

FEATURES = ("image", "title", "attributes", "category")


def run_name(variant: str, setting: str) -> str:
    return f"{variant}-{setting}"


def run_dir(workdir: str, variant: str, setting: str) -> str:
    return storage.join(workdir, "checkpoints", run_name(variant, setting))


def best_checkpoint(workdir: str, variant: str, setting: str) -> str:
    return storage.join(run_dir(workdir, variant, setting), "best")


def split_arrays(products: Products, labels: Labels, categories: Categories, setting: str, split: str,
                 query_mode: str = "name") -> dict[str, np.ndarray]:
    """Model inputs of one split: product features, the label category's text embedding, label ids."""
    mask = labels.split == split
    lab = labels.by_setting[setting][mask]
    _, label_ids = np.unique(lab, return_inverse=True)
    return {"image": products.image[mask], "title": products.title[mask],
            "attributes": products.attributes[mask],
            "category": categories.text[query_mode][categories.index(lab)],
            "label": label_ids.astype(np.int64), "row": np.arange(int(mask.sum()), dtype=np.int64)}


def _dataset(arrays: dict[str, np.ndarray]):
    import pyarrow as pa
    import ray.data
    from ray.data.extensions import ArrowTensorArray

    cols = {k: (ArrowTensorArray.from_numpy(np.ascontiguousarray(v, np.float32)) if v.ndim == 2 else pa.array(v))
            for k, v in arrays.items()}
    return ray.data.from_arrow(pa.table(cols))


def _load_whole(name: str) -> dict[str, np.ndarray]:
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    batches = list(shard.iter_batches(batch_size=None, batch_format="numpy"))
    if not batches:
        return {}
    data = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    order = np.argsort(data.pop("row"), kind="stable")  # identical row order on every worker
    return {k: v[order] for k, v in data.items()}


def _batches(data: dict[str, np.ndarray], index: np.ndarray, size: int):
    import torch

    for s in range(0, len(index), size):
        idx = index[s:s + size]
        yield {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in data.items()}


def train_loop(config: dict) -> dict:
    """Runs in every Ray Train worker."""
    import ray.train
    import torch
    import torch.distributed as dist
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model

    from clipita.checkpoint import load_model, load_optimizer, save_checkpoint
    from clipita.loss import ContrastiveLoss
    from clipita.model import ClipIta, evaluate_loss, make_optimizer, train_step, unwrap

    tc = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train, val = _load_whole("train"), _load_whole("val")
    n, batch = len(train["label"]), config["batch_size"]
    global_batch = batch * world

    torch.manual_seed(tc.seed)
    model = ClipIta(HeadConfig(**config["head"]))
    optimizer = make_optimizer(model, tc.lr, tc.weight_decay)
    history, best, start = [], float("inf"), 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_model(d).state_dict())
            load_optimizer(d, optimizer)
            meta = storage.read_json(storage.join(d, "config.json"))["metadata"]
        history, best, start = meta["history"], meta["best"], meta["epoch"]
        if rank == 0:
            print(f"[{config['name']}] resuming after epoch {start}")
    use_gpu = tc.use_gpu and torch.cuda.is_available()
    model = prepare_model(model)  # DDP when world > 1; moves to this worker's device
    autocast = torch.bfloat16 if use_gpu else None
    loss_fn = ContrastiveLoss(tc.lam, tc.label_mask, gather=True)
    val_loss_fn = ContrastiveLoss(tc.lam, tc.label_mask, gather=False)

    for epoch in range(start, tc.epochs):
        if config.get("fail_at_epoch") == epoch and rank == world - 1 and not os.path.exists(config["fail_marker"]):
            open(config["fail_marker"], "w").close()
            os._exit(1)  # test hook: a worker dies; FailureConfig restarts the group from the last checkpoint
        t0 = time.time()
        perm = np.random.default_rng([tc.seed, epoch]).permutation(n)
        steps = n // global_batch
        mine = perm[: steps * global_batch].reshape(steps, world, batch)[:, rank].reshape(-1)
        losses = [train_step(model, loss_fn, optimizer, b, autocast_dtype=autocast)
                  for b in _batches(train, mine, batch)]
        train_loss = torch.tensor(float(np.mean(losses)))
        if world > 1:  # the mean of the ranks' local losses is the loss of the global batch (clipita.loss)
            dist.all_reduce(train_loss)
            train_loss /= world
        seconds = time.time() - t0
        inner = unwrap(model)
        val_loss = (evaluate_loss(inner, val_loss_fn, _batches(val, np.arange(len(val["label"])), global_batch))
                    if val else float("nan"))
        selection = val_loss if val else train_loss.item()  # no val split: select on the training loss
        history.append({"epoch": epoch + 1, "train_loss": train_loss.item(), "val_loss": val_loss,
                        "seconds": round(seconds, 3), "samples_per_s": round(steps * global_batch / seconds, 1),
                        "tau": float(1 / inner.logit_scale.exp()),
                        "attempt_start_epoch": start})  # where this (possibly restarted) worker group began
        improved = selection < best
        best = min(best, selection)
        metrics = dict(history[-1], best=best)
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                meta = {"epoch": epoch + 1, "history": history, "best": best, "name": config["name"]}
                save_checkpoint(d, inner, optimizer, meta)
                if improved:
                    save_checkpoint(storage.join(config["run_dir"], "best"), inner, None, meta)
                storage.write_json(storage.join(config["run_dir"], "curve.json"), history)
                print(f"[{config['name']}] epoch {epoch + 1}/{tc.epochs} train {train_loss.item():.4f} "
                      f"val {val_loss:.4f} {history[-1]['samples_per_s']} samples/s")
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
    return {"history": history, "best": best}


def finished(workdir: str, variant: str, setting: str, epochs: int) -> bool:
    rd = run_dir(workdir, variant, setting)
    curve = storage.join(rd, "curve.json")
    return storage.exists(curve) and len(storage.read_json(curve)) >= epochs and \
        storage.exists(storage.join(rd, "best", "config.json"))


def train(workdir: str, variant: str, setting: str, cfg: Config, log=print,
          fail_at_epoch: int | None = None, fail_marker: str | None = None) -> dict:
    """Train one (variant, setting) run to cfg.train.epochs, resuming or skipping what is already done.
    ``fail_at_epoch``/``fail_marker``: a test hook that kills one worker once at that epoch."""
    import ray.train
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    workdir = storage.absolute(workdir)
    name, rd = run_name(variant, setting), run_dir(workdir, variant, setting)
    if finished(workdir, variant, setting, tc.epochs):
        log(f"train: {name} already has {tc.epochs} epochs in {rd}; not training again")
        return storage.read_json(storage.join(rd, "stats.json"))
    t0 = time.time()
    products, categories = load_products(workdir), load_categories(workdir)
    labels = labels_for(products, cfg.data)
    train_arrays = split_arrays(products, labels, categories, setting, "train", cfg.data.query_text)
    val_arrays = split_arrays(products, labels, categories, setting, "val", cfg.data.query_text)
    batch = tc.batch_for(setting)
    n = len(train_arrays["label"])
    if n < batch * max(1, tc.workers):
        raise ValueError(f"train split of {setting} has {n} products, fewer than one global batch "
                         f"({tc.workers} workers x {batch}); lower train.batch_size or add products")
    head = HeadConfig(variant=variant, image_dim=products.image.shape[1], text_dim=products.title.shape[1],
                      hidden_dim=tc.hidden_dim, output_dim=tc.output_dim, dropout=tc.dropout, tau=tc.tau,
                      learnable_tau=tc.learnable_tau)
    log(f"train: {name}: {n} train / {len(val_arrays['label'])} val products, "
        f"{len(np.unique(train_arrays['label']))} categories, {tc.workers} workers x batch {batch}, "
        f"{tc.epochs} epochs")
    fs, path = storage.arrow_filesystem(storage.join(workdir, "checkpoints"))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"train": dataclasses.asdict(tc), "head": dataclasses.asdict(head), "batch_size": batch, "name": name,
                           "run_dir": rd, "fail_at_epoch": fail_at_epoch, "fail_marker": fail_marker},
        scaling_config=ray.train.ScalingConfig(num_workers=tc.workers, use_gpu=tc.use_gpu),
        run_config=ray.train.RunConfig(
            name=name, storage_path=path, storage_filesystem=fs if storage.is_remote(workdir) else None,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": _dataset(train_arrays), "val": _dataset(val_arrays)},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    trainer.fit()
    history = storage.read_json(storage.join(rd, "curve.json"))
    write_curve_png(storage.join(rd, "curve.png"), history, name)
    stats = {"stage": "train", "run": name, "epochs": len(history), "train_products": n, "batch_size": batch,
             "workers": tc.workers, "best_val_loss": min(h["val_loss"] for h in history),
             "final_train_loss": history[-1]["train_loss"], "seconds": round(time.time() - t0, 2),
             "samples_per_s": float(np.median([h["samples_per_s"] for h in history]))}
    storage.write_json(storage.join(rd, "stats.json"), stats)
    return stats


def write_curve_png(uri: str, history: list[dict], title: str) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())
