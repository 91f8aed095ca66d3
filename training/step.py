"""One optimizer step of any model on the models seam (``model(batch) -> (loss, metrics)``), and the
optimizer and learning-rate schedule it steps.

:class:`TrainStep` does, for ``accum`` micro-steps: take a batch, ``prepare`` it (move it to the
device, augment it, ...), run the model under autocast and back-propagate (DDP synchronises the
gradients on the last micro-step only; under fp16 the loss is scaled by a ``torch.amp.GradScaler``
and the gradients unscaled before clipping); then it clips the gradients and makes **one** all-reduce
that agrees on the mean loss and metrics, on a non-finite loss (the step is skipped on every rank),
on a stop request and on a failed data stream (any rank). Only then does it step the optimizer and
the schedule. Another trainer plugs in its own model, ``prepare``, optimizer and schedule.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from train_config import OptimConfig
    from training.distributed import Dist

Batch = dict[str, Any]


def lr_factor(step: int, *, schedule: str, warmup: int, total: int, final: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if schedule == "constant":
        return min(1.0, (step + 1) / warmup) if warmup else 1.0
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "warmup_linear":
        return final + (1.0 - final) * (1.0 - progress)
    if schedule == "warmup_cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"--optim.schedule: unknown schedule {schedule!r}")


def build_optimizer(o: OptimConfig, model: nn.Module, total_steps: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Adam/AdamW over the trainable parameters and a :func:`lr_factor` schedule over ``total_steps``."""
    params = [p for p in model.parameters() if p.requires_grad]
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    optimizer = cls(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    sched, warm, final = o.schedule, o.warmup_steps, o.final_lr_ratio

    # A closure, not a callable object: LambdaLR.state_dict() stores callable objects' __dict__,
    # which would put non-tensor objects into the checkpoint.
    def factor(step: int) -> float:
        return lr_factor(step, schedule=sched, warmup=warm, total=total_steps, final=final)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """``--train.precision``: auto = bf16 on CUDA, fp32 elsewhere; fp16 = float16 (with a
    :func:`build_scaler` gradient scaler); None = no autocast."""
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None


def precision_name(precision: str, device: torch.device) -> str:
    """What ``--train.precision`` means on ``device``: ``bf16`` | ``fp16`` | ``fp32``."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[autocast_dtype(precision, device)]


def build_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """The gradient scaler of ``--train.precision=fp16`` (disabled, a no-op, otherwise). Its
    ``state_dict()`` (the scale and its growth counter; ``{}`` when disabled) is the checkpoint's
    ``"scaler"``."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def to_device(batch: Batch, device: torch.device) -> Batch:
    """The default ``prepare``: tensors (and label tensors) to ``device``, non-blocking."""
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch.get("labels"), dict):
        out["labels"] = {k: v.to(device, non_blocking=True) for k, v in batch["labels"].items()}
    return out


def describe_data_error(exc: BaseException) -> str:
    """One line for a failed data stream: the original error of a DataLoader worker, not its traceback."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if "Original Traceback" in str(exc) and lines:
        return lines[-1]  # "FileNotFoundError: ... 'train-000003.tar'"
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def first_batch(it: Iterator[Batch]) -> tuple[Iterator[Batch], float]:
    """``(batches, seconds)``: the stream iterator ``it`` with its first batch already taken.

    A trainer takes it before the RNGs are seeded or restored: starting the loader's worker
    processes draws torch's global generator once, and this keeps that draw out of the sequence a
    resumed run must repeat.
    """
    from training.errors import DataStreamError

    t0 = time.perf_counter()
    try:
        batch = next(it)
    except Exception as exc:  # noqa: BLE001
        raise DataStreamError(f"the data stream failed before the first step ({describe_data_error(exc)}); "
                              "check the shards with `shard-tools verify`") from exc
    return itertools.chain([batch], it), time.perf_counter() - t0


def constant_schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of a trainer without one (every group at its own lr), for :class:`TrainStep`."""

    def factor(step: int) -> float:  # a function, not a callable object (see build_optimizer)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class StepResult:
    """What one step did: the same on every rank except ``data_error``, ``consumed`` and the times."""

    loss: float  # mean over micro-steps and ranks; nan/inf when non-finite somewhere
    metrics: dict[str, float]  # the model's metrics, means over micro-steps and ranks
    grad_norm: float  # before clipping
    lr: float  # the learning rate this step used
    skipped: bool  # non-finite loss or gradient on some rank: no optimizer update anywhere
    stop: bool  # a stop request on some rank
    data_failed: bool  # the data stream failed on some rank: no update, no schedule step
    data_error: str | None  # this rank's own stream error, if it was this rank
    consumed: int  # batches this rank took from the stream in this step
    wait_s: float  # seconds waiting for batches
    time_s: float  # seconds for the whole step


class TrainStep:
    """``step(batches) -> StepResult``: one optimizer step (see the module docstring).

    ``model`` is what runs forward (the DDP or compiled wrapper if any); ``prepare(batch, micro)``
    turns a loader batch into the model's input (default: :func:`to_device`). On a failed data
    stream the optimizer and schedule are not stepped; under DDP this rank stands in for its
    missing micro-batches with a zero-weighted backward of its last batch (RNG and buffers left as
    they were), so the other ranks' gradient all-reduce completes and every rank learns of the
    failure in the step's all-reduce.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, env: Dist, *,
                 accum: int = 1, grad_clip: float = 0.0, precision: str = "auto",
                 prepare: Callable[[Batch, int], Batch] | None = None, scaler: torch.amp.GradScaler | None = None):
        self.model, self.optimizer, self.scheduler, self.env, self.accum = model, optimizer, scheduler, env, accum
        self.ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        self.clip = grad_clip if grad_clip > 0 else float("inf")
        dtype = autocast_dtype(precision, env.device)
        self.autocast = torch.autocast(device_type=env.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
        # fp16: losses are scaled before backward and gradients unscaled before clipping; a step
        # whose gradients overflow is skipped like a non-finite one and lowers the scale.
        self.scaler = scaler if scaler is not None else build_scaler(precision, env.device)
        self.prepare = prepare or (lambda batch, micro: to_device(batch, env.device))
        self.metric_names: list[str] | None = None
        self._last: Batch | None = None  # the last prepared batch, for a stand-in backward (DDP only)

    def __call__(self, batches: Iterator[Batch], *, stop: bool = False, waited: float = 0.0) -> StepResult:
        """``stop``: this rank's stop request; ``waited``: seconds the caller already spent taking
        this step's first batch (counted as data wait)."""
        t0 = time.perf_counter() - waited
        wait, consumed, error = waited, 0, None
        self.model.train()
        loss_sum = torch.zeros((), device=self.env.device)
        metric_sum: dict[str, torch.Tensor] = {}
        for micro in range(self.accum):
            tw = time.perf_counter()
            try:
                batch = next(batches)
            except Exception as exc:  # noqa: BLE001 - whatever the stream raised, the run checkpoints first
                error = describe_data_error(exc)
                break
            wait += time.perf_counter() - tw
            consumed += 1
            batch = self.prepare(batch, micro)
            if self.ddp is not None:
                self._last = batch
            sync = self.ddp.no_sync() if self.ddp is not None and micro < self.accum - 1 else contextlib.nullcontext()
            with sync:
                with self.autocast:
                    loss, metrics = self.model(batch)
                self.scaler.scale(loss / self.accum).backward()
            loss_sum += loss.detach().float()
            for k, v in metrics.items():
                metric_sum[k] = metric_sum.get(k, 0) + v.detach().float()
        if error is not None and self.ddp is not None:
            for k, v in self._stand_in().items():
                metric_sum.setdefault(k, v)
        return self._finish(loss_sum, metric_sum, stop, error, consumed, wait, t0)

    def _finish(self, loss_sum: torch.Tensor, metric_sum: dict[str, torch.Tensor], stop: bool, error: str | None,
                consumed: int, wait: float, t0: float) -> StepResult:
        scaled = self.scaler.is_enabled()
        if scaled:
            self.scaler.unscale_(self.optimizer)  # the norm, the clip and the overflow check see true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        # One all-reduce (and one host sync) agrees on the loss, the model metrics, a non-finite
        # loss on any rank, a stop request and a data failure; the grad norm is already the same
        # on every rank.
        if self.metric_names is None and metric_sum:
            self.metric_names = sorted(metric_sum)
        names = self.metric_names or []
        world, dev = self.env.world, self.env.device
        zero = torch.zeros((), device=dev)
        packed = torch.stack([
            loss_sum / self.accum,
            (~torch.isfinite(loss_sum)).float(),
            torch.tensor(float(stop), device=dev),
            grad_norm.detach().float() / world,
            torch.tensor(float(error is not None), device=dev),
            *[metric_sum.get(k, zero) / self.accum for k in names],
        ])
        if world > 1:
            self.env.all_reduce_(packed)
            packed[0] /= world
            packed[5:] /= world
        values = packed.tolist()
        loss, gnorm = values[0], values[3]
        failed = values[4] > 0
        skipped = values[1] > 0 or not math.isfinite(gnorm)
        lr = self.scheduler.get_last_lr()[0]
        if not (skipped or failed):
            self.scaler.step(self.optimizer) if scaled else self.optimizer.step()
        if scaled:
            # a failed step did not happen: the scale and its growth counter stay as they were
            self.scaler.update(self.scaler.get_scale() if failed else None)
        self.optimizer.zero_grad(set_to_none=True)
        if not failed:
            with warnings.catch_warnings():
                # a skipped step (non-finite, or fp16's scaler backing off) advances the schedule on purpose
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                self.scheduler.step()
        return StepResult(
            loss=loss, metrics={k: values[5 + i] for i, k in enumerate(names)}, grad_norm=gnorm, lr=lr,
            skipped=skipped, stop=values[2] > 0, data_failed=failed, data_error=error, consumed=consumed, wait_s=wait,
            time_s=time.perf_counter() - t0,
        )

    def _stand_in(self) -> dict[str, torch.Tensor]:
        """A zero-weighted forward/backward of the last batch, so DDP's collectives complete."""
        if self._last is None:
            raise RuntimeError("the data stream failed before this rank had a batch; the other ranks "
                               "cannot be told (they will time out)")
        buffers = [b.detach().clone() for b in self.model.buffers()]
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            with self.autocast:
                loss, metrics = self.model(self._last)
            self.scaler.scale(loss * 0).backward()
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)
        return {k: torch.zeros((), device=self.env.device) for k in metrics}
