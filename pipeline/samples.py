"""One ordered, finite pass over every sample of some manifests (for embedding and evaluation)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import numpy as np

from pipeline import audio as audio_io
from pipeline.manifest import Shard, load_manifest
from pipeline.shards import (
    LabelEncoder,
    SampleJSONError,
    ShardReadError,
    ShardUnavailableError,
    TarCursor,
    merge_label_specs,
    parse_sample_json,
)


def iter_samples(
    manifests: list[str],
    *,
    sample_rate: int | None = None,
    mono: bool = True,
    rank: int = 0,
    world_size: int = 1,
    on_error: str = "skip",
    on_skip: Callable[[str, int, str], None] | None = None,
    io_timeout_s: float = 60.0,
) -> Iterator[dict]:
    """Every sample once, in manifest / shard / tar order (finite; for embedding and evaluation).

    Rank ``r`` gets the contiguous range ``[r * N // world_size, (r + 1) * N // world_size)`` of the
    ``N`` samples. Yields ``{"key", "audio" (C, T) float32 whole clip, "sample_rate", "labels"
    (per the merged spec: multi_hot float32 arrays, class ints), "meta" (the sample JSON)}``.

    Bad samples are warned about and skipped (``on_error="raise"`` raises). So is a whole shard
    that is missing, unreadable or not its manifest size, or the rest of one that breaks off.
    ``on_skip(where, samples, reason)`` hears of every skip: ``where`` the shard URL (and the key,
    ``url:key``, for one sample), ``samples`` how many of this rank's samples were lost, so a
    caller can report an incomplete split exactly.
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if isinstance(manifests, str):
        manifests = [manifests]
    ms = [load_manifest(u) for u in manifests]
    enc = LabelEncoder(merge_label_specs(ms))

    def skipped(where: str, n: int, reason: str) -> None:
        warnings.warn(f"[musicssl] skipping {n} sample{'s' if n > 1 else ''}: {reason}", stacklevel=4)
        if on_skip is not None:
            on_skip(where, n, reason)

    for shard, a, b in _rank_ranges([s for m in ms for s in m.shards], rank, world_size):
        for raw_key, audio, sr, meta in _read_shard(shard, a, b, on_error, skipped, io_timeout_s):
            if sample_rate is not None and sr != sample_rate:
                audio, sr = audio_io.resample(audio, sr, sample_rate), sample_rate
            if mono:
                audio = audio_io.to_mono(audio)
            yield {"key": raw_key, "audio": audio, "sample_rate": sr, "labels": enc.encode(meta), "meta": meta}


def _rank_ranges(shards: list[Shard], rank: int, world_size: int) -> Iterator[tuple[Shard, int, int]]:
    """``(shard, first, end)`` member ranges that make up rank's share of the concatenated samples."""
    N = sum(s.num_samples for s in shards)
    lo, hi = rank * N // world_size, (rank + 1) * N // world_size
    base = 0
    for s in shards:
        a, b = max(lo, base) - base, min(hi, base + s.num_samples) - base
        base += s.num_samples
        if a < b:
            yield s, a, b


def _read_shard(shard: Shard, a: int, b: int, on_error: str, skipped: Callable[[str, int, str], None],
                io_timeout_s: float) -> Iterator[tuple[str, np.ndarray, int, dict]]:
    """``(key, audio, sample_rate, meta)`` of members ``a..b-1``; each bad one reported to
    ``skipped`` (or raised, with ``on_error="raise"``)."""
    cur = TarCursor(shard.url, expected_bytes=shard.bytes, timeout_s=io_timeout_s)
    try:
        for i in range(a, b):
            try:
                raw = cur.get(i)
            except ShardReadError as exc:  # truncated, malformed, not its manifest size: nothing after it is readable
                if on_error == "raise":
                    raise
                skipped(shard.url, b - i, str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - missing, access denied, a store that stays down
                reason = f"{shard.url} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
                if on_error == "raise":
                    raise ShardUnavailableError(f"{reason}; restore it or the store's access") from exc
                skipped(shard.url, b - i, reason)
                return
            name = f"{shard.url}:{raw.key}"
            try:
                if raw.audio is None or raw.meta is None:
                    raise audio_io.AudioDecodeError(f"{name}: missing audio or json member")
                meta = _sample_json(raw.meta, name)
                audio, sr = audio_io.decode_bytes(raw.audio, name=name)
            except (audio_io.AudioDecodeError, SampleJSONError) as exc:
                if on_error == "raise":
                    raise
                skipped(name, 1, str(exc))
                continue
            yield raw.key, audio, sr, meta
    finally:
        cur.close()


def _sample_json(data: bytes, name: str) -> dict:
    try:
        return parse_sample_json(data)
    except SampleJSONError as exc:
        raise SampleJSONError(f"{name}.json: {exc}") from None
