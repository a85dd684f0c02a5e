"""jobs.embed end to end on a real local Ray, with the catalogue on a loopback S3 server."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipita import storage
from clipita.config import load_config
from clipita.sources.synth import write_catalog
from clipita.stages.embed import finished_parts, run_embed
from clipita.storage import read_parquet_dir
from conftest import OFFLINE_CONFIG, ROOT

pytestmark = pytest.mark.slow


def corrupt(root: str) -> dict[str, str]:
    """Inject the faults of a real marketplace feed; returns product_id -> expected quarantine reason prefix."""
    uri = storage.join(root, "products.parquet")
    table = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
    rows = table.to_pylist()
    storage.write_bytes(storage.resolve(root, rows[0]["image"]), b"\x00garbage, not an image" * 10)
    data = storage.read_bytes(storage.resolve(root, rows[1]["image"]))
    storage.write_bytes(storage.resolve(root, rows[1]["image"]), data[: len(data) // 3])
    rows[2]["image"] = "images/does-not-exist.jpg"
    rows.append(dict(rows[3]))  # the same id twice: both rows are quarantined
    rows[4]["category_path"] = []
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
    return {rows[0]["product_id"]: "undecodable", rows[1]["product_id"]: "truncated",
            rows[2]["product_id"]: "image not found", rows[3]["product_id"]: "duplicate product_id (2 rows)",
            rows[4]["product_id"]: "empty category_path"}


def test_embed_from_s3_accounts_for_every_row(ray_session, s3_bucket):
    root = f"{s3_bucket}/catalog"
    write_catalog(root, 120, seed=5, workers=1, progress=False)
    bad = corrupt(root)
    workdir = f"{s3_bucket}/work"
    cfg = load_config(OFFLINE_CONFIG, {"embed.part_rows": 32, "embed.batch_size": 16})
    stats = run_embed(root, workdir, cfg, log=lambda *_: None)

    assert stats["read"] == 121 and stats["used"] + stats["quarantined"] == 121
    assert stats["quarantined"] == 6  # 5 faults, the duplicate counting twice
    feats = read_parquet_dir(f"{workdir}/features/products")
    ids = feats.column("product_id").to_pylist()
    assert len(ids) == len(set(ids)) == 115 and not set(ids) & set(bad)
    q = read_parquet_dir(f"{workdir}/quarantine").to_pylist()
    reasons = {r["product_id"]: r["reason"] for r in q}
    for pid, want in bad.items():
        assert reasons[pid].startswith(want) or want in reasons[pid], (pid, reasons[pid])
    image = np.stack(feats.column("image_emb").to_numpy(zero_copy_only=False))
    assert image.dtype == np.float16 and np.allclose(np.linalg.norm(image.astype(np.float32), axis=1), 1, atol=1e-2)
    categories = pq.read_table(pa.BufferReader(storage.read_bytes(f"{workdir}/features/categories.parquet")))
    assert set(categories.column("category").to_pylist()) >= {" > ".join(p) for p in
                                                              feats.column("category_path").to_pylist()}
    assert storage.read_json(f"{workdir}/catalog.json") == {"catalog": root}
    assert storage.read_json(f"{workdir}/features/stats.json")["used"] == 115

    # a second run finds everything finished and changes nothing
    again = run_embed(root, workdir, cfg, log=lambda *_: None)
    assert again["parts_this_run"] == 0 and again["used"] == 115


def test_killed_run_resumes_to_the_same_features(ray_session, tmp_path):
    root = str(tmp_path / "catalog")
    write_catalog(root, 400, seed=1, workers=1, progress=False)
    env = dict(os.environ, PYTHONPATH=ROOT, RAY_USAGE_STATS_ENABLED="0")
    sets = {"embed.part_rows": 20, "embed.batch_size": 10}
    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.embed", "--catalog", root, "--workdir", killed,
                             "--config", OFFLINE_CONFIG, *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]],
                            env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while len(finished_parts(killed)) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: the job's driver and its own local Ray
    proc.wait()
    partial = finished_parts(killed)
    assert 3 <= len(partial) < 20, "the kill must land half way"

    cfg = load_config(OFFLINE_CONFIG, sets)
    lines: list[str] = []
    run_embed(root, killed, cfg, log=lines.append)
    assert f"{len(partial)} already finished" in lines[0]  # the re-run skipped what the killed run wrote
    whole = str(tmp_path / "whole")
    run_embed(root, whole, cfg, log=lambda *_: None)
    a = read_parquet_dir(f"{killed}/features/products").sort_by("product_id")
    b = read_parquet_dir(f"{whole}/features/products").sort_by("product_id")
    assert a.num_rows == b.num_rows == 400 == len(set(a.column("product_id").to_pylist()))
    emb = ("image_emb", "title_emb", "attr_emb")
    assert a.drop_columns(list(emb)).equals(b.drop_columns(list(emb)))
    for c in emb:  # encoders batch rows differently after a resume: equal up to float summation order
        x, y = (np.stack(t.column(c).to_numpy(zero_copy_only=False)).astype(np.float32) for t in (a, b))
        assert np.abs(x - y).max() < 2e-3, c


def test_bad_arguments_fail_with_one_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "jobs.embed", "--catalog", str(tmp_path / "nothing"),
                        "--workdir", str(tmp_path / "w"), "--config", OFFLINE_CONFIG], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("jobs.embed: error: no products.parquet")
    assert "Traceback" not in r.stderr


def test_a_catalogue_with_no_usable_row_is_accounted_for(ray_session, tmp_path):
    root = str(tmp_path / "catalog")
    write_catalog(root, 20, seed=2, workers=1, progress=False)
    table = pq.read_table(f"{root}/products.parquet")
    pq.write_table(table.set_column(table.schema.get_field_index("category_path"), "category_path",
                                    pa.array([[]] * 20, pa.list_(pa.string()))), f"{root}/products.parquet")
    stats = run_embed(root, str(tmp_path / "work"), load_config(OFFLINE_CONFIG), log=lambda *_: None)
    assert stats["used"] == 0 and stats["quarantined"] == 20 and stats["reasons"] == {"empty category_path": 20}
