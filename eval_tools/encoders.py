"""Encoders, the evaluation seam: something that turns mono clips into one vector per clip.

:class:`Encoder` is the interface every evaluation command uses (extraction, probes, fine-tuning,
``embed``, ``predict``). A subclass says how one forward pass works; the base class does the
rest - cutting clips into pieces, batching pieces of different lengths with ``lengths``, moving
them to the device (pinned, non-blocking), bf16 autocast, and averaging pieces back into clips:

- ``split(clip) -> list[np.ndarray]``: the pieces one forward pass takes (default: windows of at
  most ``window`` samples; a tail shorter than ``min_samples`` is dropped unless it is the clip).
- ``forward_pieces(audio, lengths) -> (vectors, weights)``: ``audio`` float32 ``(B, T)`` on
  ``device``, zero-padded after ``lengths`` ``(B,)`` int64 valid samples (each at least
  ``min_samples``); ``vectors`` ``(B, D)`` (or ``(B, L, D)``, one per layer) pooled over each row's
  valid samples only, ``weights`` ``(B,)`` how much each row counts in its clip's average (its
  valid frames). Padding must not change a row's vector.

So a model from elsewhere (an HF transformers wav2vec2 or MERT, say) becomes an encoder through
an ``nn.Module`` whose ``embed(audio, lengths)`` returns ``{"pooled": (B, D), "layers": [(B, T', D),
...], "frame_lengths": (B,)}`` wrapped in :class:`FrameEncoder`, or through its own subclass.

The encoders here (how a clip becomes one embedding under the default ``musicssl`` protocol; the
papers' own protocols, ``--protocol clmr|marble``, are eval_tools/protocols.py's):

- CLMR (:class:`CLMREncoder`): non-overlapping crops of the model's ``input_samples`` (a clip
  shorter than one crop is zero-padded to one crop), averaged per clip; the last block's output
  (``layer=-1``) or, with ``layer="concat"``, every block's time-averaged output concatenated
  (first convolution to last). CLMR's own evaluation averages the per-crop *outputs* instead:
  ``--protocol clmr``.
- wav2vec2 and CPC (:class:`FrameEncoder`): the mean over valid frames of one transformer layer
  (``layer=-1`` the last, ``"all"`` every layer, one probe each; wav2vec2's ``"concat"``: the
  layer-normed conv features and every layer's mean side by side, one probe) or of CPC's context; long clips in windows of at
  most ``max_window_seconds``, averaged by frame count. Clips are zero-padded only up to the
  receptive field (``min_samples``), never to the training crop (issue 12).
- log-mel (:class:`LogmelEncoder`): mean and standard deviation over time of a log-mel
  spectrogram, a hand-crafted baseline.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.errors import UserError


def _sha(data: bytes, n: int = 16) -> str:
    return hashlib.sha256(data).hexdigest()[:n]


POOLS = ("mean", "meanstd")  # Encoder.pool: how a piece's frames are summarised over time


@dataclass(kw_only=True)
class Encoder(ABC):
    """Maps mono float32 clips at ``sample_rate`` to embeddings; see the module docstring.
    Subclasses (frame models, CLMR, log-mel) provide :meth:`forward_pieces`."""

    name: str  # shown in tables: "pretrained", "random init", "supervised", "log-mel"
    arch: str  # "clmr" | "wav2vec2" | "cpc" | "logmel" | an imported model's name
    sample_rate: int
    model: nn.Module | None = None
    layer: int | str = -1  # wav2vec2: an index into embed()["layers"], "all" or "concat"; CLMR: -1 or "concat"
    pool: str = "mean"  # over time within a piece: "mean", or "meanstd" (mean and standard deviation side by side)
    window: int | None = None  # samples per piece: CLMR's crop, others' longest window (None = whole clip)
    ident: str = ""  # cache key part: checkpoint hash, or a hash of the random-init config + seed
    crop_samples: int | None = None  # the training crop length (BN recalibration, fine-tuning)
    min_samples: int = 1  # the shortest input giving one output frame; shorter clips are padded to it
    meta: dict = field(default_factory=dict)
    train_config: dict | None = None  # the train.py config that rebuilds ``model`` (saved with heads, eval_tools/heads.py)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"  # "bf16": autocast the forward passes (CUDA default, see eval_tools/runtime.py)
    max_batch_pieces: int = 64  # pieces per forward pass (embed_clips)

    @property
    def cache_id(self) -> str:
        """Identifies these embeddings: weights, layer choice, windowing and precision."""
        # "v": the extraction's own version; 2 = padded only to min_samples, with lengths (issue 12)
        parts = {"ident": self.ident, "arch": self.arch, "layer": self.layer, "window": self.window, "sr": self.sample_rate,
                 "v": 2, "precision": self.precision}
        if self.pool != "mean":  # mean-pooled ids stay as they were (existing caches stay valid)
            parts["pool"] = self.pool
        return f"{self.arch}-{_sha(json.dumps(parts, sort_keys=True).encode(), 12)}"

    @property
    def dim(self) -> int:
        """Embedding size (the last axis of ``embed_clips``)."""
        return int(self.embed_clips([np.zeros(self.min_samples, dtype=np.float32)]).shape[-1])

    def to(self, device: torch.device | str, precision: str | None = None) -> Encoder:
        self.device = torch.device(device)
        if precision is not None:
            self.precision = precision
        if self.model is not None:
            self.model.to(self.device)
        return self

    # --- what a subclass provides -----------------------------------------------------------------
    def split(self, clip: np.ndarray) -> list[np.ndarray]:
        n = self.window or max(len(clip), 1)
        pieces = [clip[s : s + n] for s in range(0, len(clip), n)] or [clip]
        if len(pieces) > 1 and len(pieces[-1]) < self.min_samples:
            pieces = pieces[:-1]  # a tail too short for one frame adds nothing
        return pieces

    @abstractmethod
    def forward_pieces(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(vectors (N, D), weights (N,))`` of a padded batch of pieces ``audio (N, T)`` with ``lengths``
        (the weights average the pieces into a clip: see the module docstring)."""

    autocast_ok = True  # False: the forward pass always runs in float32 (e.g. STFTs)

    def embed(self, clips: list[np.ndarray]) -> np.ndarray:
        """The embeddings of ``clips`` (1-D float32 at ``sample_rate``): :meth:`embed_clips`."""
        return self.embed_clips(clips)

    # --- the batching machinery -------------------------------------------------------------------
    @torch.no_grad()
    def embed_clips(self, clips: list[np.ndarray]) -> np.ndarray:
        """``clips``: 1-D float32 arrays. Returns ``(N, D)`` float32, or ``(N, L, D)`` for ``layer='all'``.

        The pieces of all clips are sorted by length and run ``max_batch_pieces`` at a time, padded
        to the longest of their batch; each clip is the weighted mean of its pieces."""
        if self.model is not None:
            self.model.eval()
        pieces: list[np.ndarray] = []
        owner: list[int] = []
        for i, c in enumerate(clips):
            for p in self.split(np.asarray(c, dtype=np.float32)):
                pieces.append(p)
                owner.append(i)
        vecs: list[torch.Tensor | None] = [None] * len(pieces)
        weights = torch.zeros(len(pieces), dtype=torch.float64)
        for chunk in self._chunks([len(p) for p in pieces]):
            x, lengths = self._batch([pieces[j] for j in chunk])
            v, w = self._forward(x, lengths)
            for k, j in enumerate(chunk):
                vecs[j], weights[j] = v[k], w[k]
        emb = torch.stack(vecs).double()  # (pieces, D) or (pieces, L, D)
        idx = torch.as_tensor(owner)
        sums = torch.zeros(len(clips), *emb.shape[1:], dtype=torch.float64)
        sums.index_add_(0, idx, emb * weights.view(-1, *([1] * (emb.dim() - 1))))
        total = torch.zeros(len(clips), dtype=torch.float64).index_add_(0, idx, weights).clamp_min(1e-12)
        return (sums / total.view(-1, *([1] * (emb.dim() - 1)))).float().numpy()

    pad_slack = 0.15  # a batch may hold at most this fraction of padding beyond its valid samples

    def _chunks(self, lengths: list[int]) -> list[list[int]]:
        """Piece indices in batches: sorted by length, at most ``max_batch_pieces`` each, and cut
        where padding to the batch's longest piece would exceed ``pad_slack`` of its samples."""
        order = sorted(range(len(lengths)), key=lambda j: lengths[j])
        chunks: list[list[int]] = []
        cur: list[int] = []
        total = 0
        for j in order:
            n = max(lengths[j], self.min_samples)
            if cur and (len(cur) >= self.max_batch_pieces or (len(cur) + 1) * n > (1 + self.pad_slack) * (total + n)):
                chunks.append(cur)
                cur, total = [], 0
            cur.append(j)
            total += n
        return chunks + [cur] if cur else chunks

    def _batch(self, pieces: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pieces zero-padded into one ``(B, T)`` tensor on the device (at least ``min_samples`` wide)."""
        lengths = [max(len(p), self.min_samples) for p in pieces]
        pin = self.device.type == "cuda"
        host = torch.zeros(len(pieces), max(lengths), pin_memory=pin)
        for k, p in enumerate(pieces):
            host[k, : len(p)] = torch.from_numpy(p)
        lens = torch.tensor(lengths, dtype=torch.long, pin_memory=pin)
        return host.to(self.device, non_blocking=pin), lens.to(self.device, non_blocking=pin)

    def _forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bf16 = self.precision == "bf16" and self.autocast_ok
        try:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=bf16):
                v, w = self.forward_pieces(x, lengths)
            return v.float().cpu(), w.double().cpu()
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory on {self.device} embedding {x.shape[0]} pieces of up to {x.shape[1]} samples "
                            f"with {self.arch}: lower --embed-batch (clips per pass) or use --max-window-seconds") from None

    def embed_stream(self, clips: Iterable[np.ndarray], batch: int, on_batch: Callable[[int], None] | None = None
                     ) -> Iterator[np.ndarray]:
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


def _masked_stats(x: torch.Tensor, valid: torch.Tensor, pool: str) -> torch.Tensor:
    """``x`` (B, T', D) over its ``valid`` (B, T', 1) frames: the mean (B, D), or for ``"meanstd"``
    the mean and the (biased) standard deviation side by side (B, 2D)."""
    n = valid.sum(1).clamp_min(1)
    mean = (x * valid).sum(1) / n
    if pool == "mean":
        return mean
    var = (((x - mean[:, None]) ** 2) * valid).sum(1) / n
    return torch.cat([mean, var.sqrt()], dim=1)


@dataclass(kw_only=True)
class FrameEncoder(Encoder):
    """A model whose ``embed(audio, lengths)`` gives frames: wav2vec2, CPC, or an imported model.

    The model returns ``pooled`` (B, D), ``frame_lengths`` (B,) and, for ``layer`` other than -1,
    ``layers`` (a list of (B, T', D)); each layer is pooled over the valid frames. ``"concat"``
    (wav2vec2) pools the conv ``features`` (B, T', C) and every layer and concatenates them: the
    conv features keep the spectral detail the transformer of a briefly pretrained model mixes
    away (the wav2vec2 analogue of CLMR's every-block concat)."""

    def forward_pieces(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.embed(audio, lengths)
        return self._pool(out), out["frame_lengths"]

    def _pool(self, out: dict) -> torch.Tensor:
        if self.layer == -1 and self.pool == "mean":
            return out["pooled"]
        if self.layer == -1:
            layers = [out["frames"]]
        elif self.layer == "concat":
            layers = [out["features"], *out["layers"]]
        else:
            layers = out["layers"] if self.layer == "all" else [out["layers"][int(self.layer)]]
        valid = (torch.arange(layers[0].shape[1], device=layers[0].device)[None, :]
                 < out["frame_lengths"][:, None]).to(layers[0].dtype)[..., None]  # (B, T', 1)
        pooled = [_masked_stats(l, valid, self.pool) for l in layers]
        if self.layer == -1:
            return pooled[0]
        if self.layer == "concat":
            return torch.cat(pooled, dim=1)
        return torch.stack(pooled, dim=1) if self.layer == "all" else pooled[0]


@dataclass(kw_only=True)
class CLMREncoder(Encoder):
    """SampleCNN on non-overlapping ``input_samples`` crops, the crops' embeddings averaged per clip
    (the ``musicssl`` protocol's clip embedding; ``--protocol clmr`` scores each crop and averages
    the per-crop sigmoid outputs, as CLMR's ``evaluate`` does)."""

    def split(self, clip: np.ndarray) -> list[np.ndarray]:
        n = int(self.window)  # type: ignore[arg-type]
        k = max(1, len(clip) // n)
        if len(clip) < n:
            clip = np.pad(clip, (0, n - len(clip)))  # CLMR has no lengths: the zeros are part of the crop
        return [clip[i * n : (i + 1) * n] for i in range(k)]

    def forward_pieces(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.embed(audio)
        # "concat": every block's time-averaged map side by side (shallow blocks keep what the last one
        # pools away; a few minutes of pretraining shape the last block least)
        if self.pool == "meanstd":  # each map's mean and standard deviation over the crop's time axis
            pairs = zip(out["blocks"], out["blocks_std"])
            stats = [torch.cat(p, dim=1) for p in pairs]
            vec = torch.cat(stats, dim=1) if self.layer == "concat" else stats[-1]
        else:
            vec = torch.cat(out["blocks"], dim=1) if self.layer == "concat" else out["pooled"]
        return vec, torch.ones(audio.shape[0], device=audio.device)


@dataclass(kw_only=True)
class LogmelEncoder(Encoder):
    """Mean and std over time of a log-mel spectrogram of each whole clip (``2 * n_mels`` values)."""

    autocast_ok = False  # the STFT has no bf16 kernel

    def split(self, clip: np.ndarray) -> list[np.ndarray]:
        return [clip]

    def forward_pieces(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for i in range(audio.shape[0]):  # one STFT per clip: padding would change the statistics
            logmel = torch.log(self.model(audio[i, : int(lengths[i])]) + 1e-6)  # (M, frames)
            rows.append(torch.cat([logmel.mean(dim=1), logmel.std(dim=1, unbiased=False)]))
        return torch.stack(rows), torch.ones(audio.shape[0], device=audio.device)


def logmel_encoder(sample_rate: int, *, n_mels: int = 128, n_fft: int = 1024, hop: int = 256) -> Encoder:
    """Mean and std over time of a log-mel spectrogram (``2 * n_mels`` values per clip)."""
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels, power=2.0)
    ident = _sha(json.dumps({"n_mels": n_mels, "n_fft": n_fft, "hop": hop}).encode())
    return LogmelEncoder(name="log-mel", arch="logmel", sample_rate=sample_rate, model=mel, ident=ident)


def min_input_samples(arch: str, model_cfg) -> int:
    """The shortest input that yields one frame: CLMR's crop, wav2vec2's receptive field, CPC's
    conv stack's. Clips shorter than this are zero-padded to it, never to the training crop."""
    if arch == "clmr":
        return int(model_cfg.input_samples)
    if arch == "wav2vec2":
        return int(model_cfg.receptive_field)
    if arch == "cpc":
        def frames(n: int) -> int:  # every layer needs an output frame (num_frames lets an empty one through)
            for st, k, p in zip(model_cfg.strides, model_cfg.kernels, model_cfg.padding):
                n = (n + 2 * p - k) // st + 1 if n > 0 and n + 2 * p >= k else 0
            return n

        n = 1
        while frames(n) < 1:
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
    train_config: dict | None = None,
) -> Encoder:
    if arch == "clmr" and layer not in (-1, "concat"):
        raise UserError(f"--layer {layer}: CLMR takes -1 (the last block) or 'concat' (every block's pooled output)")
    if arch not in ("wav2vec2", "clmr") and layer != -1:
        raise UserError(f"--layer applies to wav2vec2 and CLMR only; {arch} has one output (leave --layer at -1)")
    if arch == "wav2vec2" and layer not in ("all", "concat"):
        n = model_cfg.num_layers + 1  # the transformer input, then each layer
        if not -n <= int(layer) < n:
            raise UserError(f"--layer {layer}: this wav2vec2 has layers 0..{n - 1} (0 = transformer input, -1 = last), "
                            f"'all' (one probe each) or 'concat' (conv features and every layer side by side)")
    model.eval()
    cls = CLMREncoder if arch == "clmr" else FrameEncoder
    return cls(
        name=name, arch=arch, sample_rate=sample_rate, model=model, layer=layer,
        window=_window_for(arch, model_cfg, sample_rate, max_window_seconds), ident=ident,
        crop_samples=crop_samples, min_samples=min_input_samples(arch, model_cfg), meta=meta or {}, train_config=train_config,
    )


def load_checkpoint(path: str) -> dict:
    """A train.py checkpoint (``training.checkpoint.read``), with ``_sha``: its file's digest."""
    from training import checkpoint

    ckpt, sha = checkpoint.read(path, flag="--checkpoint")
    checkpoint.refuse_finetune_state(ckpt, url=path)
    ckpt["_sha"] = sha[:16]
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
    from training import checkpoint

    ckpt = load_checkpoint(path)
    model, cfg = checkpoint.model_from_state(ckpt)
    sr = sample_rate or config_sample_rate(cfg, fallback_rate)
    return build_encoder(
        name=name, arch=cfg.arch, model=model, model_cfg=cfg.model, sample_rate=sr, crop_samples=cfg.crop_samples,
        ident=f"ckpt-{ckpt['_sha']}", layer=layer, max_window_seconds=max_window_seconds,
        meta={"checkpoint": path, "step": int(ckpt.get("step", 0)), "preset": cfg.preset}, train_config=ckpt["config"],
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
        train_config=train_config.to_dict(cfg),
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
                model.embed(torch.from_numpy(np.stack(buf).astype(np.float32)).to(enc.device))
                n += len(buf)
                buf = []
        if len(buf) > 1:  # BatchNorm needs more than one value per channel
            model.embed(torch.from_numpy(np.stack(buf).astype(np.float32)).to(enc.device))
            n += len(buf)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()
    return n
