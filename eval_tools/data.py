"""Where evaluation data comes from: a dataset's split manifests, whole clips, labels, caches.

Labels are encoded against one spec merged over the train, valid and test manifests (so class
indices agree across splits even when a split lacks some classes, e.g. held-out instruments).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np

from eval_tools.read import ReadReport
from pipeline import fsio
from pipeline.errors import UserError
from pipeline.manifest import load_manifest
from pipeline.shards import merge_label_specs

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
            raise UserError(
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


@dataclass
class Embeddings:
    """Rows of embeddings with their clips' keys and labels.

    One row per clip, unless ``owner`` is set: then ``x`` has one row per crop and ``owner[r]`` is
    the index (into ``keys``/``labels``) of row ``r``'s clip (``--protocol clmr``'s test crops).
    ``report`` is what the pass read (eval_tools/read.py); ``excluded`` counts clips read but left
    out by the view (e.g. shorter than CLMR's crop)."""

    keys: list[str]
    x: np.ndarray  # (N, D) or (N, L, D); N = rows
    labels: dict[str, np.ndarray]  # task -> (clips,) int64 or (clips, K) float32
    owner: np.ndarray | None = None  # (N,) int64 clip index per row
    report: ReadReport | None = None
    excluded: int = 0

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        extra = {} if self.owner is None else {"owner": self.owner}
        info = json.dumps({"report": self.report.to_dict() if self.report else None, "excluded": self.excluded})
        np.savez(tmp, keys=np.array(self.keys), x=self.x, info=np.array(info), **extra,
                 **{f"label__{k}": v for k, v in self.labels.items()})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> Embeddings:
        with np.load(path, allow_pickle=False) as z:
            labels = {k[len("label__"):]: z[k] for k in z.files if k.startswith("label__")}
            info = json.loads(str(z["info"])) if "info" in z.files else {}
            rep = info.get("report")
            return cls(keys=[str(k) for k in z["keys"]], x=z["x"], labels=labels,
                       owner=z["owner"] if "owner" in z.files else None,
                       report=ReadReport.from_dict(rep) if rep else None, excluded=int(info.get("excluded", 0)))

    def subset(self, idx: np.ndarray) -> Embeddings:
        """The clips ``idx`` (and, with ``owner``, their rows)."""
        idx = np.asarray(idx, dtype=np.int64)
        labels = {k: v[idx] for k, v in self.labels.items()}
        keys = [self.keys[i] for i in idx]
        if self.owner is None:
            return Embeddings(keys=keys, x=self.x[idx], labels=labels)
        remap = np.full(len(self.keys), -1, dtype=np.int64)
        remap[idx] = np.arange(len(idx))
        rows = np.flatnonzero(remap[self.owner] >= 0)
        return Embeddings(keys=keys, x=self.x[rows], labels=labels, owner=remap[self.owner[rows]])
