"""The Ray Serve endpoint on a real local Ray, over real HTTP on loopback (issue: serve/)."""
from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from clipita.features import load_categories, load_products
from clipita.index import ShardedIndex
from clipita.workdir import group_dir
from clipita.rankers import Queries, load_ranker

CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FLAG, FLAG_THRESHOLD = "top-department", 0.5
CLASSIFIER = ("clip-ita", "specific")  # what the module's classify/flags.json names (the app serves setting all)


def flags_record(workdir: str) -> dict:
    """A classify/flags.json as jobs.classify writes it: one flag over a real subtree (the largest department)."""
    return {"model": CLASSIFIER[0], "setting": CLASSIFIER[1], "temperature": 0.05,
            "flags": {FLAG: {"subtrees": [known_categories(workdir)[1]], "threshold": FLAG_THRESHOLD}}}


@pytest.fixture(scope="module")
def served_workdir(trained_workdir, embedded_workdir, tmp_path_factory):
    """A copy of trained_workdir with a classify/flags.json (written before the server starts): the session's
    workdir is shared with other modules, which must not see it."""
    from clipita import storage
    from clipita.workdir import classify_dir

    if not os.path.exists(os.path.join(trained_workdir, "catalog.json")):  # the fixture copies features/ only
        shutil.copy(os.path.join(embedded_workdir, "catalog.json"), trained_workdir)
    workdir = str(tmp_path_factory.mktemp("served") / "work")
    shutil.copytree(trained_workdir, workdir)
    storage.write_json(classify_dir(workdir, "flags.json"), flags_record(workdir))
    return workdir


@pytest.fixture(scope="module")
def server(ray_session, served_workdir):
    """The application of serve/app.py on a free loopback port; yields its base URL."""
    from ray import serve

    from serve.app import app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app({"workdir": served_workdir, "setting": "all"}), name="clipita", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def test_ef_and_query_text_default_to_what_the_index_recorded(tmp_path):
    from clipita import storage
    from serve.app import ROWS_GROUP, ServeConfig, recorded_search

    manifest = os.path.join(group_dir(str(tmp_path), "all", ROWS_GROUP), "manifest.json")
    storage.write_json(manifest, {"expansion_search": 77, "query_text": "path"})
    cfg = recorded_search(ServeConfig(workdir=str(tmp_path)))
    assert (cfg.ef, cfg.query_text) == (77, "path")
    cfg = recorded_search(ServeConfig(workdir=str(tmp_path), ef=300, query_text="name"))  # asked for: kept
    assert (cfg.ef, cfg.query_text) == (300, "name")
    storage.write_json(manifest, {})  # an index built before they were recorded: the defaults it was built with
    cfg = recorded_search(ServeConfig(workdir=str(tmp_path)))
    assert (cfg.ef, cfg.query_text) == (128, "name")


def test_config_file_is_a_valid_serve_config_for_this_app():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from serve import app as module
    from serve.app import CategoryEncoder, SearchApi, ServeConfig

    with open(os.path.join(os.path.dirname(module.__file__), "config.yaml")) as f:
        config = ServeDeploySchema.model_validate(yaml.safe_load(f))
    assert config.http_options.host == "127.0.0.1"
    (application,) = config.applications
    assert application.import_path == "serve.app:app"
    ServeConfig(**application.args)  # every arg is a known, valid field
    deployments = {d.name: d for d in application.deployments}
    assert set(deployments) == {SearchApi.name, CategoryEncoder.name}
    assert all(d.autoscaling_config for d in deployments.values())
    # batches only fill when the replica accepts that many requests at once
    assert deployments["CategoryEncoder"].max_ongoing_requests >= application.args["max_batch_size"]


@pytest.mark.parametrize("args, message", [
    ({}, "workdir is required"),
    ({"workdir": "/nonexistent/clipita"}, "no catalog.json"),
    ({"workdir": "/tmp", "setting": "most"}, "serve.setting"),
    ({"workdir": "/tmp", "batching": "maybe"}, "serve.batching"),
    ({"workdir": "/tmp", "port": 80}, "unknown key serve.port"),
])
def test_app_arguments_fail_with_one_line(args, message):
    from clipita.config import ConfigError
    from serve.app import app

    with pytest.raises(ConfigError, match=message):
        app(args)


def get(server, path, **params):
    return requests.get(server + path, params=params, timeout=60)


def known_categories(workdir) -> list[str]:
    """Two tree categories with many products: the most frequent at depth 2 and at depth 1."""
    paths = load_products(workdir).paths
    out = []
    for depth in (2, 1):
        ids, counts = np.unique([" > ".join(p[:depth]) for p in paths if len(p) >= depth], return_counts=True)
        out.append(str(ids[np.argmax(counts)]))
    return out


def test_search_equals_the_models_ranking_over_all_products(server, trained_workdir):
    k = 20
    categories = known_categories(trained_workdir)
    bodies = [get(server, "/search", category=c, k=k, model="clip-ita") for c in categories]
    assert all(r.status_code == 200 for r in bodies), [r.text for r in bodies]
    bodies = [r.json() for r in bodies]
    served = [[x["product_id"] for x in b["results"]] for b in bodies]
    scores = np.array([[x["score"] for x in b["results"]] for b in bodies])
    for b, c in zip(bodies, categories):
        assert b["category"] == c and b["model"] == "clip-ita" and b["matches"] == [c]
    assert scores.shape == (2, k) and np.all(np.diff(scores, axis=1) <= 1e-6)

    # the expected order, computed with the library as jobs.evaluate does: stored category embeddings -> head
    ranker = load_ranker(trained_workdir, "clip-ita", "all")
    queries = Queries.from_categories(load_categories(trained_workdir), categories)
    products = load_products(trained_workdir)
    exact_rows, exact_scores = ranker.rank(queries, products, k)
    assert served == [list(products.ids[r]) for r in exact_rows]
    np.testing.assert_allclose(scores, exact_scores, atol=1e-4)
    index = ShardedIndex(group_dir(trained_workdir, "all", "clip-ita-all"))
    assert index.manifest["expansion_search"] == 128  # recorded by jobs.index, searched with by the app
    assert served == [list(index.ids[r]) for r in index.search(ranker.query_vectors(queries), k, ef=128).rows]

    # a bare name resolves to a tree category; results carry the product's title and an image URL of the app
    name = categories[0].rsplit(" > ", 1)[-1]
    by_name = get(server, "/search", category=name, k=k, model="clip-ita").json()
    assert categories[0] in by_name["matches"] and by_name["query"] == name
    titles = dict(zip(products.ids, products.titles))
    assert all(x["title"] == titles[x["product_id"]] and x["image"] == f"/image/{x['product_id']}"
               for x in bodies[0]["results"])


@pytest.mark.parametrize("model", ["bm25", "mpnet", "clip", "clip-i", "clip-ia"])
def test_every_model_answers(server, model):
    body = get(server, "/search", category="Shoes", k=5, model=model).json()
    assert body["model"] == model and len(body["results"]) == 5
    assert ("note" in body) == (model == "clip")  # zero-shot clip says it is no baseline under these encoders


def test_unknown_category_still_returns_ranked_results(server):
    body = get(server, "/search", category=f"glow-in-the-dark umbrellas {uuid.uuid4().hex[:6]}", k=7).json()
    assert body["matches"] == [] and body["model"] == "clip-ita" and len(body["results"]) == 7
    assert len({x["product_id"] for x in body["results"]}) == 7
    odd = get(server, "/search", category=" > > ", k=3, model="mpnet")  # a path with no names is still text
    assert odd.status_code == 200 and len(odd.json()["results"]) == 3


@pytest.mark.parametrize("params, status, word", [
    ({}, 422, "category"),
    ({"category": ""}, 400, "empty"),
    ({"category": "   "}, 400, "empty"),
    ({"category": "Shoes", "k": 0}, 422, "k"),
    ({"category": "Shoes", "k": 1001}, 422, "k"),
    ({"category": "Shoes", "k": "ten"}, 422, "k"),
    ({"category": "Shoes", "k": "2.5"}, 422, "k"),
    ({"category": "Shoes", "model": "gpt-9"}, 400, "gpt-9"),
    ({"category": "x" * 513}, 422, "category"),
])
def test_bad_input_is_a_4xx_json_error(server, params, status, word):
    r = get(server, "/search", **params)
    assert r.status_code == status and word in r.json()["error"], (r.status_code, r.text)


def test_unknown_route_is_a_json_404(server):
    r = get(server, "/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_healthz(server):
    r = get(server, "/healthz")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["products"] == 600 and h["default_model"] == "clip-ita"
    assert set(h["models"]) == {"bm25", "mpnet", "clip", "clip-i", "clip-ia", "clip-ita"}
    assert set(h["notes"]) == {"clip"} and "trained alone" in h["notes"]["clip"]  # no baseline: said so


def test_image_bytes_come_from_the_catalogue_and_paths_are_not_reachable(server, trained_workdir):
    from clipita import storage

    products = load_products(trained_workdir)
    root = storage.read_json(storage.join(trained_workdir, "catalog.json"))["catalog"]
    pid, location = products.ids[3], products.images[3]
    r = get(server, f"/image/{pid}")
    assert r.status_code == 200 and r.content == storage.read_bytes(storage.resolve(root, location))
    assert r.headers["content-type"].startswith("image/")

    host, port = server.removeprefix("http://").split(":")
    for path in ("/image/../../etc/passwd", "/image/..%2F..%2Fetc%2Fpasswd", "/image/%2Fetc%2Fpasswd",
                 f"/image/{location}", "/image/"):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)  # sends the path as written
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        assert resp.status == 404 and b"root:" not in body, (path, resp.status, body[:200])


def test_concurrent_clients_get_no_5xx(server):
    names = ["Shoes", "Women", "Boots", "red leather thing", "", "Kitchen", "nope" * 200]
    local = threading.local()

    def one(i: int) -> int:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        params = {"category": names[i % len(names)], "k": 1 + i % 50, "model": ("clip-ita", "mpnet", "bm25")[i % 3]}
        return local.session.get(server + "/search", params=params, timeout=120).status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(1000)))
    assert sum(c >= 500 for c in codes) == 0
    assert codes.count(200) >= 700 and set(codes) <= {200, 400, 422}


def test_serves_a_workdir_and_catalogue_on_s3(server, trained_workdir, s3_bucket):
    """The same app on an s3:// workdir whose catalogue is on s3 too (loopback moto server)."""
    from ray import serve

    from clipita import storage
    from serve.app import app

    products = load_products(trained_workdir)
    fs, bucket = storage.filesystem(s3_bucket)
    workdir, catalog = f"{s3_bucket}/work", f"{s3_bucket}/catalog"
    for part in ("features", "index/all", "checkpoints"):
        fs.put(os.path.join(trained_workdir, part), f"{bucket}/work/{part}", recursive=True)
    storage.write_json(f"{workdir}/catalog.json", {"catalog": catalog})
    local_root = storage.read_json(os.path.join(trained_workdir, "catalog.json"))["catalog"]
    pid, location = products.ids[5], products.images[5]
    image = storage.read_bytes(storage.resolve(local_root, location))
    storage.write_bytes(storage.resolve(catalog, location), image)

    serve.run(app({"workdir": workdir, "model": "mpnet"}), name="s3", route_prefix="/s3")
    try:
        body = get(server, "/s3/search", category="Shoes", k=4).json()
        assert body["model"] == "mpnet" and len(body["results"]) == 4
        assert get(server, f"/s3/image/{pid}").content == image
        assert get(server, f"/s3/image/{products.ids[6]}").status_code == 404  # not uploaded: 404, not 500
        # no classify/flags.json here: /classify uses the served default model and setting, with no flags; a
        # product id takes its image from the s3 catalogue
        answer = post(server, "/s3/classify", {"product_id": pid, "k": 3}).json()
        assert (answer["model"], answer["setting"], answer["flags"]) == ("mpnet", "all", [])
        assert len(answer["categories"]) == 3
        assert post(server, "/s3/classify", {"product_id": products.ids[6]}).status_code == 404
    finally:
        serve.delete("s3")


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_gallery_page_shows_result_images_in_a_real_browser(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (Python package only)")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=args)  # a fresh profile
        try:
            page = browser.new_page()
            page.goto(server + "/", timeout=60_000)
            page.wait_for_function("document.querySelectorAll('#model option').length > 0", timeout=60_000)
            page.fill("#category", "Shoes")
            page.fill("#k", "8")
            page.press("#category", "Enter")
            page.wait_for_function("document.querySelectorAll('#grid img').length === 8 && "
                                   "[...document.querySelectorAll('#grid img')].every(i => i.complete)",
                                   timeout=60_000)
            widths = page.eval_on_selector_all("#grid img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) == 8 and all(w > 0 for w in widths)
            assert "8 results" in page.inner_text("#status")
            # zero-shot clip is named and answered as no baseline (the offline image tower has no aligned text)
            assert "clip (not a baseline)" in page.inner_text("#model")
            page.select_option("#model", "clip")
            page.press("#category", "Enter")
            page.wait_for_function("document.querySelector('#status').textContent.includes('Not a baseline')",
                                   timeout=60_000)
        finally:
            browser.close()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


# ------------------------------------------------------------------------------------- /classify and /similar

def post(server, path, body, **kwargs):
    return requests.post(server + path, json=body, timeout=120, **kwargs)


def catalogue_rows(workdir: str, rows: list[int]) -> list[dict]:
    """Index rows -> the catalogue's product_id, title, attributes (as jobs.embed cleaned them) and image bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipita import catalog, storage

    root = storage.read_json(os.path.join(workdir, "catalog.json"))["catalog"]
    table = pa.concat_tables([pq.read_table(f, columns=["product_id", "title", "attributes", "image"])
                              for f in catalog.product_files(root)])
    by_id = {r["product_id"]: r for r in table.to_pylist()}
    ids = ShardedIndex(group_dir(workdir, "all", "mpnet")).ids
    out = []
    for row in rows:
        r = by_id[ids[row]]
        out.append({"row": row, "product_id": r["product_id"], "title": r["title"] or "",
                    "attributes": [a for a in (r["attributes"] or []) if a is not None and a.strip()],
                    "image": storage.read_bytes(storage.resolve(root, r["image"].strip()))})
    return out


def stored_vectors(index: ShardedIndex) -> np.ndarray:
    """Every row's vector as the index shards store it, in row order."""
    from clipita.downstream import shard_vectors

    return np.concatenate([shard_vectors(s, int(k), len(s)) for s, k in zip(index.shards, index.first_keys)])


def expected_categoriser(workdir: str):
    """What jobs.classify ranks with for the module's flags.json: the classifying model's category vectors over
    the tree's leaves, its flags, and its products' vectors read back from the index."""
    from clipita.downstream import Categoriser, category_vectors, flag_columns, leaves
    from clipita.features import load_tree
    from clipita.models import REGISTRY
    from serve.app import ServeConfig, recorded_search

    record = flags_record(workdir)
    query_text = recorded_search(ServeConfig(workdir=workdir)).query_text
    leaf_ids = leaves(load_tree(workdir))
    flags = record["flags"]
    categoriser = Categoriser(leaf_ids, category_vectors(workdir, *CLASSIFIER, leaf_ids, query_text),
                              temperature=record["temperature"],
                              flags=flag_columns({n: f["subtrees"] for n, f in flags.items()}, leaf_ids),
                              thresholds={n: f["threshold"] for n, f in flags.items()})
    index = ShardedIndex(group_dir(workdir, "all", REGISTRY[CLASSIFIER[0]].index_group(CLASSIFIER[1])))
    return categoriser, stored_vectors(index)


def test_classify_equals_the_categoriser_on_the_stored_product_vectors(server, served_workdir):
    k = 5
    products = catalogue_rows(served_workdir, [0, 97, 211, 350, 488, 599])
    categoriser, vectors = expected_categoriser(served_workdir)
    expected = categoriser(vectors[[p["row"] for p in products]], k)
    flagged = []
    for p, want in zip(products, expected):
        body = {"title": p["title"], "attributes": p["attributes"], "k": k,
                "image": base64.b64encode(p["image"]).decode()}
        r = post(server, "/classify", body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert (got["model"], got["setting"]) == CLASSIFIER
        assert len(got["categories"]) == k
        assert got["categories"][0]["category"] == want["categories"][0]["category"], (p["product_id"], got, want)
        np.testing.assert_allclose([c["score"] for c in got["categories"]],
                                   [c["score"] for c in want["categories"]], atol=2e-3)
        scores = [c["score"] for c in got["categories"]]
        assert scores == sorted(scores, reverse=True)
        (flag,) = got["flags"]
        assert flag["flag"] == FLAG and flag["flagged"] == (flag["score"] >= FLAG_THRESHOLD)
        assert abs(flag["score"] - want["flags"][0]["score"]) < 2e-2
        flagged.append(flag["flagged"])

        # the same product by its catalogue id: the same answer (its image from the catalogue; its own title
        # when the request gives none)
        for by_id in ({"product_id": p["product_id"], "title": p["title"], "attributes": p["attributes"], "k": k},
                      {"product_id": p["product_id"], "attributes": p["attributes"], "k": k}):
            same = post(server, "/classify", by_id).json()
            assert same["product_id"] == p["product_id"]
            assert [c["category"] for c in same["categories"]] == [c["category"] for c in got["categories"]]
            np.testing.assert_allclose([c["score"] for c in same["categories"]], scores, atol=1e-5)
            assert abs(same["flags"][0]["score"] - flag["score"]) < 1e-5
    # the expected flags over every product: the threshold both flags and spares some of them
    every = categoriser(vectors, 1)
    assert {a["flags"][0]["flagged"] for a in every} == {True, False}
    # a data: URL (what FileReader.readAsDataURL gives) and base64 wrapped at 76 columns decode to the same image
    p = products[0]
    wrapped = base64.encodebytes(p["image"]).decode()
    for image in (f"data:image/jpeg;base64,{base64.b64encode(p['image']).decode()}", wrapped):
        r = post(server, "/classify", {"title": p["title"], "attributes": p["attributes"], "image": image})
        assert r.status_code == 200 and r.json()["categories"][0]["category"] == \
            expected[0]["categories"][0]["category"]


def test_similar_equals_the_brute_force_ranking_over_the_stored_vectors(server, served_workdir):
    k = 10
    for model, group in (("clip-ita", "clip-ita-all"), ("mpnet", "mpnet")):
        index = ShardedIndex(group_dir(served_workdir, "all", group))
        vectors, ids = stored_vectors(index), index.ids
        for row in (3, 150, 444):
            params = {"product_id": ids[row], "k": k} | ({"model": model} if model != "clip-ita" else {})
            r = get(server, "/similar", **params)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["product_id"] == ids[row] and body["model"] == model
            scores = vectors @ vectors[row]
            scores[row] = -np.inf  # never the product itself
            best = np.argsort(-scores, kind="stable")[:k]
            got = [x["product_id"] for x in body["results"]]
            assert ids[row] not in got and len(got) == k
            np.testing.assert_allclose([x["score"] for x in body["results"]], scores[best], atol=1e-4)
            # the same listings, bar the order of exact ties
            assert sorted(got) == sorted(ids[best]) or np.allclose(np.diff(scores[best]), 0, atol=1e-6)
            assert all(x["image"] == f"/image/{x['product_id']}" for x in body["results"])


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_CLASSIFY = [
    ("{not json", 400, "JSON"),
    ("[1, 2]", 400, "object"),
    ("[" * 100_000, 400, "JSON"),  # nested past the parser's recursion limit
    ({"image": "PNG"}, 400, "title"),  # an upload needs a title
    ({"title": "   ", "image": "PNG"}, 400, "title"),
    ({"title": 5, "image": "PNG"}, 400, "title"),
    ({"title": "x" * 4097, "image": "PNG"}, 400, "title"),
    ({"title": "boots", "attributes": "red", "image": "PNG"}, 400, "attributes"),
    ({"title": "boots", "attributes": [1, 2], "image": "PNG"}, 400, "attributes"),
    ({"title": "boots", "image": "!!not base64!!"}, 400, "base64"),
    ({"title": "boots", "image": 12}, 400, "image"),
    ({"title": "boots", "image": ""}, 400, "empty"),
    ({"title": "boots", "image": b64(b"hello, not an image")}, 400, "undecodable"),
    ({"title": "boots", "image": b64(b"\xff\xd8\xff\xe0" + b"\0" * 64)}, 400, "image"),  # a JPEG's header only
    ({"title": "boots", "image": b64(b"GIF89a" + b"\0" * 64)}, 400, "image"),
    ({"title": "boots", "image": b64(b"\0" * 5_000_001)}, 413, "5000000"),
    ({"title": "boots", "product_id": "no-such-product"}, 404, "no-such-product"),
    ({"title": "boots"}, 400, "exactly one"),
    ({"title": "boots", "image": "PNG", "product_id": "PID"}, 400, "exactly one"),
    ({"title": "boots", "image": "PNG", "k": 0}, 400, "k"),
    ({"title": "boots", "image": "PNG", "k": 101}, 400, "k"),
    ({"title": "boots", "image": "PNG", "k": "5"}, 400, "k"),
    ({"title": "boots", "image": "PNG", "k": 2.5}, 400, "k"),
    ({"title": "boots", "image": "PNG", "k": True}, 400, "k"),
    ({"title": "boots", "image": "PNG", "colour": "red"}, 400, "colour"),
    ({"product_id": ""}, 400, "product_id"),
    ({"product_id": 7}, 400, "product_id"),
]


def classify_body(body, pid: str):
    """A BAD_CLASSIFY body as bytes: "PNG" stands for a valid image, "PID" for a catalogue product id."""
    if isinstance(body, str):
        return body.encode()
    body = dict(body)
    if body.get("image") == "PNG":
        body["image"] = b64(_tiny_png())
    if body.get("product_id") == "PID":
        body["product_id"] = pid
    return json.dumps(body).encode()


def test_bad_classify_input_is_a_4xx_json_error(server, served_workdir):
    pid = ShardedIndex(group_dir(served_workdir, "all", "mpnet")).ids[0]
    good = classify_body({"title": "boots", "image": "PNG"}, pid)
    assert requests.post(server + "/classify", data=good, timeout=60).status_code == 200  # the baseline is good
    for body, status, word in BAD_CLASSIFY:
        r = requests.post(server + "/classify", data=classify_body(body, pid), timeout=60)
        assert r.status_code == status and word in r.json()["error"], (str(body)[:80], r.status_code, r.text[:300])
        assert set(r.json()) == {"error"}
    # a body over the bound (base64 of max_image_bytes + the text) is refused before it is parsed
    r = requests.post(server + "/classify", data=b"x" * 8_000_000, timeout=60)
    assert r.status_code == 413 and "error" in r.json()
    assert get(server, "/classify").status_code == 405 and "error" in get(server, "/classify").json()


@pytest.mark.parametrize("params, status, word", [
    ({"product_id": "no-such-product"}, 404, "no-such-product"),
    ({"product_id": "PID", "k": 0}, 400, "k"),
    ({"product_id": "PID", "k": 1001}, 400, "k"),
    ({"product_id": "PID", "k": "ten"}, 422, "k"),
    ({"product_id": "PID", "model": "bm25"}, 400, "bm25"),
    ({"product_id": "PID", "model": "gpt-9"}, 400, "gpt-9"),
    ({}, 422, "product_id"),
])
def test_bad_similar_input_is_a_4xx_json_error(server, served_workdir, params, status, word):
    pid = ShardedIndex(group_dir(served_workdir, "all", "mpnet")).ids[0]
    params = {k: (pid if v == "PID" else v) for k, v in params.items()}
    r = get(server, "/similar", **params)
    assert r.status_code == status and word in r.json()["error"], (r.status_code, r.text)


def test_mixed_classify_and_similar_clients_get_no_5xx(server, served_workdir):
    products = catalogue_rows(served_workdir, list(range(0, 600, 60)))
    pid = products[0]["product_id"]
    bodies = [b for b in (classify_body(b, pid) for b, _, _ in BAD_CLASSIFY) if len(b) < 100_000]  # not the 7 MB
    local = threading.local()

    def one(i: int) -> int:
        if not hasattr(local, "session"):
            local.session = requests.Session()
        p = products[i % len(products)]
        kind = i % 5
        if kind == 0:  # an upload
            r = local.session.post(server + "/classify", timeout=120, json={
                "title": p["title"], "attributes": p["attributes"], "image": b64(p["image"]), "k": 1 + i % 100})
        elif kind == 1:  # a catalogue product
            r = local.session.post(server + "/classify", json={"product_id": p["product_id"]}, timeout=120)
        elif kind == 2:  # bad input
            r = local.session.post(server + "/classify", data=bodies[i % len(bodies)], timeout=120)
        else:  # similar, good and bad
            params = {"product_id": p["product_id"] if i % 4 else "nope", "k": (0, 5, 50, 1001)[i % 4],
                      "model": ("clip-ita", "mpnet", "bm25")[i % 3]}
            r = local.session.get(server + "/similar", params=params, timeout=120)
        return r.status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(one, range(1000)))
    assert sum(c >= 500 for c in codes) == 0, sorted(set(codes))
    assert codes.count(200) >= 400 and set(codes) <= {200, 400, 404, 413, 422}


def test_classifier_record_is_checked_when_the_app_is_built(tmp_path):
    from clipita import storage
    from clipita.config import ConfigError
    from clipita.workdir import classify_dir
    from serve.app import ServeConfig, classifier_spec

    cfg = ServeConfig(workdir=str(tmp_path))
    assert classifier_spec(cfg)["flags"] == {} and classifier_spec(cfg)["model"] == "clip-ita"
    for record, word in (({"setting": "all"}, "not a jobs.classify record"),
                         ({"model": "bm25", "setting": "all"}, "dense"),
                         ({"model": "mpnet", "setting": "most"}, "setting"),
                         ({"model": "clip-ita", "setting": "all"}, "no checkpoint"),
                         ({"model": "mpnet", "setting": "all", "flags": {"x": {"subtrees": ["A"]}}}, "record")):
        storage.write_json(classify_dir(str(tmp_path), "flags.json"), record)
        with pytest.raises(ConfigError, match=word):
            classifier_spec(cfg)
    storage.write_json(classify_dir(str(tmp_path), "flags.json"), {
        "model": "mpnet", "setting": "all", "temperature": 0.1, "flags": {"x": {"subtrees": ["A"], "threshold": 0.7}}})
    spec = classifier_spec(cfg)
    assert spec["flags"] == {"x": {"subtrees": ["A"], "threshold": 0.7}} and spec["temperature"] == 0.1


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
def test_gallery_categorises_an_uploaded_product_in_a_real_browser(server, served_workdir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (Python package only)")
    from clipita.downstream import leaves
    from clipita.features import load_tree

    (p,) = catalogue_rows(served_workdir, [42])
    image = tmp_path / "product.jpg"
    image.write_bytes(p["image"])
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                        headless=True, args=args)
        try:
            page = browser.new_page()
            page.goto(server + "/", timeout=60_000)
            page.fill("#c-title", p["title"])
            page.fill("#c-attributes", "\n".join(p["attributes"]))
            page.set_input_files("#c-image", str(image))
            page.fill("#c-k", "4")
            page.click("#classify button[type=submit]")
            page.wait_for_function("document.querySelectorAll('#categories li').length === 4", timeout=60_000)
            shown = page.eval_on_selector_all("#categories li", "lis => lis.map(li => li.textContent)")
            flags = page.eval_on_selector_all("#flags li", "lis => lis.map(li => li.textContent)")
        finally:
            browser.close()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
    tree_leaves = set(leaves(load_tree(served_workdir)))
    paths = [t.rsplit(" ", 1)[0] for t in shown]
    assert all(c in tree_leaves for c in paths) and len(set(paths)) == 4, shown
    scores = [float(t.rsplit(" ", 1)[1]) for t in shown]
    assert scores == sorted(scores, reverse=True)
    assert len(flags) == 1 and flags[0].startswith(FLAG)
    # the same answer as the endpoint's for the same product
    body = post(server, "/classify", {"title": p["title"], "attributes": p["attributes"], "image": b64(p["image"]),
                                      "k": 4}).json()
    assert paths == [c["category"] for c in body["categories"]]
