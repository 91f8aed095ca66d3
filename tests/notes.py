"""Rendered real-instrument notes for the tests, cached per process.

Every note comes from ``shard_tools.demo.render_note`` (the GM soundfont pretty_midi ships, through
midirenderer; about 26 ms a note), so the demo datasets and the tests hear the same instruments.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def rendered_note(program: int, pitch: int, *, seconds: float, sample_rate: int) -> np.ndarray:
    """``pitch`` on GM ``program``, held all of ``seconds``: float32 mono at ``sample_rate``, exactly
    ``seconds`` long, peak-normalised to 0.5."""
    from shard_tools.demo import render_note

    clip = render_note(program, pitch, velocity=100, seconds=seconds, sample_rate=sample_rate)
    return (clip / (np.abs(clip).max() + 1e-8) * 0.5).astype(np.float32)


@lru_cache(maxsize=8)
def rendered_notes(programs: tuple[int, ...], pitches: tuple[int, ...], *, seconds: float,
                   sample_rate: int) -> np.ndarray:
    """Every program at every pitch (programs outer): float32 ``(len(programs) * len(pitches), samples)``."""
    return np.stack([rendered_note(p, k, seconds=seconds, sample_rate=sample_rate)
                     for p in programs for k in pitches])
