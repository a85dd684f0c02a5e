"""The Ray Serve endpoint on a real local Ray, over real HTTP on loopback (issue: serve/)."""
from __future__ import annotations

import http.client
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


@pytest.fixture(scope="module")
def server(ray_session, trained_workdir, embedded_workdir):
    """The application of serve/app.py on a free loopback port; yields its base URL."""
    from ray import serve

    from serve.app import app

    if not os.path.exists(os.path.join(trained_workdir, "catalog.json")):  # the fixture copies features/ only
        shutil.copy(os.path.join(embedded_workdir, "catalog.json"), trained_workdir)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app({"workdir": trained_workdir, "setting": "all"}), name="clipita", route_prefix="/")
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
