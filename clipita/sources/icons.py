"""IBM Carbon Design System icons (npm ``@carbon/icons``) -> a clipita catalogue of rasterised icons.

A second, real catalogue beside the synthetic demo, with a two-level category tree and per-icon tags: about 2,800
icons in 7 categories and 25 subcategories (version 11.89.0). The package is Apache-2.0 (its ``LICENSE`` file), which
allows redistributing derived images with the licence notice. Obtain it with ``npm pack @carbon/icons@11.89.0``
(a .tgz, read as it is) or any folder holding its files (``metadata.json`` and ``svg/``, directly or under
``package/`` as the .tgz unpacks).

The package's ``metadata.json`` is ``{"icons": [...], "categories": [...]}``; an icon entry reads (abridged)::

    {"name": "3D-Cursor", "friendlyName": "3D cursor", "namespace": ["watson-health"],
     "aliases": ["Watson", "IBM Watson", "Watson Health", "3D cursor", "cursor", "health", "cube", "3D cube"],
     "sizes": [32], "assets": [{"size": 32, "filepath": "32/watson-health/3D-Cursor.svg", "source": "<svg ..."}],
     "category": "Enterprise", "subcategory": "Health", "output": [...], "moduleInfo": [...]}

and ``categories`` is ``[{"name": "Actions", "subcategories": [{"name": "Controls", "members": ["play", ...]}]}]``.

Mapping (one catalogue row per icon entry, or one reject with its reason):
- ``product_id`` <- ``name`` (unique in the package, e.g. "play--filled"); the image is ``images/<name>.png``.
- ``title`` <- ``friendlyName`` ("Play filled"); without one, the name with "-" read as spaces.
- ``category_path`` <- [``category``, ``subcategory``]: level 1 is Carbon's category (Actions, Brand, Enterprise,
  Organization, Person, Planning, Tools), level 2 its subcategory (Controls, Formatting, ..., Weather). An entry
  without these two fields takes the first (category, subcategory) of ``categories`` whose ``members`` list it; 6
  icons of 11.89.0 are members of two subcategories there, and the entry's own fields decide.
- ``attributes`` <- each of ``aliases`` as "tag: X" (whitespace collapsed, repeats dropped case-insensitively, in
  the package's order); "style: filled" / "style: outline" when a "--"-separated part of the name says so
  ("filled", "solid", "fill" / "outline"; both for e.g. play--outline--filled); "namespace: X" for each
  ``namespace`` (watson-health, Q). With ``drop_path_tags`` a tag equal (case-insensitively) to a category name on
  the icon's own path is left out: in 11.89.0, 1,129 of the 2,751 converted icons carry such a tag (999 their
  subcategory's name, e.g. "health"), which a text ranker reads as the label.
- Styles: Carbon publishes variants as separate names (play, play--filled, play--outline, play--outline--filled),
  each with its own entry and category; each is its own product with the style attribute above, none is merged or
  dropped.
- ``image``: the SVG file ``svg/<filepath>`` of the entry's largest numeric ``size`` asset (32 px, the designed size;
  the 16/20/24 px assets are separate drawings for small sizes), else its first asset (glyph-only icons), rendered
  with resvg (PyPI ``resvg-py``, a self-contained wheel) to fit ``size`` x ``size`` px, centred on white, saved as
  RGB PNG. The icons are black line/solid drawings on a transparent canvas.

Rejects go to ``<out>/conversion_rejects.parquet`` (product_id, reason, source = ``metadata.json#icons[i]``), never
dropped; a reason reads "<kind>: <detail>" with kind one of: malformed entry, malformed name, duplicate name
(compared case-insensitively, so that images/<name>.png files cannot clash on a case-insensitive disk), deprecated
(``deprecated`` set; the detail is the package's ``reason``: in 11.89.0, 24 icons that are retired or were renamed /
replaced by another icon, which would then be a near-duplicate product), no category, no svg, missing svg, broken svg
(resvg cannot parse it), blank image (renders as nothing visible), write failed.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
import time
from typing import Any, Callable

from PIL import Image

from clipita import storage
from clipita.catalog import write_converted
from clipita.sources.convert import Reject, failure, reason_counts, threaded

METADATA = "metadata.json"
MIN_SIZE, MAX_SIZE = 16, 2048
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # also a safe file name for images/<name>.png
STYLES = {"filled": "filled", "solid": "filled", "fill": "filled", "outline": "outline"}


class Package:
    """The files of an unpacked package folder or an npm .tgz, by path relative to the package root."""

    def __init__(self, uri: str):
        self.uri = uri
        fs, path = storage.filesystem(uri)
        if not fs.exists(path):
            raise FileNotFoundError(f"no such file or folder: {uri}")
        self._files: dict[str, bytes] | None = None
        self._root: str | None = None
        if fs.isdir(path):
            for sub in ("", "package"):
                root = storage.join(uri, sub) if sub else uri.rstrip("/")
                if storage.exists(storage.join(root, METADATA)):
                    self._root = root
                    break
            else:
                raise FileNotFoundError(f"no {METADATA} in {uri} or {uri.rstrip('/')}/package: "
                                        "not an unpacked @carbon/icons package")
        else:
            self._files = _read_tgz(uri)

    def read(self, rel: str) -> bytes | None:
        """The file's bytes, or None when the package has no such file."""
        if self._files is not None:
            return self._files.get(rel)
        try:
            return storage.read_bytes(storage.join(self._root, rel))
        except (storage.StorageError, FileNotFoundError, IsADirectoryError):
            return None


def _read_tgz(uri: str) -> dict[str, bytes]:
    """metadata.json, package.json, LICENSE and svg/** of a .tgz (npm pack puts them under ``package/``), read once
    sequentially (a gzip stream has no random access; the JavaScript modules beside them are skipped)."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri)), mode="r:*")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{uri} is neither a folder nor a readable .tgz: {e}") from None
    files: dict[str, bytes] = {}
    with tar:
        try:
            for member in tar:
                parts = member.name.lstrip("./").split("/", 1)
                if len(parts) < 2 or not member.isfile():
                    continue
                rel = parts[1]  # below the single top-level folder ("package")
                if rel in (METADATA, "package.json", "LICENSE") or (rel.startswith("svg/") and rel.endswith(".svg")):
                    f = tar.extractfile(member)
                    files[rel] = f.read() if f else b""
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ValueError(f"{uri}: truncated or corrupt archive: {e}") from None
    if METADATA not in files:
        raise FileNotFoundError(f"no package/{METADATA} in {uri}: not an @carbon/icons package")
    return files


def load_metadata(package: Package) -> tuple[list[Any], list[Any]]:
    """(icon entries, categories) of the package's metadata.json; ValueError when it is not Carbon's format."""
    try:
        meta = json.loads(package.read(METADATA) or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{METADATA} in {package.uri} is not JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("icons"), list):
        raise ValueError(f"{METADATA} in {package.uri} has no 'icons' list: not @carbon/icons metadata")
    categories = meta.get("categories")
    return meta["icons"], categories if isinstance(categories, list) else []


def package_info(package: Package) -> dict[str, str | None]:
    try:
        info = json.loads(package.read("package.json") or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = {}
    info = info if isinstance(info, dict) else {}
    return {k: info.get(k) if isinstance(info.get(k), str) else None for k in ("name", "version", "license")}


def clean(value: Any) -> str:
    return " ".join(str(value).split())


def memberships(categories: list[Any]) -> dict[str, list[str]]:
    """icon name -> [category, subcategory] of its first listing in ``categories`` (file order)."""
    out: dict[str, list[str]] = {}
    for cat in categories:
        if not isinstance(cat, dict) or not clean(cat.get("name") or ""):
            continue
        for sub in cat.get("subcategories") or []:
            if isinstance(sub, dict) and clean(sub.get("name") or "") and isinstance(sub.get("members"), list):
                for name in sub["members"]:
                    if isinstance(name, str):
                        out.setdefault(name, [clean(cat["name"]), clean(sub["name"])])
    return out


def category_path(entry: dict[str, Any], listed: dict[str, list[str]]) -> list[str]:
    cat, sub = entry.get("category"), entry.get("subcategory")
    if isinstance(cat, str) and isinstance(sub, str) and clean(cat) and clean(sub):
        return [clean(cat), clean(sub)]
    if entry["name"] in listed:
        return listed[entry["name"]]
    raise Reject("no category: no category/subcategory and not a member of any subcategory in categories")


def title(entry: dict[str, Any]) -> str:
    friendly = entry.get("friendlyName")
    if isinstance(friendly, str) and clean(friendly):
        return clean(friendly)
    return clean(entry["name"].replace("-", " "))


def attributes(entry: dict[str, Any], path: list[str] | None = None) -> list[str]:
    """Tags ("tag: X"), style and namespace; with ``path``, tags naming a category of that path are left out."""
    skip = {p.lower() for p in path or []}
    out: dict[str, None] = {}  # ordered set
    seen: set[str] = set()
    for alias in entry.get("aliases") or []:
        text = clean(alias) if isinstance(alias, (str, int, float)) and not isinstance(alias, bool) else ""
        if text and text.lower() not in seen and text.lower() not in skip:
            seen.add(text.lower())
            out[f"tag: {text}"] = None
    for part in entry["name"].lower().split("--")[1:]:
        if part in STYLES:
            out[f"style: {STYLES[part]}"] = None
    namespaces = entry.get("namespace") or []
    for ns in [namespaces] if isinstance(namespaces, str) else namespaces:
        if isinstance(ns, str) and clean(ns):
            out[f"namespace: {clean(ns)}"] = None
    return list(out)


def _size(asset: dict[str, Any]) -> float:
    size = asset.get("size")
    return float(size) if isinstance(size, (int, float)) and not isinstance(size, bool) else -1.0


def svg_file(entry: dict[str, Any]) -> str:
    """The package path of the SVG to render: the largest numeric size's asset, else the first (a glyph)."""
    assets = [a for a in entry.get("assets") or [] if isinstance(a, dict) and isinstance(a.get("filepath"), str)
              and a["filepath"].strip()]
    if not assets:
        raise Reject("no svg: no asset with a filepath")
    best = max(assets, key=_size)  # max keeps the first of equal sizes
    rel = best["filepath"].strip().lstrip("/")
    if ".." in rel.split("/"):
        raise Reject(f"no svg: unsafe filepath {rel!r}")
    return f"svg/{rel}"


def rasterise(svg: bytes, size: int) -> bytes:
    """An SVG rendered to fit ``size`` x ``size`` px (aspect kept, centred) on white, as RGB PNG bytes."""
    import resvg_py  # the `icons` / `dev` extra; imported here so the rest of clipita does not need it

    try:
        text = svg.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Reject(f"broken svg: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise Reject("broken svg: empty file")
    try:
        png = resvg_py.svg_to_bytes(svg_string=text, width=size, height=size, background="#ffffff",
                                    skip_system_fonts=True)
    except BaseException as e:  # noqa: BLE001 - resvg raises ValueError, a Rust panic surfaces as PanicException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise Reject(f"broken svg: {str(e).splitlines()[0] if str(e) else type(e).__name__}"[:300]) from None
    with Image.open(io.BytesIO(bytes(png))) as im:
        im.load()
        drawn = im.convert("RGBA")
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(drawn, ((size - drawn.width) // 2, (size - drawn.height) // 2), drawn)
    if canvas.convert("L").point(lambda v: 255 - v).getbbox() is None:
        raise Reject("blank image: the svg draws nothing visible")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def convert(package: str, out: str, size: int = 128, workers: int = 4, drop_path_tags: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write ``<out>/products.parquet``, ``<out>/images/<name>.png`` and ``<out>/conversion_rejects.parquet``;
    return counts. Raises FileNotFoundError / ValueError for a missing or unreadable package or bad arguments."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} px, got {size}")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    t0 = time.time()
    pkg = Package(package)
    entries, categories = load_metadata(pkg)
    info = package_info(pkg)
    log(f"icons: {info['name'] or '?'}@{info['version'] or '?'} ({info['license'] or 'licence unknown'}): "
        f"{len(entries):,} icon entries")
    listed = memberships(categories)
    candidates: list[tuple[dict[str, Any], str, str]] = []  # (row, svg path in package, source)
    rejects: list[dict[str, Any]] = []
    first_seen: dict[str, str] = {}
    path_tagged: set[str] = set()  # icons with a tag naming a category of their own path (before dropping)
    for i, entry in enumerate(entries):
        source, name = f"{METADATA}#icons[{i}]", None
        try:
            if not isinstance(entry, dict):
                raise Reject(f"malformed entry: a JSON {type(entry).__name__}, not an object")
            name = entry.get("name")
            name = name.strip() if isinstance(name, str) else None
            if not name:
                raise Reject("malformed entry: no name")
            if not _NAME.match(name):
                raise Reject(f"malformed name: {name[:60]!r}")
            if name.lower() in first_seen:  # case-insensitively: images/<name>.png must not clash anywhere
                raise Reject(f"duplicate name: first at {first_seen[name.lower()]}")
            first_seen[name.lower()] = source
            if entry.get("deprecated"):
                raise Reject(f"deprecated: {clean(entry.get('reason') or 'marked deprecated in the metadata')}"[:300])
            entry = {**entry, "name": name}
            path = category_path(entry, listed)
            attrs = attributes(entry, path if drop_path_tags else None)
            svg = svg_file(entry)
        except Reject as e:
            rejects.append({"product_id": name, "reason": str(e), "source": source})
            continue
        row = {"product_id": name, "title": title(entry), "attributes": attrs, "category_path": path,
               "image": f"images/{name}.png"}
        candidates.append((row, svg, source))
        if {f"tag: {p}".lower() for p in path} & {a.lower() for a in attributes(entry)}:
            path_tagged.add(name)

    def render(item: tuple[dict[str, Any], str, str]) -> str | None:
        row, svg, _ = item
        try:
            data = pkg.read(svg)
            if data is None:
                raise Reject(f"missing svg: no file {svg} in the package")
            png = rasterise(data, size)
        except Reject as e:
            return str(e)
        try:
            storage.write_bytes(storage.join(out, row["image"]), png)
        except Exception as e:  # noqa: BLE001 - one unwritable file is this row's problem, not the job's
            return failure(e, "write")
        return None

    products: list[dict[str, Any]] = []
    for n, (item, reason) in enumerate(zip(candidates, threaded(render, candidates, workers)), start=1):
        if reason:
            rejects.append({"product_id": item[0]["product_id"], "reason": reason, "source": item[2]})
        else:
            products.append(item[0])
        if n % 500 == 0:
            log(f"icons: rendered {n:,} of {len(candidates):,}")
    rejects.sort(key=lambda r: int(r["source"].rsplit("[", 1)[1].rstrip("]")))  # metadata order

    write_converted(out, products, rejects)
    tags = [sum(a.startswith("tag: ") for a in p["attributes"]) for p in products]
    return {"package": info["name"], "version": info["version"], "license": info["license"],
            "entries": len(entries), "products": len(products), "rejected": len(rejects),
            "reasons": reason_counts(rejects),
            "categories": {depth: len({tuple(p["category_path"][:depth]) for p in products}) for depth in (1, 2)},
            "tags_per_icon": round(sum(tags) / len(tags), 2) if tags else 0.0,
            "icons_with_path_tag": sum(p["product_id"] in path_tagged for p in products), "size": size,
            "seconds": round(time.time() - t0, 1)}
