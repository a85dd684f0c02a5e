"""The XMarket converter on a hand-written fixture in the dataset's shape (tests/fixtures/xmarket/README.md): the
output is a catalogue that clipita.catalog accepts, with the paper's one path per product, "key: value" attributes,
resolvable images, and every unconvertible line in conversion_rejects.parquet with its reason."""
from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from PIL import Image

from catalogs import read_catalog
from clipita import storage
from clipita.catalog import REJECTS_FILE
from clipita.sources import xmarket
from jobs.xmarket import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "xmarket")
METADATA = os.path.join(FIXTURE, "us")
IMAGES = os.path.join(FIXTURE, "images")
ELECTRONICS = os.path.join(METADATA, "Electronics", "metadata_us_Electronics.json")
WITHOUT_LOCAL_IMAGE = {"B0844Y2B7M", "B075QJSQLH", "B00ZPD3Y4E"}
REJECTS = {  # source -> (product_id, reason kind), see the fixture's README
    "metadata_us_Electronics.json#8": (None, "malformed line"),
    "metadata_us_Electronics.json#9": (None, "malformed line"),
    "metadata_us_Electronics.json#10": (None, "missing asin"),
    "metadata_us_Electronics.json#19": ("B0NOCATS01", "no categories"),
    "metadata_us_Electronics.json#20": ("B0NOIMAGE1", "no image"),
    "metadata_us_Electronics.json#21": ("B0BLANKCT1", "blank name in categories"),
    "metadata_us_Home_and_Kitchen.json#7": ("B000023VW2", "duplicate asin"),
}


def rows_by_id(root: str) -> dict[str, dict]:
    return {r["product_id"]: r for r in read_catalog(root).products.to_pylist()}


def rejects(root: str) -> dict[str, tuple[str | None, str]]:
    table = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(root, REJECTS_FILE))))
    return {r["source"]: (r["product_id"], r["reason"]) for r in table.to_pylist()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("xmarket") / "catalog")
    summary = xmarket.convert(METADATA, out, images=IMAGES, workers=4, log=lambda *_: None)
    return out, summary


def test_output_is_a_valid_catalogue_with_expected_counts(converted):
    out, summary = converted
    catalog = read_catalog(out)
    assert catalog.counts == {"read": 26, "used": 26, "quarantined": 0}
    assert summary["files"] == 2  # the reviews file beside the metadata is not read
    assert (summary["read"], summary["products"], summary["rejected"]) == (33, 26, 7)
    assert (summary["images_copied"], summary["image_urls"]) == (23, 3)
    assert summary["reasons"] == {"malformed line": 2, "missing asin": 1, "no categories": 1, "no image": 1,
                                  "blank name in categories": 1, "duplicate asin": 1}


def test_dataset_sample_record_maps_to_path_attributes_and_image(converted):
    out, _ = converted
    antenna = rows_by_id(out)["B000023VW2"]
    assert antenna["title"] == "Sangean ANT-60 Short Wave Antenna"  # the first row wins over the duplicate
    assert antenna["category_path"] == ["Electronics", "Accessories & Supplies", "Audio & Video Accessories",
                                        "Antennas", "Radio Antennas"]
    attrs = antenna["attributes"]
    assert attrs[:4] == ["Product Dimensions: 5.98 x 8.27 x 0.94 inches", "Item Weight: 1.41 ounces",
                         "Manufacturer: Sangean", "Item model number: ANT-60"]
    assert "feature: Has 3.5-millimeter mini plug" in attrs
    assert not [a for a in attrs if a.split(":")[0] in ("ASIN", "Customer Reviews", "Best Sellers Rank")]
    # the local file was found by the name of one of its image URLs, and copied under the asin
    assert antenna["image"] == "images/B000023VW2.jpg"
    with open(os.path.join(IMAGES, "71-XmouTyhL._AC_SX355_.jpg"), "rb") as f:
        assert storage.read_bytes(storage.resolve(out, antenna["image"])) == f.read()


def test_every_image_resolves(converted):
    out, _ = converted
    formats = {".jpg": "JPEG", ".png": "PNG", ".webp": "WEBP"}
    for pid, row in rows_by_id(out).items():
        if pid in WITHOUT_LOCAL_IMAGE:
            assert row["image"].startswith(("http://", "https://")), pid
            continue
        assert row["image"].startswith(f"images/{pid}."), row["image"]
        with Image.open(io.BytesIO(storage.read_bytes(storage.resolve(out, row["image"])))) as im:
            assert im.format == formats[os.path.splitext(row["image"])[1]]
    rows = rows_by_id(out)
    # without a local file the largest image of imgUrl ({url: [height, width]}) is kept
    assert rows["B0844Y2B7M"]["image"].endswith("._AC_SX679_.jpg")
    assert rows["B07FKTZC4M"]["image"] == "images/B07FKTZC4M.png"


def test_python_literal_and_older_dump_records(converted):
    out, _ = converted
    rows = rows_by_id(out)
    assert rows["B07VQ2TJ6S"]["category_path"][-1] == "Dutch Ovens"  # the Python-literal line
    sheets = rows["B00ZPD3Y4E"]  # list of paths -> the longest, first of equals; entities decoded
    assert sheets["category_path"] == ["Home & Kitchen", "Bedding", "Sheets & Pillowcases", "Sheet & Pillowcase Sets"]
    assert sheets["title"] == "Sheet & Pillowcase Set, Queen, Microfiber"
    assert sheets["attributes"] == ["Brand: AmazonBasics"]
    assert sheets["image"] == "http://ecx.images-amazon.com/images/I/41YKLM8cbCL.jpg"
    # a scraped productDetails key "Brand \u200f : \u200e" reads as "Brand"
    assert rows["B00004OCKR"]["attributes"][:2] == ["Brand: OXO", "Material: Plastic"]


def test_unconvertible_lines_are_rejects_with_reasons(converted):
    out, _ = converted
    got = rejects(out)
    assert {src: (pid, reason.split(":")[0]) for src, (pid, reason) in got.items()} == REJECTS
    duplicate = got["metadata_us_Home_and_Kitchen.json#7"][1]
    assert duplicate == "duplicate asin: first kept at metadata_us_Electronics.json#1"
    assert got["metadata_us_Electronics.json#9"][1] == "malformed line: a JSON list, not an object"
    assert got["metadata_us_Electronics.json#8"][1].startswith("malformed line: Unterminated string")


def test_gzipped_single_file_without_images_keeps_urls(tmp_path):
    src = tmp_path / "metadata_us_Electronics.json.gz"
    with open(ELECTRONICS, "rb") as f, gzip.open(src, "wb") as g:
        shutil.copyfileobj(f, g)
    out = str(tmp_path / "catalog")
    summary = xmarket.convert(str(src), out, log=lambda *_: None)
    rows = rows_by_id(out)
    assert len(rows) == summary["products"] == 14 and summary["images_copied"] == 0
    assert all(r["image"].startswith("https://") for r in rows.values())
    assert not os.path.exists(os.path.join(out, "images"))
    assert rejects(out)["metadata_us_Electronics.json.gz#20"] == ("B0NOIMAGE1", "no image: no imgUrl/imUrl")


def test_the_same_asin_in_another_market_is_a_listing_of_its_group(tmp_path):
    (tmp_path / "us").mkdir()
    (tmp_path / "de").mkdir()
    shutil.copy(ELECTRONICS, tmp_path / "us" / "metadata_us_Electronics.json")
    shutil.copy(ELECTRONICS, tmp_path / "de" / "metadata_de_Electronics.json")
    out = str(tmp_path / "catalog")
    summary = xmarket.convert(str(tmp_path), out, log=lambda *_: None)
    rows = {r["product_id"]: r for r in pq.read_table(os.path.join(out, "products.parquet")).to_pylist()}
    assert summary["products"] == 28 and len(rows) == 28  # the 14 products, listed in both markets
    assert rows["B000023VW2@us"]["group_id"] == rows["B000023VW2"]["group_id"] == "B000023VW2"  # de sorts first
    assert rows["B000023VW2@us"]["title"] == rows["B000023VW2"]["title"]
    assert all(r["group_id"] == pid.split("@")[0] for pid, r in rows.items())


def test_unit_mapping_rules():
    assert xmarket.image_urls({"imgUrl": '{"https://a/s.jpg": [10, 10], "https://a/l.jpg": [20, 30], '
                                         '"https://a/t.jpg": [20, 30]}'}) == ["https://a/l.jpg", "https://a/t.jpg",
                                                                             "https://a/s.jpg"]
    assert xmarket.image_urls({"imgUrl": "not json {"}) == []
    assert xmarket.image_urls({"imUrl": "relative/path.jpg"}) == []  # would resolve inside the catalogue
    assert xmarket.category_path({"categories": [["A", "B"], ["C", "D"], ["A"]]}) == ["A", "B"]
    with pytest.raises(xmarket.Reject, match="no categories"):
        xmarket.category_path({"categories": "Electronics"})
    assert xmarket.attributes({"productDetails": {"Size": ["S", "M", 3], "Flag": True, "Dims": {"w": 1}, "X": " "},
                               "features": ["  two   spaces ", "two spaces"]}) == ["Size: S, M, 3",
                                                                                     "feature: two spaces"]
    with pytest.raises(xmarket.Reject, match="not UTF-8"):
        xmarket.parse_record(b'{"asin": "\xff"}')


def test_reads_and_writes_s3(s3_bucket):
    for folder in (METADATA, IMAGES):  # the dataset and the downloaded images in the bucket too
        for dirpath, _, names in os.walk(folder):
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), FIXTURE)
                with open(os.path.join(dirpath, name), "rb") as f:
                    storage.write_bytes(f"{s3_bucket}/xmarket/{rel}", f.read())
    out = f"{s3_bucket}/catalogs/xmarket-us"
    summary = xmarket.convert(f"{s3_bucket}/xmarket/us", out, images=f"{s3_bucket}/xmarket/images", workers=4,
                              log=lambda *_: None)
    rows = rows_by_id(out)
    assert len(rows) == summary["products"] == 26 and summary["images_copied"] == 23
    data = storage.read_bytes(storage.resolve(out, rows["B07FKTZC4M"]["image"]))
    assert Image.open(io.BytesIO(data)).format == "PNG"
    assert {src: (pid, reason.split(":")[0]) for src, (pid, reason) in rejects(out).items()} == REJECTS


def test_cli_success_and_summary(tmp_path, capsys):
    main(["--metadata", METADATA, "--out", str(tmp_path / "c"), "--images", IMAGES])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("jobs.xmarket: 26 products from 33 lines in 2 file(s)")
    assert "7 rejected" in line and "conversion_rejects.parquet" in line


@pytest.mark.parametrize("args, message", [
    (["--metadata", "/no/such/folder"], "no such file or folder: /no/such/folder"),
    (["--metadata", IMAGES], "no metadata_*.json or metadata_*.json.gz file under"),
    (["--metadata", METADATA, "--images", "/no/such/images"], "image folder not found"),
    (["--metadata", METADATA, "--workers", "0"], "--workers must be >= 1"),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(args + ["--out", str(tmp_path / "c")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jobs.xmarket: error: ") and message in err


def test_cli_all_rejected_exits_2_and_keeps_rejects(tmp_path, capsys):
    bad = tmp_path / "metadata_us_Bad.json"
    bad.write_text('{"asin": "B0X", "categories": []}\nnot json at all\n')
    out = tmp_path / "c"
    with pytest.raises(SystemExit) as e:
        main(["--metadata", str(bad), "--out", str(out)])
    assert e.value.code == 2
    assert "no product could be converted" in capsys.readouterr().err
    assert [r[1].split(":")[0] for r in rejects(str(out)).values()] == ["no categories", "malformed line"]


def test_module_entrypoint_exit_codes(tmp_path):
    run = [sys.executable, "-m", "jobs.xmarket", "--metadata", ELECTRONICS, "--out", str(tmp_path / "c")]
    ok = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "14 products" in ok.stdout
    usage = subprocess.run(run[:3], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert usage.returncode == 2 and "--metadata" in usage.stderr
