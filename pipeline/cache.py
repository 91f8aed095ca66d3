"""An opt-in local cache of remote shards (``LoaderConfig.cache_dir``): a bucket is read once per
node, not once per epoch.

Layout of ``cache_dir`` (a node-local disk: ``flock`` does not hold across NFS clients)::

    <sha256>.tar          a verified copy of the shard whose manifest entry has that sha256
    <sha256>.ok           the copy's (bytes, mtime_ns, inode) when it was verified; its mtime is
                          the copy's last use (eviction is least recently used first)
    <sha256>.lock         flock: one process fetches or checks a shard, the others wait for it
    .evict.lock           flock: one process evicts at a time
    .<sha256>.<pid>.part  a download in progress (renamed to <sha256>.tar once verified)

A copy is verified when it is fetched (sha256 and size against the manifest, while it streams in;
the rename makes it appear whole) and again whenever its file no longer matches its ``.ok``
record: a truncated or rewritten copy is hashed, found wrong, and fetched again
(``cache_corrupt`` in ``loader.stats()``). Every rank and worker of a node may share one cache: a
shard is opened while its lock is held, so an eviction by another process (an unlink) cannot pull
it away from under a reader, and the evicting process skips shards whose lock is held.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from typing import IO

from pipeline import fsio
from pipeline.shards import ShardHashError, ShardSizeError, ShardUnavailableError

_CHUNK = 8 << 20  # bytes per remote read while fetching
_DISK_MARGIN = 512 << 20  # free disk space a fetch leaves
_SHA = re.compile(r"[0-9a-f]{64}")


class ShardCache:
    """Local verified copies of remote shards, at most ``limit_bytes`` of them."""

    def __init__(self, folder: str, limit_bytes: int, *, timeout_s: float, retries: int, stats: Counter):
        self.folder, self.limit = folder, limit_bytes
        self.timeout_s, self.retries, self.stats = timeout_s, retries, stats
        self._warned_big = False
        os.makedirs(folder, exist_ok=True)

    def opener(self, url: str, sha256: str, nbytes: int) -> Callable[[], IO] | None:
        """A function that returns the shard opened from its verified local copy (fetched first if
        need be); None when the shard cannot be cached (larger than the cache: read it directly)."""
        if not _SHA.fullmatch(sha256):  # the name of a file here: never a path a manifest chose
            raise ShardHashError(url, "not a hex digest", sha256)
        if nbytes > self.limit:
            if not self._warned_big:
                warnings.warn(f"[musicssl] {url}: {nbytes / 2**30:.2f} GiB is more than data.cache_limit_gb; "
                              "such shards are read from the store directly", stacklevel=2)
                self._warned_big = True
            return None
        return lambda: self.open(url, sha256, nbytes)

    def open(self, url: str, sha256: str, nbytes: int) -> IO:
        path = os.path.join(self.folder, f"{sha256}.tar")
        with self._locked(f"{sha256}.lock", what=f"the cached copy of {url}"):
            if os.path.exists(path):
                if self._verified(path, sha256, nbytes):
                    os.utime(path[:-4] + ".ok")  # last use, for eviction
                    return open(path, "rb")
                self.stats["cache_corrupt"] += 1
                warnings.warn(f"[musicssl] cached copy {path} of {url} does not match the manifest; fetching it again",
                              stacklevel=2)
                _remove(path, path[:-4] + ".ok")
            self._make_room(nbytes)
            self._fetch(url, path, sha256, nbytes)
            self.stats["cache_fetched"] += 1
            return open(path, "rb")

    # --- checking ------------------------------------------------------------------------------

    def _verified(self, path: str, sha256: str, nbytes: int) -> bool:
        """True when ``path`` is the shard: its file as recorded at its last check, else hashed now."""
        st = os.stat(path)
        mark = path[:-4] + ".ok"
        try:
            with open(mark) as f:
                if json.load(f) == _record(st) and st.st_size == nbytes:
                    return True
        except (OSError, ValueError):
            pass
        if st.st_size != nbytes or _file_sha256(path) != sha256:
            return False
        _write_mark(mark, st)
        return True

    # --- fetching ------------------------------------------------------------------------------

    def _fetch(self, url: str, path: str, sha256: str, nbytes: int) -> None:
        """Download ``url`` into ``path``: streamed into a part file while hashed, checked, renamed."""
        part = os.path.join(self.folder, f".{sha256}.{os.getpid()}.part")
        for attempt in range(self.retries + 1):
            try:
                got, digest = self._download(url, part)
                break
            except Exception as exc:  # noqa: BLE001 - retried if transient, else the shard is unavailable
                _remove(part)
                if attempt == self.retries or not fsio.is_transient(exc):
                    raise ShardUnavailableError(
                        f"{url} cannot be fetched into the cache {self.folder} ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:300]}); restore the shard or the store's access, then resume"
                    ) from exc
                delay = 0.25 * 2**attempt
                print(f"[musicssl] transient error fetching {url}: {exc!r}; again in {delay:g} s "
                      f"(retry {attempt + 1}/{self.retries})", flush=True)
                time.sleep(delay)
        if got != nbytes or digest != sha256:
            _remove(part)
            raise ShardSizeError(url, got, nbytes) if got != nbytes else ShardHashError(url, digest, sha256)
        os.replace(part, path)
        _write_mark(path[:-4] + ".ok", os.stat(path))

    def _download(self, url: str, part: str) -> tuple[int, str]:
        h, got = hashlib.sha256(), 0
        src = fsio.call_with_timeout(lambda: fsio.open_url(url, "rb"), timeout_s=self.timeout_s, what=url,
                                     flag="data.io_timeout_s")
        try:
            with open(part, "wb") as out:
                while True:
                    chunk = fsio.call_with_timeout(lambda: src.read(_CHUNK), timeout_s=self.timeout_s, what=url,
                                                   flag="data.io_timeout_s")
                    if not chunk:
                        break
                    h.update(chunk)
                    out.write(chunk)
                    got += len(chunk)
                out.flush()
                os.fsync(out.fileno())
        finally:
            src.close()
        return got, h.hexdigest()

    # --- eviction ------------------------------------------------------------------------------

    def _make_room(self, nbytes: int) -> None:
        """Evict least recently used copies until ``nbytes`` more fit the limit and the disk.
        Copies whose lock another process holds (being fetched, checked or opened) are kept."""
        with self._locked(".evict.lock", what=f"eviction in {self.folder}"):
            copies = sorted(self._copies(), key=lambda c: c[0])  # oldest use first
            total = sum(size for _, size, _ in copies)
            for _, size, sha in copies:
                if total + nbytes <= self.limit and shutil.disk_usage(self.folder).free >= nbytes + _DISK_MARGIN:
                    return
                with self._try_lock(f"{sha}.lock") as held:
                    if held:
                        _remove(os.path.join(self.folder, f"{sha}.tar"), os.path.join(self.folder, f"{sha}.ok"))
                        total -= size
            if shutil.disk_usage(self.folder).free < nbytes + _DISK_MARGIN:
                raise ShardUnavailableError(
                    f"{self.folder}: no room to cache a {nbytes / 2**20:.0f} MiB shard (free disk space is below it "
                    "plus 512 MiB, and nothing is left to evict); free space there, or lower data.cache_limit_gb"
                )

    def _copies(self) -> Iterator[tuple[float, int, str]]:
        """``(last use, size, sha256)`` of every copy (a part file counts as a copy being made)."""
        for entry in os.scandir(self.folder):
            name = entry.name
            try:
                if name.endswith(".tar") and _SHA.fullmatch(name[:-4]):
                    mark = os.path.join(self.folder, name[:-4] + ".ok")
                    used = os.stat(mark).st_mtime if os.path.exists(mark) else 0.0
                    yield used, entry.stat().st_size, name[:-4]
                elif name.endswith(".part"):
                    yield float("inf"), entry.stat().st_size, ""  # never evicted; counts toward the total
            except FileNotFoundError:  # evicted or renamed by another process meanwhile
                continue

    # --- locks ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, name: str, *, what: str) -> Iterator[None]:
        """Hold ``name``'s flock; while another process holds it (a fetch can take a while), say so
        every 30 s, and give up after 10 x (io_retries + 1) x io_timeout_s."""
        fd = os.open(os.path.join(self.folder, name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            t0 = warned = time.monotonic()
            deadline = 10 * (self.retries + 1) * self.timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                now = time.monotonic()
                if now - t0 > deadline:
                    raise ShardUnavailableError(f"waited {now - t0:.0f} s for {what} (another process holds "
                                                f"{os.path.join(self.folder, name)}); check the other ranks")
                if now - warned > 30:
                    warnings.warn(f"[musicssl] waiting {now - t0:.0f} s for {what}, held by another process", stacklevel=3)
                    warned = now
                time.sleep(0.05)
            yield
        finally:
            os.close(fd)  # releases the lock

    @contextlib.contextmanager
    def _try_lock(self, name: str) -> Iterator[bool]:
        fd = os.open(os.path.join(self.folder, name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except OSError:
                held = False
            yield held
        finally:
            os.close(fd)


def _record(st: os.stat_result) -> dict:
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _write_mark(path: str, st: os.stat_result) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(_record(st), f)
    os.replace(tmp, path)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _remove(*paths: str) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
