"""Tiny labelled datasets for the evaluation tests: four well-separated notes with two timbre tags.

``write_toy(folder)`` writes train/valid/test shards (docs/architecture.md §1, via tests/shardgen.py)
of 0.45 s synthetic notes at 16 kHz: ``pitch`` (class, 4 values) and ``tags`` (multi_hot: "bright"
= 8 harmonics instead of 2, "noisy" = louder noise), seeded.
"""

from __future__ import annotations

import numpy as np

from tests import shardgen

SR = 16000
PITCHES = [48, 55, 62, 69]  # four well-separated notes
TAGS = ["bright", "noisy"]
SPEC = {"pitch": {"kind": "class", "names": PITCHES}, "tags": {"kind": "multi_hot", "names": TAGS}}


def toy_clip(rng: np.random.Generator, i: int, prefix: str, *, seconds: float = 0.45, sample_rate: int = SR) -> dict:
    pitch = PITCHES[i % 4]
    bright, noisy = bool((i // 4) % 2), bool((i // 8) % 2)
    f0 = 440.0 * 2 ** ((pitch - 69) / 12)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    n_harm = 8 if bright else 2
    x = sum(rng.uniform(0.3, 1.0) / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 6.28)) for k in range(1, n_harm + 1))
    x = 0.3 * x / np.max(np.abs(x)) * np.exp(-t * rng.uniform(0.5, 3))
    x = x + (0.05 if noisy else 0.002) * rng.standard_normal(len(t))
    tags = [name for name, on in zip(TAGS, (bright, noisy)) if on]
    return {"key": f"{prefix}-{i:04d}", "audio": x[None].astype(np.float32), "sample_rate": sample_rate,
            "labels": {"pitch": pitch, "tags": tags}}


def write_toy(folder: str, sizes: tuple[int, int, int] = (48, 24, 24), *, seed: int = 0, shards: int = 2,
              seconds: float = 0.45, sample_rate: int = SR) -> str:
    """train/valid/test of ``sizes`` clips, each split in ``shards`` shards; returns ``folder``."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "valid", "test"), sizes):
        clips = [toy_clip(rng, i, split, seconds=seconds, sample_rate=sample_rate) for i in range(n)]
        cuts = [n // shards] * (shards - 1)
        shardgen.write_split(folder, clips, cuts + [n - sum(cuts)], split=split, dataset="toy", labels=SPEC)
    return folder
