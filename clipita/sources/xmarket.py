"""Amazon XMarket metadata (the paper's dataset) -> a clipita catalogue (DESIGN.md "Catalogue").

XMarket (Bonab et al., CIKM 2021, https://xmrec.github.io) ships one metadata file per market and category,
``<market>/<Category>/metadata_<market>_<Category>.json.gz``, one product per line, e.g. (abridged, from the
dataset page)::

    {"asin": "B000023VW2", "title": "Sangean ANT-60 Short Wave Antenna", "price": "$12.86",
     "imgUrl": "{\\"https://.../71-XmouTyhL._AC_SX569_.jpg\\":[369,569], \\"https://..._SX355_.jpg\\":[230,355]}",
     "categories": ["Electronics", "Accessories & Supplies", "Audio & Video Accessories", "Antennas", "Radio Antennas"],
     "productDetails": {"Item Weight": "1.41 ounces", "Manufacturer": "Sangean", "ASIN": "B000023VW2", ...},
     "overviewFeatures": {}, "features": ["Extends to 23 feet ...", ...], "description": "...", "related": {...}}

Mapping (one output row per input line, or one reject with its reason):
- ``product_id`` <- ``asin``.
- ``title`` <- ``title`` (may be empty: the catalogue reads it as "").
- ``category_path`` <- ``categories``: XMarket gives one path, root -> leaf, as the paper uses it. Older Amazon dumps
  (McAuley et al.) give a list of paths: we take the longest (the most specific), the first of equally long ones.
- ``attributes`` <- "key: value" strings in this order, repeats dropped: ``brand`` (older dumps) as "Brand: X";
  ``overviewFeatures`` {key: value}; ``productDetails`` {key: value} except ASIN, Customer Reviews and Best Sellers
  Rank (identifiers and shop statistics, not properties of the product; Customer Reviews holds page CSS in the
  dataset's own sample), list values joined with ", "; each ``features`` bullet as "feature: <text>". Not used:
  ``description`` (prose), ``price``, ratings and ``related`` (other products).
- ``image``: with ``images`` given, a local file named ``<asin>.<ext>`` or like the last segment of one of the
  product's image URLs is copied to ``images/<asin><ext>`` and referenced relatively; otherwise the URL itself is
  kept: ``imgUrl`` is a JSON object {url: [height, width]} and we take the largest image, ``imUrl`` (older dumps)
  is one URL.
Text is HTML-unescaped (older dumps carry "&amp;") and whitespace-collapsed. Lines are JSON; XMarket's own reading
example evaluates lines as Python literals, so those are accepted too (``ast.literal_eval``, never ``eval``).
A repeated asin within one market (the same product in two category files) keeps its first row; later rows are
rejects. The same asin in another market (``metadata_<market>_...``) is that product's listing there: product_id
``<asin>@<market>``; every row's ``group_id`` is its asin, so jobs.align treats a product's listings across
markets as one product (``align.groups``).
Rejects go to ``<out>/conversion_rejects.parquet`` (product_id, reason, source = ``file#line``), never dropped;
a reason reads "<kind>: <detail>" with kind one of: malformed line, missing asin, malformed asin, duplicate asin,
no categories, blank name in categories, no image, image copy failed.
"""
from __future__ import annotations

import ast
import gzip
import html
import json
import os
import re
import time
from typing import Any, Callable, Iterator


from clipita import storage
from clipita.catalog import write_converted
from clipita.sources.convert import Reject, failure, reason_counts, threaded

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
METADATA_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")
SKIPPED_DETAILS = {"asin", "customer reviews", "best sellers rank"}
_ASIN = re.compile(r"^[A-Za-z0-9_-]+$")  # also a safe file name for images/<asin><ext>
_INVISIBLE = dict.fromkeys(map(ord, "\u200e\u200f\ufeff"))  # direction marks in scraped productDetails keys


def metadata_files(uri: str) -> list[str]:
    """The metadata files to read: ``uri`` itself, or every ``metadata_*.json[l][.gz]`` under it (sorted, so the
    first of repeated asins is the same on every run). Reviews and ratings files beside them are ignored."""
    fs, path = storage.filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"no such file or folder: {uri}")
    if fs.isfile(path):
        return [uri]
    prefix = "s3://" if uri.startswith("s3://") else ""
    found = sorted(p for p in fs.find(path)
                   if os.path.basename(p).startswith("metadata_") and p.endswith(METADATA_SUFFIXES))
    if not found:
        raise FileNotFoundError(f"no metadata_*.json or metadata_*.json.gz file under {uri}")
    return [prefix + p for p in found]


def read_lines(uri: str) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw line) of a metadata file, gunzipped on the fly; blank lines are skipped."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as raw:
        f = gzip.GzipFile(fileobj=raw) if uri.endswith(".gz") else raw
        for number, line in enumerate(f, start=1):
            if line.strip():
                yield number, line


def parse_record(line: bytes) -> dict[str, Any]:
    try:
        text = line.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise Reject(f"malformed line: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        try:
            record = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise Reject(f"malformed line: {e.msg}, column {e.colno}") from None
    if not isinstance(record, dict):
        raise Reject(f"malformed line: a JSON {type(record).__name__}, not an object")
    return record


def clean(value: Any) -> str:
    """Text as a user would read it: HTML entities decoded, invisible marks removed, whitespace collapsed."""
    return " ".join(html.unescape(str(value)).translate(_INVISIBLE).split())


def category_path(record: dict[str, Any]) -> list[str]:
    paths = record.get("categories")
    if isinstance(paths, list) and paths and all(isinstance(p, list) for p in paths):
        paths = max(paths, key=len)  # a list of paths: the most specific, the first on ties (max keeps the first)
    if not isinstance(paths, list) or not paths:
        raise Reject("no categories")
    names = [clean(p) if isinstance(p, str) else "" for p in paths]
    if not all(names):
        raise Reject(f"blank name in categories: {paths!r}"[:200])
    return names


def _value_text(value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, dict):
        return ""
    if isinstance(value, list):
        return ", ".join(t for t in (clean(v) for v in value if isinstance(v, (str, int, float))) if t)
    return clean(value)


def attributes(record: dict[str, Any]) -> list[str]:
    pairs: list[tuple[str, Any]] = []
    if record.get("brand"):
        pairs.append(("Brand", record["brand"]))
    for field in ("overviewFeatures", "productDetails"):
        table = record.get(field)
        if isinstance(table, dict):
            pairs += [(k, v) for k, v in table.items() if clean(k).rstrip(" :").lower() not in SKIPPED_DETAILS]
    features = record.get("features")
    if isinstance(features, list):
        pairs += [("feature", f) for f in features if isinstance(f, str)]
    out: dict[str, None] = {}  # ordered set
    for key, value in pairs:
        key, text = clean(key).rstrip(" :"), _value_text(value)
        if key and text:
            out[f"{key}: {text}"] = None
    return list(out)


def _area(size: Any) -> float:
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, (int, float)) for v in size):
        return float(size[0]) * float(size[1])
    return 0.0


def image_urls(record: dict[str, Any]) -> list[str]:
    """The product's image URLs, the best (largest) first."""
    raw = record.get("imgUrl", record.get("imUrl"))
    if isinstance(raw, str) and raw.strip().startswith("{"):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return []
    if isinstance(raw, dict):
        urls = sorted(raw, key=lambda u: -_area(raw[u]))  # stable: the first of equally large ones
    elif isinstance(raw, str):
        urls = [raw]
    elif isinstance(raw, list):
        urls = [u for u in raw if isinstance(u, str)]
    else:
        urls = []
    return [u.strip() for u in urls if isinstance(u, str) and "://" in u]


def image_index(uri: str) -> dict[str, str]:
    """lower-cased file name -> URI of every image file under a folder (local or s3://)."""
    fs, path = storage.filesystem(uri)
    if not fs.isdir(path):
        raise FileNotFoundError(f"image folder not found: {uri}")
    prefix = "s3://" if uri.startswith("s3://") else ""
    index: dict[str, str] = {}
    for p in sorted(fs.find(path)):
        name = os.path.basename(p).lower()
        if name.endswith(IMAGE_EXTENSIONS):
            index.setdefault(name, prefix + p)
    return index


def local_image(asin: str, urls: list[str], index: dict[str, str]) -> str | None:
    names = [f"{asin}{ext}".lower() for ext in IMAGE_EXTENSIONS]
    names += [u.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1].lower() for u in urls]
    return next((index[n] for n in names if n in index), None)


def convert(metadata: str, out: str, images: str | None = None, workers: int = 16,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``<out>/products.parquet`` (+ ``images/`` when local images are found) and
    ``<out>/conversion_rejects.parquet``; return counts. Raises FileNotFoundError for missing inputs."""
    t0 = time.time()
    files = metadata_files(metadata)
    index = image_index(images) if images else {}
    products: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    first_seen: dict[tuple[str, str], str] = {}  # (asin, market) -> its source
    source_of: dict[str, str] = {}  # product_id -> source
    markets: dict[str, str] = {}  # asin -> the market of its first listing
    copies: list[tuple[int, str, str]] = []  # (row in products, source image URI, destination URI)
    read = 0
    for uri in files:
        name = uri.rsplit("/", 1)[-1]
        market = name.split("_")[1] if name.count("_") >= 2 else ""
        for number, line in read_lines(uri):
            read += 1
            source, asin = f"{name}#{number}", None
            try:
                record = parse_record(line)
                asin = record.get("asin")
                asin = asin.strip() if isinstance(asin, str) else None
                if not asin:
                    raise Reject("missing asin")
                if not _ASIN.match(asin):
                    raise Reject(f"malformed asin: {asin[:40]!r}")
                if (asin, market) in first_seen:
                    raise Reject(f"duplicate asin: first kept at {first_seen[asin, market]}")
                path = category_path(record)
                urls = image_urls(record)
                found = local_image(asin, urls, index) if index else None
                if found is None and not urls:
                    raise Reject("no image: no imgUrl/imUrl" + (" and no local file" if images else ""))
            except Reject as e:
                rejects.append({"product_id": asin, "reason": str(e), "source": source})
                continue
            first_seen[asin, market] = source
            pid = asin if markets.setdefault(asin, market) == market else f"{asin}@{market}"
            source_of[pid] = source
            image = urls[0] if found is None else f"images/{pid}{os.path.splitext(found)[1].lower()}"
            if found is not None:
                copies.append((len(products), found, storage.join(out, image)))
            products.append({"product_id": pid, "title": clean(record.get("title") or ""),
                             "attributes": attributes(record), "category_path": path, "image": image,
                             "group_id": asin})
        log(f"xmarket: {name}: {read:,} lines read so far, {len(products):,} products, {len(rejects):,} rejects")

    failed = _copy_images(copies, workers)
    for row in sorted(failed, reverse=True):  # delete from the end so earlier row numbers stay valid
        p = products.pop(row)
        rejects.append({"product_id": p["product_id"], "reason": failed[row], "source": source_of[p["product_id"]]})
    if copies:
        log(f"xmarket: copied {len(copies) - len(failed):,} images to {storage.join(out, 'images')}")

    write_converted(out, products, rejects, extra=("group_id",))
    return {"files": len(files), "read": read, "products": len(products), "rejected": len(rejects),
            "reasons": reason_counts(rejects),
            "images_copied": len(copies) - len(failed), "image_urls": sum("://" in p["image"] for p in products),
            "seconds": round(time.time() - t0, 1)}


def _copy_images(copies: list[tuple[int, str, str]], workers: int) -> dict[int, str]:
    """Copy (row, source, destination) files in threads (I/O bound, S3 latency); row -> reason for failures."""
    def copy(item: tuple[int, str, str]) -> tuple[int, str | None]:
        row, src, dst = item
        try:
            data = storage.read_bytes(src)
            if not data:
                return row, f"image copy failed: empty file {src}"
            storage.write_bytes(dst, data)
            return row, None
        except Exception as e:  # noqa: BLE001 - one unreadable file is this row's problem, not the job's
            return row, failure(e, "image copy")

    return {row: reason for row, reason in threaded(copy, copies, workers) if reason}
