"""Shared measurement helpers for the augmentation tests (rendered notes, f0, RT60, tone levels)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from tests.notes import rendered_note

SR = 22050


@lru_cache(maxsize=8)
def render_note(pitch: int = 69, seconds: float = 1.5, program: int = 73, total: float | None = None) -> np.ndarray:
    """A real instrument note held ``seconds`` (``tests.notes``), mono float32 at SR, peak 0.5.

    ``program`` 73 is a flute: its fundamental dominates, so the strongest spectral peak is f0.
    ``total`` pads with silence to that many seconds.
    """
    mono = rendered_note(program, pitch, seconds=seconds, sample_rate=SR)
    if total is not None:
        n = int(total * SR)
        mono = np.pad(mono, (0, max(0, n - len(mono))))[:n]
    return mono


def f0_hz(x: np.ndarray, sr: int = SR, fmin: float = 60.0, fmax: float = 2000.0) -> float:
    """Frequency of the strongest spectral peak in [fmin, fmax] (Hann, 16x zero-padding, parabolic)."""
    x = np.asarray(x, dtype=np.float64)
    n = 1 << int(np.ceil(np.log2(len(x) * 16)))
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x)), n=n))
    freqs = np.fft.rfftfreq(n, 1 / sr)
    band = np.nonzero((freqs >= fmin) & (freqs <= fmax))[0]
    k = band[np.argmax(mag[band])]
    a, b, c = np.log(mag[k - 1 : k + 2] + 1e-30)
    delta = 0.5 * (a - c) / (a - 2 * b + c)
    return float((k + delta) * sr / n)


def semitones(f_out: float, f_in: float) -> float:
    return 12 * np.log2(f_out / f_in)


def active_seconds(x: np.ndarray, sr: int = SR, floor_db: float = -30.0) -> float:
    """Duration from the first to the last 10 ms frame whose RMS is within floor_db of the loudest."""
    hop = sr // 100
    frames = np.asarray(x, dtype=np.float64)[: len(x) // hop * hop].reshape(-1, hop)
    db = 10 * np.log10(np.mean(frames**2, axis=1) + 1e-20)
    on = np.nonzero(db > db.max() + floor_db)[0]
    return (on[-1] - on[0] + 1) * hop / sr


def tone_level(x: np.ndarray, freq: float, sr: int = SR) -> float:
    """Amplitude of the component at ``freq`` (Hann-windowed DFT at that exact frequency)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.hanning(len(x))
    t = np.arange(len(x)) / sr
    return float(2 * np.abs(np.sum(w * x * np.exp(-2j * np.pi * freq * t))) / np.sum(w))


def schroeder_rt60(ir: np.ndarray, sr: int = SR) -> float:
    """RT60 from the energy decay curve (backward-integrated energy), line fit from -5 to -25 dB."""
    e = np.asarray(ir, dtype=np.float64) ** 2
    edc = np.cumsum(e[::-1])[::-1]
    db = 10 * np.log10(edc / edc[0])
    sel = np.nonzero((db <= -5) & (db >= -25))[0]
    slope = np.polyfit(sel / sr, db[sel], 1)[0]
    return -60.0 / slope


# The measurements above are what the augmentation tests trust; check them on known signals.


def test_f0_of_pure_tone_is_exact():
    t = np.arange(SR) / SR
    assert abs(f0_hz(np.sin(2 * np.pi * 311.1 * t)) - 311.1) < 0.05


def test_schroeder_rt60_of_exponential_decay():
    rng = np.random.default_rng(0)
    t = np.arange(SR) / SR
    ir = rng.standard_normal(SR) * np.exp(-np.log(1000) * t / 0.4)
    assert abs(schroeder_rt60(ir) - 0.4) < 0.04


def test_rendered_note_has_its_pitch_and_length():
    x = render_note(69, 1.0, total=1.5)
    assert abs(semitones(f0_hz(x[2000:15000]), 440.0)) < 0.3
    assert 0.9 < active_seconds(x) < 1.3
