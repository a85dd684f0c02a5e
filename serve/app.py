"""The query endpoint: Ray Serve application answering category -> product images over HTTP.

    serve run serve/config.yaml                                   # workdir, host, port, autoscaling from the file
    serve run serve.app:app workdir=demo-workdir [setting=all model=clip-ita batching=false]
    curl '127.0.0.1:8000/search?category=Women%20>%20Shoes&k=10'

Two deployments:
- ``CategoryEncoder`` turns (query text, model) into the model's query vector. Requests are grouped by
  ``@serve.batch``: one call of the frozen text encoders for the whole batch, then each model's head on its rows.
  Categories of the tree reuse the embeddings jobs.embed computed (the vectors jobs.evaluate ranks with); any
  other text is embedded live, since the models generalise to unseen categories.
- ``SearchApi`` (FastAPI ingress) validates requests, resolves a category name or full path against the tree,
  asks the encoder through a DeploymentHandle, searches the memory-mapped USearch index of all products
  (``index/all/<group>``), and serves product images by product id from the catalogue's storage (local or s3).
  bm25 has no vectors: it ranks the titles in the ingress.

Every error is JSON ``{"error": ...}`` with a 4xx status (503 only when a backend replica fails).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import pyarrow as pa
from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipita import storage
from clipita.config import ConfigError, DataConfig, IndexConfig, section_from_dict
from clipita.models import MODELS, REGISTRY, ROWS_GROUP
from clipita.rankers import Queries
from clipita.tree import SEP, SETTINGS
from clipita.workdir import catalog_record, group_dir

MAX_K = 1000  # DESIGN.md: k in 1..1000
MAX_QUERY_CHARS = 512  # longer category text is refused (a category name is a few words)
GALLERY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gallery.html")
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Application arguments (``args:`` in serve/config.yaml, or ``key=value`` after ``serve run serve.app:app``)."""

    workdir: str = ""  # workdir URI with features/, checkpoints/ and index/all/ (required)
    setting: str = "all"  # whose trained heads to serve: all | general | specific
    model: str = "clip-ita"  # default model when a request names none
    # text embedded for a tree category: its name (the paper) or its full path; "": what the workdir's index
    # recorded (data.query_text of the run that trained and evaluated it)
    query_text: str = ""
    ef: int = 0  # HNSW expansion at query time; 0: the index.expansion_search the workdir's index recorded
    batching: bool = True  # group concurrent encoder calls with @serve.batch
    max_batch_size: int = 32  # at most the encoder's max_ongoing_requests, or batches never fill
    batch_wait_timeout_s: float = 0.005  # how long a first request waits for others to join its batch

    def __post_init__(self):
        if not self.workdir:
            raise ConfigError("serve: workdir is required (serve run serve.app:app workdir=URI)")
        if self.setting not in SETTINGS:
            raise ConfigError(f"serve.setting must be one of {', '.join(SETTINGS)}, got {self.setting!r}")
        if self.model not in MODELS:
            raise ConfigError(f"serve.model must be one of {', '.join(MODELS)}, got {self.model!r}")
        if self.query_text not in ("", "name", "path"):
            raise ConfigError(f"serve.query_text must be name or path, got {self.query_text!r}")
        if self.ef < 0 or self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ConfigError("serve: ef must be >= 0, max_batch_size >= 1, batch_wait_timeout_s >= 0")


def recorded_search(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with ef and query_text, where left at 0 / "", as the workdir's index recorded them (so served
    rankings are the ones jobs.evaluate measured); an index built before they were recorded used the defaults."""
    manifest = storage.read_json(storage.join(group_dir(cfg.workdir, "all", ROWS_GROUP), "manifest.json"))
    return dataclasses.replace(
        cfg, ef=cfg.ef or int(manifest.get("expansion_search", IndexConfig.expansion_search)),
        query_text=cfg.query_text or manifest.get("query_text", DataConfig.query_text))


def served_models(cfg: ServeConfig) -> list[str]:
    """A sparse model always; a dense model when jobs.index built its all-products index."""
    return [n for n, m in REGISTRY.items() if not m.dense or storage.exists(
        storage.join(group_dir(cfg.workdir, "all", m.index_group(cfg.setting)), "manifest.json"))]


def _id_hash(product_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(product_id.encode(), digest_size=8).digest(), "big")


def sniff_image_type(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# ------------------------------------------------------------------------------------------------ encoder

@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class CategoryEncoder:
    """(query text, model) -> the model's unit query vector; loads the frozen encoders and heads once."""

    def __init__(self, cfg: ServeConfig, models: list[str]):
        from clipita.features import load_categories, recorded_encoders
        from clipita.rankers import QueryEncoder, load_ranker

        self.rankers = {m: load_ranker(cfg.workdir, m, cfg.setting) for m in models if REGISTRY[m].dense}
        self.encoder = QueryEncoder(recorded_encoders(cfg.workdir))
        cats = load_categories(cfg.workdir)
        keys = cats.names if cfg.query_text == "name" else cats.ids
        # Tree categories: the embeddings jobs.embed stored, so served rankings equal jobs.evaluate's.
        self.known = {str(t): i for i, t in enumerate(keys)}
        self.known_text, self.known_clip = cats.text[cfg.query_text], cats.clip[cfg.query_text]
        self.batching = cfg.batching
        self.encode_batch.set_max_batch_size(cfg.max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def embed(self, items: list[tuple[str, str]]) -> list[np.ndarray]:
        """Query vectors for a batch: each kind of text embedding is computed once, for the texts that need it."""
        texts = [t for t, _ in items]
        text = np.zeros((len(items), self.known_text.shape[1]), np.float32)
        clip = np.zeros((len(items), self.known_clip.shape[1]), np.float32)
        live_text, live_clip = [], []
        for i, (t, model) in enumerate(items):
            j = self.known.get(t)
            if j is not None:
                text[i], clip[i] = self.known_text[j], self.known_clip[j]
            elif REGISTRY[model].reads_clip_text:  # embedded by the CLIP text tower only
                live_clip.append(i)
            else:
                live_text.append(i)
        if live_text:
            text[live_text] = self.encoder.text.encode([texts[i] for i in live_text])
        if live_clip:
            clip[live_clip] = self.encoder.clip.encode_text([self.encoder.prompt.format(texts[i]) for i in live_clip])
        out: list[np.ndarray] = [None] * len(items)  # type: ignore[list-item]
        for model in {m for _, m in items}:
            rows = [i for i, (_, m) in enumerate(items) if m == model]
            vectors = self.rankers[model].query_vectors(Queries([texts[i] for i in rows], text[rows], clip[rows]))
            for i, v in zip(rows, vectors):
                out[i] = v
        return out

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def encode_batch(self, texts: list[str], models: list[str]) -> list[np.ndarray]:
        return self.embed(list(zip(texts, models)))

    async def encode(self, text: str, model: str) -> np.ndarray:
        if self.batching:
            return await self.encode_batch(text, model)
        return self.embed([(text, model)])[0]

    def ready(self) -> dict:
        return {"models": sorted(self.rankers), "known_queries": len(self.known)}


# ------------------------------------------------------------------------------------------------ ingress

api = FastAPI(title="clipita", description="Category-to-image retrieval (CLIP-ITA)", docs_url="/docs")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request, exc: StarletteHTTPException) -> JSONResponse:
    return error(exc.status_code, str(exc.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default is 422 {"detail": [...]}; the contract is {"error": "<one line>"}
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
    return error(422, f"{where}: {first.get('msg', 'invalid request')}")


@serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class SearchApi:
    """HTTP ingress: /search, /image/<product_id>, /healthz and the gallery page at /."""

    def __init__(self, encoder: DeploymentHandle, cfg: ServeConfig, models: list[str]):
        from clipita.bm25 import SparseBM25
        from clipita.features import load_tree, recorded_encoders
        from clipita.index import ShardedIndex, read_rows

        t0 = time.time()
        self.encoder, self.cfg, self.models = encoder, cfg, models
        self.tree = load_tree(cfg.workdir)  # per category, not per product
        note = recorded_encoders(cfg.workdir).zero_shot_note
        # said with every answer of a model that reads the CLIP text tower, when that tower is aligned with nothing
        self.notes = {m: note for m in models if note and REGISTRY[m].reads_clip_text}
        self.catalog = storage.read_json(catalog_record(cfg.workdir))["catalog"]
        # memory-mapped (view=True): replicas on one machine share the pages of the shard files. Every model of
        # the all-products scope shares one row order, so their rows (id, title, image) are held once, as Arrow.
        self.indexes = {m: ShardedIndex(group_dir(cfg.workdir, "all", REGISTRY[m].index_group(cfg.setting)),
                                        view=True, columns=None) for m in models if REGISTRY[m].dense}
        rows_uri = group_dir(cfg.workdir, "all", ROWS_GROUP)
        manifest = storage.read_json(storage.join(rows_uri, "manifest.json"))
        layout = [(e["name"], e["count"]) for e in manifest["shards"]]
        for m, index in self.indexes.items():
            if [(e["name"], e["count"]) for e in index.manifest["shards"]] != layout:
                raise ConfigError(f"serve: index/all of {m} was built apart from {ROWS_GROUP}'s: run jobs.index again")
        self.rows = read_rows(rows_uri, manifest, ["product_id", "title", "image"])
        ids = self.rows.column("product_id")
        # product id -> row for /image: sorted 64-bit hashes (16 bytes a product), checked against the id on use
        hashes = np.fromiter((_id_hash(p) for p in ids.to_pylist()), np.uint64, len(ids))
        self.by_hash = np.argsort(hashes, kind="stable")
        self.hashes = hashes[self.by_hash]
        # BM25 over every title, as an inverted index: a query touches only the titles sharing one of its words
        self.bm25 = SparseBM25(self.rows.column("title").to_pylist())
        with open(GALLERY, encoding="utf-8") as f:
            self.page = f.read()
        logger.info(f"clipita: {len(ids)} products, models {', '.join(models)}, {time.time() - t0:.1f} s")

    def _row(self, product_id: str) -> int | None:
        h = np.uint64(_id_hash(product_id))
        lo = int(np.searchsorted(self.hashes, h))
        while lo < len(self.hashes) and self.hashes[lo] == h:
            row = int(self.by_hash[lo])
            if self.rows.column("product_id")[row].as_py() == product_id:
                return row
            lo += 1
        return None

    def resolve(self, text: str) -> tuple[str, str, list[str]]:
        """(category shown, text to embed, tree matches): a tree node by full path or name, else free text."""
        matches = self.tree.find(text)
        if matches:
            cid = matches[0]
            return cid, (cid.rsplit(SEP, 1)[-1] if self.cfg.query_text == "name" else cid), matches
        parts = [p.strip() for p in text.split(">") if p.strip()] or [text]
        return text, (parts[-1] if self.cfg.query_text == "name" else SEP.join(parts)), []

    @api.get("/search")
    async def search(self, category: str = Query(..., max_length=MAX_QUERY_CHARS),
                     k: int = Query(10, ge=1, le=MAX_K), model: str | None = None):
        text = category.strip()
        if not text:
            return error(400, "category must not be empty")
        model = model or self.cfg.model
        if model not in self.models:
            return error(400, f"unknown model {model!r}: use one of {', '.join(self.models)}")
        shown, query, matches = self.resolve(text)
        try:
            if model not in self.indexes:  # sparse: BM25 over the titles
                rows, scores = await asyncio.to_thread(self.bm25.top_k, [query], k)
            else:
                vector = await self.encoder.encode.remote(query, model)
                found = self.indexes[model].search(vector, k, ef=max(self.cfg.ef, k))
                rows, scores = found.rows, found.scores
            keep = rows[0] >= 0
            rows, scores = rows[0][keep], scores[0][keep]
            taken = self.rows.take(pa.array(rows, pa.int64()))
            ids, titles = taken.column("product_id").to_pylist(), taken.column("title").to_pylist()
        except Exception as e:  # noqa: BLE001 - a failed replica is the service's fault, said as JSON
            logger.exception("search failed")
            return error(503, f"search failed: {type(e).__name__}")
        return {"category": shown, "query": query, "matches": matches, "model": model,
                **({"note": self.notes[model]} if model in self.notes else {}),
                "results": [{"product_id": p, "score": float(s), "title": t or "",
                             "image": f"/image/{quote(p, safe='')}"} for p, t, s in zip(ids, titles, scores)]}

    @api.get("/image/{product_id:path}")
    def image(self, product_id: str):
        # Only catalogue products, looked up by id: the URL never becomes a path, so nothing else is reachable.
        row = self._row(product_id)
        if row is None:
            return error(404, f"no product {product_id!r} in the catalogue")
        try:
            data = storage.read_bytes(storage.resolve(self.catalog, self.rows.column("image")[row].as_py()))
        except Exception:  # noqa: BLE001 - missing file, storage error: the image is not available
            return error(404, f"the image of product {product_id!r} is not available")
        return Response(data, media_type=sniff_image_type(data), headers={"Cache-Control": "max-age=3600"})

    @api.get("/healthz")
    async def healthz(self):
        try:
            encoder = await self.encoder.ready.remote()
        except Exception as e:  # noqa: BLE001
            return error(503, f"encoder not ready: {type(e).__name__}")
        return {"status": "ok", "products": self.rows.num_rows, "models": self.models,
                "default_model": self.cfg.model, "setting": self.cfg.setting, "notes": self.notes, "encoder": encoder}

    @api.get("/", response_class=HTMLResponse)
    def gallery(self):
        return HTMLResponse(self.page)


def app(args: dict) -> serve.Application:
    """Application builder: ``serve run serve.app:app workdir=URI`` or ``import_path: serve.app:app``."""
    cfg = section_from_dict(ServeConfig, dict(args), "serve")
    # replicas may run in another working directory than the one `serve run` was started in
    cfg = dataclasses.replace(cfg, workdir=storage.absolute(cfg.workdir))
    if not storage.exists(catalog_record(cfg.workdir)):
        raise ConfigError(f"serve: {cfg.workdir} is not a workdir (no catalog.json): run jobs.embed first")
    models = served_models(cfg)
    if ROWS_GROUP not in models:
        raise ConfigError(f"serve: no index under {cfg.workdir}/index/all: run jobs.index")
    cfg = recorded_search(cfg)
    if cfg.model not in models:
        raise ConfigError(f"serve: no index for model {cfg.model} (setting {cfg.setting}) under "
                          f"{cfg.workdir}/index/all: run jobs.train and jobs.index")
    return SearchApi.bind(CategoryEncoder.bind(cfg, models), cfg, models)
