"""Audio I/O: soundfile for all decoding and encoding (torchaudio's own I/O needs torchcodec)."""

from __future__ import annotations

import io
from functools import lru_cache
from math import gcd

import numpy as np
import soundfile as sf

# soundfile's format names per codec we write
_CODECS = {"flac": ("FLAC", "PCM_16"), "wav": ("WAV", "PCM_16")}


class AudioDecodeError(ValueError):
    """Raised when bytes or a file are not decodable audio (corrupt, truncated, empty, non-audio)."""


def decode_bytes(data: bytes, *, name: str = "<bytes>") -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG/MP3 bytes to float32 ``(channels, frames)`` and the sample rate."""
    if not data:
        raise AudioDecodeError(f"{name}: empty file")
    try:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise AudioDecodeError(f"{name}: not decodable audio ({exc})") from exc
    if audio.shape[0] == 0:
        raise AudioDecodeError(f"{name}: no audio frames")
    if not np.isfinite(audio).all():
        raise AudioDecodeError(f"{name}: non-finite samples")
    return np.ascontiguousarray(audio.T), int(sr)


def read_audio(path: str) -> tuple[np.ndarray, int]:
    """Read a local audio file to float32 ``(channels, frames)`` and the sample rate."""
    with open(path, "rb") as f:
        data = f.read()
    return decode_bytes(data, name=path)


def encode_audio(audio: np.ndarray, sample_rate: int, codec: str = "flac") -> bytes:
    """Encode float ``(channels, frames)`` audio in [-1, 1] to FLAC or WAV (16-bit PCM) bytes."""
    if codec not in _CODECS:
        raise ValueError(f"codec must be one of {sorted(_CODECS)}, got {codec!r}")
    fmt, subtype = _CODECS[codec]
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0).T, sample_rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Average channels: ``(channels, frames) -> (1, frames)``."""
    return audio.mean(axis=0, keepdims=True, dtype=np.float32) if audio.shape[0] > 1 else audio


@lru_cache(maxsize=32)
def _poly_factors(orig: int, new: int) -> tuple[int, int]:
    g = gcd(orig, new)
    return new // g, orig // g


def resample(audio: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited polyphase resampling of float ``(channels, frames)`` audio (scipy)."""
    if orig_sr == new_sr:
        return audio
    from scipy.signal import resample_poly

    up, down = _poly_factors(orig_sr, new_sr)
    return resample_poly(audio, up, down, axis=-1).astype(np.float32, copy=False)
