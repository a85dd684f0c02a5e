"""Latency of the endpoint's POST /classify with an image upload (serve/app.py), and a burst of mixed good and bad
/classify and /similar requests counting 5xx, on loopback.

    python benchmarks/serve_classify.py --workdir /tmp/demo-a5
    python benchmarks/serve_classify.py --build /tmp/bench-serve --products 600     # synth -> embed -> train -> index
    python benchmarks/serve_classify.py --workdir W --requests 300 --burst 1000 --concurrency 16 --profile

Starts the application (one replica per deployment, as serve/config.yaml's minimum), warms it up, then sends
``--requests`` sequential POST /classify, each a catalogue product's own title, attributes and image file (base64 in
the JSON body, as a client uploads it), cycling over the catalogue, and records each response time; then the same
with every attribute made unique (no hit in the encoder's attribute cache), then with ``product_id`` only (the
catalogue image read by the ingress, the catalogue title, no attributes). Then ``--burst`` mixed requests from
``--concurrency`` client threads: uploads, product ids, /similar, and bad input of every kind (bad base64, not an
image, k out of range, unknown ids, malformed JSON). ``--profile`` also times each step of one product in this
process with one torch thread (what a 1-CPU replica gets): decode, image tower, title and attributes, head and
categoriser. Prints the machine, the date, the command and a markdown table for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import importlib.util
import json
import os
import platform
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# `python benchmarks/serve_classify.py` puts benchmarks/ first on sys.path, where serve.py would shadow the
# `serve` package
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

WARMUP = 20


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def catalogue_products(workdir: str, n: int) -> list[dict]:
    """Up to ``n`` indexed products with their catalogue title, attributes (cleaned as jobs.embed does) and image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipita import catalog, storage
    from clipita.index import read_rows
    from clipita.models import ROWS_GROUP
    from clipita.workdir import catalog_record, group_dir

    root = storage.read_json(catalog_record(workdir))["catalog"]
    tables = []
    for f in catalog.product_files(root):
        fs, path = storage.arrow_filesystem(f)
        tables.append(pq.read_table(path, filesystem=fs, columns=["product_id", "title", "attributes", "image"]))
    by_id = {r["product_id"]: r for r in pa.concat_tables(tables).to_pylist()}
    rows_uri = group_dir(workdir, "all", ROWS_GROUP)
    ids = read_rows(rows_uri, storage.read_json(storage.join(rows_uri, "manifest.json")), ["product_id"])
    ids = ids.column("product_id").to_pylist()
    picked = [ids[i] for i in np.linspace(0, len(ids) - 1, min(n, len(ids))).astype(int)]
    out = []
    for pid in picked:
        r = by_id[pid]
        data = storage.read_bytes(storage.resolve(root, r["image"].strip()))
        out.append({"product_id": pid, "title": r["title"] or "", "image": base64.b64encode(data).decode(),
                    "attributes": [a for a in (r["attributes"] or []) if a is not None and a.strip()],
                    "bytes": len(data)})
    return out


def profile(workdir: str, products: list[dict], setting: str, model: str, repeats: int = 30) -> dict[str, float]:
    """Median ms of each step of one /classify product in this process, one torch thread."""
    import torch

    from clipita.downstream import Categoriser, category_vectors, leaves
    from clipita.encoders import ImageEncoder, TextEncoder
    from clipita.features import Products, load_tree, recorded_encoders
    from clipita.images import load_image
    from clipita.rankers import load_ranker

    torch.set_num_threads(1)
    enc = recorded_encoders(workdir)
    image, text = ImageEncoder(enc), TextEncoder(enc)
    ranker = load_ranker(workdir, model, setting)
    leaf_ids = leaves(load_tree(workdir))
    categoriser = Categoriser(leaf_ids, category_vectors(workdir, model, setting, leaf_ids))
    steps: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        steps.setdefault(name, []).append((time.perf_counter() - t) * 1000)
        return out

    for i in range(repeats + 3):
        p = products[i % len(products)]
        data = timed("base64 decode", lambda: base64.b64decode(p["image"], validate=True))
        pixels = timed("image decode (load_image)", lambda: load_image(data, image.image_size))
        img = timed("image tower", lambda: image.encode(pixels[None]))
        title = timed("title (sentence encoder)", lambda: text.encode([p["title"]]))
        attrs = timed("attributes (sentence encoder)", lambda: text.encode_attributes([p["attributes"]]))
        timed("title + attributes in one call (the app's, with no attribute seen before)",
              lambda: text.encode([p["title"], *dict.fromkeys(p["attributes"])]))
        products_ = Products(ids=np.array([""], object), titles=np.array([p["title"]], object),
                             images=np.array([""], object), paths=[[]], image=img, title=title, attributes=attrs)
        vec = timed("head (product vector)", lambda: ranker.product_vectors(products_))
        timed("categoriser", lambda: categoriser(vec, 5))
    return {k: float(np.median(v[3:])) for k, v in steps.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--workdir", help="an existing workdir with index/all/ (jobs.index) and its catalogue")
    where.add_argument("--build", metavar="DIR", help="build a synthetic workdir under DIR first (reused if there)")
    p.add_argument("--products", type=int, default=600, help="catalogue size for --build (default 600)")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "offline.yaml"), help="config for --build")
    p.add_argument("--requests", type=int, default=300, help="sequential timed /classify uploads (default 300)")
    p.add_argument("--burst", type=int, default=1000, help="mixed good and bad requests (default 1000)")
    p.add_argument("--concurrency", type=int, default=16, help="client threads of the burst (default 16)")
    p.add_argument("--k", type=int, default=5, help="categories per answer (default 5)")
    p.add_argument("--setting", default="all", help="whose trained heads the app serves (default all)")
    p.add_argument("--model", default="clip-ita", help="the app's default model (default clip-ita)")
    p.add_argument("--batching", choices=("true", "false"), default="true", help="@serve.batch (default true)")
    p.add_argument("--profile", action="store_true", help="also time each step of one product in this process")
    args = p.parse_args()
    if not 1 <= args.requests <= 100_000 or not 0 <= args.burst <= 100_000 or args.concurrency < 1:
        sys.exit("serve_classify benchmark: --requests in 1..100000, --burst in 0..100000, --concurrency >= 1")

    import ray
    import requests
    from ray import serve

    from clipita.storage import StorageError
    from serve.app import app

    bench = _bench_module("serve")
    try:
        workdir = args.workdir or bench.build_workdir(args.build, args.products, args.config)
        application = app({"workdir": workdir, "setting": args.setting, "model": args.model,
                           "batching": args.batching == "true"})
        products = catalogue_products(workdir, 300)
    except (ValueError, FileNotFoundError, StorageError) as e:  # bad arguments or inputs: one line, no trace
        sys.exit(f"serve_classify benchmark: error: {str(e).splitlines()[0]}")

    steps = profile(workdir, products, args.setting, args.model) if args.profile else {}
    ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    port = bench.free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    try:
        serve.run(application, name="bench", route_prefix="/")
        session = requests.Session()

        def upload(i: int, s=session) -> requests.Response:
            q = products[i % len(products)]
            return s.post(url + "/classify", timeout=120, json={
                "title": q["title"], "attributes": q["attributes"], "image": q["image"], "k": args.k})

        def unseen(i: int, s=session) -> requests.Response:  # attributes no request sent before: no cache hit
            q = products[i % len(products)]
            return s.post(url + "/classify", timeout=120, json={
                "title": q["title"], "attributes": [f"{a} #{i}" for a in q["attributes"]], "image": q["image"],
                "k": args.k})

        def by_id(i: int, s=session) -> requests.Response:
            return s.post(url + "/classify", timeout=120,
                          json={"product_id": products[i % len(products)]["product_id"], "k": args.k})

        for i in range(WARMUP):
            assert upload(i).status_code == 200 and by_id(i).status_code == 200
        seq = {}
        for name, fn in (("upload", upload), ("upload, unseen attributes", unseen), ("product_id", by_id)):
            lat, failed = [], 0
            for i in range(args.requests):
                t = time.perf_counter()
                failed += fn(i).status_code != 200
                lat.append((time.perf_counter() - t) * 1000)
            seq[name] = (np.percentile(lat, 50), np.percentile(lat, 99), failed)

        bad = [b"{not json", b"[1]", json.dumps({"title": "x", "image": "!!"}).encode(),
               json.dumps({"title": "x", "image": base64.b64encode(b"not an image").decode()}).encode(),
               json.dumps({"title": "x", "image": products[0]["image"], "k": 0}).encode(),
               json.dumps({"title": "", "image": products[0]["image"]}).encode(),
               json.dumps({"product_id": "no-such-product"}).encode(),
               json.dumps({"title": "x", "image": products[0]["image"], "product_id": "x"}).encode()]
        local = threading.local()

        def mixed(i: int) -> int:
            if not hasattr(local, "s"):
                local.s = requests.Session()
            kind = i % 5
            if kind == 0:
                return upload(i, local.s).status_code
            if kind == 1:
                return by_id(i, local.s).status_code
            if kind == 2:
                return local.s.post(url + "/classify", data=bad[i % len(bad)], timeout=120).status_code
            pid = products[i % len(products)]["product_id"] if i % 4 else "nope"
            return local.s.get(url + "/similar", timeout=120,
                               params={"product_id": pid, "k": (0, 5, 50, 1001)[i % 4]}).status_code

        t = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            codes = list(pool.map(mixed, range(args.burst)))
        wall = time.perf_counter() - t
    finally:
        serve.shutdown()
        ray.shutdown()

    sys.path.insert(0, HERE)
    from machine import cpu  # noqa: E402

    print(f"{datetime.datetime.now():%Y-%m-%d %H:%M}; {cpu()}, Python {platform.python_version()}; "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"command: python benchmarks/serve_classify.py {' '.join(sys.argv[1:])}")
    print(f"workdir: {workdir}; classifies with {application_classifier(workdir, args)}; k {args.k}; images "
          f"{int(np.median([q['bytes'] for q in products]))} bytes median; 1 SearchApi + 1 CategoryEncoder replica "
          "(1 CPU each), clients in the same machine")
    print()
    print("| requests | count | non-200 | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for name, (p50, p99, failed) in seq.items():
        print(f"| sequential /classify, {name} | {args.requests} | {failed} | {p50:.1f} | {p99:.1f} |")
    if args.burst:
        counts = {c: codes.count(c) for c in sorted(set(codes))}
        print(f"| burst, {args.concurrency} clients, mixed good/bad | {args.burst} | 5xx: "
              f"{sum(c >= 500 for c in codes)} ({', '.join(f'{c}: {n}' for c, n in counts.items())}) | "
              f"{args.burst / wall:.1f} req/s | |")
    if steps:
        print()
        print("| step (in process, 1 torch thread) | median ms |")
        print("|---|---|")
        for name, ms in steps.items():
            print(f"| {name} | {ms:.2f} |")


def application_classifier(workdir: str, args) -> str:
    from serve.app import ServeConfig, classifier_spec

    spec = classifier_spec(ServeConfig(workdir=workdir, setting=args.setting, model=args.model))
    return f"{spec['model']} ({spec['setting']}), " + (f"flags {', '.join(spec['flags'])}" if spec["flags"]
                                                        else "no flags")


if __name__ == "__main__":
    main()
