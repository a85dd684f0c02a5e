"""jobs.align as a Ray stage: Ray Data pairs into Ray Train, on a real local Ray and a loopback S3 server."""
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clipita import align, storage
from clipita.config import load_config
from clipita.aligned import aligned_folder
from clipita.encoders import ImageEncoder
from clipita.features import labeler_for
from clipita.images import load_image
from clipita.sources.synth import write_catalog
from clipita.stages import align as stage
from clipita.stages.embed import run_embed
from clipita.stages.train import FAIL_AT_EPOCH_ENV, FAIL_MARKER_ENV
from clipita.storage import read_parquet_dir
from clipita.vectors import vectors
from conftest import OFFLINE_CONFIG
from test_embed import corrupt

pytestmark = pytest.mark.slow
SMALL = {"data.unseen_fraction": 0.1, "embed.part_rows": 64, "align.batch_size": 32, "align.epochs": 2,
         "align.eval_rows": 50}


def with_groups(root: str, pairs: int) -> list[tuple[str, str]]:
    """A group_id column: the first ``pairs`` pairs of rows share one (listings of one product)."""
    uri = storage.join(root, "products.parquet")
    table = pq.read_table(pa.BufferReader(storage.read_bytes(uri)))
    groups = [""] * table.num_rows
    ids = table.column("product_id").to_pylist()
    for k in range(pairs):
        groups[10 + 2 * k] = groups[11 + 2 * k] = f"sku-{k}"
    sink = pa.BufferOutputStream()
    pq.write_table(table.append_column("group_id", pa.array(groups)), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
    return [(ids[10 + 2 * k], ids[11 + 2 * k]) for k in range(pairs)]


def test_align_from_s3_accounts_for_every_row_and_embed_reads_the_aligned_towers(ray_session, s3_bucket):
    root, workdir = f"{s3_bucket}/align-catalog", f"{s3_bucket}/align-work"
    write_catalog(root, 240, seed=3, workers=1, progress=False)
    bad = corrupt(root)
    pairs = with_groups(root, 4)
    cfg = load_config(OFFLINE_CONFIG, SMALL)
    stats = stage.run_align(root, workdir, cfg, log=lambda *_: None)

    assert stats["read"] == 241 and stats["quarantined"] == 6  # corrupt's 5 faults, the duplicate twice
    assert stats["read"] == stats["train"] + stats["val"] + stats["test"] + stats["quarantined"]
    assert stats["grouped"] == 8 and stats["epochs"] == 2
    cache = read_parquet_dir(f"{workdir}/align/cache")
    assert cache.num_rows == 235 and not set(cache.column("product_id").to_pylist()) & set(bad)
    group = dict(zip(cache.column("product_id").to_pylist(), cache.column("group").to_pylist()))
    assert all(group[a] == group[b] for a, b in pairs) and len(set(group.values())) >= 230
    # the split every later stage uses is the one alignment trained under: no test category among its pairs
    labeler = labeler_for(workdir, cfg.data)
    assert labeler.held and all(labeler.split(p, path) == s for p, path, s in zip(
        cache.column("product_id").to_pylist(), cache.column("category_path").to_pylist(),
        cache.column("split").to_pylist()))
    metrics = storage.read_json(f"{workdir}/align/metrics.json")
    assert metrics["test_pairs"] == stats["test"] > 0
    assert set(metrics["aligned"]) == set(metrics["unaligned"]) >= {"title_to_image", "image_to_title",
                                                                     "zero_shot_depth1"}
    assert storage.exists(f"{workdir}/align/curve.png")

    # the best checkpoint loads in open_clip from the object store, and jobs.embed embeds with it
    folder = aligned_folder(f"{workdir}/align/best")
    assert folder and os.path.isfile(os.path.join(folder, "open_clip_config.json"))
    lines = []
    embed_stats = run_embed(root, workdir, cfg, log=lines.append)
    assert any("from jobs.align's cache" in line for line in lines)  # the locked trunk is not run twice
    assert embed_stats["used"] == 235 and embed_stats["quarantined"] == 6
    quarantine = {r["product_id"]: r["reason"] for r in read_parquet_dir(f"{workdir}/quarantine").to_pylist()}
    for pid, want in bad.items():
        assert want in quarantine[pid], (pid, quarantine[pid])
    recorded = storage.read_json(f"{workdir}/features/encoders.json")
    assert recorded["image_pretrained"] == f"{workdir}/align/best"
    feats = read_parquet_dir(f"{workdir}/features/products")
    assert feats.schema.field("image_emb").type.list_size == cfg.align.embed_dim


def test_resumes_after_a_worker_dies_and_the_cache_matches_the_embedding(ray_session, tmp_path, monkeypatch):
    root, workdir = str(tmp_path / "catalog"), str(tmp_path / "work")
    write_catalog(root, 200, seed=4, workers=1, progress=False)
    monkeypatch.setenv(FAIL_AT_EPOCH_ENV, "1")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(tmp_path / "failed-once"))
    cfg = load_config(OFFLINE_CONFIG, {**SMALL, "align.epochs": 3, "align.workers": 2})
    stats = stage.run_align(root, workdir, cfg, log=lambda *_: None)
    assert os.path.exists(tmp_path / "failed-once")  # a worker died at the start of epoch 2 ...
    history = storage.read_json(f"{workdir}/align/last/open_clip_config.json")["clipita"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and stats["epochs"] == 3  # ... and the group went on
    assert history[-1]["train_loss"] < history[0]["train_loss"]

    # a re-run finds the parts cached and the towers aligned: nothing is redone
    mtime = os.path.getmtime(f"{workdir}/align/last/open_clip_pytorch_model.bin")
    again = stage.run_align(root, workdir, cfg, log=lambda *_: None)
    assert again["read"] == stats["read"] and os.path.getmtime(
        f"{workdir}/align/last/open_clip_pytorch_model.bin") == mtime

    # a re-run asking for other texts must not mix its pairs with these
    with pytest.raises(ValueError, match="holds alignment of other towers, texts or modes"):
        stage.run_align(root, workdir, load_config(OFFLINE_CONFIG, {**SMALL, "align.text": "title+attributes"}),
                        log=lambda *_: None)

    # jobs.embed from the cache (no image decoded) writes the features it writes from the pixels
    cached_lines = []
    run_embed(root, workdir, cfg, log=cached_lines.append)
    assert any("from jobs.align's cache" in line for line in cached_lines)
    other = str(tmp_path / "pixels")
    run_embed(root, other, load_config(OFFLINE_CONFIG, {**SMALL, "encoders.image_pretrained": f"{workdir}/align/best"}),
              log=lambda *_: None)
    a, b = (read_parquet_dir(f"{w}/features/products").sort_by("product_id") for w in (workdir, other))
    assert a.column("product_id").to_pylist() == b.column("product_id").to_pylist()
    for column in ("image_emb", "title_emb", "attr_emb"):
        x, y = (vectors(t.column(column)) for t in (a, b))
        norms = np.linalg.norm(x, axis=1)  # attributes: the mean of unit vectors
        assert (np.allclose(norms, 1, atol=1e-2) if column != "attr_emb" else (norms > 0.3).all()), column
        np.testing.assert_allclose(x, y, atol=2e-3, err_msg=column)  # float16 storage

    # the cached locked trunk through the aligned projection is what ImageEncoder computes from the pixels
    enc = load_config(OFFLINE_CONFIG, {"encoders.image_pretrained": f"{workdir}/align/best"}).encoders
    encoder = ImageEncoder(enc)
    cache = pq.read_table(sorted(p for p in (tmp_path / "work" / "align" / "cache").iterdir()
                                 if p.suffix == ".parquet")[0])
    catalog = pq.read_table(f"{root}/products.parquet").to_pylist()
    where = {r["product_id"]: r["image"] for r in catalog}
    ids = cache.column("product_id").to_pylist()[:4]
    pixels = np.stack([load_image(open(f"{root}/{where[p]}", "rb").read(), encoder.image_size) for p in ids])
    features = torch.tensor(cache.column("image_in").combine_chunks().flatten().to_numpy()
                            .reshape(cache.num_rows, -1)[:4])
    model = align.load_checkpoint(f"{workdir}/align/best")
    np.testing.assert_allclose(align.head(model, "image", features).detach().numpy(), encoder.encode(pixels),
                               atol=2e-5)
    assert enc.zero_shot_note is None
