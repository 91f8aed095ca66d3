"""Embedding extraction: a split -> rows of embeddings and labels, with a read report and a cache.

A :class:`View` says which audio of each clip is embedded: the whole clip (``clip``), one seeded
random crop (``random_crop``: CLMR's training features) or every non-overlapping crop
(``crops``: CLMR's test, one row per crop). Under torchrun every rank embeds its share of the split
and rank 0 gathers the rows in split order (eval_tools/runtime.py).

The cache holds only complete passes (every sample the manifest lists was read), keyed by the
encoder, the view and a hash of the manifest, which lists every shard's ``bytes`` and ``sha256``;
an entry stores the keys it holds and is used only when their count equals the manifest's. A
split read with samples missing is never cached, so a repaired shard is read again (issue 13,
item 3).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from eval_tools.data import Dataset, Embeddings
from eval_tools.encoders import Encoder, has_batchnorm, recalibrate_batchnorm
from eval_tools.read import ReadReport, iter_split
from eval_tools.runtime import Runtime, broadcast_from_main, gather_to_main
from pipeline.errors import UserError
from pipeline.shards import LabelEncoder

LOCAL = Runtime(device=torch.device("cpu"), precision="fp32")


def _unit(seed: int, key: str) -> float:
    """A float in [0, 1) that depends only on (seed, key): crop offsets independent of rank layout."""
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2.0**64


@dataclass(frozen=True, kw_only=True)
class View:
    """Which audio of a clip becomes rows; see the module docstring."""

    kind: str = "clip"  # "clip" | "random_crop" | "crops"
    crop: int | None = None  # samples, for random_crop and crops
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("clip", "random_crop", "crops"):
            raise ValueError(f"view kind must be clip, random_crop or crops, got {self.kind!r}")
        if self.kind != "clip" and not (self.crop and self.crop > 0):
            raise ValueError(f"view {self.kind} needs a positive crop length")

    @property
    def id(self) -> str:
        return "clip" if self.kind == "clip" else f"{self.kind}{self.crop}" + (f"s{self.seed}" if self.kind == "random_crop" else "")

    def segments(self, key: str, clip: np.ndarray) -> list[np.ndarray]:
        """The audio to embed, one array per row; ``[]`` leaves the clip out (counted as excluded)."""
        if self.kind == "clip":
            return [clip]
        n = int(self.crop)  # type: ignore[arg-type]
        if self.kind == "random_crop":
            # CLMR's ContrastiveDataset skips clips shorter than the crop; RandomResizedCrop draws
            # the offset uniformly over [0, len - n]
            if len(clip) < n:
                return []
            s = int(_unit(self.seed, key) * (len(clip) - n + 1))
            return [clip[s : s + n]]
        # CLMR's concat_clip: torch.split into n-sample chunks, then drop the last chunk (even when
        # it is full); a clip of at most one crop keeps one (zero-padded) crop instead of none
        k = max(1, -(-len(clip) // n) - 1)
        clip = np.pad(clip, (0, max(0, n - len(clip))))
        return [clip[i * n : (i + 1) * n] for i in range(k)]


def calibration_crops(ds: Dataset, sample_rate: int, crop: int, *, n_crops: int = 512, seed: int = 0) -> list[np.ndarray]:
    """``n_crops`` random crops of length ``crop`` from clips spread evenly over the train split
    (unaugmented); only the chosen clips are decoded."""
    n_clips = ds.num_samples.get("train", 0)
    per_clip = max(1, -(-n_crops // max(1, n_clips)))  # ceil: few clips -> several crops each
    stride = max(1, n_clips * per_clip // n_crops)
    rng = np.random.default_rng(seed)
    crops: list[np.ndarray] = []
    report = ReadReport(source=ds.manifests["train"])
    for clip in iter_split(ds.manifests["train"], report, sample_rate=sample_rate, select=lambda i: i % stride == 0):
        for _ in range(per_clip):
            if len(clip.audio) <= crop:
                crops.append(np.pad(clip.audio, (0, crop - len(clip.audio))))
            else:
                s = int(rng.integers(0, len(clip.audio) - crop + 1))
                crops.append(clip.audio[s : s + crop])
        if len(crops) >= n_crops:
            break
    return crops[:n_crops]


def prepare_encoder(enc: Encoder, ds: Dataset, *, recalibrate: bool = True, n_crops: int = 512, seed: int = 0) -> int:
    """Recompute BatchNorm statistics on clean crops of ``ds``'s train split (no-op without BatchNorm).

    The cache identity of the encoder then names the calibration data, so embeddings computed with
    and without recalibration (or on another dataset's statistics) never mix. Every rank computes
    the same statistics from the same crops."""
    if not recalibrate or enc.model is None or not has_batchnorm(enc.model):
        return 0
    crop = enc.crop_samples or enc.window
    crops = calibration_crops(ds, enc.sample_rate, int(crop), n_crops=n_crops, seed=seed)
    used = recalibrate_batchnorm(enc, crops)
    enc.ident += f"+bn({ds.manifest_hash('train')},{used},{seed})"
    enc.meta["bn_recalibrated_on"] = used
    return used


def cache_path(cache_dir: str, enc: Encoder, ds: Dataset, split: str, view: View) -> str:
    return os.path.join(cache_dir, enc.cache_id, f"{ds.name}-{split}-{ds.manifest_hash(split)}-{view.id}.npz")


def _cached(path: str | None, ds: Dataset, split: str) -> Embeddings | None:
    if not path or not os.path.exists(path):
        return None
    emb = Embeddings.load(path)
    # only a complete pass is ever written; an entry whose clips (embedded + left out by the view)
    # do not add up to the manifest's count is stale or tampered with
    n = ds.num_samples[split]
    if emb.report is None or not emb.report.complete or emb.report.listed != n or len(emb.keys) + emb.excluded != n:
        return None
    return emb


def extract(enc: Encoder, ds: Dataset, split: str, *, view: View = View(), cache_dir: str | None = None, batch: int = 16,
            progress: bool = True, rt: Runtime = LOCAL, min_read: float = 0.0) -> Embeddings | None:
    """Embeddings and labels of a split (rank 0's; None on other ranks), with ``.report``.

    Read from / written to ``cache_dir`` when given (complete passes only). A pass that read less
    than ``min_read`` of the samples its manifest lists raises :class:`UserError` on every rank."""
    path = cache_path(cache_dir, enc, ds, split, view) if cache_dir else None
    cached = _cached(path, ds, split) if rt.is_main else None
    if broadcast_from_main(cached is not None, rt):
        return cached
    part = _extract_part(enc, ds, split, view, batch=batch, progress=progress and rt.is_main, rt=rt)
    parts = gather_to_main(part, rt)
    out = _concat(parts) if parts is not None else None  # type: ignore[arg-type]
    refusal = broadcast_from_main(refusal_message(out.report, ds, split, min_read) if out is not None else None, rt)
    if refusal:
        raise UserError(refusal)
    if out is not None and path and out.report is not None and out.report.complete:
        out.save(path)
    return out


def refusal_message(report: ReadReport | None, ds: Dataset, split: str, min_read: float) -> str | None:
    """Why a pass is too incomplete to evaluate on (None when it is not)."""
    if report is None or report.fraction_read >= min_read:
        return None
    folder = ds.manifests[split].rsplit("/", 1)[0]
    return (f"--data {ds.name}: the {split} split is incomplete: {report.summary()}. {report.fraction_read:.1%} read is "
            f"under the {min_read:.0%} required (--min-read); repair the shards (`shard-tools verify {folder}`) or pass "
            "--allow-incomplete to evaluate on what was read")


def _extract_part(enc: Encoder, ds: Dataset, split: str, view: View, *, batch: int, progress: bool, rt: Runtime) -> Embeddings:
    from tqdm import tqdm

    labels_of = LabelEncoder(ds.spec)
    report = ReadReport(source=ds.manifests[split])
    keys: list[str] = []
    labels: dict[str, list] = {k: [] for k in ds.spec}
    owner: list[int] = []
    excluded = 0
    bar = tqdm(total=ds.num_samples.get(split, 0) // rt.world_size, desc=f"embed {enc.name} {ds.name}/{split}", unit="row",
               disable=not progress, leave=False)

    def segments():
        nonlocal excluded
        for clip in iter_split(ds.manifests[split], report, sample_rate=enc.sample_rate, rank=rt.rank, world_size=rt.world_size):
            segs = view.segments(clip.key, clip.audio)
            if not segs:
                excluded += 1
                continue
            keys.append(clip.key)
            lab = labels_of.encode(clip.meta)
            for k in labels:
                labels[k].append(lab[k])
            owner.extend([len(keys) - 1] * len(segs))
            yield from segs

    vecs = list(enc.embed_stream(segments(), batch, bar.update))
    bar.close()
    x = np.concatenate(vecs) if vecs else np.zeros((0, 0), dtype=np.float32)
    return Embeddings(keys=keys, x=x, labels={k: _stack(v) for k, v in labels.items()},
                      owner=np.asarray(owner, dtype=np.int64) if view.kind == "crops" else None, report=report, excluded=excluded)


def _stack(values: list) -> np.ndarray:
    return np.stack([np.asarray(v) for v in values]) if values else np.zeros((0,))


def _concat(parts: list[Embeddings]) -> Embeddings:
    """Rank parts in rank order -> one split (owner indices shifted by the clips before)."""
    parts_x = [p for p in parts if len(p.keys)]
    report = parts[0].report
    for p in parts[1:]:
        report = report.merge(p.report)  # type: ignore[union-attr]
    excluded = sum(p.excluded for p in parts)
    if not parts_x:
        return Embeddings(keys=[], x=np.zeros((0, 0), dtype=np.float32), labels={}, report=report, excluded=excluded)
    keys = [k for p in parts_x for k in p.keys]
    labels = {k: np.concatenate([p.labels[k] for p in parts_x]) for k in parts_x[0].labels}
    owner = None
    if parts_x[0].owner is not None:
        offsets = np.cumsum([0] + [len(p.keys) for p in parts_x[:-1]])
        owner = np.concatenate([p.owner + off for p, off in zip(parts_x, offsets)])  # type: ignore[operator]
    return Embeddings(keys=keys, x=np.concatenate([p.x for p in parts_x]), labels=labels, owner=owner, report=report,
                      excluded=excluded)
