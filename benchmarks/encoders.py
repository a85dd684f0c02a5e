"""Throughput of the frozen encoders, one stage at a time, as the embed job runs them:

- decode: ``load_image`` on a 800x600 JPEG (one CPU core; the job's CPU tasks),
- image:  ``ImageEncoder.encode`` on uint8 batches (the actor stage),
- text:   ``TextEncoder.encode`` on product-title-like strings (the actor stage).

    python benchmarks/encoders.py --config configs/offline.yaml --device cpu
    python benchmarks/encoders.py --config configs/production.yaml --device cuda --batch-size 256 --items 8192
    python benchmarks/encoders.py --config configs/production.yaml --stages image --set encoders.image_pretrained=

Prints the machine, the date and one markdown table (items/s, best of 3 passes) for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from clipita.config import ConfigError, load_config  # noqa: E402
from clipita.encoders import EncoderLoadError, ImageEncoder, TextEncoder, image_preprocess_spec, load_image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared machine.py beside this script
from machine import cpu, torch_device  # noqa: E402

WORDS = ("women's men's leather cotton running shoes boots dress shirt slim fit black red blue size pack of 2 "
         "wireless charger usb-c stainless steel kitchen knife set organic green tea 500g waterproof jacket "
         "hooded kids toy car remote control led desk lamp dimmable").split()
REPEATS = 3  # timed passes per stage


def product_jpeg(rng: np.random.Generator) -> bytes:
    """An 800x600 photo-like JPEG (smooth shapes and mild noise, so it decodes like a product shot)."""
    y, x = np.mgrid[0:600, 0:800]
    img = np.stack([x * 255 / 800, y * 255 / 600, (x + y) * 255 / 1400], -1)
    img[(x - 400) ** 2 + (y - 300) ** 2 < 200 ** 2] = (200, 40, 40)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def titles(n: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, rng.integers(4, 17))) for _ in range(n)]


def rate(fn, batches: list) -> float:
    """Items per second of fn over batches: the best of REPEATS passes after one warm-up call (the best pass
    is the least disturbed by other processes on a shared machine)."""
    fn(batches[0])
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for b in batches:
            fn(b)  # encoders return numpy arrays, so each call has finished on the device when it returns
        best = min(best, time.perf_counter() - start)
    return sum(len(b) for b in batches) / best


def chunks(items, size: int) -> list:
    return [items[i:i + size] for i in range(0, len(items), size)]


def machine() -> str:
    return f"{cpu()}, {torch_device()}"



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/offline.yaml", help="clipita config file (its encoders: section)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides encoders.device")
    p.add_argument("--batch-size", type=int, default=64, help="items per encode call (default 64)")
    p.add_argument("--items", type=int, default=512, help="items timed per stage (default 512)")
    p.add_argument("--stages", default="decode,image,text", help="comma-separated: decode,image,text")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config override, e.g. encoders.image_pretrained= for a random-init architecture")
    args = p.parse_args()
    overrides = dict(kv.split("=", 1) for kv in args.set)
    if args.device:
        overrides["encoders.device"] = args.device
    try:
        cfg = load_config(args.config, overrides).encoders
        rng = np.random.default_rng(0)
        rows = []
        stages = [s for s in args.stages.split(",") if s]
        size = image_preprocess_spec(cfg)[0]
        if "decode" in stages:
            jpeg = product_jpeg(rng)
            r = rate(lambda b: [load_image(d, size) for d in b], chunks([jpeg] * args.items, args.batch_size))
            rows.append(("decode", f"load_image 800x600 JPEG -> {size}px", "cpu (1 core)", r))
        if "image" in stages:
            enc = ImageEncoder(cfg)
            pixels = rng.integers(0, 256, (args.items, size, size, 3), dtype=np.uint8)
            r = rate(enc.encode, chunks(pixels, args.batch_size))
            weights = cfg.image_pretrained or "random init"
            rows.append(("image", f"{cfg.image_model} ({weights})", f"{enc.device} {cfg.precision}", r))
        if "text" in stages:
            enc = TextEncoder(cfg)
            r = rate(enc.encode, chunks(titles(args.items, rng), args.batch_size))
            rows.append(("text", cfg.text_model, f"{enc.device} {cfg.precision}", r))
    except (ConfigError, EncoderLoadError) as e:
        sys.exit(f"{type(e).__name__}: {e}")
    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {machine()}")
    print(f"command: python benchmarks/encoders.py {' '.join(sys.argv[1:])}")
    print()
    print("| stage | model | device | batch | items | items/s |")
    print("|---|---|---|---|---|---|")
    for stage, model, device, r in rows:
        print(f"| {stage} | {model} | {device} | {args.batch_size} | {args.items} | {r:,.0f} |")


if __name__ == "__main__":
    main()
