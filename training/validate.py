"""Validation during pretraining: the model's own loss and metrics on a fixed set of held-out batches.

``--data.valid_manifests`` names a held-out split; every ``--train.eval_every`` optimizer steps
(and at the last step) :class:`Validator` scores the first ``--train.eval_batches`` micro-batches
of its stream on every rank and all-reduces the means, so a curve's points are comparable:

- **The same batches each time.** The validation loader (``DataConfig.loader_config(valid=True)``:
  the valid manifests, read in the main process) is rewound to its start before every pass; its
  crops, shuffle order and CPU augmentation draws are functions of (seed, epoch, rank, position),
  so they repeat. The batched augmentation has its own generator, reseeded before every pass, and
  the model's own random draws (wav2vec2's masks and negatives, CPC's windows) run under a forked
  torch generator seeded the same way. Nothing here depends on the training state, and nothing
  here moves it: the training RNGs, data stream and augmentation generator are as they were, so
  a resumed run repeats the uninterrupted run's training losses *and* validation curve.
- **The model untouched.** ``model.eval()`` and ``torch.no_grad()`` on the unwrapped model (no DDP
  hooks): BatchNorm normalises with its running statistics and does not update them, dropout and
  LayerDrop are off; the previous mode is restored afterwards.

Every rank runs the same number of batches (collectives inside a model, e.g. CLMR's all-gather of
the projections, stay matched). The result is ``{"valid/loss", "valid/<metric>", "valid/clips",
"valid/seconds"}``, the same on every rank; rank 0 logs it (``RunLogger.log_eval``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from training.errors import ConfigError
from training.step import autocast_dtype

if TYPE_CHECKING:
    from train_config import Config
    from training.distributed import Dist

VALID_SEED = 104_729  # added to --train.seed: the validation stream's seed, apart from training's


class Validator:
    """``validator(model) -> {"valid/...": value}``: one pass over the fixed validation batches."""

    def __init__(self, cfg: Config, env: Dist, *, sample_rate: int, crop: int, micro_batch: int):
        from pipeline.augment import build_augment
        from pipeline.loader import StreamingLoader

        self.env, self.precision = env, cfg.train.precision
        self.seed = cfg.train.seed + VALID_SEED
        transform = None
        if cfg.augment.enabled and cfg.augment.backend == "cpu":
            from pipeline.augment_cpu import CpuAugment

            transform = CpuAugment(cfg.augment, sample_rate=sample_rate)
        try:
            loader_cfg = cfg.data.loader_config(batch_size=micro_batch, views=cfg.views, crop_samples=crop,
                                                sample_rate=sample_rate, seed=self.seed, cuda=False, valid=True)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        from pipeline.errors import UserError
        from pipeline.manifest import load_manifest

        try:
            clips = sum(load_manifest(url).num_samples for url in loader_cfg.manifests)
        except UserError as exc:
            raise ConfigError(f"--data.valid_manifests: {exc}") from None
        if clips < micro_batch * env.world:
            raise ConfigError(
                f"--data.valid_manifests: {clips} clips are fewer than one validation batch of {micro_batch} clips on "
                f"each of {env.world} rank(s); add held-out clips or lower --train.global_batch_size")
        self.loader = StreamingLoader(loader_cfg, rank=env.rank, world_size=env.world, transform=transform)
        per_pass = self.loader.steps_per_epoch
        self.batches = min(cfg.train.eval_batches, per_pass)
        if env.master and self.batches < cfg.train.eval_batches:
            print(f"[train] note: --train.eval_batches={cfg.train.eval_batches} is more than the validation split "
                  f"holds; scoring {self.batches} batches a rank (one pass)", flush=True)
        self.clips = self.batches * micro_batch * env.world
        self._start = self.loader.state_dict()
        self.augmenter = build_augment(cfg.augment, sample_rate=sample_rate,
                                       seed=self.seed + 7919 * env.rank).to(env.device)
        self.on_device = cfg.augment.enabled and cfg.augment.backend == "gpu"
        self.metric_names: list[str] | None = None

    def describe(self) -> str:
        return (f"validation: {self.batches} batches x {self.clips // (self.batches * self.env.world)} clips on "
                f"{self.env.world} rank(s) = {self.clips} fixed clips of {', '.join(self.loader.config.manifests)}")

    def __call__(self, model: nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        env = self.env
        self.loader.load_state_dict(self._start)  # the same batches, from the first
        self.augmenter.generator.manual_seed(self.seed + 7919 * env.rank)
        dtype = autocast_dtype(self.precision, env.device)
        was_training = model.training
        model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        sums: dict[str, torch.Tensor] = {}
        it = iter(self.loader)
        devices = [env.device] if env.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.seed + env.rank)
                for _ in range(self.batches):
                    batch = self._prepare(next(it))
                    with torch.autocast(device_type=env.device.type, dtype=dtype or torch.bfloat16,
                                        enabled=dtype is not None):
                        loss, metrics = model(batch)
                    loss_sum += loss.detach().double()
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0) + v.detach().double()
        finally:
            it.close()
            model.train(was_training)
        if self.metric_names is None:
            self.metric_names = sorted(sums)
        zero = torch.zeros((), dtype=torch.float64, device=env.device)
        packed = torch.stack([loss_sum, *[sums.get(k, zero) for k in self.metric_names]])
        env.all_reduce_(packed)
        values = (packed / (self.batches * env.world)).tolist()
        out = {"valid/loss": values[0], **{f"valid/{k}": v for k, v in zip(self.metric_names, values[1:])}}
        return out | {"valid/clips": self.clips, "valid/seconds": round(time.perf_counter() - t0, 3)}

    def _prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        audio = batch["audio"].to(self.env.device)  # (B, V, C, T)
        if self.on_device:
            b, v, c, t = audio.shape
            audio = self.augmenter(audio.reshape(b * v, c, t)).reshape(b, v, c, t)
        return {**batch, "audio": audio, "lengths": batch["lengths"].to(self.env.device)}
