"""Decode and crop one raw sample: the frames its views need, no more (the loader's decode -> crop).

A raw sample is the bytes of its audio member and its JSON (:class:`pipeline.shards.RawSample`).
:class:`Cropper` draws the view offsets, decodes only those frames with libsndfile from the bytes
in memory (FLAC seeks are exact), resamples and downmixes when asked, and applies the CPU
transform. A sample that cannot be used raises :class:`BadSample`, which the stream counts and
replaces (``pipeline/stream.py``).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from pipeline import audio as audio_io
from pipeline.shards import LabelEncoder, RawSample, SampleJSONError, parse_sample_json

if TYPE_CHECKING:
    from pipeline.loader import LoaderConfig

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]
MAX_CHANNELS, MIN_RATE, MAX_RATE = 64, 1000, 768_000  # beyond these a sample's header is taken as damage


class BadSample(Exception):
    """A sample the stream skips, counts (``skipped_<kind>``) and replaces."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # "corrupt" | "short" | "truncated" | "mismatched"


@dataclass
class Example:
    key: str
    views: list[np.ndarray] | None  # V arrays (C, L) float32; None: decoded into the batch already
    length: int
    labels: dict
    padded: bool


class KeyedDraws:
    """Uniform integers drawn from a hash of ``(key, counter)``: the per-example random source for
    crop offsets. Building a seeded numpy Generator (SeedSequence hashing, PCG64 set-up) and drawing
    two offsets took 39 us, a few percent of a clip's whole cost; this takes 6 us (timeit). Each
    draw is ``low + (h * (high - low)) >> 64`` for a 64-bit BLAKE2b value ``h``: its bias is below
    ``(high - low) / 2**64``."""

    __slots__ = ("_key", "_n")

    def __init__(self, *key: int):
        self._key = ",".join(str(int(k)) for k in key).encode()
        self._n = 0

    def integers(self, low: int, high: int) -> int:
        if high <= low:
            raise ValueError(f"integers: empty range [{low}, {high})")
        h = hashlib.blake2b(self._key, digest_size=8, salt=self._n.to_bytes(16, "little")).digest()
        self._n += 1
        return low + ((int.from_bytes(h, "little") * (high - low)) >> 64)


# soundfile's own binding of libsndfile (module internals, present in every soundfile since 0.10);
# None: fall back to the public SoundFile.read
_SF_READF = getattr(getattr(sf, "_snd", None), "sf_readf_float", None) if hasattr(sf, "_ffi") and hasattr(sf, "_error_check") else None


def readf(f: sf.SoundFile, out: np.ndarray) -> int:
    """Decode ``len(out)`` frames at the current position into the C-contiguous float32
    ``(n, channels)`` array ``out``; returns the frames decoded.

    ``SoundFile.read`` wraps every read in a ``tell()`` and a ``seek()`` back to where the read
    ended; on FLAC that seek re-synchronises the decoder (~5 % of a clip's cost on the demo
    shards), and nothing here needs it: the next read continues in place. So this calls
    libsndfile's ``sf_readf_float`` directly when soundfile exposes it."""
    if out.dtype != np.float32 or not out.flags.c_contiguous or out.shape[1:] != (f.channels,):
        raise ValueError(f"readf needs a C-contiguous float32 (n, {f.channels}) array, got {out.dtype} {out.shape}")
    if _SF_READF is None:
        return f.read(len(out), out=out).shape[0]
    f._check_if_closed()
    n = _SF_READF(f._file, sf._ffi.cast("float *", out.ctypes.data), len(out))
    sf._error_check(f._errorcode)
    return int(n)


def read_spans(f: sf.SoundFile, spans: list[tuple[int, int]], name: str, dest: list[np.ndarray] | None = None,
               pos: int = 0) -> list[np.ndarray]:
    """Decode only the frame spans ``[(offset, length)]`` of an open file; returns ``(channels,
    length)`` views. ``dest[i]``: a contiguous ``(length, channels)`` array to decode span i into
    (the batch itself, saving a copy). ``pos``: the file's current frame (0 when freshly opened); a
    span starting there is read without a seek."""
    out = []
    check_finite = f.subtype in ("FLOAT", "DOUBLE")  # integer PCM cannot hold NaN or inf
    for i, (off, n) in enumerate(spans):
        if off != pos:
            f.seek(off)
        x = dest[i] if dest is not None else np.empty((n, f.channels), dtype=np.float32)
        got = readf(f, x)
        if got != n:
            raise BadSample("corrupt", f"{name}: {got} of {n} frames decodable at offset {off}")
        if check_finite and not np.isfinite(x).all():
            raise BadSample("corrupt", f"{name}: non-finite samples")
        pos = off + n
        out.append(x.T)
    return out


class Cropper:
    """Decode the needed frames of one raw sample and cut its views."""

    def __init__(self, cfg: LoaderConfig, labels: LabelEncoder, transform: Transform | None):
        self.cfg, self.labels, self.transform = cfg, labels, transform

    def __call__(self, raw: RawSample, url: str, crop_rng: KeyedDraws, tf_rng: Callable[[], np.random.Generator],
                 dest: np.ndarray | None = None) -> Example:
        """The example for ``raw``; with ``dest`` (its ``(V, 1, T)`` row of the batch) a mono file at
        the target rate is decoded straight into the batch (``Example.views`` is then None)."""
        name = f"{url}:{raw.key}"
        if raw.audio is None or raw.meta is None:
            raise BadSample("corrupt", f"{name}: missing {'audio' if raw.audio is None else 'json'} member")
        try:
            meta = parse_sample_json(raw.meta)
        except SampleJSONError as exc:
            raise BadSample("corrupt", f"{name}.json: {exc}") from exc
        try:
            with sf.SoundFile(io.BytesIO(raw.audio)) as f:
                pieces, L, padded, sr = self._crop(f, name, crop_rng, dest)
        except BadSample:
            raise
        except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
            raise BadSample("corrupt", f"{name}: not decodable audio ({exc})") from exc
        labels = self.labels.encode(meta)
        if pieces is None:  # already in the batch
            return Example(key=raw.key, views=None, length=L, labels=labels, padded=padded)
        return Example(key=raw.key, views=self._views(pieces, sr, L, tf_rng), length=L, labels=labels, padded=padded)

    def _crop(self, f: sf.SoundFile, name: str, rng: KeyedDraws, dest: np.ndarray | None) -> tuple[list[np.ndarray] | None, int, bool, int]:
        """Pick the view offsets and decode just those frames: (pieces at the source rate, L, padded, sr)."""
        cfg = self.cfg
        frames, sr = int(f.frames), int(f.samplerate)
        if frames <= 0:
            raise BadSample("corrupt", f"{name}: no audio frames")
        if not 1 <= f.channels <= MAX_CHANNELS or not MIN_RATE <= sr <= MAX_RATE:
            # what a header may claim is not what is worth allocating or resampling for
            raise BadSample("corrupt", f"{name}: {f.channels} channels at {sr} Hz is not audio this loader takes")
        target = cfg.sample_rate or sr
        avail = frames if target == sr else (frames * target) // sr  # frames at the target rate
        L, padded = self._length(avail, name)
        offsets = [int(rng.integers(0, avail - L + 1)) for _ in range(cfg.views)]
        if target == sr:
            spans = [(o, L) for o in offsets]
        else:
            # a few extra source frames so the resampler's edge does not fall inside the crop
            n_src = min(frames, -(-L * sr // target) + 8)
            spans = [(min(o * sr // target, frames - n_src), n_src) for o in offsets]
        direct = dest is not None and target == sr and f.channels == 1
        if len(spans) == 2 and abs(spans[0][0] - spans[1][0]) < spans[0][1]:
            return self._overlapping(f, spans, L, name, dest if direct else None), L, padded, sr
        if direct:
            read_spans(f, spans, name, [dest[v, 0, :L].reshape(L, 1) for v in range(len(spans))])
            return None, L, padded, sr
        return read_spans(f, spans, name), L, padded, sr

    def _length(self, avail: int, name: str) -> tuple[int, bool]:
        """The view length for a clip of ``avail`` frames at the target rate, and whether it is padded."""
        cfg, T = self.cfg, self.cfg.crop_samples
        if cfg.variable_length:
            return min(avail, T), False
        if avail >= T:
            return T, False
        if cfg.short_policy == "skip":
            raise BadSample("short", f"{name}: {avail} frames < crop_samples {T}")
        return avail, True

    @staticmethod
    def _overlapping(f: sf.SoundFile, spans: list[tuple[int, int]], L: int, name: str,
                     dest: np.ndarray | None) -> list[np.ndarray] | None:
        """Two overlapping views: every frame of their union is decoded once."""
        if dest is not None:
            # the earlier view straight into its batch row; the later one copies the overlap
            # from it and decodes only its tail, continuing where the first read stopped (no seek)
            a, b = (0, 1) if spans[0][0] <= spans[1][0] else (1, 0)
            shift = spans[b][0] - spans[a][0]
            read_spans(f, [(spans[a][0], L)], name, [dest[a, 0, :L].reshape(L, 1)])
            dest[b, 0, : L - shift] = dest[a, 0, shift:L]
            if shift:
                read_spans(f, [(spans[a][0] + L, shift)], name, [dest[b, 0, L - shift : L].reshape(shift, 1)], pos=spans[a][0] + L)
            return None
        lo = min(spans[0][0], spans[1][0])
        (union,) = read_spans(f, [(lo, max(spans[0][0], spans[1][0]) + spans[0][1] - lo)], name)
        return [union[:, s - lo : s - lo + n] for s, n in spans]

    def _views(self, pieces: list[np.ndarray], sr: int, L: int, tf_rng: Callable[[], np.random.Generator]) -> list[np.ndarray]:
        """Decoded pieces -> views at the target rate and channel count, through the CPU transform."""
        cfg = self.cfg
        target = cfg.sample_rate or sr
        views = []
        for x in pieces:
            if target != sr:
                x = audio_io.resample(x, sr, target)[:, :L]
                if x.shape[1] < L:
                    x = np.pad(x, ((0, 0), (0, L - x.shape[1])))
            views.append(audio_io.to_mono(x) if cfg.mono else x)
        if self.transform is None:
            return views
        v = np.stack(views)  # (V, C, L)
        out = self.transform(v, tf_rng())
        if out.shape != v.shape:
            raise ValueError(f"loader transform {self.transform!r} returned shape {out.shape} for input {v.shape}; it must keep the shape")
        return list(np.asarray(out, dtype=np.float32))
