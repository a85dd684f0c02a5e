import pytest

from clipita import storage


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_round_trip(kind, tmp_path, request):
    root = str(tmp_path) if kind == "local" else request.getfixturevalue("s3_bucket")
    uri = storage.join(root, "a/b/c.json")
    assert not storage.exists(uri)
    storage.write_json(uri, {"x": [1, 2]})
    assert storage.exists(uri)
    assert storage.read_json(uri) == {"x": [1, 2]}
    with pytest.raises(storage.StorageError, match="not found"):
        storage.read_bytes(storage.join(root, "missing"))


def test_resolve_and_schemes(tmp_path):
    assert storage.resolve("s3://b/cat", "images/1.jpg") == "s3://b/cat/images/1.jpg"
    assert storage.resolve("s3://b/cat", "s3://x/y.jpg") == "s3://x/y.jpg"
    assert storage.resolve("/data/cat", "/abs/y.jpg") == "/abs/y.jpg"
    assert storage.filesystem(f"file://{tmp_path}")[1] == str(tmp_path)
    with pytest.raises(storage.StorageError, match="unsupported URI scheme"):
        storage.filesystem("ftp://host/x")


def test_absolute_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("work") == str(tmp_path / "work")
    assert storage.absolute("file://rel") == str(tmp_path / "rel")
    assert storage.absolute("s3://b/p") == "s3://b/p"


def test_http_images_are_readable(tmp_path):
    import functools
    import http.server
    import threading

    (tmp_path / "img.jpg").write_bytes(b"jpeg bytes")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert storage.read_bytes(f"{base}/img.jpg") == b"jpeg bytes"
        with pytest.raises(storage.StorageError, match="not found"):
            storage.read_bytes(f"{base}/missing.jpg")
    finally:
        server.shutdown()
