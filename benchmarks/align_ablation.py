"""Ablation of jobs.align's choices on a workdir's cache (validation pairs only: never the test split).

    python benchmarks/align_ablation.py WORKDIR [--config configs/offline.yaml] [--epochs 12] \
        [--grid "text_train=lock,partial lr=1e-3,3e-4 batch_size=256"]

Trains in this process (no Ray) on the cache's train pairs with the locked image trunk's cached features, one run
per point of the grid (the text tower from the cached texts, in whatever mode the point asks), and prints val
title->image Recall@10 per epoch and the best, with the pairs/s of the steps. A cache from an image_train=lock run.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clipita import align  # noqa: E402
from clipita.config import load_config  # noqa: E402
from clipita.loss import ContrastiveLoss  # noqa: E402
from clipita.stages.align import _Towers, recall  # noqa: E402


def load(workdir: str, split: str) -> dict:
    tables = [pq.read_table(os.path.join(workdir, "align", "cache", f))
              for f in sorted(os.listdir(os.path.join(workdir, "align", "cache"))) if f.endswith(".parquet")]
    out = {"image_in": [], "text": [], "group": []}
    for t in tables:
        keep = np.array([s == split for s in t.column("split").to_pylist()])
        out["image_in"].append(t.column("image_in").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)[keep])
        out["text"] += [x for x, k in zip(t.column("text").to_pylist(), keep) if k]
        out["group"].append(t.column("group").to_numpy()[keep])
    return {"image_in": np.concatenate(out["image_in"]), "text": out["text"], "group": np.concatenate(out["group"])}


def run(cfg, ac, train, val, epochs: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = align.build_model(cfg.encoders, ac, seed)
    align.set_trainable(model, ac.image_train, ac.text_train)
    align.train_mode(model)
    cached = {"image": True, "text": align.cacheable(model, "text", ac.text_train)}
    tok = align.tokenizer(cfg.encoders, ac)

    def text_in(texts):
        tokens = tok(texts)
        if not cached["text"]:
            return tokens.numpy()
        return np.concatenate([align.trunk_features(model, "text", align.trim_padding(tokens[i:i + 128])).numpy()
                               for i in range(0, len(texts), 128)])

    tr = {"image_in": train["image_in"], "text_in": text_in(train["text"]), "group": train["group"]}
    va = {"image_in": val["image_in"], "text_in": text_in(val["text"]), "group": val["group"]}
    towers = _Towers(model, cfg.encoders, cached, torch.device("cpu"), 224)
    opt = align.make_optimizer(model, ac)
    step = align.GradCacheStep(model, ContrastiveLoss(0.5, label_mask=ac.groups == "mask", gather=False), ac.chunk,
                               towers.image, towers.text)
    curve, pairs, seconds = [], 0, 0.0
    n, b = len(tr["group"]), min(ac.batch_size, len(tr["group"]))
    for epoch in range(epochs):
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        t0 = time.time()
        for s in range(0, n - b + 1, b):
            align.train_step(model, step, opt, *towers.tensors({k: v[perm[s:s + b]] for k, v in tr.items()}))
            pairs += b
        seconds += time.time() - t0
        vi, vt, vg = towers.embed(va)
        curve.append(recall(vt, vi, vg, vg)[10])
    return {"curve": curve, "best": max(curve), "best_epoch": 1 + int(np.argmax(curve)),
            "pairs_per_s": round(pairs / seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument("--config", default="configs/offline.yaml")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--grid", default="text_train=lock,partial")
    args = p.parse_args()
    cfg = load_config(args.config)
    train, val = load(args.workdir, "train"), load(args.workdir, "val")
    axes = [(k, v.split(",")) for k, v in (item.split("=") for item in args.grid.split())]
    print(f"{len(train['group'])} train / {len(val['group'])} val pairs; val title->image R@10 by epoch")
    for values in itertools.product(*[v for _, v in axes]):
        changes = {k: type(getattr(cfg.align, k))(v) for (k, _), v in zip(axes, values)}
        ac = dataclasses.replace(cfg.align, **changes)
        r = run(cfg, ac, train, val, args.epochs)
        print(f"{' '.join(f'{k}={v}' for k, v in changes.items())}: best {r['best']:.1f} at epoch "
              f"{r['best_epoch']}, {r['pairs_per_s']} pairs/s; {' '.join(f'{c:.1f}' for c in r['curve'])}",
              flush=True)


if __name__ == "__main__":
    main()
