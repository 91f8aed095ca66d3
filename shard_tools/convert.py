"""One item's audio, converted for a shard: decode -> mono -> resample -> encode, in bounded blocks.

A worker never holds a whole recording: it decodes ``BLOCK_FRAMES`` frames at a time (a segment
only its span), averages channels, resamples with :class:`BlockResampler` and feeds each block to
the encoder. An encoded sample larger than ``SPOOL_BYTES`` is written to a temp file owned by the
build (:mod:`shard_tools.owner`), which the main process streams into the tar, so neither a worker
nor the main process grows with the length of a file (an hour of 44.1 kHz stereo is 1.3 GB as
float32 in one piece, 2 MB per block here).

The bytes are exactly those of the whole-file path (``pipeline.audio``: ``resample`` then
``encode_audio``): polyphase resampling is time-invariant over periods of ``down`` input frames,
so each block is resampled with enough input context on both sides and cut on such a period
(tests/test_shard_scale.py checks it bit for bit), and libsndfile's encoders do not depend on the
sizes of the writes.
"""

from __future__ import annotations

import io
import os
from math import gcd
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from pipeline import fsio
from pipeline.audio import to_mono
from shard_tools.owner import Owner, temp_path
from shard_tools.writer import dumps_json

BLOCK_FRAMES = 1 << 18  # frames decoded per block: 1 MB per channel as float32
SPOOL_BYTES = 8 << 20  # encoded samples above this go through a temp file, not the result pipe
REMOTE_BLOCK_BYTES = 4 << 20  # read-ahead of a source file in a bucket
_FORMATS = {"flac": ("FLAC", "PCM_16"), "wav": ("WAV", "PCM_16")}


class SkipItem(Exception):
    """An item that cannot be written; the message is the reason reported."""


@dataclass(frozen=True)
class Convert:
    """What every item is converted to (the build options a worker needs)."""

    dataset: str
    codec: str
    sample_rate: int | None
    mono: bool
    owner: Owner | None = None  # the build that owns spooled samples (None: this process)
    spool_dir: str | None = None  # where spooled samples go (None: the system temp folder)


@dataclass(frozen=True)
class Spooled:
    """An encoded sample in a temp file (the main process moves it into the tar, then deletes it)."""

    path: str
    size: int


class BlockResampler:
    """``scipy.signal.resample_poly`` over a stream of ``(channels, frames)`` blocks, bit-identical
    to resampling the concatenation in one call.

    Output frames are emitted for input up to a multiple of ``down`` frames (where the polyphase
    pattern repeats) whose filter support lies inside the buffered input; ``pad`` input frames of
    context on each side cover the filter (``2 * 10 * max(up, down) + 1`` taps at the upsampled
    rate, scipy's default), and the file's own edges get resample_poly's zero padding as before.
    """

    def __init__(self, orig_sr: int, new_sr: int, min_block: int = BLOCK_FRAMES):
        g = gcd(orig_sr, new_sr)
        self.up, self.down = new_sr // g, orig_sr // g  # as pipeline.audio.resample
        taps = 20 * max(self.up, self.down) + 1
        self.pad = self.down * (-(-taps // (self.up * self.down)) + 2)
        self.min_block = min_block
        self._buf: np.ndarray | None = None  # input from frame self._base on
        self._base = 0
        self._done = 0  # output emitted for input frames [0, _done); a multiple of down
        self._total = 0  # input frames pushed

    def push(self, x: np.ndarray) -> np.ndarray:
        self._buf = x if self._buf is None else np.concatenate([self._buf, x], axis=1)
        self._total += x.shape[1]
        end = (self._total - self.pad) // self.down * self.down
        if end - self._done < self.min_block:
            return x[:, :0]
        return self._emit(end, final=False)

    def finish(self) -> np.ndarray:
        if self._buf is None:
            return np.zeros((1, 0), np.float32)
        return self._emit(self._total, final=True)

    def _emit(self, end: int, *, final: bool) -> np.ndarray:
        from scipy.signal import resample_poly

        up, down = self.up, self.down
        lo = max(0, self._done - self.pad)  # == self._base
        hi = self._total if final else end + self.pad
        y = resample_poly(self._buf[:, lo - self._base:hi - self._base], up, down, axis=-1)
        start = (self._done - lo) * up // down
        if final:  # resample_poly's length: ceil(frames * up / down)
            n = -(-self._total * up // down) - self._done * up // down
        else:
            n = (end - self._done) * up // down
        keep = max(0, end - self.pad)
        self._buf, self._base, self._done = self._buf[:, keep - self._base:], keep, end
        return y[:, start:start + n].astype(np.float32, copy=False)


def _declared_wav_shortfall(info: str) -> bool:
    """True when libsndfile notes that a WAV's data chunk is shorter than its header declares.

    libsndfile reports e.g. ``data : 32000 (should be 15978)``; streaming writers leave the size 0
    or 0xFFFFFFFF, which is not truncation.
    """
    for line in info.splitlines():
        line = line.strip()
        if line.startswith("data :") and "(should be" in line:
            try:
                declared = int(line.split(":", 1)[1].split("(")[0].strip())
                actual = int(line.split("(should be", 1)[1].rstrip(") "))
            except ValueError:
                continue
            if 0 < declared < 0xFFFFFFF0 and actual < declared:
                return True
    return False


@contextmanager
def _open_source(path: str):
    """A ``soundfile.SoundFile`` reading ``path`` (local, or any fsspec URL); SkipItem if unusable."""
    try:
        if fsio.is_local(path):
            size = os.path.getsize(fsio.local_path(path))
        else:
            fs, p = fsio.fs_and_path(path)
            size = int(fsio.with_retries(lambda: fs.size(p), what=path))
    except (FileNotFoundError, OSError) as exc:
        raise SkipItem(f"missing file: {getattr(exc, 'strerror', None) or exc}") from exc
    if size == 0:
        raise SkipItem("empty file: 0 bytes")
    # a bucket object is read through a small read-ahead buffer (s3fs's default is 50 MB per file)
    raw = None if fsio.is_local(path) else fs.open(p, "rb", block_size=REMOTE_BLOCK_BYTES)
    try:
        try:
            f = sf.SoundFile(fsio.local_path(path) if raw is None else raw)
        except Exception as exc:  # LibsndfileError, RuntimeError, TypeError from odd headers
            raise SkipItem(f"not decodable audio: unknown format or corrupt data (libsndfile: {exc})") from exc
        with f:
            yield f
    finally:
        if raw is not None:
            raw.close()


def _span(f: sf.SoundFile, segment: tuple[float, float] | None) -> tuple[int, int | None, int]:
    """``(first frame, frames to read or None for all, frames expected)`` of an item in ``f``."""
    sr, total = int(f.samplerate), int(f.frames)
    if segment is None:
        return 0, None, total
    start = max(0, int(round(segment[0] * sr)))
    stop = int(round(segment[1] * sr))
    if total > 0 and start >= total:
        raise SkipItem(f"segment beyond end of file: starts at {segment[0]:.2f} s, file has {total / sr:.2f} s")
    return start, stop - start, (min(stop, total) - start if total > 0 else stop - start)


def _blocks(f: sf.SoundFile, start: int, want: int | None):
    """Decoded float32 ``(channels, frames)`` blocks of ``want`` frames (None: to the end) from ``start``."""
    try:
        if start:
            f.seek(start)
        left = want
        while left is None or left > 0:
            n = BLOCK_FRAMES if left is None else min(BLOCK_FRAMES, left)
            block = f.read(n, dtype="float32", always_2d=True)
            if block.shape[0] == 0:
                return
            if left is not None:
                left -= block.shape[0]
            if not np.isfinite(block).all():
                raise SkipItem("non-finite samples: NaN or Inf in the decoded audio")
            yield np.ascontiguousarray(block.T)
    except SkipItem:
        raise
    except Exception as exc:  # a decoder error part-way through the stream
        raise SkipItem(f"not decodable audio: unknown format or corrupt data (libsndfile: {exc})") from exc


class _Sink:
    """The encoder's output: memory for small samples, a build-owned temp file for long ones."""

    def __init__(self, expected_bytes: int | None, conv: Convert):
        self.path = None
        if expected_bytes is not None and expected_bytes <= SPOOL_BYTES:
            self.file = io.BytesIO()
        else:
            self.path = temp_path("spool", f".{conv.codec}", conv.owner, conv.spool_dir)
            self.file = open(self.path, "w+b")

    def result(self) -> bytes | Spooled:
        if self.path is None:
            return self.file.getvalue()
        self.file.close()
        return Spooled(self.path, os.path.getsize(self.path))

    def discard(self) -> None:
        self.file.close()
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)


def _convert(f: sf.SoundFile, item, conv: Convert) -> tuple[bytes | Spooled, int, int, int]:
    """Stream ``item`` from ``f`` through mono/resample into the encoder.

    Returns ``(payload, sample_rate, channels, frames)`` of the encoded sample."""
    sr, fmt = int(f.samplerate), f.format
    if fmt == "WAV" and _declared_wav_shortfall(f.extra_info):
        raise SkipItem("truncated: WAV data chunk shorter than its header declares")
    start, want, expected = _span(f, item.segment)
    out_sr = conv.sample_rate or sr
    channels = 1 if conv.mono else int(f.channels)
    resampler = BlockResampler(sr, out_sr) if out_sr != sr else None
    est = expected * out_sr // sr * channels * 2 + 4096 if expected > 0 else None
    sink = _Sink(est, conv)
    encoder = None
    got = frames = 0
    try:
        def write(x: np.ndarray) -> None:
            nonlocal encoder, frames
            if x.shape[1] == 0:
                return
            if encoder is None:
                try:
                    encoder = sf.SoundFile(sink.file, "w", samplerate=out_sr, channels=x.shape[0],
                                           format=_FORMATS[conv.codec][0], subtype=_FORMATS[conv.codec][1])
                except Exception as exc:  # e.g. FLAC cannot hold > 8 channels
                    raise SkipItem(f"encode failed: {exc}") from exc
            encoder.write(np.clip(x, -1.0, 1.0).T)
            frames += x.shape[1]

        for block in _blocks(f, start, want):
            got += block.shape[1]
            x = to_mono(block) if conv.mono else block
            write(resampler.push(x) if resampler is not None else x)
        if got == 0:
            raise SkipItem("no audio frames: the file decodes to zero samples")
        # A header promising more frames than the stream holds means a cut-off download. An MP3's
        # frame count is an estimate (exact with a Xing/LAME header, file size / bitrate without
        # one, which is off for VBR), so only a large shortfall counts there.
        slack = 0.10 if fmt == "MP3" else 0.02
        if expected > 0 and got < expected - max(4096, int(slack * expected)):
            raise SkipItem(f"truncated: header says {expected} frames, only {got} decode")
        if resampler is not None:
            write(resampler.finish())
        encoder.close()
        return sink.result(), out_sr, channels, frames
    except BaseException:
        if encoder is not None and not encoder.closed:
            try:
                encoder.close()
            except Exception:  # noqa: BLE001 - the sample is dropped anyway
                pass
        sink.discard()
        raise


def process_item(item, conv: Convert) -> tuple:
    """Worker entry point. Returns ``("ok", audio, json_bytes, seconds, sr, channels)`` with
    ``audio`` the encoded bytes or a :class:`Spooled` file, or ``("skip", reason)``; never raises
    for a bad file."""
    try:
        with _open_source(item.path) as f:
            audio, sr, channels, frames = _convert(f, item, conv)
        meta: dict = {
            "key": item.key,
            "dataset": conv.dataset,
            "split": item.split,
            "id": item.id,
            "source": item.source,
            "sample_rate": sr,
            "num_samples": int(frames),
            "channels": int(channels),
        }
        if item.segment is not None:
            meta["segment"] = [float(item.segment[0]), float(item.segment[1])]
        meta["labels"] = item.labels
        for k, v in item.extra.items():
            meta.setdefault(k, v)
        return ("ok", audio, dumps_json(meta), frames / sr, sr, int(channels))
    except SkipItem as exc:
        return ("skip", str(exc))
    except MemoryError:
        return ("skip", "out of memory: file too large to decode")
    except Exception as exc:  # noqa: BLE001 - one odd file must not stop a day-long build
        return ("skip", f"unexpected error: {type(exc).__name__}: {exc}")


def discard_result(res: tuple) -> None:
    """Remove the temp file of a result that will not be written (a spooled sample)."""
    if res[0] == "ok" and isinstance(res[1], Spooled) and os.path.exists(res[1].path):
        os.unlink(res[1].path)
