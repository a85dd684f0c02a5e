"""The Carbon icon-set converter on a hand-written fixture in the npm package's layout (tests/fixtures/icons/README.md):
the output is a catalogue that clipita.catalog accepts, with the package's two-level tree as paths, aliases as
"tag: X" attributes, PNGs of the requested size, and every unconvertible icon in conversion_rejects.parquet."""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from catalogs import read_catalog
from clipita import storage
from clipita.catalog import REJECTS_FILE
from clipita.sources import icons
from jobs.icons import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "icons")
PACKAGE = os.path.join(FIXTURE, "package")
PATHS = {  # product_id -> category_path
    "play": ["Actions", "Controls"],
    "play--filled": ["Actions", "Controls"],
    "3D-Cursor": ["Enterprise", "Health"],
    "circle-fill": ["Organization", "Status"],
    "color-picker": ["Actions", "Controls"],  # no category fields: its first listing in `categories`
    "ruler--alt": ["Tools", "Instruments"],
    "gas-station": ["Planning", "Travel"],
}
REJECTS = {  # source -> (product_id, reason kind)
    "metadata.json#icons[7]": ("watson", "deprecated"),
    "metadata.json#icons[8]": ("bicycle", "missing svg"),
    "metadata.json#icons[9]": ("chart--bar", "broken svg"),
    "metadata.json#icons[10]": ("empty-state", "blank image"),
    "metadata.json#icons[11]": ("gas-station", "duplicate name"),
    "metadata.json#icons[12]": ("stray-icon", "no category"),
    "metadata.json#icons[13]": ("../escape", "malformed name"),
    "metadata.json#icons[14]": (None, "malformed entry"),
    "metadata.json#icons[15]": (None, "malformed entry"),
    "metadata.json#icons[16]": ("hammer", "no svg"),
}


def rows_by_id(root: str) -> dict[str, dict]:
    return {r["product_id"]: r for r in read_catalog(root).products.to_pylist()}


def rejects(root: str) -> dict[str, tuple[str | None, str]]:
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(root, REJECTS_FILE))))
    return {r["source"]: (r["product_id"], r["reason"]) for r in table.to_pylist()}


def image(root: str, row: dict) -> Image.Image:
    im = Image.open(io.BytesIO(storage.read_bytes(storage.resolve(root, row["image"]))))
    im.load()
    return im


def npm_tgz(path) -> str:
    """The fixture packed as `npm pack` does: every file under a top-level `package/` folder."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(PACKAGE, arcname="package")
    return str(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("icons") / "catalog")
    summary = icons.convert(FIXTURE, out, size=64, workers=2, log=lambda *_: None)
    return out, summary


def test_output_is_a_valid_catalogue_with_expected_counts(converted):
    out, summary = converted
    assert read_catalog(out).counts == {"read": 7, "used": 7, "quarantined": 0}
    assert (summary["entries"], summary["products"], summary["rejected"]) == (17, 7, 10)
    assert (summary["package"], summary["version"], summary["license"]) == ("@carbon/icons", "11.89.0", "Apache-2.0")
    assert summary["reasons"] == {"deprecated": 1, "missing svg": 1, "broken svg": 1, "blank image": 1,
                                  "duplicate name": 1, "no category": 1, "malformed name": 1, "malformed entry": 2,
                                  "no svg": 1}
    assert summary["categories"] == {1: 5, 2: 5}
    assert summary["icons_with_path_tag"] == 3  # play ("controls"), 3D-Cursor ("health"), gas-station ("travel")


def test_rows_tree_titles_and_attributes(converted):
    out, _ = converted
    rows = rows_by_id(out)
    assert {pid: r["category_path"] for pid, r in rows.items()} == PATHS
    assert all(r["image"] == f"images/{pid}.png" for pid, r in rows.items())
    cursor = rows["3D-Cursor"]
    assert cursor["title"] == "3D cursor"
    assert cursor["attributes"] == ["tag: Watson", "tag: IBM Watson", "tag: Watson Health", "tag: 3D cursor",
                                    "tag: cursor", "tag: health", "tag: cube", "namespace: watson-health"]
    # repeats dropped case-insensitively (the first spelling kept), whitespace collapsed, style from the name
    assert rows["play--filled"]["attributes"] == ["tag: Play", "tag: start", "tag: filled play", "style: filled"]
    assert rows["play"]["title"] == "Play" and not [a for a in rows["play"]["attributes"] if a.startswith("style")]
    assert rows["gas-station"]["title"] == "Gas station"  # the first of the two entries named gas-station


def test_pngs_decode_at_the_requested_size_on_white(converted):
    out, _ = converted
    rows = rows_by_id(out)
    for row in rows.values():
        im = image(out, row)
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (64, 64)), row["product_id"]
        assert im.convert("L").getextrema()[0] < 64, row["product_id"]  # something dark is drawn
    play = image(out, rows["play"])
    assert play.getpixel((2, 2)) == (255, 255, 255)  # the 32 px triangle, not the 16 px asset (a full square)
    ruler = image(out, rows["ruler--alt"])  # a 2:1 drawing fits the width and is centred on white
    assert ruler.getpixel((32, 4)) == (255, 255, 255) and ruler.getpixel((32, 59)) == (255, 255, 255)
    assert ruler.getpixel((32, 32)) == (0, 0, 0)


def test_unconvertible_icons_are_rejects_with_reasons(converted):
    out, _ = converted
    got = rejects(out)
    assert {src: (pid, reason.split(":")[0]) for src, (pid, reason) in got.items()} == REJECTS
    assert got["metadata.json#icons[8]"][1] == "missing svg: no file svg/32/bicycle.svg in the package"
    assert got["metadata.json#icons[11]"][1] == "duplicate name: first at metadata.json#icons[6]"
    assert got["metadata.json#icons[7]"][1].startswith("deprecated: Icon represents the old avatar")
    assert not os.path.exists(os.path.join(out, "images", "bicycle.png"))
    assert not os.path.exists(os.path.join(out, "images", "empty-state.png"))


def test_npm_tgz_and_package_folder_read_the_same(tmp_path, converted):
    _, summary = converted
    tgz = npm_tgz(tmp_path / "carbon-icons-11.89.0.tgz")
    for source, name in ((tgz, "from-tgz"), (PACKAGE, "from-folder")):
        out = str(tmp_path / name)
        got = icons.convert(source, out, size=32, workers=1, log=lambda *_: None)
        assert {k: got[k] for k in ("products", "rejected", "reasons")} == \
            {k: summary[k] for k in ("products", "rejected", "reasons")}
        assert image(out, rows_by_id(out)["3D-Cursor"]).size == (32, 32)


def test_drop_path_tags(tmp_path):
    out = str(tmp_path / "c")
    summary = icons.convert(FIXTURE, out, drop_path_tags=True, log=lambda *_: None)
    rows = rows_by_id(out)
    cursor = rows["3D-Cursor"]["attributes"]
    assert "tag: health" not in cursor and "tag: Watson Health" in cursor
    assert "tag: travel" not in rows["gas-station"]["attributes"]
    assert "tag: controls" not in rows["play"]["attributes"] and "tag: control" in rows["play"]["attributes"]
    assert summary["icons_with_path_tag"] == 3  # counted before dropping
    assert image(out, rows["play"]).size == (128, 128)  # the default size


def test_unit_mapping_rules():
    assert icons.svg_file({"assets": [{"size": 16, "filepath": "16/a.svg"}, {"size": "glyph", "filepath": "a.svg"},
                                      {"size": 32, "filepath": "32/a.svg"}]}) == "svg/32/a.svg"
    assert icons.svg_file({"assets": [{"size": "glyph", "filepath": "a.svg"}]}) == "svg/a.svg"
    with pytest.raises(icons.Reject, match="unsafe filepath"):
        icons.svg_file({"assets": [{"size": 32, "filepath": "../../etc/passwd"}]})
    assert icons.title({"name": "arrow--left-circle"}) == "arrow left circle"
    assert icons.attributes({"name": "x--outline", "aliases": ["a", 3, True, None, " "], "namespace": "Q"}) == \
        ["tag: a", "tag: 3", "style: outline", "namespace: Q"]
    with pytest.raises(icons.Reject, match="broken svg: not UTF-8"):
        icons.rasterise(b"<svg \xff>", 16)
    png = icons.rasterise(b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 8 8"><rect width="8" height="8"/>'
                          b"</svg>", 20)
    assert Image.open(io.BytesIO(png)).getextrema() == ((0, 0), (0, 0), (0, 0))


def test_writes_to_s3(s3_bucket):
    out = f"{s3_bucket}/catalogs/icons"
    summary = icons.convert(PACKAGE, out, size=48, log=lambda *_: None)
    rows = rows_by_id(out)
    assert len(rows) == summary["products"] == 7
    assert image(out, rows["circle-fill"]).size == (48, 48)
    assert {src: (pid, reason.split(":")[0]) for src, (pid, reason) in rejects(out).items()} == REJECTS


def test_cli_success_and_summary(tmp_path, capsys):
    main(["--package", FIXTURE, "--out", str(tmp_path / "c"), "--size", "32", "--workers", "2"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("jobs.icons: 7 products from 17 icons of @carbon/icons@11.89.0 (Apache-2.0)")
    assert "5 categories / 5 subcategories, 32 px" in line
    assert "10 rejected" in line and "conversion_rejects.parquet" in line


@pytest.mark.parametrize("args, message", [
    (["--package", "/no/such/package.tgz"], "no such file or folder: /no/such/package.tgz"),
    (["--package", os.path.join(PACKAGE, "svg")], "no metadata.json in"),
    (["--package", os.path.join(PACKAGE, "LICENSE")], "is neither a folder nor a readable .tgz"),
    (["--package", FIXTURE, "--size", "8"], "--size must be between 16 and 2048"),
    (["--package", FIXTURE, "--workers", "0"], "--workers must be >= 1"),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(args + ["--out", str(tmp_path / "c")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jobs.icons: error: ") and message in err


def test_cli_bad_metadata_and_all_rejected_exit_2(tmp_path, capsys):
    pkg = tmp_path / "pkg"
    (pkg / "svg").mkdir(parents=True)
    (pkg / "metadata.json").write_text('{"icons": {"play": {}}}')
    with pytest.raises(SystemExit) as e:
        main(["--package", str(pkg), "--out", str(tmp_path / "c1")])
    assert e.value.code == 2 and "has no 'icons' list" in capsys.readouterr().err
    (pkg / "metadata.json").write_text('{"icons": [{"name": "play", "category": "A", "subcategory": "B", '
                                       '"assets": [{"size": 32, "filepath": "32/play.svg"}]}]}')
    out = tmp_path / "c2"
    with pytest.raises(SystemExit) as e:
        main(["--package", str(pkg), "--out", str(out)])
    assert e.value.code == 2
    assert "no icon could be converted" in capsys.readouterr().err
    assert [r[1].split(":")[0] for r in rejects(str(out)).values()] == ["missing svg"]


def test_module_entrypoint_exit_codes(tmp_path):
    run = [sys.executable, "-m", "jobs.icons", "--package", npm_tgz(tmp_path / "p.tgz"), "--out", str(tmp_path / "c")]
    ok = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "7 products" in ok.stdout
    usage = subprocess.run(run[:3], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert usage.returncode == 2 and "--package" in usage.stderr
