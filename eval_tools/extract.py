"""Embedding extraction with a cache, and batch-norm recalibration on clean training crops."""

from __future__ import annotations

import os

import numpy as np

from eval_tools.data import Dataset, Embeddings, iter_clips
from eval_tools.encoders import Encoder, has_batchnorm, recalibrate_batchnorm


def calibration_crops(ds: Dataset, sample_rate: int, crop: int, *, n_crops: int = 512, seed: int = 0) -> list[np.ndarray]:
    """``n_crops`` random crops of length ``crop`` spread evenly over the train split (unaugmented)."""
    n_clips = ds.num_samples.get("train", 0)
    per_clip = max(1, -(-n_crops // max(1, n_clips)))  # ceil: few clips -> several crops each
    stride = max(1, n_clips * per_clip // n_crops)
    rng = np.random.default_rng(seed)
    crops: list[np.ndarray] = []
    for i, (_, audio, _) in enumerate(iter_clips(ds, "train", sample_rate)):
        if i % stride:
            continue
        for _ in range(per_clip):
            if len(audio) <= crop:
                crops.append(np.pad(audio, (0, crop - len(audio))))
            else:
                s = int(rng.integers(0, len(audio) - crop + 1))
                crops.append(audio[s : s + crop])
        if len(crops) >= n_crops:
            break
    return crops[:n_crops]


def prepare_encoder(enc: Encoder, ds: Dataset, *, recalibrate: bool = True, n_crops: int = 512, seed: int = 0) -> int:
    """Recompute BatchNorm statistics on clean crops of ``ds``'s train split (no-op without BatchNorm).

    The cache identity of the encoder then names the calibration data, so embeddings computed with
    and without recalibration (or on another dataset's statistics) never mix."""
    if not recalibrate or enc.model is None or not has_batchnorm(enc.model):
        return 0
    crop = enc.crop_samples or enc.window
    crops = calibration_crops(ds, enc.sample_rate, int(crop), n_crops=n_crops, seed=seed)
    used = recalibrate_batchnorm(enc, crops)
    enc.ident += f"+bn({ds.manifest_hash('train')},{used},{seed})"
    enc.meta["bn_recalibrated_on"] = used
    return used


def extract(enc: Encoder, ds: Dataset, split: str, *, cache_dir: str | None = None, clip_batch: int = 16,
            progress: bool = True) -> Embeddings:
    """Embeddings and labels of every clip in a split; read from / written to ``cache_dir`` when given."""
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, enc.cache_id, f"{ds.name}-{split}-{ds.manifest_hash(split)}.npz")
        if os.path.exists(path):
            return Embeddings.load(path)
    from tqdm import tqdm

    keys: list[str] = []
    vecs: list[np.ndarray] = []
    labels: dict[str, list] = {k: [] for k in ds.spec}
    bar = tqdm(total=ds.num_samples.get(split), desc=f"embed {enc.name} {ds.name}/{split}", unit="clip",
               disable=not progress, leave=False)
    def audio():
        for key, clip, lab in iter_clips(ds, split, enc.sample_rate):
            keys.append(key)
            for k in labels:
                labels[k].append(lab[k])
            yield clip

    vecs.extend(enc.embed_stream(audio(), clip_batch, bar.update))
    bar.close()
    if not keys:
        raise ValueError(f"{ds.manifests[split]}: the split yielded no decodable clips; run `shard-tools verify` on it")
    out = Embeddings(
        keys=keys, x=np.concatenate(vecs),
        labels={k: np.stack([np.asarray(v) for v in vals]) for k, vals in labels.items()},
    )
    if path:
        out.save(path)
    return out
