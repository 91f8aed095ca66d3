"""URL helpers shared by the shard builder, the loader and the trainer.

A URL is a local path, ``file://...``, ``s3://...``, ``gs://...`` or anything else fsspec knows.
Cloud filesystems (s3fs, gcsfs) are imported lazily by fsspec, only when such a URL is used.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable
from typing import IO, TypeVar

import fsspec

T = TypeVar("T")

# Errors worth retrying: network hiccups and throttling. Anything else (missing file, access
# denied) fails at once so the user sees the real cause.
_TRANSIENT_NAMES = {
    "ConnectionError",
    "ConnectionResetError",
    "ConnectionAbortedError",
    "TimeoutError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "EndpointConnectionError",
    "ServerDisconnectedError",
    "ClientOSError",
    "ClientPayloadError",
    "IncompleteReadError",
    "ResponseStreamingError",
    "ServiceUnavailable",
    "SlowDown",
}


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry may cure (connection resets, timeouts, throttling, 5xx)."""
    for cls in type(exc).__mro__:
        if cls.__name__ in _TRANSIENT_NAMES:
            return True
    text = str(exc)
    return any(s in text for s in ("SlowDown", "503", "500 Internal", "Connection reset", "timed out"))


def with_retries(fn: Callable[[], T], *, attempts: int = 5, base_delay: float = 0.5, what: str = "") -> T:
    """Call ``fn`` and retry transient errors with jittered exponential backoff."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - re-raised unless transient
            if i == attempts - 1 or not is_transient(exc):
                raise
            delay = base_delay * (2**i) * (0.5 + random.random())
            print(f"[musicssl] transient error on {what or 'remote I/O'}: {exc!r}; retry {i + 1}/{attempts - 1} in {delay:.1f}s")
            time.sleep(delay)
    raise AssertionError("unreachable")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join_url(base: str, *parts: str) -> str:
    """Join path parts onto a folder URL; an absolute part (``s3://..`` or ``/..``) wins."""
    out = base
    for p in parts:
        if "://" in p or p.startswith("/"):
            out = p
        else:
            out = out.rstrip("/") + "/" + p
    return out


def parent_url(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."


def fs_and_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def open_url(url: str, mode: str = "rb") -> IO:
    """Open a URL for reading or writing (not atomic; see ``write_bytes_atomic``)."""
    if is_local(url):
        return open(local_path(url), mode)
    return fsspec.open(url, mode).open()


def read_bytes(url: str) -> bytes:
    if is_local(url):
        with open(local_path(url), "rb") as f:
            return f.read()
    fs, path = fs_and_path(url)
    return with_retries(lambda: fs.cat_file(path), what=url)


def exists(url: str) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = fs_and_path(url)
    return with_retries(lambda: fs.exists(path), what=url)


def makedirs(url: str) -> None:
    if is_local(url):
        os.makedirs(local_path(url), exist_ok=True)
    # object stores have no folders


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole file.

    Local: a temp file in the same folder, fsync, then ``os.replace``. Object stores: a single PUT,
    which is atomic per object (S3, GCS).
    """
    if is_local(url):
        path = local_path(url)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        try:
            # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask)
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return
    fs, path = fs_and_path(url)
    with_retries(lambda: fs.pipe_file(path, data), what=url)


def upload_file_atomic(local_src: str, url: str) -> None:
    """Move/copy a finished local file to ``url`` so it appears whole under its final name."""
    if is_local(url):
        dst = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        os.replace(local_src, dst)
        return
    fs, path = fs_and_path(url)
    with_retries(lambda: fs.put_file(local_src, path), what=url)
    os.unlink(local_src)


def remove(url: str) -> None:
    if is_local(url):
        p = local_path(url)
        if os.path.exists(p):
            os.unlink(p)
        return
    fs, path = fs_and_path(url)
    if fs.exists(path):
        fs.rm_file(path)


def list_dir(url: str) -> list[str]:
    """Names (not full URLs) of the entries directly below a folder URL; [] if it does not exist."""
    if is_local(url):
        p = local_path(url)
        return sorted(os.listdir(p)) if os.path.isdir(p) else []
    fs, path = fs_and_path(url)
    try:
        entries = with_retries(lambda: fs.ls(path, detail=False), what=url)
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
