"""jobs.xmarket: convert Amazon XMarket metadata (the paper's dataset) into a clipita catalogue.

    python -m jobs.xmarket --metadata xmarket/us --out catalogs/xmarket-us --images xmarket/us-images
    python -m jobs.xmarket --metadata metadata_us_Electronics.json.gz --out s3://shop/catalogs/xmarket-us-electronics
    ray job submit --working-dir . -- python -m jobs.xmarket --metadata s3://shop/xmarket/us \
        --out s3://shop/catalogs/xmarket-us

--metadata is one metadata file (.json, .json.gz, one product per line) or a folder searched for
metadata_*.json[.gz] (the paper uses the US market: point it at the market's folder). --images is an optional folder
of downloaded product images, named <asin>.<ext> or as in the image URLs; found ones are copied into <out>/images/,
the others keep their image URL. The field mapping and the reject reasons are in clipita/sources/xmarket.py. Rows that
cannot be converted go to <out>/conversion_rejects.parquet and are counted here. Then run
`python -m jobs.pipeline --catalog <out> --workdir ...`.

A small I/O job: it does not use Ray (image copies run in a thread pool); exit status 2 with one line on bad
arguments, unreadable inputs or when no product could be converted.
"""
from __future__ import annotations

import argparse

from clipita import runtime, storage
from clipita.catalog import REJECTS_FILE
from clipita.sources import xmarket


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jobs.xmarket", description=__doc__.splitlines()[0])
    parser.add_argument("--metadata", required=True, help="metadata file or folder (local, file:// or s3://)")
    parser.add_argument("--out", required=True, help="catalogue folder or s3:// prefix to write")
    parser.add_argument("--images", help="folder of local product images to copy into the catalogue")
    parser.add_argument("--workers", type=int, default=16, help="threads copying images (default 16)")
    args = parser.parse_args(argv)
    with runtime.job("jobs.xmarket"):
        if args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        s = xmarket.convert(args.metadata, args.out, images=args.images, workers=args.workers)
        rejects = storage.join(args.out, REJECTS_FILE)
        print(f"jobs.xmarket: {s['products']:,} products from {s['read']:,} lines in {s['files']} file(s) to "
              f"{args.out} ({s['images_copied']:,} images copied, {s['image_urls']:,} image URLs) in "
              f"{s['seconds']} s; {runtime.rejects_line(s, rejects)}")
        if s["products"] == 0:
            raise ValueError(f"no product could be converted from {args.metadata}: see {rejects}")


if __name__ == "__main__":
    main()
