"""Reading evaluation inputs with an account of every sample not read.

An evaluation's numbers mean something only for the samples it saw. This module reads a split's
shards (or a list of audio files) in order and keeps a :class:`ReadReport`: how many samples the
manifest lists for this pass, how many were read, and each one that was not, with the reason (a
corrupt member, a truncated or missing shard, a file that is not a regular file). The invariant
``listed == read + not_read`` always holds, so a caller can refuse an incomplete split, print the
gap at the top of its table, and never cache a partial pass (issue 13, items 2-4, 10, 18).

``pipeline.loader.iter_samples`` walks shards the same way for other callers but only warns about
what it skips; evaluation needs the count, the reason and the missing tail of a truncated shard.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline import audio as audio_io
from pipeline.shards import ShardReadError, TarCursor, load_manifest

MAX_LISTED_SKIPS = 50  # reasons kept per report; the counts are always complete


@dataclass
class ReadReport:
    """What one pass over a source read. ``skipped`` entries: ``{"where", "reason", "samples"}``."""

    source: str
    listed: int = 0  # samples this pass was meant to read (the manifest's count for this rank's range)
    read: int = 0
    resampled: int = 0  # clips read at another rate and resampled
    not_read: int = 0
    skipped: list[dict] = field(default_factory=list)

    def skip(self, where: str, reason: str, samples: int = 1) -> None:
        self.not_read += samples
        if len(self.skipped) < MAX_LISTED_SKIPS:
            self.skipped.append({"where": where, "reason": reason, "samples": int(samples)})

    @property
    def complete(self) -> bool:
        return self.not_read == 0 and self.read == self.listed

    @property
    def fraction_read(self) -> float:
        return self.read / self.listed if self.listed else 1.0

    def merge(self, other: ReadReport) -> ReadReport:
        out = ReadReport(source=self.source, listed=self.listed + other.listed, read=self.read + other.read,
                         resampled=self.resampled + other.resampled, not_read=self.not_read + other.not_read)
        out.skipped = (self.skipped + other.skipped)[:MAX_LISTED_SKIPS]
        return out

    def to_dict(self) -> dict:
        return {"source": self.source, "listed": self.listed, "read": self.read, "not_read": self.not_read,
                "resampled": self.resampled, "skipped": list(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict) -> ReadReport:
        return cls(source=d["source"], listed=int(d["listed"]), read=int(d["read"]), not_read=int(d["not_read"]),
                   resampled=int(d.get("resampled", 0)), skipped=list(d.get("skipped", [])))

    def summary(self) -> str:
        """One line: ``read 78 of 132 samples (54 not read: 1 truncated shard ...)``."""
        if self.complete:
            return f"read all {self.listed} samples"
        reasons = "; ".join(f"{s['where']}: {s['reason']}" + (f" ({s['samples']} samples)" if s["samples"] > 1 else "")
                            for s in self.skipped[:3])
        more = f"; +{len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
        return f"read {self.read} of {self.listed} samples ({self.not_read} not read: {reasons}{more})"


@dataclass
class Clip:
    index: int  # position in the split (manifest order), the same whatever the rank layout
    key: str
    audio: np.ndarray | None  # mono float32 (T,) at the requested rate (None: decode=False)
    meta: dict


def rank_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[lo, hi)`` of ``n`` samples (ranks in order cover all)."""
    return rank * n // world_size, (rank + 1) * n // world_size


def _meta(raw, name: str) -> dict:
    if raw.meta is None:
        raise audio_io.AudioDecodeError(f"{name}: missing json member")
    meta = json.loads(raw.meta)
    if not isinstance(meta, dict):
        raise ValueError(f"{name}: sample JSON is not an object")
    return meta


def _decode(raw, name: str, sample_rate: int | None) -> tuple[np.ndarray, dict, bool]:
    if raw.audio is None:
        raise audio_io.AudioDecodeError(f"{name}: missing audio member")
    meta = _meta(raw, name)
    audio, sr = audio_io.decode_bytes(raw.audio, name=name)
    resampled = sample_rate is not None and sr != sample_rate
    if resampled:
        audio = audio_io.resample(audio, sr, sample_rate)
    return np.ascontiguousarray(audio_io.to_mono(audio)[0], dtype=np.float32), meta, resampled


def iter_split(manifest_url: str, report: ReadReport, *, sample_rate: int | None, rank: int = 0, world_size: int = 1,
               select: Callable[[int], bool] | None = None, decode: bool = True) -> Iterator[Clip]:
    """Every sample of this rank's range of the split, in manifest/shard/tar order, as mono clips
    resampled to ``sample_rate``. ``select(index)`` False passes a sample by without reading its
    audio (and without counting it as listed); ``decode=False`` yields the sample JSON only (``audio``
    None). Every sample listed but not yielded is in ``report``."""
    m = load_manifest(manifest_url)
    lo, hi = rank_range(m.num_samples, rank, world_size)
    base = 0
    for shard in m.shards:
        a, b = max(lo, base) - base, min(hi, base + shard.num_samples) - base
        first = base
        base += shard.num_samples
        if a >= b:
            continue
        wanted = [i for i in range(a, b) if select is None or select(first + i)]
        report.listed += len(wanted)
        cursor = TarCursor(shard.url)
        try:
            for n, i in enumerate(wanted):
                try:
                    raw = cursor.get(i)
                except ShardReadError as exc:  # nothing after a truncation point can be read
                    report.skip(shard.url, f"{exc}".replace(f"{shard.url}: ", ""), samples=len(wanted) - n)
                    break
                except OSError as exc:  # a missing or unreadable shard (after the cursor's retries)
                    report.skip(shard.url, f"shard not readable ({type(exc).__name__}: {exc})", samples=len(wanted) - n)
                    break
                name = f"{shard.url}:{raw.key}"
                try:
                    audio, meta, resampled = _decode(raw, name, sample_rate) if decode else (None, _meta(raw, name), False)
                except (audio_io.AudioDecodeError, ValueError, RecursionError, UnicodeDecodeError) as exc:
                    report.skip(name, str(exc).replace(f"{name}: ", "")[:200])
                    continue
                report.read += 1
                report.resampled += resampled
                yield Clip(index=first + i, key=raw.key, audio=audio, meta=meta)
        finally:
            cursor.close()


def check_audio_file(path: str) -> str | None:
    """Why ``path`` cannot be read as an audio file without risk (None when it can): a dangling
    symlink, or not a regular file (a FIFO would block ``open`` forever, a device never ends)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "dangling symlink" if os.path.islink(path) else "no such file"
    except OSError as exc:
        return f"cannot stat ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device or other"
        return f"not a regular file ({kind})"
    return None


def iter_files(paths: list[str], report: ReadReport, *, sample_rate: int) -> Iterator[Clip]:
    """Audio files as mono clips at ``sample_rate``; unreadable ones are counted in ``report``."""
    report.listed += len(paths)
    for i, path in enumerate(paths):
        why = check_audio_file(path)
        if why is None:
            try:
                audio, sr = audio_io.read_audio(path)
            except (audio_io.AudioDecodeError, OSError) as exc:
                why = str(exc).replace(f"{path}: ", "")
        if why is not None:
            report.skip(path, why)
            continue
        report.read += 1
        report.resampled += sr != sample_rate
        mono = audio_io.to_mono(audio_io.resample(audio, sr, sample_rate))[0]
        yield Clip(index=i, key=path, audio=np.ascontiguousarray(mono, dtype=np.float32), meta={})
