"""The query endpoint: Ray Serve application answering category -> product images over HTTP.

    serve run serve/config.yaml                                   # workdir, host, port, autoscaling from the file
    serve run serve.app:app workdir=demo-workdir [setting=all model=clip-ita batching=false]
    curl '127.0.0.1:8000/search?category=Women%20>%20Shoes&k=10'
    curl -H 'content-type: application/json' -d '{"title": "red boots", "product_id": "p1"}' 127.0.0.1:8000/classify
    curl '127.0.0.1:8000/similar?product_id=p1&k=10'

Two deployments:
- ``CategoryEncoder`` turns (query text, model) into the model's query vector. Requests are grouped by
  ``@serve.batch``: one call of the frozen text encoders for the whole batch, then each model's head on its rows.
  Categories of the tree reuse the embeddings jobs.embed computed (the vectors jobs.evaluate ranks with); any
  other text is embedded live, since the models generalise to unseen categories. For /classify it also turns a
  product (decoded image, title, attributes) into the classifying model's product vector with the same towers
  (batched too) and categorises it into the tree's leaves (clipita.downstream.Categoriser).
- ``SearchApi`` (FastAPI ingress) validates requests, resolves a category name or full path against the tree,
  asks the encoder through a DeploymentHandle, searches the memory-mapped USearch index of all products
  (``index/all/<group>``), and serves product images by product id from the catalogue's storage (local or s3).
  bm25 has no vectors: it ranks the titles in the ingress. /classify's JSON body (the image as base64) is bounded
  and decoded here, as jobs.embed decodes (clipita.images.load_image); /similar reads a product's vector back
  from its index shard and searches its neighbours.

Every error is JSON ``{"error": ...}`` with a 4xx status (503 only when a backend replica fails).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from urllib.parse import quote

import numpy as np
import pyarrow as pa
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipita import storage
from clipita.config import ConfigError, DataConfig, section_from_dict
from clipita.index import recorded_ef
from clipita.models import MODELS, REGISTRY, ROWS_GROUP
from clipita.rankers import Queries
from clipita.tree import SEP, SETTINGS
from clipita.workdir import catalog_record, classify_dir, group_dir

MAX_K = 1000  # DESIGN.md: k in 1..1000
MAX_QUERY_CHARS = 512  # longer category text is refused (a category name is a few words)
MAX_CLASSIFY_K = 100  # /classify: categories per answer
MAX_TITLE_CHARS = 4096  # /classify: a title is truncated at encoders.text_max_length tokens anyway
MAX_ATTRIBUTES, MAX_ATTRIBUTE_CHARS = 256, 512
ATTRIBUTE_CACHE = 50_000  # attribute embeddings the encoder keeps (LRU): ~77 MB at 384 dims
CLASSIFY_FIELDS = ("title", "attributes", "image", "product_id", "k")
# /classify body beyond the base64 image: title and attributes at their limits, JSON-escaped (\uXXXX: 6 bytes a char)
CLASSIFY_TEXT_BYTES = 6 * (MAX_TITLE_CHARS + MAX_ATTRIBUTES * (MAX_ATTRIBUTE_CHARS + 4)) + 4096
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
    max_image_bytes: int = 5_000_000  # /classify: largest image file (decoded from base64); larger: 413

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
        if not 1 <= self.max_image_bytes <= 100_000_000:
            raise ConfigError(f"serve.max_image_bytes must be in 1..100000000, got {self.max_image_bytes}")


def recorded_search(cfg: ServeConfig) -> ServeConfig:
    """``cfg`` with ef and query_text, where left at 0 / "", as the workdir's index recorded them (so served
    rankings are the ones jobs.evaluate measured); an index built before they were recorded used the defaults."""
    manifest = storage.read_json(storage.join(group_dir(cfg.workdir, "all", ROWS_GROUP), "manifest.json"))
    return dataclasses.replace(
        cfg, ef=cfg.ef or recorded_ef(manifest),
        query_text=cfg.query_text or manifest.get("query_text", DataConfig.query_text))


def served_models(cfg: ServeConfig) -> list[str]:
    """A sparse model always; a dense model when jobs.index built its all-products index."""
    return [n for n, m in REGISTRY.items() if not m.dense or storage.exists(
        storage.join(group_dir(cfg.workdir, "all", m.index_group(cfg.setting)), "manifest.json"))]


def classifier_spec(cfg: ServeConfig) -> dict:
    """What /classify categorises with: jobs.classify's choice (``classify/flags.json``: model, setting, softmax
    temperature and flags with their thresholds) where the workdir has one, else the served default model and
    setting with no flags. Checked here, so that a bad record fails the app with one line, not a replica."""
    uri = classify_dir(cfg.workdir, "flags.json")
    if not storage.exists(uri):
        return {"model": cfg.model, "setting": cfg.setting, "temperature": None, "flags": {}, "source": ""}
    where = f"serve: {uri}"
    try:
        record = storage.read_json(uri)
        model, setting, flags = record["model"], record["setting"], record.get("flags") or {}
        temperature = float(record.get("temperature", 0.05))
        flags = {str(n): {"subtrees": [str(c) for c in f["subtrees"]], "threshold": float(f["threshold"])}
                 for n, f in flags.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"{where} is not a jobs.classify record ({type(e).__name__}: {e})") from None
    if model not in REGISTRY or not REGISTRY[model].dense:
        raise ConfigError(f"{where}: model {model!r} is not a dense model of the registry")
    if setting not in SETTINGS:
        raise ConfigError(f"{where}: setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if REGISTRY[model].trained and not storage.exists(
            storage.join(REGISTRY[model].checkpoint(cfg.workdir, setting), "config.json")):
        raise ConfigError(f"{where}: no checkpoint of {model} (setting {setting}): run jobs.train")
    if not 1e-4 <= temperature <= 10:
        raise ConfigError(f"{where}: temperature must be in 1e-4..10, got {temperature}")
    return {"model": model, "setting": setting, "temperature": temperature, "flags": flags, "source": uri}


@dataclass
class ProductInput:
    """A validated /classify request: the image as bytes or a catalogue product id (exactly one)."""

    title: str
    attributes: list[str]
    image: bytes | None
    product_id: str | None
    k: int


class InputError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def classify_body_limit(max_image_bytes: int) -> int:
    """Largest /classify body accepted: the base64 of the largest image (and a data: URL prefix) + the text."""
    return 4 * ((max_image_bytes + 2) // 3) + 256 + CLASSIFY_TEXT_BYTES


def parse_classify(body: bytes, max_image_bytes: int) -> ProductInput:
    """A /classify JSON body -> ProductInput; raises InputError (status, one line) for anything else."""
    try:
        req = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...
        raise InputError(400, "the body is not valid JSON") from None
    if not isinstance(req, dict):
        raise InputError(400, "the body must be a JSON object")
    unknown = sorted(set(req) - set(CLASSIFY_FIELDS))
    if unknown:
        raise InputError(400, f"unknown field {unknown[0]!r}: the fields are {', '.join(CLASSIFY_FIELDS)}")
    title = req.get("title")
    if title is None:
        title = ""
    if not isinstance(title, str):
        raise InputError(400, "title must be a string")
    if len(title) > MAX_TITLE_CHARS:
        raise InputError(400, f"title is over {MAX_TITLE_CHARS} characters")
    attrs = req.get("attributes")
    if attrs is None:
        attrs = []
    if not isinstance(attrs, list) or not all(isinstance(a, str) for a in attrs):
        raise InputError(400, "attributes must be a list of strings")
    if len(attrs) > MAX_ATTRIBUTES or any(len(a) > MAX_ATTRIBUTE_CHARS for a in attrs):
        raise InputError(400, f"attributes: at most {MAX_ATTRIBUTES}, each at most {MAX_ATTRIBUTE_CHARS} characters")
    k = req.get("k", 5)
    if isinstance(k, bool) or not isinstance(k, int):
        raise InputError(400, "k must be an integer")
    if not 1 <= k <= MAX_CLASSIFY_K:
        raise InputError(400, f"k must be in 1..{MAX_CLASSIFY_K}, got {k}")
    image, product_id = req.get("image"), req.get("product_id")
    if (image is None) == (product_id is None):
        raise InputError(400, "give exactly one of image (base64 of a JPEG/PNG/WebP file) and product_id")
    data = None
    if product_id is not None:
        if not isinstance(product_id, str) or not product_id:
            raise InputError(400, "product_id must be a non-empty string")
    else:
        if not isinstance(image, str):
            raise InputError(400, "image must be a base64 string")
        if not title.strip():
            raise InputError(400, "title must not be empty")
        if image.startswith("data:"):  # a data: URL, as FileReader.readAsDataURL makes
            head, _, image = image.partition(",")
            if not head.endswith(";base64"):
                raise InputError(400, "image: a data: URL must be base64")
        if any(c in image for c in " \n\r\t"):  # base64 as wrapped by `base64` without -w0
            image = "".join(image.split())
        if len(image) // 4 * 3 - 3 > max_image_bytes:  # before decoding anything
            raise InputError(413, f"image is over {max_image_bytes} bytes")
        try:
            data = base64.b64decode(image, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(400, "image is not valid base64") from None
        if len(data) > max_image_bytes:
            raise InputError(413, f"image is over {max_image_bytes} bytes")
        if not data:
            raise InputError(400, "image is empty")
    # blank attributes are dropped, as the catalogue's are (clipita.catalog.validate)
    return ProductInput(title, [a for a in attrs if a.strip()], data, product_id, k)


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

    def __init__(self, cfg: ServeConfig, models: list[str], classifier: dict | None = None):
        from clipita.features import load_categories, recorded_encoders
        from clipita.rankers import QueryEncoder, load_ranker

        self.rankers = {m: load_ranker(cfg.workdir, m, cfg.setting) for m in models if REGISTRY[m].dense}
        self.encoder = QueryEncoder(recorded_encoders(cfg.workdir))
        self._load_classifier(cfg, classifier or {"model": cfg.model, "setting": cfg.setting, "flags": {}})
        cats = load_categories(cfg.workdir)
        keys = cats.names if cfg.query_text == "name" else cats.ids
        # Tree categories: the embeddings jobs.embed stored, so served rankings equal jobs.evaluate's.
        self.known = {str(t): i for i, t in enumerate(keys)}
        self.known_text, self.known_clip = cats.text[cfg.query_text], cats.clip[cfg.query_text]
        self.batching = cfg.batching
        for method in (self.encode_batch, self.classify_batch):
            method.set_max_batch_size(cfg.max_batch_size)
            method.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def _load_classifier(self, cfg: ServeConfig, spec: dict) -> None:
        """The product side (/classify): the classifying model's ranker and its Categoriser over the tree's leaves,
        with the category vectors jobs.classify ranks against."""
        import pyarrow.parquet as pq

        from clipita.downstream import Categoriser, category_vectors, flag_columns, leaves
        from clipita.features import load_tree, product_files
        from clipita.rankers import load_ranker

        self.classifier = {"model": spec["model"], "setting": spec["setting"]}
        self.categoriser = None
        self.attribute_cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        if not REGISTRY[spec["model"]].dense:  # bm25 served by default and no classify/flags.json: no vectors
            return
        model, setting = spec["model"], spec["setting"]
        self.product_ranker = (self.rankers[model] if setting == cfg.setting and model in self.rankers
                               else load_ranker(cfg.workdir, model, setting))
        leaf_ids = leaves(load_tree(cfg.workdir))
        flags = spec.get("flags") or {}
        self.categoriser = Categoriser(
            leaf_ids, category_vectors(cfg.workdir, model, setting, leaf_ids, cfg.query_text),
            temperature=spec.get("temperature") or Categoriser.temperature,
            flags=flag_columns({n: f["subtrees"] for n, f in flags.items()}, leaf_ids),
            thresholds={n: f["threshold"] for n, f in flags.items()})
        # the precision jobs.embed stored the features in: a live product is rounded alike before the heads
        fs, path = storage.arrow_filesystem(product_files(cfg.workdir)[0])
        stored = pq.read_schema(path, filesystem=fs).field("image_emb").type.value_type
        self.feature_dtype = np.float16 if stored == pa.float16() else np.float32

    def categorise(self, items: list[tuple[np.ndarray, str, list[str], int]]) -> list[dict]:
        """Products (uint8 (S, S, 3) pixels, title, attributes, k) -> their top-k leaves and flags: the frozen towers
        once for the batch, the classifying model's product vectors, then the Categoriser."""
        from clipita.features import Products

        n = len(items)
        enc = self.encoder
        rounded = lambda x: np.asarray(x, self.feature_dtype).astype(np.float32)  # noqa: E731
        titles = [t for _, t, _, _ in items]
        # titles and the attributes not seen lately in one call of the sentence encoder; attribute values repeat
        # across listings ("color: red"), so their embeddings are kept (LRU). Attributes are then averaged as
        # TextEncoder.encode_attributes does (zeros when none).
        cache = self.attribute_cache
        distinct = list(dict.fromkeys(a for _, _, attrs, _ in items for a in attrs))
        missing = [a for a in distinct if a not in cache]
        emb = enc.text.encode(titles + missing)
        for a, v in zip(missing, emb[n:]):
            cache[a] = v.copy()
        for a in distinct:
            cache.move_to_end(a)
        attributes = np.zeros((n, emb.shape[1]), np.float32)
        for row, (_, _, attrs, _) in enumerate(items):
            if attrs:
                attributes[row] = np.mean([cache[a] for a in attrs], axis=0)
        while len(cache) > ATTRIBUTE_CACHE:
            cache.popitem(last=False)
        products = Products(
            ids=np.array([""] * n, dtype=object), titles=np.array(titles, dtype=object),
            images=np.array([""] * n, dtype=object), paths=[[] for _ in range(n)],
            image=rounded(enc.clip.encode(np.stack([p for p, _, _, _ in items]))),
            title=rounded(emb[:n]), attributes=rounded(attributes))
        answers = self.categoriser(self.product_ranker.product_vectors(products), max(k for *_, k in items))
        for answer, (*_, k) in zip(answers, items):
            answer.update(self.classifier, categories=answer["categories"][:k])
        return answers

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def classify_batch(self, pixels: list[np.ndarray], titles: list[str], attributes: list[list[str]],
                             ks: list[int]) -> list[dict]:
        return self.categorise(list(zip(pixels, titles, attributes, ks)))

    async def classify(self, pixels: np.ndarray, title: str, attributes: list[str], k: int) -> dict:
        if self.categoriser is None:
            raise ValueError(f"model {self.classifier['model']} has no product vectors")
        if self.batching:
            return await self.classify_batch(pixels, title, attributes, k)
        return self.categorise([(pixels, title, attributes, k)])[0]

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
        return {"models": sorted(self.rankers), "known_queries": len(self.known),
                "image_size": self.encoder.clip.image_size,
                "classify": {**self.classifier, "available": self.categoriser is not None}}


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


def _takes_the_request(endpoint):
    """Annotate ``request`` with the class itself: Serve's class-based view resolves string annotations (this
    module's ``from __future__ import annotations``) in its own module, where ``Request`` is unknown, and FastAPI
    would then read it as a required query parameter."""
    endpoint.__annotations__["request"] = Request
    return endpoint


@serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 1})
@serve.ingress(api)
class SearchApi:
    """HTTP ingress: /search, /classify, /similar, /image/<product_id>, /healthz and the gallery page at /."""

    def __init__(self, encoder: DeploymentHandle, cfg: ServeConfig, models: list[str],
                 classifier: dict | None = None):
        from clipita.bm25 import SparseBM25
        from clipita.features import load_tree, recorded_encoders
        from clipita.index import ShardedIndex, read_rows

        t0 = time.time()
        self.encoder, self.cfg, self.models = encoder, cfg, models
        self.classifier = classifier or {"model": cfg.model, "setting": cfg.setting, "flags": {}}
        self.body_limit = classify_body_limit(cfg.max_image_bytes)
        self.image_size: int | None = None  # the recorded image tower's input size, asked of the encoder once
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

    async def _body(self, request: Request) -> bytes | JSONResponse:
        """The request body, refused (413) past ``body_limit`` before it is all read."""
        too_large = error(413, f"request body over {self.body_limit} bytes (images up to "
                               f"{self.cfg.max_image_bytes} bytes, base64)")
        length = request.headers.get("content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.body_limit:
            return too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.body_limit:
                return too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def _pixels(self, data: bytes) -> np.ndarray:
        """Image bytes -> uint8 (S, S, 3) at the recorded image tower's size, decoded as jobs.embed decodes them
        (clipita.images.load_image, its format and pixel limits), in a thread: the event loop keeps serving."""
        from clipita.images import load_image

        if self.image_size is None:
            self.image_size = int((await self.encoder.ready.remote())["image_size"])
        return await asyncio.to_thread(load_image, data, self.image_size)

    @api.post("/classify")
    @_takes_the_request
    async def classify(self, request):
        from clipita.images import ImageError

        model, setting = self.classifier["model"], self.classifier["setting"]
        if not REGISTRY[model].dense:
            return error(400, f"/classify needs a dense model: the served model {model} has no product vectors "
                              "(serve model=clip-ita, or run jobs.classify)")
        body = await self._body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            item = parse_classify(body, self.cfg.max_image_bytes)
        except InputError as e:
            return error(e.status, str(e))
        title, data = item.title, item.image
        if item.product_id is not None:  # the catalogue's image (as /image serves it), its title unless given
            row = self._row(item.product_id)
            if row is None:
                return error(404, f"no product {item.product_id!r} in the catalogue")
            if not title.strip():
                title = self.rows.column("title")[row].as_py() or ""
            try:
                location = storage.resolve(self.catalog, self.rows.column("image")[row].as_py())
                data = await asyncio.to_thread(storage.read_bytes, location)
            except Exception:  # noqa: BLE001 - missing file, storage error: the image is not available
                return error(404, f"the image of product {item.product_id!r} is not available")
        try:
            pixels = await self._pixels(data)
            answer = await self.encoder.classify.remote(pixels, title, item.attributes, item.k)
        except ImageError as e:
            return error(413 if "too large" in str(e) or "elongated" in str(e) else 400, f"image: {e}")
        except Exception as e:  # noqa: BLE001 - a failed replica is the service's fault, said as JSON
            logger.exception("classify failed")
            return error(503, f"classify failed: {type(e).__name__}")
        return {"model": model, "setting": setting,
                **({"product_id": item.product_id} if item.product_id is not None else {}),
                "categories": answer["categories"], "flags": answer["flags"]}

    @api.get("/similar")
    async def similar(self, product_id: str = Query(..., max_length=4096), k: int = Query(10),
                      model: str | None = None):
        from clipita.downstream import shard_vectors

        if not 1 <= k <= MAX_K:
            return error(400, f"k must be in 1..{MAX_K}, got {k}")
        model = model or self.cfg.model
        if model not in self.models:
            return error(400, f"unknown model {model!r}: use one of {', '.join(self.models)}")
        if model not in self.indexes:
            return error(400, f"model {model} has no vectors to find similar products with: use one of "
                              f"{', '.join(self.indexes)}")
        row = self._row(product_id)
        if row is None:
            return error(404, f"no product {product_id!r} in the catalogue")
        index = self.indexes[model]
        try:
            # the product's vector as its shard stores it (jobs.index keys a shard's rows from its first key)
            shard = int(np.searchsorted(index.offsets, row, side="right")) - 1
            vector = shard_vectors(index.shards[shard], int(index.first_keys[shard] + row - index.offsets[shard]), 1)
            found = index.search(vector, k + 1, ef=max(self.cfg.ef, k + 1))
            rows, scores = found.rows[0], found.scores[0]
            keep = (rows >= 0) & (rows != row)  # never the product itself
            rows, scores = rows[keep][:k], scores[keep][:k]
            taken = self.rows.take(pa.array(rows, pa.int64()))
            ids, titles = taken.column("product_id").to_pylist(), taken.column("title").to_pylist()
        except Exception as e:  # noqa: BLE001
            logger.exception("similar failed")
            return error(503, f"similar failed: {type(e).__name__}")
        return {"product_id": product_id, "model": model,
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
                "default_model": self.cfg.model, "setting": self.cfg.setting, "notes": self.notes, "encoder": encoder,
                "classify": {"model": self.classifier["model"], "setting": self.classifier["setting"],
                             "flags": sorted(self.classifier.get("flags") or {}),
                             "max_image_bytes": self.cfg.max_image_bytes}}

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
    classifier = classifier_spec(cfg)
    return SearchApi.bind(CategoryEncoder.bind(cfg, models, classifier), cfg, models, classifier)
