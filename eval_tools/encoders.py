"""Frozen encoders for probing: a trained checkpoint, a random-init encoder, or log-mel statistics.

Each :class:`Encoder` turns whole mono clips into one vector per clip, the way each model is
evaluated in its paper:

- CLMR: the clip is cut into non-overlapping crops of the model's ``input_samples`` (a clip shorter
  than one crop is zero-padded to one crop), each crop is encoded, and the crop embeddings are
  averaged (CLMR's evaluation).
- wav2vec2: the clip's frames are mean-pooled over time, from one chosen transformer layer
  (``layer=-1`` = the last) or from every layer (``layer="all"``; one probe per layer).
- CPC: the context network's features mean-pooled over time (the model's ``embed()["pooled"]``).
- log-mel: mean and standard deviation over time of a log-mel spectrogram (a hand-crafted baseline).

Long clips are embedded in windows of at most ``max_window_seconds`` (wav2vec2 and CPC), and the
window embeddings are averaged, so memory stays bounded on full-length recordings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn


def _sha(data: bytes, n: int = 16) -> str:
    return hashlib.sha256(data).hexdigest()[:n]


@dataclass
class Encoder:
    """Something that maps mono float32 clips at ``sample_rate`` to embeddings."""

    name: str  # shown in tables: "pretrained", "random init", "supervised", "log-mel"
    arch: str  # "clmr" | "wav2vec2" | "cpc" | "logmel"
    sample_rate: int
    model: nn.Module | None = None
    layer: int | str = -1  # wav2vec2: which layer (index into embed()["layers"]) or "all"
    window: int | None = None  # CLMR: crop length (input_samples); others: max window in samples
    ident: str = ""  # cache key part: checkpoint hash, or a hash of the random-init config + seed
    crop_samples: int | None = None  # the training crop length (BN recalibration, fine-tuning)
    min_samples: int = 1  # the shortest input giving one output frame (receptive field); shorter clips are padded to it
    meta: dict = field(default_factory=dict)
    batch_crops: int = 128  # crops per forward pass

    @property
    def cache_id(self) -> str:
        """Identifies these embeddings: weights, layer choice and windowing."""
        # "v": the extraction's own version; 2 = padded only to min_samples, with lengths (issue 12)
        parts = {"ident": self.ident, "arch": self.arch, "layer": self.layer, "window": self.window, "sr": self.sample_rate,
                 "v": 2}
        return f"{self.arch}-{_sha(json.dumps(parts, sort_keys=True).encode(), 12)}"

    def embed_stream(self, clips, batch: int, on_batch=None):
        """Embed an iterable of 1-D clips ``batch`` at a time; yields one array per batch (see
        :meth:`embed_clips`) and calls ``on_batch(n)`` after each, e.g. a progress bar's update."""
        buf: list[np.ndarray] = []
        for audio in clips:
            buf.append(audio)
            if len(buf) == batch:
                yield self.embed_clips(buf)
                if on_batch:
                    on_batch(len(buf))
                buf = []
        if buf:
            yield self.embed_clips(buf)
            if on_batch:
                on_batch(len(buf))

    @torch.no_grad()
    def embed_clips(self, clips: list[np.ndarray]) -> np.ndarray:
        """``clips``: list of 1-D float32 arrays. Returns ``(N, D)``, or ``(N, L, D)`` for ``layer='all'``."""
        if self.arch == "logmel":
            return np.stack([self._logmel(c) for c in clips])
        assert self.model is not None
        self.model.eval()
        if self.arch == "clmr":
            return self._embed_crops(clips)
        return np.stack([self._embed_windows(c) for c in clips])

    # --- CLMR: non-overlapping crops, averaged per clip -----------------------------------------
    def _embed_crops(self, clips: list[np.ndarray]) -> np.ndarray:
        n = int(self.window)  # type: ignore[arg-type]
        crops, owner = [], []
        for i, c in enumerate(clips):
            k = max(1, len(c) // n)
            c = np.pad(c, (0, max(0, n - len(c))))
            crops.append(c[: k * n].reshape(k, n))
            owner += [i] * k
        x = torch.from_numpy(np.concatenate(crops).astype(np.float32, copy=False))
        outs = [self.model.embed(x[i : i + self.batch_crops])["pooled"] for i in range(0, len(x), self.batch_crops)]
        emb = torch.cat(outs).double()  # (crops, D)
        idx = torch.as_tensor(owner)
        sums = torch.zeros(len(clips), emb.shape[1], dtype=torch.float64).index_add_(0, idx, emb)
        return (sums / torch.bincount(idx, minlength=len(clips))[:, None]).float().numpy()

    # --- wav2vec2 / CPC: mean over time, in bounded windows --------------------------------------
    def _embed_windows(self, clip: np.ndarray) -> np.ndarray:
        """Mean over the clip's frames, embedded in windows of at most ``window`` samples.

        Only a clip (or last window) shorter than ``min_samples`` is zero-padded, and only up to
        it: the training crop plays no part, so a 1 s note is never padded to 15.6 s of silence."""
        n = self.window or len(clip)
        pieces = [clip[s : s + n] for s in range(0, len(clip), n)] or [clip]
        if len(pieces) > 1 and len(pieces[-1]) < self.min_samples:
            pieces = pieces[:-1]  # a tail too short for one frame adds nothing
        vecs, weights = [], []
        for w in pieces:
            if len(w) < self.min_samples:
                w = np.pad(w, (0, self.min_samples - len(w)))
            x = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))[None]
            out = self.model.embed(x, torch.tensor([len(w)]))
            v = self._pool(out)[0]
            vecs.append(v.double())
            weights.append(int(out["frame_lengths"][0]))
        wts = torch.tensor(weights, dtype=torch.float64)
        return (torch.stack(vecs) * (wts / wts.sum()).view(-1, *([1] * vecs[0].dim()))).sum(0).float().numpy()

    def _pool(self, out: dict) -> torch.Tensor:
        """``(B, D)`` (or ``(B, L, D)`` for ``layer='all'``): the chosen output, mean over valid frames."""
        if self.arch != "wav2vec2" or self.layer == -1:
            return out["pooled"]
        layers = out["layers"] if self.layer == "all" else [out["layers"][int(self.layer)]]
        valid = (torch.arange(layers[0].shape[1], device=layers[0].device)[None, :]
                 < out["frame_lengths"][:, None]).to(layers[0].dtype)[..., None]  # (B, T', 1)
        pooled = [(l * valid).sum(1) / valid.sum(1).clamp_min(1) for l in layers]
        return torch.stack(pooled, dim=1) if self.layer == "all" else pooled[0]

    # --- log-mel statistics ----------------------------------------------------------------------
    def _logmel(self, clip: np.ndarray) -> np.ndarray:
        mel = self.model(torch.from_numpy(np.ascontiguousarray(clip, dtype=np.float32)))  # (M, frames)
        logmel = torch.log(mel + 1e-6)
        return torch.cat([logmel.mean(dim=1), logmel.std(dim=1, unbiased=False)]).numpy()


def logmel_encoder(sample_rate: int, *, n_mels: int = 128, n_fft: int = 1024, hop: int = 256) -> Encoder:
    """Mean and std over time of a log-mel spectrogram (``2 * n_mels`` values per clip)."""
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels, power=2.0)
    ident = _sha(json.dumps({"n_mels": n_mels, "n_fft": n_fft, "hop": hop}).encode())
    return Encoder(name="log-mel", arch="logmel", sample_rate=sample_rate, model=mel, ident=ident)


def min_input_samples(arch: str, model_cfg) -> int:
    """The shortest input that yields one frame: CLMR's crop, wav2vec2's receptive field, CPC's
    conv stack's. Clips shorter than this are zero-padded to it, never to the training crop."""
    if arch == "clmr":
        return int(model_cfg.input_samples)
    if arch == "wav2vec2":
        return int(model_cfg.receptive_field)
    if arch == "cpc":
        n = 1
        while model_cfg.num_frames(n) < 1:
            n += 1
        return n
    return 1


def _window_for(arch: str, model_cfg, sample_rate: int, max_window_seconds: float) -> int:
    if arch == "clmr":
        return int(model_cfg.input_samples)
    return int(max_window_seconds * sample_rate)


def build_encoder(
    *,
    name: str,
    arch: str,
    model: nn.Module,
    model_cfg,
    sample_rate: int,
    crop_samples: int | None,
    ident: str,
    layer: int | str = -1,
    max_window_seconds: float = 30.0,
    meta: dict | None = None,
) -> Encoder:
    if arch != "wav2vec2" and layer != -1:
        raise ValueError(f"--layer applies to wav2vec2 only; {arch} has one output (leave --layer at -1)")
    model.eval()
    return Encoder(
        name=name, arch=arch, sample_rate=sample_rate, model=model, layer=layer,
        window=_window_for(arch, model_cfg, sample_rate, max_window_seconds), ident=ident,
        crop_samples=crop_samples, min_samples=min_input_samples(arch, model_cfg), meta=meta or {},
    )


def load_checkpoint(path: str) -> dict:
    """``torch.load(weights_only=True)`` of a train.py checkpoint, with a clear error if it is not one."""
    from pipeline import fsio

    import io

    try:
        data = fsio.read_bytes(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"--checkpoint {path}: no such file; pass a ckpt-<step>.pt written by train.py") from exc
    ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != "musicssl-ckpt/1":
        raise ValueError(f"--checkpoint {path}: not a musicssl checkpoint (format 'musicssl-ckpt/1' expected, see docs/architecture.md §5)")
    ckpt["_sha"] = _sha(data)
    return ckpt


def config_sample_rate(cfg, fallback: int | None) -> int:
    """The rate the encoder was trained at: the run's ``data.sample_rate``, else its training
    shards' rate, else ``fallback`` (the evaluation shards' rate)."""
    sr = cfg.data.sample_rate
    if sr is None:
        from pipeline.shards import load_manifest

        try:
            rates = {load_manifest(u).sample_rate for u in cfg.data.manifests}
            sr = rates.pop() if len(rates) == 1 else None
        except (FileNotFoundError, ValueError):
            sr = None
    sr = sr or fallback
    if sr is None:
        raise ValueError("cannot tell the encoder's sample rate (data.sample_rate unset, shards mix rates); pass --sample-rate")
    return int(sr)


def encoder_from_checkpoint(path: str, *, name: str = "pretrained", layer: int | str = -1, sample_rate: int | None = None,
                            fallback_rate: int | None = None, max_window_seconds: float = 30.0) -> Encoder:
    """The encoder of a train.py checkpoint (its resolved config rebuilds the model)."""
    import train_config

    ckpt = load_checkpoint(path)
    cfg = train_config.from_dict(ckpt["config"])
    _, model_cls = train_config.model_classes(cfg.arch)
    model = model_cls(cfg.model)
    model.load_state_dict(ckpt["model"])
    sr = sample_rate or config_sample_rate(cfg, fallback_rate)
    return build_encoder(
        name=name, arch=cfg.arch, model=model, model_cfg=cfg.model, sample_rate=sr, crop_samples=cfg.crop_samples,
        ident=f"ckpt-{ckpt['_sha']}", layer=layer, max_window_seconds=max_window_seconds,
        meta={"checkpoint": path, "step": int(ckpt.get("step", 0)), "preset": cfg.preset},
    )


def preset_config(preset: str, overrides: list[str] | None = None):
    """A train.py preset (e.g. ``clmr_tiny``) with ``--section.key=value`` overrides applied."""
    import train_config

    return train_config.apply_overrides(train_config.preset(preset), list(overrides or []))


def checkpoint_config(path: str):
    """The resolved run config stored in a checkpoint (rebuilds the same architecture)."""
    import train_config

    return train_config.from_dict(load_checkpoint(path)["config"])


def random_encoder(cfg, *, sample_rate: int, seed: int = 0, name: str = "random init", layer: int | str = -1,
                   max_window_seconds: float = 30.0) -> Encoder:
    """A randomly initialised, seeded encoder of a run config's architecture (``preset_config`` or
    ``checkpoint_config``): the baseline that shows what pretraining bought."""
    import train_config

    _, model_cls = train_config.model_classes(cfg.arch)
    torch.manual_seed(seed)
    model = model_cls(cfg.model)
    ident = _sha(json.dumps({"model": train_config.to_dict(cfg.model), "seed": seed, "arch": cfg.arch}, sort_keys=True).encode())
    return build_encoder(
        name=name, arch=cfg.arch, model=model, model_cfg=cfg.model, sample_rate=sample_rate, crop_samples=cfg.crop_samples,
        ident=f"random-{ident}", layer=layer, max_window_seconds=max_window_seconds, meta={"preset": cfg.preset, "seed": seed},
    )


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(enc: Encoder, crops: Iterable[np.ndarray], *, batch_size: int = 64) -> int:
    """Recompute every BatchNorm's running mean/var from clean (unaugmented) crops.

    Statistics left by augmented training (or a random init's defaults of 0/1) do not match clean
    audio; re-estimating them as a cumulative average over clean crops makes every encoder,
    pretrained or random, be probed under the same normalisation. Returns the crops used.
    """
    model = enc.model
    if model is None or not has_batchnorm(model):
        return 0
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all calibration batches
    model.eval()
    for m in bns:
        m.train()
    n, buf = 0, []
    try:
        for c in crops:
            buf.append(c)
            if len(buf) == batch_size:
                model.embed(torch.from_numpy(np.stack(buf).astype(np.float32)))
                n += len(buf)
                buf = []
        if len(buf) > 1:  # BatchNorm needs more than one value per channel
            model.embed(torch.from_numpy(np.stack(buf).astype(np.float32)))
            n += len(buf)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    return n
