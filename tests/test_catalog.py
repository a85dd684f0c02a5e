import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalogs import read_catalog
from clipita import storage
from clipita.catalog import CatalogError

GOOD = {
    "product_id": ["a", "b", "c"],
    "title": ["red boot", None, "blue shirt"],
    "attributes": [["color: red"], None, ["size: M", None, ""]],
    "category_path": [["Women", "Shoes", "Boots"], ["Men", "Shoes", "Boots"], ["Men", "Tops"]],
    "image": ["images/a.jpg", "images/b.jpg", "s3://other/c.png"],
}


def write(root, table: pa.Table, name="products.parquet"):
    uri = storage.join(str(root), name)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def test_reads_a_clean_catalogue_and_normalises_nulls(tmp_path):
    write(tmp_path, pa.table(GOOD))
    cat = read_catalog(str(tmp_path))
    assert cat.counts == {"read": 3, "used": 3, "quarantined": 0}
    rows = {r["product_id"]: r for r in cat.products.to_pylist()}
    assert rows["b"]["title"] == "" and rows["b"]["attributes"] == []
    assert rows["c"]["attributes"] == ["size: M"]  # null and blank attributes are skipped, not the row
    assert cat.products.schema.field("attributes").type == pa.list_(pa.string())


def test_bad_rows_go_to_quarantine_with_reasons(tmp_path):
    t = pa.table({
        "product_id": ["ok", "dup", "dup", None, "nopath", "blank", "noimg", " "],
        "title": ["t"] * 8,
        "attributes": [[]] * 8,
        "category_path": [["A", "B"], ["A"], ["A"], ["A"], [], ["A", " "], ["A"], ["A"]],
        "image": ["x.jpg", "x.jpg", "y.jpg", "z.jpg", "p.jpg", "q.jpg", "", "r.jpg"],
    })
    write(tmp_path, t)
    cat = read_catalog(str(tmp_path))
    assert cat.products.column("product_id").to_pylist() == ["ok"]
    assert cat.counts["read"] == 8 and cat.counts["used"] + cat.counts["quarantined"] == 8
    reasons = dict(zip(cat.quarantine.column("source").to_pylist(), cat.quarantine.column("reason").to_pylist()))
    src = str(tmp_path / "products.parquet")
    assert reasons[f"{src}#1"] == reasons[f"{src}#2"] == "duplicate product_id (2 rows)"
    assert reasons[f"{src}#3"] == reasons[f"{src}#7"] == "missing product_id"
    assert reasons[f"{src}#4"] == "empty category_path"
    assert reasons[f"{src}#5"] == "blank name in category_path"
    assert reasons[f"{src}#6"] == "missing image"


def test_folder_of_parts_with_one_bad_typed_file(tmp_path):
    write(tmp_path, pa.table(GOOD), "products/part-0.parquet")
    bad = dict(GOOD, product_id=["d", "e", "a"], attributes=["color: red", "x", None])  # strings, not lists
    write(tmp_path, pa.table(bad), "products/part-1.parquet")
    cat = read_catalog(str(tmp_path))
    assert cat.counts == {"read": 6, "used": 2, "quarantined": 4}
    reasons = cat.reasons()
    # "a" is in both files: duplicates are found across files, before types are checked
    assert reasons["duplicate product_id (2 rows)"] == 1
    assert reasons["attributes has type string, expected list<item: string> (file part-1.parquet)"] == 3


def test_integer_ids_are_read_as_strings(tmp_path):
    write(tmp_path, pa.table(dict(GOOD, product_id=[1, 2, 3])))
    assert read_catalog(str(tmp_path)).products.column("product_id").to_pylist() == ["1", "2", "3"]


def test_missing_column_is_one_clear_error(tmp_path):
    t = pa.table({k: v for k, v in GOOD.items() if k != "category_path"})
    write(tmp_path, t)
    with pytest.raises(CatalogError, match="lacks required column 'category_path'"):
        read_catalog(str(tmp_path))


def test_no_products_file_and_garbage_parquet(tmp_path):
    with pytest.raises(CatalogError, match="no products.parquet"):
        read_catalog(str(tmp_path))
    (tmp_path / "products.parquet").write_bytes(b"not parquet")
    with pytest.raises(CatalogError, match="cannot read .* as parquet"):
        read_catalog(str(tmp_path))


def test_reads_from_s3(s3_bucket):
    root = f"{s3_bucket}/shop"
    write(root, pa.table(GOOD), "products/part-0.parquet")
    cat = read_catalog(root)
    assert cat.counts["used"] == 3
    assert cat.files == [f"{root}/products/part-0.parquet"]
