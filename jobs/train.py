"""jobs.train: contrastive training of the CLIP-I / CLIP-IA / CLIP-ITA heads on <workdir>/features (Ray Train).

    python -m jobs.train --workdir demo-workdir --variant ita --setting specific --config configs/offline.yaml
    python -m jobs.train --workdir demo-workdir --all --epochs 5
    ray job submit --working-dir . -- python -m jobs.train --workdir s3://shop/clipita --all \
        --config configs/production.yaml --workers 4 --gpu

Writes checkpoints/<variant>-<setting>/ (last/, best/, curve.json, curve.png, stats.json). A re-run resumes an
unfinished run from its last checkpoint and skips a finished one. The train split streams from the features
(streaming_split shards, one per worker): no process holds the catalogue.
"""
from __future__ import annotations

import argparse

from clipita import runtime, workdir
from clipita.models import VARIANTS
from clipita.stages import train
from clipita.tree import SETTINGS



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jobs.train", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="workdir URI with features/ from jobs.embed")
    parser.add_argument("--variant", choices=VARIANTS, help="i = CLIP-I, ia = CLIP-IA, ita = CLIP-ITA")
    parser.add_argument("--setting", choices=SETTINGS, help="labelling setting (PAPER.md)")
    parser.add_argument("--all", action="store_true", help="train every variant x setting (one worker group, one "
                                                            "pass over the features per epoch for all nine)")
    parser.add_argument("--workers", type=int, help="Ray Train workers (train.workers)")
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16 autocast (train.use_gpu)")
    parser.add_argument("--epochs", type=int, help="train.epochs (paper: 30)")
    parser.add_argument("--batch-size", type=int, help="per-worker batch (train.batch_size; paper: 8 general, 128)")
    parser.add_argument("--lr", type=float, help="train.lr")
    parser.add_argument("--learnable-tau", action="store_true", help="learn the temperature (train.learnable_tau)")
    parser.add_argument("--label-mask", action="store_true", help="same-category rows are not negatives")
    runtime.add_config_argument(parser)
    args = parser.parse_args(argv)
    if args.all == bool(args.variant or args.setting) or (not args.all and not (args.variant and args.setting)):
        parser.error("give --variant and --setting, or --all")
    flags = {"workers": args.workers, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
             "use_gpu": args.gpu or None, "learnable_tau": args.learnable_tau or None,
             "label_mask": args.label_mask or None}
    args.set += [f"train.{k}={v}" for k, v in flags.items() if v is not None]
    runs = [(v, s) for s in SETTINGS for v in VARIANTS] if args.all else [(args.variant, args.setting)]
    with runtime.job("jobs.train"):
        cfg = runtime.config_from_args(args)
        runtime.start_ray()
        done = train.train_runs(args.workdir, runs, cfg)
        for variant, setting in runs:
            stats = done[workdir.run_name(variant, setting)]
            print(f"jobs.train: {stats['run']}: {stats['epochs']} epochs, best val loss "
                  f"{stats['best_val_loss']:.4f}, {stats['samples_per_s'] or 0:.0f} samples/s -> "
                  f"{workdir.best_checkpoint(args.workdir, variant, setting)}")


if __name__ == "__main__":
    main()
