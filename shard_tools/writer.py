"""Deterministic tar shards: fixed member order and header fields, written to a temp file first.

A shard is only ever visible under its final name once it is complete: it is written to a local
temp file (hidden, beside the target for local output so the final ``os.replace`` stays on one
filesystem; in the system temp folder for buckets, named by its build's pid so that a later build
removes what a killed one left, see ``shard_tools.owner``), then published with
``pipeline.fsio.upload_file_atomic`` (rename locally, a single upload of the finished file to a
bucket).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

from pipeline import fsio
from shard_tools.owner import temp_path

# Every member header gets these fields, so that the same samples give the same bytes on any
# machine, user or clock (see docs/architecture.md section 1).
_MODE = 0o644


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = _MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Append samples (``<key>.<codec>`` then ``<key>.json``) to one tar shard under construction.

    Usage: ``w = ShardWriter(out_url)``, ``w.add(key, "flac", audio, meta_json)`` ...,
    ``w.publish()`` returns ``(bytes, sha256)`` once the shard is visible under ``out_url``;
    ``w.discard()`` drops an unfinished shard.
    """

    def __init__(self, url: str):
        self.url = url
        if fsio.is_local(url):
            path = fsio.local_path(url)
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            # hidden and suffixed, so no `*.tar` glob or manifest reader ever sees a partial shard
            self._tmp = os.path.join(folder, "." + os.path.basename(path) + ".partial")
        else:
            self._tmp = temp_path("shard", ".tar.partial")
        self._file = open(self._tmp, "wb")
        # PAX only adds extended headers for fields that do not fit ustar (long keys); with the
        # fixed integer fields above no timestamp ever enters the archive.
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)
        self.num_samples = 0
        self.seconds = 0.0

    @property
    def size(self) -> int:
        """Bytes written so far (the finished tar adds at most the end blocks and record padding)."""
        return self._file.tell()

    def add(self, key: str, ext: str, audio: bytes | str, meta_json: bytes, seconds: float) -> None:
        """Append a sample; ``audio`` is the encoded bytes or the path of a file holding them
        (copied in blocks, so a long sample never sits in memory whole)."""
        if isinstance(audio, str):
            with open(audio, "rb") as f:
                self._tar.addfile(_tarinfo(f"{key}.{ext}", os.fstat(f.fileno()).st_size), f)
        else:
            self._tar.addfile(_tarinfo(f"{key}.{ext}", len(audio)), io.BytesIO(audio))
        self._tar.addfile(_tarinfo(f"{key}.json", len(meta_json)), io.BytesIO(meta_json))
        self.num_samples += 1
        self.seconds += seconds

    def publish(self) -> tuple[int, str]:
        """Finish the tar, publish it under its final URL; returns ``(bytes, sha256)``."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        nbytes = os.path.getsize(self._tmp)
        sha = file_sha256(self._tmp)
        fsio.upload_file_atomic(self._tmp, self.url)
        return nbytes, sha

    def discard(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)


def dumps_json(obj, indent: int | None = None) -> bytes:
    """UTF-8 JSON; falls back to ASCII escapes when a value holds undecodable file-name bytes
    (surrogate escapes from ``os.walk``), which UTF-8 cannot carry."""
    try:
        return json.dumps(obj, ensure_ascii=False, indent=indent).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, indent=indent).encode("ascii")


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Like ``pipeline.fsio.write_bytes_atomic``, but a local temp file has a fixed name
    (``.<name>.partial``) so that a build killed mid-write leaves nothing the re-run does not
    overwrite and rename away (a random temp name would stay behind as litter)."""
    if not fsio.is_local(url):
        fsio.write_bytes_atomic(url, data)
        return
    path = fsio.local_path(url)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, "." + os.path.basename(path) + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
