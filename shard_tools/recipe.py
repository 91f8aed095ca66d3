"""The seam between dataset recipes (mtat.py, nsynth.py, ...) and the generic shard builder.

A recipe reads a corpus in its original on-disk layout and returns a :class:`Recipe`: the list of
samples to write (:class:`Item`), the files it already rejected while reading the layout
(:class:`Skip`), and the manifest's label spec. It does not decode audio (beyond reading a header
when it must know a duration to cut segments); the builder (``shard_tools.build``) decodes,
resamples, encodes and writes shards in a process pool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(*parts: object) -> str:
    """A tar-safe sample key from id parts: ``[A-Za-z0-9_-]`` only (no dots, see architecture.md)."""
    return "-".join(_KEY_BAD.sub("_", str(p)).strip("_") for p in parts if str(p) != "")


@dataclass
class Item:
    """One sample to write: a whole file, or a segment of one."""

    path: str  # local path of the source audio file
    source: str  # path relative to --root (stored in the sample JSON)
    split: str
    id: str  # the dataset's own id
    key: str  # unique within the split, see make_key
    labels: dict = field(default_factory=dict)  # raw, JSON-serialisable label values
    segment: tuple[float, float] | None = None  # seconds within the source file
    extra: dict = field(default_factory=dict)  # extra top-level JSON fields (clip_id, msd_id, ...)


def item_record(item: Item) -> list:
    """An item as a JSON list (the plan file, the build fingerprint); :func:`item_from_record` undoes it."""
    return [item.split, item.key, item.path, item.source, item.id, item.labels,
            list(item.segment) if item.segment is not None else None, item.extra]


def item_from_record(rec: list) -> Item:
    split, key, path, source, id_, labels, segment, extra = rec
    return Item(path=path, source=source, split=split, id=id_, key=key, labels=labels,
                segment=tuple(segment) if segment is not None else None, extra=extra)


@dataclass
class Skip:
    """A source file (or label row) left out, and why. Every skip is reported, none is silent."""

    path: str
    reason: str


@dataclass
class Recipe:
    dataset: str
    items: list[Item]
    skipped: list[Skip]
    # manifest "labels" spec, see docs/architecture.md: {field: {"kind": ..., "names": [...]}}
    labels: dict[str, dict] = field(default_factory=dict)
    # distinct source files considered, written or skipped (files_in in the report)
    files_in: int = 0
    # the --root the paths are below (local path or URL): skips are sliced by their path relative
    # to it, like items by their source, so slices agree on machines that mount the corpus elsewhere
    root: str = ""

    def slice_key(self, path: str) -> str:
        """What ``--slice`` hashes for a skipped file: its path relative to the root when below it."""
        base = self.root.rstrip("/")
        return path[len(base) + 1:] if base and path.startswith(base + "/") else path
