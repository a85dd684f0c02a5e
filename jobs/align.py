"""jobs.align: e-CLIP alignment of the image and text towers on the catalogue's own image-title pairs (Ray Data
into Ray Train), before jobs.embed.

    python -m jobs.align --workdir demo-workdir --catalog demo-workdir/catalog --config configs/offline.yaml
    ray job submit --working-dir . -- python -m jobs.align --catalog s3://shop/catalog \\
        --workdir s3://shop/clipita --config configs/production.yaml --set align.workers=8 --set align.use_gpu=true

Writes align/best/ and align/last/ (open_clip local-dir checkpoints: open_clip.create_model("local-dir:...")
loads them), align/curve.png, align/metrics.json, align/stats.json, align/cache/ and split.json. jobs.embed then
embeds with the aligned towers. A re-run resumes: cached parts are skipped and training goes on from last/.
"""
from __future__ import annotations

import argparse

from clipita import runtime, storage
from clipita.stages import align
from clipita.workdir import catalog_record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jobs.align", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--workdir", required=True, help="workdir URI shared by all jobs")
    parser.add_argument("--catalog", help="catalogue root: local path, file:// or s3:// (default: the workdir's "
                                          "catalog.json, else <workdir>/catalog)")
    runtime.add_config_argument(parser)
    args = parser.parse_args(argv)
    with runtime.job("jobs.align"):
        cfg = runtime.config_from_args(args)
        catalog = args.catalog
        if catalog is None:
            record = catalog_record(storage.absolute(args.workdir))
            catalog = (storage.read_json(record)["catalog"] if storage.exists(record)
                       else storage.join(storage.absolute(args.workdir), "catalog"))
        runtime.start_ray()
        s = align.run_align(catalog, args.workdir, cfg)
        m = storage.read_json(storage.join(storage.absolute(args.workdir), "align", "metrics.json"))
        line = (f"test title->image R@10 {m['aligned']['title_to_image']['10']:.1f} aligned vs "
                f"{m['unaligned']['title_to_image']['10']:.1f} before" if "aligned" in m else "no test pairs")
        print(f"jobs.align: {s['read']} rows read: {s['train']} train / {s['val']} val / {s['test']} test pairs, "
              f"{s['quarantined']} quarantined; {s['epochs']} epochs, best {s['best_epoch']} (val R@10 "
              f"{s['best_val_r10']:.1f}); {line}; {s['seconds']} s")


if __name__ == "__main__":
    main()
