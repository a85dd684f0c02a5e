"""jobs.icons: convert the IBM Carbon icon set (npm @carbon/icons) into a clipita catalogue of PNG icons.

    npm pack @carbon/icons@11.89.0              # -> carbon-icons-11.89.0.tgz (about 7 MB, Apache-2.0)
    python -m jobs.icons --package carbon-icons-11.89.0.tgz --out /tmp/icons-catalog
    python -m jobs.icons --package node_modules/@carbon/icons --out s3://shop/catalogs/carbon-icons --size 224

--package is the .tgz that `npm pack` writes (read as it is, nothing is unpacked) or a folder holding the package's
files (metadata.json and svg/, directly or under package/). Each icon becomes one product: its name, its friendly
name as title, its aliases as "tag: X" attributes, [category, subcategory] as its path, and its 32 px SVG rendered
to a --size x --size PNG on white in <out>/images/. The field mapping and the reject reasons are in
clipita/sources/icons.py. Icons that cannot be converted go to <out>/conversion_rejects.parquet and are counted
here. Then run `python -m jobs.pipeline --catalog <out> --workdir ...`.

A small job: it does not use Ray (rendering runs in a thread pool); exit status 2 with one line on bad arguments,
an unreadable package or when no icon could be converted.
"""
from __future__ import annotations

import argparse

from clipita import runtime, storage
from clipita.catalog import REJECTS_FILE
from clipita.sources import icons


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jobs.icons", description=__doc__.splitlines()[0])
    parser.add_argument("--package", required=True, help="@carbon/icons .tgz (npm pack) or unpacked package folder")
    parser.add_argument("--out", required=True, help="catalogue folder or s3:// prefix to write")
    parser.add_argument("--size", type=int, default=128, help="PNG width and height in px (default 128)")
    parser.add_argument("--workers", type=int, default=4, help="threads rendering and writing images (default 4)")
    parser.add_argument("--drop-path-tags", action="store_true",
                        help="leave out tags that name a category of the icon's own path (e.g. 'health')")
    args = parser.parse_args(argv)
    with runtime.job("jobs.icons"):
        s = icons.convert(args.package, args.out, size=args.size, workers=args.workers,
                          drop_path_tags=args.drop_path_tags)
        rejects = storage.join(args.out, REJECTS_FILE)
        print(f"jobs.icons: {s['products']:,} products from {s['entries']:,} icons of {s['package'] or '?'}@"
              f"{s['version'] or '?'} ({s['license'] or 'licence unknown'}) to {args.out} in "
              f"{s['categories'][1]} categories / {s['categories'][2]} subcategories, {s['size']} px PNGs, in "
              f"{s['seconds']} s; {runtime.rejects_line(s, rejects)}")
        if s["products"] == 0:
            raise ValueError(f"no icon could be converted from {args.package}: see {rejects}")


if __name__ == "__main__":
    main()
