"""Test helper: write shards exactly per docs/architecture.md §1, independently of shard_tools.

Kept on purpose next to the real builder: it is a second, tiny implementation of the format, so a
loader test that passes on both is a check that the builder and the loader agree with the document
rather than with each other.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import soundfile as sf


def make_clips(
    n: int,
    *,
    sample_rate: int = 8000,
    seconds: tuple[float, float] = (0.5, 0.5),
    channels: int = 1,
    seed: int = 0,
    prefix: str = "clip",
    tags: list[str] | None = None,
) -> list[dict]:
    """``n`` clips of distinct noise+tone audio (no two share a window), with raw labels.

    Each clip gets a pitch ``40 + i % 12`` and the tags ``tags[j]`` for the set bits ``j`` of ``i``.
    """
    rng = np.random.default_rng(seed)
    tags = tags if tags is not None else ["a", "b", "c"]
    clips = []
    for i in range(n):
        frames = int(round(rng.uniform(*seconds) * sample_rate))
        t = np.arange(frames) / sample_rate
        tone = 0.3 * np.sin(2 * np.pi * (110 + 7 * i) * t)
        audio = np.stack([tone + 0.2 * rng.standard_normal(frames) for _ in range(channels)]).astype(np.float32)
        labels = {"pitch": 40 + i % 12, "tags": [tg for j, tg in enumerate(tags) if (i >> j) & 1]}
        clips.append({"key": f"{prefix}-{i:05d}", "audio": np.clip(audio, -1, 1), "sample_rate": sample_rate, "labels": labels})
    return clips


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
    tf.addfile(ti, io.BytesIO(data))


def encode(audio: np.ndarray, sample_rate: int, codec: str = "flac") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio.T, sample_rate, format=codec.upper(), subtype="PCM_16")
    return buf.getvalue()


def write_split(
    folder: str,
    clips: list[dict],
    shard_sizes: list[int],
    *,
    split: str = "train",
    dataset: str = "gen",
    codec: str = "flac",
    labels: dict | None = None,
    corrupt_keys: tuple[str, ...] = (),
) -> str:
    """Write ``clips`` into ``len(shard_sizes)`` tars and the manifest; returns the manifest path.

    ``corrupt_keys``: those samples get garbage bytes in place of their audio member (the JSON stays
    valid), which is what a bit-flipped upload looks like to the loader.
    """
    assert sum(shard_sizes) == len(clips), "shard sizes must add up to the clip count"
    os.makedirs(folder, exist_ok=True)
    shards, pos, total_seconds = [], 0, 0.0
    for si, size in enumerate(shard_sizes):
        name = f"{split}-{si:06d}.tar"
        path = os.path.join(folder, name)
        seconds = 0.0
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
            for c in clips[pos : pos + size]:
                sr, audio = c["sample_rate"], c["audio"]
                data = encode(audio, sr, codec)
                if c["key"] in corrupt_keys:
                    data = bytes(np.random.default_rng(1).integers(0, 256, len(data), dtype=np.uint8))
                meta = {
                    "key": c["key"], "dataset": dataset, "split": split, "id": c["key"], "source": f"{c['key']}.wav",
                    "sample_rate": sr, "num_samples": audio.shape[1], "channels": audio.shape[0], "labels": c["labels"],
                }
                _add(tf, f"{c['key']}.{codec}", data)
                _add(tf, f"{c['key']}.json", json.dumps(meta).encode())
                seconds += audio.shape[1] / sr
        pos += size
        with open(path, "rb") as f:
            blob = f.read()
        shards.append({"url": name, "num_samples": size, "seconds": seconds, "bytes": len(blob),
                       "sha256": hashlib.sha256(blob).hexdigest()})
        total_seconds += seconds
    if labels is None:
        tag_names = sorted({t for c in clips for t in c["labels"].get("tags", [])})
        labels = {"tags": {"kind": "multi_hot", "names": tag_names},
                  "pitch": {"kind": "class", "names": list(range(21, 109))}}
    srs = {c["sample_rate"] for c in clips}
    chans = {c["audio"].shape[0] for c in clips}
    manifest = {
        "format": "musicssl-shards/1", "dataset": dataset, "split": split, "codec": codec,
        "sample_rate": srs.pop() if len(srs) == 1 else None,
        "channels": chans.pop() if len(chans) == 1 else None,
        "num_samples": len(clips), "seconds": total_seconds, "shards": shards, "labels": labels,
        "build": {"command": "tests/shardgen.py", "seed": 0, "created": "1970-01-01T00:00:00Z"},
    }
    path = os.path.join(folder, f"{split}.manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f)
    return path


def truncate(path: str, keep_fraction: float) -> None:
    """Cut a file to a fraction of its bytes (a half-finished upload)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction))
