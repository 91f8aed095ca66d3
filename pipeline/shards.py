"""Reading the shard format of docs/architecture.md §1: tar cursors, sample JSON, label specs.

Nothing here decodes audio or unpickles anything: a sample is handed on as the raw bytes of its
``<key>.flac`` (or ``.wav``) member and its parsed ``<key>.json``. The loader (``pipeline.loader``)
decides what to decode.

Tars are read header by header (:class:`TarCursor`, a lean parser of the formats ``tarfile``
writes) over a seekable file object (a local file or an fsspec file for ``s3://``/``gs://``), so
skipping a sample costs one header read and a seek, not the transfer of its audio. That is what
makes a mid-epoch resume cheap.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

import numpy as np

from pipeline import fsio
from pipeline.errors import UserError
from pipeline.manifest import MANIFEST_FORMAT, Manifest, Shard, load_manifest  # their owner is pipeline.manifest

AUDIO_EXTS = ("flac", "wav", "ogg", "mp3")


class ShardReadError(RuntimeError):
    """A shard could not be read (truncated tar, bad header, fewer samples than its manifest says)."""


class ShardMismatchError(ShardReadError):
    """A shard that is not what its manifest entry says: none of its samples is used. ``kind``
    names the loader's counters (``skipped_<kind>``, ``<kind>_shards``)."""

    kind = "mismatched"


class ShardSizeError(ShardMismatchError):
    """A shard's size differs from its manifest entry: cut short, or replaced by another file."""

    def __init__(self, url: str, actual: int, expected: int):
        super().__init__(f"{url}: {actual} bytes, the manifest says {expected} "
                         f"({'cut short' if actual < expected else 'not the shard the manifest describes'}); "
                         "re-upload or rebuild it (`shard-tools verify` checks every shard)")
        self.actual, self.expected = actual, expected
        self.kind = "truncated" if actual < expected else "mismatched"


class ShardHashError(ShardMismatchError):
    """A shard's sha256 differs from its manifest entry (checked where it is read whole: the cache)."""

    def __init__(self, url: str, actual: str, expected: str):
        super().__init__(f"{url}: sha256 {actual[:16]}..., the manifest says {expected[:16]}... (not the shard the "
                         "manifest describes); re-upload or rebuild it (`shard-tools verify` checks every shard)")


class BadDataError(UserError, RuntimeError):
    """A bad sample with ``data.on_error="raise"``, or a worker's range with no usable sample at all."""


class ShardUnavailableError(UserError, RuntimeError):
    """A shard could not be read at all, for a reason retrying did not cure: missing, access
    denied, an object store that stayed down past ``data.io_timeout_s`` x ``data.io_retries``.

    The loader raises it at start (a shard listed but absent; or not its manifest size, with
    ``on_error="raise"``) or from the stream mid-run; the
    stream's position is then that of the last batch delivered, so a checkpoint written on catching
    it resumes exactly once the shard is back."""


# ------------------------------------------------------------------------------------------------
# Sample JSON and labels


class SampleJSONError(ValueError):
    """A sample's ``<key>.json`` is not a usable JSON object."""


def parse_sample_json(data: bytes) -> dict:
    """A sample's metadata (§1 ``<key>.json``) as a dict; :class:`SampleJSONError` for anything
    else: bad UTF-8 or JSON, an integer too long to convert, nesting deep enough to exhaust the
    parser's recursion limit, a top level or ``labels`` that is not an object."""
    try:
        meta = json.loads(data)
    except RecursionError:
        raise SampleJSONError("invalid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise SampleJSONError(f"invalid JSON ({str(exc)[:200]})") from None
    if not isinstance(meta, dict):
        raise SampleJSONError(f"invalid sample JSON (a {type(meta).__name__}, not an object)")
    if not isinstance(meta.get("labels") or {}, dict):
        raise SampleJSONError("invalid sample JSON ('labels' is not an object)")
    return meta


def merge_label_specs(manifests: list[Manifest]) -> dict[str, dict]:
    """One label spec over several manifests.

    Fields are united; a field present in several manifests must have the same kind, and its names
    are united in first-seen order (so MSD and MTAT tag vocabularies can be mixed). A sample from a
    manifest lacking a field gets the "missing" value (zeros / -1).
    """
    merged: dict[str, dict] = {}
    origin: dict[str, str] = {}
    for m in manifests:
        for name, spec in m.labels.items():  # kinds were checked by the manifest reader
            kind = spec["kind"]
            names = list(spec.get("names") or [])
            if name not in merged:
                merged[name] = {"kind": kind, "names": names}
                origin[name] = m.url
                continue
            if merged[name]["kind"] != kind:
                raise ValueError(
                    f"label {name!r} is {merged[name]['kind']!r} in {origin[name]} but {kind!r} in {m.url}; "
                    "mix only manifests whose label kinds agree"
                )
            seen = set(map(_norm, merged[name]["names"]))
            merged[name]["names"] += [n for n in names if _norm(n) not in seen]
    return merged


def _norm(v: object) -> str:
    # JSON may give 60 in one place and "60" in another; labels compare by their text
    return str(v)


class LabelEncoder:
    """Turns a sample's raw labels into arrays per the merged spec (multi_hot float32, class int64)."""

    def __init__(self, spec: dict[str, dict]):
        self.spec = spec
        self.index = {f: {_norm(n): i for i, n in enumerate(s["names"])} for f, s in spec.items()}

    def _raw(self, meta: dict, name: str) -> object:
        labels = meta.get("labels") or {}
        if name in labels:
            return labels[name]
        return meta.get(name)  # e.g. mtat's clip_id sits at the top level of the sample JSON

    def encode(self, meta: dict) -> dict[str, np.ndarray | int]:
        out: dict[str, np.ndarray | int] = {}
        for name, spec in self.spec.items():
            raw = self._raw(meta, name)
            idx = self.index[name]
            if spec["kind"] == "multi_hot":
                v = np.zeros(len(idx), dtype=np.float32)
                for item in raw if isinstance(raw, list) else ([] if raw is None else [raw]):
                    j = idx.get(_norm(item))
                    if j is not None:
                        v[j] = 1.0
                out[name] = v
            else:
                out[name] = -1 if raw is None or isinstance(raw, list) else idx.get(_norm(raw), -1)
        return out


# ------------------------------------------------------------------------------------------------
# Tar cursor


@dataclass
class RawSample:
    """One sample's undecoded members. ``audio`` is None when the tar lacks an audio member."""

    key: str
    audio: bytes | None
    audio_ext: str
    meta: bytes | None


def _split_name(name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    key, _, ext = base.partition(".")  # keys have no dots (architecture.md §1)
    return key, ext


_BLOCK = 512


@dataclass
class _Member:
    """A regular file in a tar: its name, data size and where its data starts."""

    name: str
    size: int
    offset: int

    @property
    def end(self) -> int:  # where the next header starts
        return self.offset + -(-self.size // _BLOCK) * _BLOCK


def _tar_int(field: bytes, what: str) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (first byte 0x80)."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise ValueError(f"bad {what} field {field!r}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """The ``"<len> <key>=<value>\\n"`` records of a POSIX pax extended header; ValueError for a
    malformed one (a record length that is not a number, or runs outside the header or backwards)."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= space - pos or pos + length > len(data):
            raise ValueError(f"pax record of length {length} at offset {pos}")
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class TarCursor:
    """Random access *forward* over the samples of one tar shard, by sample index.

    ``get(i)`` returns sample ``i`` (members grouped by key, in tar order) and may only be called
    with increasing ``i``; samples in between are passed over by reading their headers and seeking
    past their data. Raises :class:`ShardReadError` for a truncated or malformed tar (including
    fewer samples than ``i + 1``), and :class:`ShardSizeError` when the file's size is not
    ``expected_bytes`` (checked when it is opened: nearly free, and it catches a truncated or
    replaced shard before any of it is used). Each remote open or read waits at most
    ``timeout_s`` (a warning names the URL while it waits); transient errors, timeouts included,
    are retried ``retries`` times with backoff by reopening the shard and scanning back to the same
    sample. Other errors (missing file, access denied) are raised as they are.

    The headers are parsed here rather than by ``tarfile``, whose full ``TarInfo`` parse measured
    ~0.07 ms a member (a few percent of a clip's cost in the loader); this reads the ustar, GNU and
    pax forms ``tarfile`` writes (long names, pax ``path``/``size`` records, base-256 sizes) and
    checks every header's checksum.
    """

    def __init__(self, url: str, *, expected_bytes: int | None = None, timeout_s: float = 60.0, retries: int = 3,
                 opener: Callable[[], IO] | None = None):
        self.url = url
        self.expected_bytes = expected_bytes  # checked when the shard is opened (ShardSizeError)
        self.timeout_s, self.retries = timeout_s, retries  # per remote open/read, and reopen attempts
        self._opener = opener  # opens a local copy instead of the URL (pipeline.cache)
        self._remote = opener is None and not fsio.is_local(url)
        self._f: IO | None = None
        self._size = 0  # the file's size, known once it is open
        self._pos = 0  # the file's position, tracked so that reading on costs no seek
        self._next = 0  # where the next header starts
        self._pending: _Member | None = None  # first member of the next group
        self._broken: ShardReadError | None = None  # a bad header met after a complete sample, raised on the next get
        self._index = -1  # index of the group ``_pending`` belongs to
        self._eof = False

    def _open(self) -> None:
        self.close()
        self._f = self._opener() if self._opener is not None else self._call(lambda: fsio.open_url(self.url, "rb"))
        self._pos = self._next = 0
        self._pending, self._index, self._eof, self._broken = None, -1, False, None
        f = self._f
        size = self._call(lambda: fsio.file_size(f))
        self._size = 1 << 62 if size is None else size  # unknown: reads are not clamped
        if self.expected_bytes is not None and size is not None:
            if size != self.expected_bytes:
                self._broken = ShardSizeError(self.url, size, self.expected_bytes)  # and every later get
                raise self._broken

    def _call(self, fn):
        """A call that may wait on a remote store: bounded by ``timeout_s`` there, direct locally."""
        if not self._remote:
            return fn()
        return fsio.call_with_timeout(fn, timeout_s=self.timeout_s, what=self.url, flag="data.io_timeout_s")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f = None

    def _read_at(self, offset: int, n: int) -> bytes:
        f = self._f
        assert f is not None
        # a header may claim any size: never ask for more than the file holds (the caller sees a short read)
        n = max(0, min(n, self._size - offset))
        if not self._remote:
            if offset != self._pos:
                f.seek(offset)
            data = f.read(n)
        else:
            seek = offset != self._pos
            # the call touches only ``f``: if it misses its deadline the cursor reopens a new file
            data = self._call(lambda: (f.seek(offset) if seek else None, f.read(n))[1])
        self._pos = offset + len(data)
        return data

    def _next_header(self) -> _Member | None:
        """The next regular file's header (None at the end of the archive); the file is left at
        its data. Directories and other non-files are passed over."""
        name = size = None  # from a pax or GNU long-name header, for the member that follows
        while True:
            at = self._next
            buf = self._read_at(at, _BLOCK)
            if len(buf) < _BLOCK or buf.count(0) == _BLOCK:
                # an end-of-archive block, or the file simply ends between members (as tarfile reads it)
                if at == 0:
                    raise ShardReadError(f"{self.url}: empty file, not a tar; rebuild or re-upload this shard")
                return None
            stored = buf[148:156]
            try:
                chksum = _tar_int(stored, "checksum")
                member_size = _tar_int(buf[124:136], "size")
            except ValueError as exc:
                what = "not a tar" if at == 0 else f"malformed tar header at byte {at}"
                raise ShardReadError(f"{self.url}: {what} ({exc}); rebuild or re-upload this shard") from None
            unsigned = sum(buf) - sum(stored) + 8 * 32  # the checksum field counts as spaces
            # some old writers summed signed bytes (tarfile accepts both too)
            if chksum != unsigned and chksum != unsigned - 256 * sum(b >= 128 for b in buf[:148] + buf[156:]):
                what = "not a tar" if at == 0 else f"corrupt tar header at byte {at}"
                raise ShardReadError(f"{self.url}: {what} (checksum mismatch); rebuild or re-upload this shard")
            kind = buf[156:157]
            member = _Member(name="", size=member_size, offset=at + _BLOCK)
            self._next = member.end
            if kind in (b"x", b"L", b"g"):  # data that describes the next member (or the archive)
                data = self._read_at(member.offset, member.size)
                if len(data) != member.size:
                    raise ShardReadError(f"{self.url}: truncated tar (extended header at byte {at})")
                if kind == b"x":
                    try:
                        rec = _pax_records(data)
                        size = int(rec["size"]) if "size" in rec else size
                        if size is not None and size < 0:
                            raise ValueError(f"size {size}")
                    except ValueError as exc:
                        raise ShardReadError(f"{self.url}: malformed pax header at byte {at} ({exc}); "
                                             "rebuild or re-upload this shard") from None
                    name = rec.get("path", name)
                elif kind == b"L":
                    name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            if kind not in (b"0", b"\0", b"7"):  # directories, links, devices: nothing to read
                name = size = None
                continue
            if name is None:
                name = buf[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if buf[257:262] == b"ustar" and buf[345] != 0:
                    name = buf[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            member.name = name
            if size is not None:
                member.size = size
                self._next = member.end
            return member

    def _advance_group(self) -> None:
        """Move ``_pending`` to the first header of the next group (or EOF)."""
        if self._index >= 0:
            key = _split_name(self._pending.name)[0]  # type: ignore[union-attr]
            while True:
                ti = self._next_header()
                if ti is None or _split_name(ti.name)[0] != key:
                    break
        else:
            ti = self._next_header()
        self._pending = ti
        self._index += 1
        self._eof = ti is None

    def _read(self, m: _Member) -> bytes:
        data = self._read_at(m.offset, m.size)
        if len(data) != m.size:
            raise ShardReadError(f"{self.url}: truncated member {m.name} ({len(data)} of {m.size} bytes)")
        return data

    def _get(self, i: int) -> RawSample:
        if self._f is None:
            self._open()
        if i < self._index:
            raise ValueError(f"{self.url}: TarCursor.get({i}) after sample {self._index}; indices must increase")
        if self._broken is not None:
            raise self._broken
        while self._index < i and not self._eof:
            self._advance_group()
        if self._eof or self._index != i:
            raise ShardReadError(f"{self.url}: tar ends before sample {i} (truncated shard?)")
        first = self._pending
        assert first is not None
        key = _split_name(first.name)[0]
        audio, audio_ext, meta = None, "", None
        m: _Member | None = first
        while m is not None and _split_name(m.name)[0] == key:
            ext = _split_name(m.name)[1]
            if ext in AUDIO_EXTS and audio is None:
                audio, audio_ext = self._read(m), ext
            elif ext == "json":
                meta = self._read(m)
            try:
                m = self._next_header()
            except ShardReadError as exc:
                # this sample is whole; the damage belongs to what follows it
                self._broken, m = exc, None
        self._pending, self._index, self._eof = m, self._index + 1, m is None
        return RawSample(key=key, audio=audio, audio_ext=audio_ext, meta=meta)

    def get(self, i: int) -> RawSample:
        for attempt in range(self.retries + 1):
            try:
                return self._get(i)
            except ShardReadError:
                raise
            except Exception as exc:  # noqa: BLE001 - remote hiccups: reopen and rescan
                if attempt == self.retries or not fsio.is_transient(exc):
                    raise
                delay = 0.25 * 2**attempt
                print(f"[musicssl] transient error reading {self.url}: {exc!r}; reopening in {delay:g} s "
                      f"(retry {attempt + 1}/{self.retries})", flush=True)
                time.sleep(delay)
                self.close()  # the next attempt reopens the shard and scans back to sample i
        raise AssertionError("unreachable")


def check_shards(manifests: list[Manifest], *, timeout_s: float = 60.0) -> tuple[list[str], list[str]]:
    """Every shard the manifests list, compared with its entry before anything is read: returns
    ``(missing, mismatched)``, one line per shard (a mismatched one's line says both sizes)."""
    entries = {s.url: (m.url, s) for m in manifests for s in m.shards}
    found = fsio.sizes(list(entries), timeout_s=timeout_s)
    missing, mismatched = [], []
    for url, (murl, s) in entries.items():
        if found[url] is None:
            missing.append(f"shard {url} listed in {murl} does not exist")
        elif found[url] != s.bytes:
            mismatched.append(str(ShardSizeError(url, found[url], s.bytes)))
    return missing, mismatched


__all__ = ["AUDIO_EXTS", "BadDataError", "LabelEncoder", "RawSample", "SampleJSONError", "ShardHashError", "ShardMismatchError",
           "ShardReadError", "ShardSizeError",
           "ShardUnavailableError", "TarCursor", "check_shards", "merge_label_specs", "parse_sample_json",
           # re-exported for callers that import them from here
           "MANIFEST_FORMAT", "Manifest", "Shard", "load_manifest"]
