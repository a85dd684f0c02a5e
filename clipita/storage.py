"""One way to reach a URI: local paths, ``file://``, ``s3://`` (s3fs) and, for reading images, ``http(s)://``.

S3 uses the standard AWS configuration (env vars, profiles, instance roles); ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) points it at an S3-compatible store such as MinIO or a loopback moto server.
Every job and library function takes URIs and goes through here, so local and S3 behave the same.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import fsspec
import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A URI that cannot be read or written; the message is one line naming it."""


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None) -> fsspec.AbstractFileSystem:
    """One client per endpoint and process: creating one costs milliseconds, and a job reads many images."""
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint} if endpoint else {},
                             skip_instance_cache=True)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (fsspec filesystem, path inside it) for a local path, ``file://`` or ``s3://`` URI."""
    if uri.startswith("s3://"):
        return _s3(_s3_endpoint()), uri[len("s3://"):].rstrip("/")
    if uri.startswith(("http://", "https://")):  # read-only: image locations of catalogues such as XMarket
        return fsspec.filesystem("http"), uri
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file://, s3:// or http(s)://")
    return fsspec.filesystem("file"), os.path.abspath(uri)


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem for (Ray Data / pyarrow.parquet) readers and writers, wrapping the fsspec one."""
    fs, path = filesystem(uri)
    if uri.startswith("s3://"):
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    return pafs.LocalFileSystem(), path


def absolute(uri: str) -> str:
    """A local path made absolute (Ray workers run in other working directories); URIs unchanged."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return uri if "://" in uri else os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        if p.strip("/"):  # an empty part adds nothing (a group stored in the scope folder itself)
            out = f"{out}/{p.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def remove(uri: str) -> None:
    """Delete the file at ``uri`` if there is one."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"not found: {uri}") from None


def open_output(uri: str):
    """A binary file at ``uri`` opened for writing (its local parent folders made): for writers that stream."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    if parent and not is_remote(uri):
        fs.makedirs(parent, exist_ok=True)
    return fs.open(path, "wb")


def write_bytes(uri: str, data: bytes) -> None:
    with open_output(uri) as f:
        f.write(data)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if not is_remote(uri):
        fs.makedirs(path, exist_ok=True)


def write_parquet(uri: str, table) -> None:
    """A pyarrow table as one parquet file at ``uri`` (one PUT on object storage: atomic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue().to_pybytes())


def parquet_files(uri: str) -> list[str]:
    """URIs of the parquet files directly under a folder, in name order ([] when it does not exist). Always a fresh
    listing: s3fs caches listings, and a cached one would hide files other processes wrote since, or make a file
    written since look missing to later reads."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    except FileNotFoundError:
        return []
    finally:
        fs.invalidate_cache(path)  # nor is this listing kept
    prefix = uri.split("://", 1)[0] + "://" if is_remote(uri) else ""
    return [prefix + f for f in files]


def read_parquet_dir(uri: str, columns: list[str] | None = None):
    """All parquet files of a folder (local or s3) as one pyarrow table, files in name order (small folders, tests)."""
    files = [filesystem(f)[1] for f in parquet_files(uri)]
    if not files:
        raise FileNotFoundError(f"no parquet files under {uri}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    afs, _ = arrow_filesystem(uri)
    return pa.concat_tables([pq.read_table(f, columns=columns, filesystem=afs) for f in files])


def resolve(base: str, location: str) -> str:
    """A location relative to ``base`` (a catalogue root), or an absolute URI / path as it is."""
    if "://" in location or location.startswith("/"):
        return location
    return join(base, location)
