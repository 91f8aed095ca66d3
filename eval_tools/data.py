"""Where evaluation data comes from: a dataset's split manifests, whole clips, labels, caches.

Labels are encoded against one spec merged over the train, valid and test manifests (so class
indices agree across splits even when a split lacks some classes, e.g. held-out instruments).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from pipeline import fsio
from pipeline.manifest import load_manifest
from pipeline.shards import LabelEncoder, merge_label_specs

SPLITS = ("train", "valid", "test")


@dataclass
class Dataset:
    """The three split manifests of one dataset and their merged label spec."""

    name: str
    manifests: dict[str, str]  # split -> manifest URL
    spec: dict[str, dict] = field(default_factory=dict)
    sample_rate: int | None = None  # the shards' rate (None if they differ)
    num_samples: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, folder: str, name: str | None = None) -> Dataset:
        """``folder`` holds ``train.manifest.json``, ``valid.manifest.json``, ``test.manifest.json``."""
        manifests = {s: fsio.join_url(folder, f"{s}.manifest.json") for s in SPLITS}
        missing = [u for u in manifests.values() if not fsio.exists(u)]
        if missing:
            raise FileNotFoundError(
                f"--data {folder}: missing {', '.join(missing)}; a dataset folder needs train/valid/test manifests "
                "(build them with `shard-tools build ...`, or `shard-tools demo --out DIR` for the demo)"
            )
        return cls.from_manifests(manifests, name=name or folder.rstrip("/").rsplit("/", 1)[-1])

    @classmethod
    def from_manifests(cls, manifests: dict[str, str], name: str) -> Dataset:
        parsed = {s: load_manifest(u) for s, u in manifests.items()}
        rates = {m.sample_rate for m in parsed.values()}
        return cls(
            name=name, manifests=dict(manifests), spec=merge_label_specs(list(parsed.values())),
            sample_rate=rates.pop() if len(rates) == 1 else None,
            num_samples={s: m.num_samples for s, m in parsed.items()},
        )

    def manifest_hash(self, split: str) -> str:
        return hashlib.sha256(fsio.read_bytes(self.manifests[split])).hexdigest()[:12]


def iter_clips(ds: Dataset, split: str, sample_rate: int) -> Iterator[tuple[str, np.ndarray, dict]]:
    """``(key, mono float32 (T,), encoded labels)`` for every clip of a split, in shard order."""
    from pipeline.loader import iter_samples

    enc = LabelEncoder(ds.spec)
    for s in iter_samples([ds.manifests[split]], sample_rate=sample_rate, mono=True):
        meta = s.get("meta") or {}
        yield s["key"], np.ascontiguousarray(s["audio"][0], dtype=np.float32), enc.encode(meta)


@dataclass
class Embeddings:
    keys: list[str]
    x: np.ndarray  # (N, D) or (N, L, D)
    labels: dict[str, np.ndarray]  # task -> (N,) int64 or (N, K) float32

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, keys=np.array(self.keys), x=self.x, **{f"label__{k}": v for k, v in self.labels.items()})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> Embeddings:
        with np.load(path, allow_pickle=False) as z:
            labels = {k[len("label__"):]: z[k] for k in z.files if k.startswith("label__")}
            return cls(keys=[str(k) for k in z["keys"]], x=z["x"], labels=labels)

    def subset(self, idx: np.ndarray) -> Embeddings:
        return Embeddings(keys=[self.keys[i] for i in idx], x=self.x[idx], labels={k: v[idx] for k, v in self.labels.items()})
