"""jobs.align's training path against a bare open_clip training loop, side by side in one process.

    python benchmarks/align_speed.py CATALOG [--pairs 256] [--epochs 2] [--config configs/offline.yaml]

Both train the same open_clip model (align.build_model) with the same trainable set, batch, optimiser and torch
threads on the same (image, title) pairs of CATALOG (decoded once, outside the timing):
- bare: every step runs model.encode_image / encode_text on pixels and tokens and open_clip's ClipLoss;
- clipita: what the stage does: a locked side's trunk runs once per run (its cache), every step runs the
  projections (or the unlocked tower) through GradCacheStep and clipita.loss.
Prints pairs/s of each over --epochs (clipita's time includes computing its cache) and their ratio, per mode, and
the cost of GradCache chunks (align.chunk) against one pass at the same batch.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import open_clip  # noqa: E402

from clipita import align  # noqa: E402
from clipita.config import load_config  # noqa: E402
from clipita.encoders import PixelNormalizer, image_preprocess_spec  # noqa: E402
from clipita.images import load_image  # noqa: E402
from clipita.loss import ContrastiveLoss  # noqa: E402
from clipita.stages.align import _Towers  # noqa: E402


def bare(cfg, ac, x, tokens, epochs: int) -> float:
    model = align.build_model(cfg.encoders, ac)
    align.set_trainable(model, ac.image_train, ac.text_train)
    model.eval()
    opt, loss_fn, b = align.make_optimizer(model, ac), open_clip.ClipLoss(), ac.batch_size
    t0 = time.perf_counter()
    for _ in range(epochs):
        for s in range(0, len(x) - b + 1, b):
            opt.zero_grad(set_to_none=True)
            img = model.encode_image(x[s:s + b], normalize=True)
            txt = model.encode_text(tokens[s:s + b], normalize=True)
            loss_fn(img, txt, model.logit_scale.exp()).backward()
            opt.step()
    return epochs * (len(x) // b) * b / (time.perf_counter() - t0)


def clipita(cfg, ac, pixels, x, tokens, epochs: int) -> float:
    model = align.build_model(cfg.encoders, ac)
    align.set_trainable(model, ac.image_train, ac.text_train)
    align.train_mode(model)
    cached = {s: align.cacheable(model, s, getattr(ac, f"{s}_train")) for s in ("image", "text")}
    t0 = time.perf_counter()
    rows = {"image_in": align.trunk_features(model, "image", x).numpy() if cached["image"] else
            pixels.reshape(len(pixels), -1),
            "text_in": align.trunk_features(model, "text", align.trim_padding(tokens)).numpy() if cached["text"]
            else tokens.numpy(), "group": np.arange(len(x))}
    towers = _Towers(model, cfg.encoders, cached, torch.device("cpu"), pixels.shape[1])
    opt, b = align.make_optimizer(model, ac), ac.batch_size
    step = align.GradCacheStep(model, ContrastiveLoss(0.5, label_mask=False, gather=False), ac.chunk, towers.image,
                               towers.text)
    for _ in range(epochs):
        for s in range(0, len(x) - b + 1, b):
            img, txt, _ = towers.tensors({k: v[s:s + b] for k, v in rows.items()})
            align.train_step(model, step, opt, img, txt)
    return epochs * (len(x) // b) * b / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("catalog")
    p.add_argument("--config", default="configs/offline.yaml")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    cfg = load_config(args.config)
    rows = pq.read_table(os.path.join(args.catalog, "products.parquet")).to_pylist()[:args.pairs]
    size = image_preprocess_spec(cfg.encoders)[0]
    pixels = np.stack([load_image(open(os.path.join(args.catalog, r["image"]), "rb").read(), size) for r in rows])
    x = PixelNormalizer(cfg.encoders)(torch.tensor(pixels))
    tokens = align.tokenizer(cfg.encoders, cfg.align)([r["title"] for r in rows])
    print(f"{len(rows)} pairs, {args.epochs} epochs, torch threads {torch.get_num_threads()}, "
          f"batch {min(cfg.align.batch_size, len(rows))}; pairs/s")
    for image, text, chunk in (("lock", "lock", 0), ("lock", "partial", 0), ("lock", "partial", 64)):
        ac = dataclasses.replace(cfg.align, image_train=image, text_train=text, chunk=chunk,
                                 batch_size=min(cfg.align.batch_size, len(rows)))
        a, c = bare(cfg, ac, x, tokens, args.epochs), clipita(cfg, ac, pixels, x, tokens, args.epochs)
        print(f"{image}/{text} chunk {chunk}: bare open_clip {a:.1f}, clipita {c:.1f}, ratio {c / a:.2f}", flush=True)


if __name__ == "__main__":
    main()
