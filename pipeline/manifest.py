"""The shard manifest ``<split>.manifest.json`` (docs/architecture.md §1): its one reader and writer.

Every stage that touches a manifest goes through here: the shard builder and ``merge`` write with
:func:`write_manifest`; the loader, ``shard-tools verify/info/merge``, the trainer and evaluation
read with :func:`load_manifest`. The reader checks the whole schema once, so a manifest with a
missing field or a field of the wrong type is one clear error naming the URL, the entry and what to
do, never a ``TypeError`` deep inside a consumer.

:class:`Manifest` is the parsed, typed view (shard URLs resolved against the manifest's folder);
``Manifest.record`` is the JSON object as read, for tools that rewrite or summarise it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import fsio
from pipeline.errors import UserError

MANIFEST_FORMAT = "musicssl-shards/1"
LABEL_KINDS = ("multi_hot", "class")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REBUILD = "rebuild the split with `shard-tools build` (or `shard-tools merge` for --slice builds)"


class ManifestError(UserError, ValueError):
    """A manifest that cannot be used: unreadable, not JSON, or not the §1 schema."""


class ManifestNotFound(UserError, FileNotFoundError):
    """The manifest URL names nothing."""


@dataclass(frozen=True)
class Shard:
    url: str  # absolute URL (resolved against the manifest's folder)
    num_samples: int
    bytes: int  # the tar's size as written
    sha256: str  # hex digest of the tar
    seconds: float


@dataclass
class Manifest:
    """A parsed ``<split>.manifest.json`` with shard URLs resolved."""

    url: str
    shards: list[Shard]
    labels: dict[str, dict] = field(default_factory=dict)
    sample_rate: int | None = None
    channels: int | None = None
    dataset: str = ""
    split: str = ""
    codec: str = ""
    record: dict[str, Any] = field(default_factory=dict, repr=False)  # the JSON object as read

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


def resolve_shard_url(manifest_url: str, shard_url: str) -> str:
    """A shard entry's URL as an absolute URL (relative ones live beside the manifest)."""
    return fsio.join_url(fsio.parent_url(manifest_url), shard_url)


def load_manifest(url: str, *, allow_empty: bool = False) -> Manifest:
    """Read and check a manifest. Raises :class:`ManifestNotFound` or :class:`ManifestError`, whose
    messages name ``url`` and say what to do. ``allow_empty``: accept a manifest without samples
    (the partial manifest of a slice that got none; shard-tools reads those, the loader does not)."""
    try:
        data = fsio.read_bytes(url)  # remote reads: bounded by a timeout, transient errors retried
    except (FileNotFoundError, IsADirectoryError) as exc:
        if _is_folder(url):
            raise ManifestError(f"{url} is a folder; give a <split>.manifest.json, e.g. "
                                f"{fsio.join_url(url, 'train.manifest.json')}") from exc
        raise ManifestNotFound(
            f"{url} does not exist; build the split with `shard-tools build ...` (`shard-tools demo --out "
            "demo_shards` for the demo; `shard-tools merge` for --slice builds), or give the URL of an existing "
            "<split>.manifest.json"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - permissions, credentials, a store that is down
        raise ManifestError(f"cannot read manifest {url} ({type(exc).__name__}: {exc}); check the URL, "
                            "its permissions and the store's credentials") from exc
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise ManifestError(f"manifest {url} is not valid JSON ({str(exc)[:200]}); {_REBUILD}") from exc
    return parse_manifest(raw, url, allow_empty=allow_empty)


def _is_folder(url: str) -> bool:
    if fsio.is_local(url):
        return os.path.isdir(fsio.local_path(url))
    try:
        fs, path = fsio.fs_and_path(url)
        return bool(fs.isdir(path))
    except Exception:  # noqa: BLE001 - only the message depends on it
        return False


def parse_manifest(raw: object, url: str, *, allow_empty: bool = False) -> Manifest:
    """Check a manifest's JSON object against the §1 schema and return the typed view."""
    check = _Checker(url)
    if not isinstance(raw, dict):
        check.fail(f"holds a JSON {type(raw).__name__}, not an object")
    if raw.get("format") != MANIFEST_FORMAT:
        check.fail(f"has format {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    entries = raw.get("shards")
    if not isinstance(entries, list):
        check.fail("has no 'shards' list")
    shards = [_parse_shard(check, i, s, url) for i, s in enumerate(entries)]
    check.integer(raw, "num_samples", minimum=0)  # verify compares it with the shards' sum
    check.number(raw, "seconds")
    if not allow_empty and sum(s.num_samples for s in shards) == 0:
        raise ManifestError(f"manifest {url} lists no samples; check the build report next to it")
    labels = raw.get("labels") or {}
    if not isinstance(labels, dict):
        check.fail("'labels' is not an object")
    for name, spec in labels.items():
        if not isinstance(spec, dict) or spec.get("kind") not in LABEL_KINDS:
            kind = spec.get("kind") if isinstance(spec, dict) else spec
            check.fail(f"label {name!r} has kind {kind!r}; expected 'multi_hot' or 'class'")
        if not isinstance(spec.get("names", []), list):
            check.fail(f"label {name!r}: 'names' is not a list")
    return Manifest(
        url=url,
        shards=shards,
        labels={k: dict(v) for k, v in labels.items()},
        sample_rate=check.integer(raw, "sample_rate", minimum=1, optional=True),
        channels=check.integer(raw, "channels", minimum=1, optional=True),
        dataset=check.text(raw, "dataset"),
        split=check.text(raw, "split"),
        codec=check.text(raw, "codec"),
        record=raw,
    )


def _parse_shard(check: _Checker, i: int, s: object, url: str) -> Shard:
    if not isinstance(s, dict):
        check.fail(f"shard entry {i} is not an object")
    if not isinstance(s.get("url"), str) or not s["url"]:
        check.fail(f"shard entry {i} has no 'url' string")
    where = f"shard entry {i} ({s['url']})"
    sha = s.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        check.fail(f"{where}: sha256 {sha!r} is not the tar's hex digest (64 of 0-9a-f)")
    return Shard(url=resolve_shard_url(url, s["url"]),
                 num_samples=check.integer(s, "num_samples", minimum=0, where=where),
                 bytes=check.integer(s, "bytes", minimum=0, where=where), sha256=sha,
                 seconds=check.number(s, "seconds", where=where))


class _Checker:
    """Field checks whose failures all read ``manifest <url>: <what>; <what to do>``."""

    def __init__(self, url: str):
        self.url = url

    def fail(self, what: str) -> None:
        raise ManifestError(f"manifest {self.url}: {what}; {_REBUILD}")

    def integer(self, obj: dict, key: str, *, minimum: int, where: str = "", optional: bool = False) -> int | None:
        v = obj.get(key)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self.fail(f"{where + ': ' if where else ''}{key} {v!r} is not an integer >= {minimum}")
        return v

    def number(self, obj: dict, key: str, *, where: str = "") -> float:
        v = obj.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            self.fail(f"{where + ': ' if where else ''}{key} {v!r} is not a number >= 0")
        return float(v)

    def text(self, obj: dict, key: str) -> str:
        v = obj.get(key, "")
        if not isinstance(v, str):
            self.fail(f"'{key}' must be a string, got {v!r}")
        return v


def dumps_manifest(record: dict[str, Any]) -> bytes:
    """The manifest's bytes: UTF-8 JSON, one space of indent; ASCII escapes when a value holds
    undecodable file-name bytes (surrogate escapes from ``os.walk``), which UTF-8 cannot carry."""
    try:
        return json.dumps(record, ensure_ascii=False, indent=1).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(record, ensure_ascii=True, indent=1).encode("ascii")


def write_manifest(url: str, record: dict[str, Any], *,
                   write: Callable[[str, bytes], None] = fsio.write_bytes_atomic) -> None:
    """Write a manifest atomically with ``write`` (readers see the old one or the whole new one),
    after checking that the reader accepts it: nothing writes a manifest its readers refuse.
    shard-tools passes its own atomic writer, whose temp file has a fixed name a re-run replaces."""
    parse_manifest(record, url, allow_empty=True)  # a slice that received no samples still gets its manifest
    write(url, dumps_manifest(record))


__all__ = ["MANIFEST_FORMAT", "Manifest", "ManifestError", "ManifestNotFound", "Shard", "dumps_manifest",
           "load_manifest", "parse_manifest", "resolve_shard_url", "write_manifest"]
