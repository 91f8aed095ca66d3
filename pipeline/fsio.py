"""URL helpers shared by the shard builder, the loader and the trainer.

A URL is a local path, ``file://...``, ``s3://...``, ``gs://...`` or anything else fsspec knows.
Cloud filesystems (s3fs, gcsfs) are imported lazily by fsspec, only when such a URL is used.
"""

from __future__ import annotations

import io
import os
import queue
import random
import tempfile
import threading
import time
import warnings
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


class IOTimeout(TimeoutError):
    """A remote call that did not answer within its deadline (transient: retried like a reset)."""


class _Helper:
    """A daemon thread that runs blocking calls for one calling thread, so the caller can stop
    waiting. A call that misses its deadline keeps the thread; the next call gets a fresh one
    (the stuck one ends when its call does, or with the process: it is a daemon)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.pid = os.getpid()
        threading.Thread(target=self._run, args=(self.jobs,), daemon=True, name="musicssl-io").start()

    @staticmethod
    def _run(jobs: queue.SimpleQueue) -> None:
        while True:
            fn, box, done = jobs.get()
            try:
                box.append((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box.append((False, exc))
            done.set()


_helpers = threading.local()


def call_with_timeout(fn: Callable[[], T], *, timeout_s: float, what: str, warn_after_s: float | None = None,
                      flag: str = "") -> T:
    """``fn()``, waited for at most ``timeout_s`` seconds; :class:`IOTimeout` after that.

    While waiting, a warning naming ``what`` is issued once after ``warn_after_s`` (default: 5 s,
    or half the timeout if that is shorter), so a frozen object store shows up in the log as
    itself and not as a silent stall. ``flag``: the setting that sets the timeout, named in both."""
    helper = getattr(_helpers, "helper", None)
    if helper is None or helper.pid != os.getpid():  # none yet in this thread, or inherited through a fork
        helper = _helpers.helper = _Helper()
    box: list = []
    done = threading.Event()
    helper.jobs.put((fn, box, done))
    warn_after = min(5.0, timeout_s / 2) if warn_after_s is None else min(warn_after_s, timeout_s)
    t0 = time.monotonic()
    if not done.wait(warn_after):
        knob = f" ({flag})" if flag else ""
        warnings.warn(f"[musicssl] waiting for {what}: no answer for {warn_after:.1f} s; giving up after "
                      f"{timeout_s:g} s{knob}", stacklevel=2)
        if not done.wait(max(0.0, timeout_s - (time.monotonic() - t0))):
            _helpers.helper = None
            raise IOTimeout(f"{what}: no answer in {timeout_s:g} s{knob}")
    ok, value = box[0]
    if not ok:
        raise value
    return value


def file_size(f: IO) -> int | None:
    """The size of an open file: fsspec's ``size``, ``fstat``, or a seek to the end and back;
    None for a stream that knows none of these."""
    size = getattr(f, "size", None)
    if isinstance(size, int):
        return size
    try:
        return os.fstat(f.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        pass
    try:
        pos = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(pos)
        return end
    except (OSError, ValueError):
        return None


def sizes(urls: list[str], *, timeout_s: float = 60.0) -> dict[str, int | None]:
    """Each URL's size in bytes (None: it does not exist). Remote URLs are listed one folder at a
    time (one LIST instead of a HEAD per object); what a listing misses is asked for directly."""
    out: dict[str, int | None] = {}
    by_folder: dict[str, list[str]] = {}
    for u in urls:
        if is_local(u):
            try:
                out[u] = os.stat(local_path(u)).st_size
            except FileNotFoundError:
                out[u] = None
        else:
            by_folder.setdefault(parent_url(u), []).append(u)
    for folder, members in by_folder.items():
        fs, path = fs_and_path(folder)
        fs.invalidate_cache(path)
        try:
            listed = with_retries(lambda: call_with_timeout(lambda: fs.ls(path, detail=True), timeout_s=timeout_s, what=folder),
                                  what=folder)
        except FileNotFoundError:
            listed = []
        by_name = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in listed if e.get("type") != "directory"}
        for u in members:
            name = u.rsplit("/", 1)[-1]
            out[u] = by_name[name] if name in by_name else _size(u, timeout_s)
    return out


def _size(url: str, timeout_s: float) -> int | None:
    fs, path = fs_and_path(url)
    try:
        info = with_retries(lambda: call_with_timeout(lambda: fs.info(path), timeout_s=timeout_s, what=url), what=url)
    except FileNotFoundError:
        return None
    return int(info["size"])


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


def read_bytes(url: str, *, timeout_s: float = 60.0) -> bytes:
    """A whole file's bytes; a remote read that gets no answer for ``timeout_s`` is retried."""
    if is_local(url):
        with open(local_path(url), "rb") as f:
            return f.read()
    fs, path = fs_and_path(url)
    return with_retries(lambda: call_with_timeout(lambda: fs.cat_file(path), timeout_s=timeout_s, what=url), what=url)


def exists(url: str, *, timeout_s: float = 60.0) -> bool:
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = fs_and_path(url)
    return with_retries(lambda: call_with_timeout(lambda: fs.exists(path), timeout_s=timeout_s, what=url), what=url)


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
        entries = with_retries(lambda: call_with_timeout(lambda: fs.ls(path, detail=False), timeout_s=60.0, what=url), what=url)
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
