"""Self-supervised pre-training on music shards: CLMR, wav2vec 2.0 or CPC, one process or DDP.

Single process (CPU or one GPU), on the demo shards (``shard-tools demo --out demo_shards``)::

    python train.py --config clmr_tiny
    python train.py --config clmr_tiny --optim.lr=3e-4 --train.steps=500 --logging.wandb_mode=disabled

One node, 8 GPUs::

    torchrun --standalone --nproc_per_node=8 train.py --config clmr_mtat

Several nodes (run on every node; the rendezvous endpoint is any node's address)::

    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_id=clmr-msd \\
        --rdzv_endpoint=node0.example:29500 train.py --config clmr_msd \\
        --checkpoint.dir=s3://bucket/runs/clmr_msd

Resume after preemption (same command plus ``--resume auto``; continues the same W&B run)::

    torchrun --standalone --nproc_per_node=8 train.py --config clmr_mtat --resume auto

Watch it learn: validation loss on a held-out split and an online kNN probe (docs/training.md);
fp16 with a gradient scaler on GPUs without bf16::

    python train.py --config clmr_tiny --data.valid_manifests=./demo_shards/nsynth/valid.manifest.json \
        --train.eval_every=50 --eval.probe_data=./demo_shards/nsynth/valid.manifest.json --eval.probe_every=50
    torchrun --standalone --nproc_per_node=8 train.py --config clmr_mtat --train.precision=fp16

``python train.py --help`` lists the presets; ``--print-config`` prints every key of the resolved
config as a ``--section.key=value`` line that can be overridden.

:func:`train` reads top to bottom: join the job, check the config, build the model, the data and
the logger, resume, then loop over :class:`training.step.TrainStep` (``train.grad_accum``
micro-batches from ``pipeline.loader``, moved to the device and augmented there by
``pipeline.augment`` as ``(B*V, C, T)``, forward under ``--train.precision``'s autocast (bf16 on
CUDA by default; fp16 with a gradient scaler), one all-reduce per step), score validation and the
online probe when due (:class:`Evaluations`: ``training.validate``, ``training.online_probe``) and
checkpoint (``training.checkpoint``, docs/architecture.md §5: every rank's data-stream position,
augmentation generator and RNG states and the fp16 scaler, so a resumed run repeats an
uninterrupted run's losses and validation curve). Rank 0 logs through ``training.log.RunLogger``
(``<out_dir>/metrics.jsonl``, console, W&B).

Call :func:`train` in-process for quickstarts and evaluation scripts: ``train(config) -> summary``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import train_config as tc
from pipeline import fsio
from train_config import Config
from training import checkpoint
from training.checkpoint import load_model_from_checkpoint  # noqa: F401 - part of this module's API
from training.distributed import Dist, StopFlag
from training.distributed import setup as setup_distributed
from training.errors import ConfigError, DataStreamError, TrainingDiverged
from training.log import RunLogger, fmt, fmt_duration, numbers
from training.step import StepResult, TrainStep, build_optimizer, build_scaler, first_batch, precision_name

# --------------------------------------------------------------------------------------------
# Validation at start: every error names the flag to change.


def read_manifest(url: str) -> Any:
    """One shard manifest through ``pipeline.manifest.load_manifest`` (its one reader, which checks
    every field); every problem is a :class:`ConfigError` naming ``--data.manifests`` and the URL."""
    from pipeline.errors import UserError
    from pipeline.manifest import load_manifest

    try:
        return load_manifest(url)
    except UserError as exc:
        raise ConfigError(f"--data.manifests: {exc}") from exc


def check_checkpoint_dir(cfg: Config) -> None:
    """A fresh run must not rotate an earlier run's checkpoints away; a resume URL must exist."""
    checkpoint.refuse_fresh_run(cfg.checkpoint_dir, cfg.checkpoint.resume, flag="--checkpoint.dir",
                                elsewhere="in another --train.out_dir or --checkpoint.dir")
    if cfg.checkpoint.resume not in ("none", "auto") and not fsio.exists(cfg.checkpoint.resume):
        raise ConfigError(f"--resume / --checkpoint.resume: {cfg.checkpoint.resume} does not exist; use auto or a ckpt-*.pt URL")


def validate(cfg: Config, world_size: int) -> dict[str, Any]:
    """Checks that need the world size or the file system. Returns facts the run needs (sample rate)."""
    per_step = world_size * cfg.train.grad_accum
    if cfg.train.global_batch_size % per_step:
        good = max(per_step, round(cfg.train.global_batch_size / per_step) * per_step)
        raise ConfigError(
            f"--train.global_batch_size={cfg.train.global_batch_size} is not divisible by world size "
            f"{world_size} x --train.grad_accum={cfg.train.grad_accum} = {per_step}; "
            f"use e.g. --train.global_batch_size={good} or change --train.grad_accum"
        )
    if cfg.augment.enabled and cfg.augment.backend == "cpu" and cfg.data.num_workers == 0:
        print("[train] note: --augment.backend=cpu with --data.num_workers=0 augments in the main process")
    manifests = [read_manifest(url) for url in cfg.data.manifests]
    try:
        from pipeline.shards import merge_label_specs

        merge_label_specs(manifests)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"--data.manifests: the label specs of {', '.join(cfg.data.manifests)} do not fit "
                          f"together or are malformed ({exc})") from None
    clips = sum(m.num_samples for m in manifests)
    if clips < cfg.train.global_batch_size:
        raise ConfigError(f"--train.global_batch_size={cfg.train.global_batch_size} is more than the {clips} clips of "
                          "--data.manifests (one step would need more than an epoch); lower it or add data")
    rates = {m.sample_rate for m in manifests}
    sample_rate = cfg.data.sample_rate
    if sample_rate is None:
        if len(rates) != 1 or None in rates:
            raise ConfigError(
                f"--data.sample_rate: the manifests have sample rates {sorted(map(str, rates))}; "
                "set --data.sample_rate to resample them to one rate"
            )
        sample_rate = int(rates.pop())
    try:
        crop = cfg.crop_samples
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    min_crop = getattr(cfg.model, "input_samples", None)
    if min_crop is not None and crop < min_crop:
        raise ConfigError(f"--data.crop_samples={crop} is shorter than the model's input ({min_crop} samples)")
    if cfg.eval.probe_data:  # the probe reads it on rank 0 only; a bad URL is every rank's error here
        from pipeline.errors import UserError
        from pipeline.manifest import load_manifest

        try:
            load_manifest(cfg.eval.probe_data)
        except UserError as exc:
            raise ConfigError(f"--eval.probe_data: {exc}") from None
    check_checkpoint_dir(cfg)
    return {"sample_rate": sample_rate, "crop_samples": crop}


# --------------------------------------------------------------------------------------------
# The parts of a run


@dataclass
class Parts:
    """What a pretraining run is made of; each stateful part reports its own state."""

    raw_model: nn.Module  # the unwrapped model (what checkpoints hold)
    model: nn.Module  # what runs forward: raw_model, compiled and/or wrapped in DDP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: Any  # pipeline.loader.StreamingLoader
    stream: Any  # the loader, or a DevicePrefetcher over it on CUDA
    augmenter: nn.Module  # pipeline.augment's Compose (identity when augmentation runs in the workers)
    logger: RunLogger
    scaler: torch.amp.GradScaler  # --train.precision=fp16's gradient scaler (disabled otherwise)


def build_model(cfg: Config, env: Dist) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, Any]:
    """``(raw_model, model, optimizer, scheduler)``; the same init on every rank (DDP also broadcasts rank 0's)."""
    torch.manual_seed(cfg.train.seed)
    _, model_cls = tc.model_classes(cfg.arch)
    raw_model = model_cls(cfg.model)
    if cfg.train.init_from:  # a resumed run then loads its checkpoint's weights over these
        from eval_tools.weights import warm_start
        from pipeline.errors import UserError

        try:
            got = warm_start(raw_model, cfg.arch, cfg.train.init_from)
        except UserError as exc:
            raise ConfigError(str(exc)) from None
        if env.master:
            kept = f"; fresh init kept for {len(got['kept_init'])} training-only tensors" if got["kept_init"] else ""
            print(f"[train] warm start from {got['source']} ({got['kind']}): {got['loaded']} tensors{kept}", flush=True)
    raw_model = raw_model.to(env.device)
    if cfg.train.sync_batchnorm and env.world > 1 and env.device.type == "cuda":
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    optimizer, scheduler = build_optimizer(cfg.optim, raw_model, cfg.train.steps)
    model: nn.Module = torch.compile(raw_model) if cfg.train.compile else raw_model
    if env.world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=cfg.train.find_unused_parameters,
        )
    return raw_model, model, optimizer, scheduler


def build_data(cfg: Config, env: Dist, *, sample_rate: int, crop: int, micro_batch: int) -> tuple[Any, Any, nn.Module]:
    """``(loader, stream, augmenter)``: this rank's share of the shards and its own augmentation generator."""
    from pipeline.augment import build_augment
    from pipeline.loader import DevicePrefetcher, StreamingLoader

    transform = None
    if cfg.augment.enabled and cfg.augment.backend == "cpu":
        from pipeline.augment_cpu import CpuAugment

        transform = CpuAugment(cfg.augment, sample_rate=sample_rate)
    cuda = env.device.type == "cuda"
    loader_cfg = cfg.data.loader_config(batch_size=micro_batch, views=cfg.views, crop_samples=crop,
                                        sample_rate=sample_rate, seed=cfg.train.seed, cuda=cuda)
    loader = StreamingLoader(loader_cfg, rank=env.rank, world_size=env.world, transform=transform)
    # One generator per rank: each rank augments its own clips differently.
    augmenter = build_augment(cfg.augment, sample_rate=sample_rate, seed=cfg.train.seed + 7919 * env.rank).to(env.device)
    return loader, DevicePrefetcher(loader, env.device) if cuda else loader, augmenter


class Prepare:
    """A loader batch -> the model's input: audio to the device and augmented there
    (``--augment.backend=gpu``); when ``audio_step`` is set, the first micro-batch's clean and
    augmented clips go to the logger as audio examples."""

    def __init__(self, cfg: Config, env: Dist, augmenter: nn.Module, logger: RunLogger, sample_rate: int):
        self.device, self.augmenter, self.logger, self.sample_rate = env.device, augmenter, logger, sample_rate
        self.on_device = cfg.augment.enabled and cfg.augment.backend == "gpu"  # "gpu" = the training device
        self.no_params = ("augmented in the loader workers (--augment.backend=cpu; parameters not recorded)"
                          if cfg.augment.enabled and not self.on_device else "no augmentation")
        self.audio_step: int | None = None

    def __call__(self, batch: dict[str, Any], micro: int) -> dict[str, Any]:
        audio = batch["audio"].to(self.device, non_blocking=True)  # (B, V, C, T); no-op after the prefetcher
        clean = audio.clone() if self.audio_step is not None and micro == 0 else None
        if self.on_device:
            with torch.no_grad():
                b, v, c, t = audio.shape
                audio = self.augmenter(audio.reshape(b * v, c, t)).reshape(b, v, c, t)
        if clean is not None:
            params = self.augmenter.last_params if self.on_device else {}
            self.logger.audio(self.audio_step, clean, audio, params, list(batch.get("keys", [])), self.sample_rate,
                              self.no_params)
        return {**batch, "audio": audio, "lengths": batch["lengths"].to(self.device, non_blocking=True)}


class Evaluations:
    """Validation loss (``--data.valid_manifests`` every ``--train.eval_every`` steps, every rank;
    training/validate.py) and the online probe (``--eval.probe_data`` every ``--eval.probe_every``
    steps, rank 0; training/online_probe.py), both also at the last step. Neither touches the
    training state, so a resumed run logs the same values."""

    def __init__(self, cfg: Config, env: Dist, *, sample_rate: int, crop: int, micro_batch: int):
        self.cfg, self.validator, self.probe = cfg, None, None
        if cfg.data.valid_manifests:
            from training.validate import Validator

            self.validator = Validator(cfg, env, sample_rate=sample_rate, crop=crop, micro_batch=micro_batch)
            if env.master:
                print(f"[train] {self.validator.describe()}, every {cfg.train.eval_every} steps", flush=True)
        if cfg.eval.probe_data and env.master:
            from training.online_probe import OnlineProbe

            self.probe = OnlineProbe(cfg, env, sample_rate=sample_rate)

    def __call__(self, step: int, model: nn.Module, logger: RunLogger) -> None:
        last = step == self.cfg.train.steps
        if self.validator is not None and (step % self.cfg.train.eval_every == 0 or last):
            logger.log_eval(step, self.validator(model))
        if self.probe is not None and (step % self.cfg.eval.probe_every == 0 or last):
            logger.log_eval(step, self.probe(model))


# --------------------------------------------------------------------------------------------
# Checkpoints (the artefact itself is training.checkpoint's)


# What a resumed run must share with its checkpoint besides the weights' shapes: the data stream
# (its manifests, mixing and seed) and the per-rank batch its position counts in.
RESUME_FIXED = ("data.manifests", "data.weights", "train.seed")


def check_resumable(state: dict[str, Any], url: str, cfg: Config, env: Dist) -> None:
    """A :class:`ConfigError` naming the flags when ``state`` cannot continue as this run."""
    missing = [k for k in ("step", "model_name", "model", "optimizer", "scheduler", "loader", "augment", "config")
               if k not in state]
    if missing:
        raise ConfigError(f"--resume: {url} is not a train.py checkpoint (it has no {', '.join(missing)})")
    if state["model_name"] != cfg.arch:
        raise ConfigError(f"--resume: {url} holds a {state['model_name']} model, this run is {cfg.arch}")
    fixed = [f"--{line}" for line in tc.diff(state["config"], tc.to_dict(cfg)) if line.startswith(RESUME_FIXED)]
    if fixed:
        raise ConfigError(f"--resume: {url} cannot continue with a changed {'; '.join(fixed)} (a run resumes the "
                          "model, data stream and seed it was written with); drop those overrides, or start a new "
                          "run in another --train.out_dir")
    micro = cfg.train.global_batch_size // (env.world * cfg.train.grad_accum)
    was, ranks = state["loader"].get("batch_size"), len(state.get("ranks") or [1])
    if was != micro:
        raise ConfigError(
            f"--resume: {url} was written with {was} clips per rank and micro-step ({ranks} ranks); this run has "
            f"{micro} (--train.global_batch_size={cfg.train.global_batch_size} / ({env.world} ranks x "
            f"--train.grad_accum={cfg.train.grad_accum})); the data stream continues only with the same per-rank "
            f"micro-batch: use --train.global_batch_size={was * env.world * cfg.train.grad_accum}"
        )


def restore(state: dict[str, Any], url: str, cfg: Config, env: Dist, p: Parts) -> tuple[int, str | None, dict[str, Any]]:
    """Load checkpoint ``state`` into the parts; ``(step, W&B run id, this rank's RNG state)``."""
    check_resumable(state, url, cfg, env)
    try:
        p.raw_model.load_state_dict(state["model"])
        p.optimizer.load_state_dict(state["optimizer"])
        p.scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes or parameter groups that do not match
        changed = [f"--{line}" for line in tc.diff(state["config"], tc.to_dict(cfg)) if line.startswith("model.")]
        why = "; ".join(changed) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"--resume: {url} holds a model of another shape ({why}); drop those overrides, "
                          "or start a new run in another --train.out_dir") from None
    mine, exact = checkpoint.rank_state(state, env.rank, env.world)
    if not exact and env.master:
        print(f"[train] warning: {url} was written by {len(state.get('ranks', []))} ranks, this run has {env.world}; "
              "every rank resumes from rank 0's data position and generator, so the loss sequence "
              "will differ from an uninterrupted run")
    # The loader's state is rank-agnostic; strict=False continues at the next epoch when the
    # world size or worker count changed (an exact mid-epoch resume needs the same layout).
    try:
        p.stream.load_state_dict(state["loader"], strict=exact)
    except ValueError as exc:
        raise ConfigError(f"--resume: {url}: {exc}") from None
    p.augmenter.load_state_dict(mine["augment"])
    p.logger.load_state_dict(state.get("counters", {}))
    checkpoint.set_scaler_state(p.scaler, state.get("scaler"), say=print if env.master else lambda _: None)
    if env.master:
        changed = tc.diff(state["config"], tc.to_dict(cfg))
        print(f"[train] resuming from {url} at step {state['step']}"
              + (f"; config changed: {'; '.join(changed)}" if changed else ""))
    return int(state["step"]), state.get("wandb_run_id"), mine["rng"]


def write_checkpoint(cfg: Config, env: Dist, p: Parts, step: int, *, rewind: int = 0) -> str | None:
    """Every rank calls this. ``rewind``: batches this rank took for a step that did not complete."""
    mine = {"loader": p.stream.state_dict(held=rewind), "augment": p.augmenter.state_dict(),
            "rng": checkpoint.rng_state(env.device)}
    spe = p.loader.steps_per_epoch // cfg.train.grad_accum

    def shared() -> dict[str, Any]:
        return {"epoch": step // spe if spe else 0, "model_name": cfg.arch, "model": p.raw_model.state_dict(),
                "optimizer": p.optimizer.state_dict(), "scheduler": p.scheduler.state_dict(),
                "counters": p.logger.state_dict(), "config": tc.to_dict(cfg), "wandb_run_id": p.logger.run_id,
                "scaler": p.scaler.state_dict()}

    return checkpoint.save_run(cfg.checkpoint_dir, cfg.checkpoint.keep, env, step=step, mine=mine, shared=shared)


def data_failure(cfg: Config, env: Dist, p: Parts, r: StepResult, step: int, start_step: int,
                 last_ckpt: str | None) -> DataStreamError:
    """After a failed data stream: checkpoint the last completed step (if this run completed any)
    and name what failed, on every rank."""
    if step > start_step:
        write_checkpoint(cfg, env, p, step, rewind=r.consumed)
        kept = f"checkpoint {checkpoint.checkpoint_url(cfg.checkpoint_dir, step)} holds step {step}"
    else:
        kept = f"no step completed since {last_ckpt}" if last_ckpt else "no step completed"
    errors = env.gather_objects(r.data_error)
    what = "; ".join(e if env.world == 1 else f"rank {i}: {e}" for i, e in enumerate(errors) if e)
    return DataStreamError(f"the data stream failed in step {step + 1}: {what}. {kept}; check the shards "
                           "(`shard-tools verify <folder>`), then continue with --resume auto")


# --------------------------------------------------------------------------------------------
# The trainer


def train(cfg: Config) -> dict[str, Any]:
    """Train to ``cfg.train.steps`` (resuming per ``cfg.checkpoint.resume``); return the run summary.

    Under torchrun every rank calls this. The summary (also ``<out_dir>/summary.json`` on rank 0)
    has ``status`` "completed" | "stopped" (SIGTERM/SIGINT, checkpointed). Too many non-finite
    losses in a row raise :class:`TrainingDiverged`, a failed data stream :class:`DataStreamError`,
    each after writing a checkpoint.
    """
    env = setup_distributed(cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    facts = validate(cfg, env.world)
    sample_rate, crop, accum = facts["sample_rate"], facts["crop_samples"], cfg.train.grad_accum
    micro_batch = cfg.train.global_batch_size // (env.world * accum)
    if env.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(f"[train] {cfg.preset}: {cfg.arch} on {env.world} x {env.device.type}, global batch "
              f"{cfg.train.global_batch_size} = {env.world} ranks x {accum} micro-steps x {micro_batch} clips, "
              f"{crop} samples @ {sample_rate} Hz, {precision_name(cfg.train.precision, env.device)}, "
              f"out {cfg.out_dir}")

    raw_model, model, optimizer, scheduler = build_model(cfg, env)
    loader, stream, augmenter = build_data(cfg, env, sample_rate=sample_rate, crop=crop, micro_batch=micro_batch)
    logger = RunLogger(cfg.logging, env, out_dir=cfg.out_dir, total_steps=cfg.train.steps, run_name=cfg.preset,
                       config=tc.to_dict(cfg), audio_seconds=cfg.views * crop / sample_rate,
                       steps_per_epoch=loader.steps_per_epoch // accum)
    p = Parts(raw_model, model, optimizer, scheduler, loader, stream, augmenter, logger,
              build_scaler(cfg.train.precision, env.device))
    evals = Evaluations(cfg, env, sample_rate=sample_rate, crop=crop, micro_batch=micro_batch)

    resume_url, state = checkpoint.resume_point(cfg.checkpoint.resume, cfg.checkpoint_dir,
                                                say=print if env.master else lambda _: None)
    step, run_id, rng = restore(state, resume_url, cfg, env, p) if state is not None else (0, None, None)
    del state
    logger.start(step=step, resumed=resume_url is not None, run_id=run_id)
    if logger.wandb is not None:
        logger.wandb.summary["n_params"] = sum(q.numel() for q in raw_model.parameters())

    # Installed before the first batch, which can take long (worker start-up, remote shards). Only
    # this process is covered: the loader's workers ignore SIGTERM/SIGINT (it stops them itself).
    stop = StopFlag()
    stop.install()
    stream_iter = iter(stream)
    try:
        batches, waited = first_batch(stream_iter)
    except BaseException:
        stop.restore()
        raise
    # last: the loader iterator and W&B may draw from the global generators
    checkpoint.seed_or_restore_rng(rng, seed=cfg.train.seed, rank=env.rank, device=env.device)
    prepare = Prepare(cfg, env, augmenter, logger, sample_rate)
    train_step = TrainStep(model, optimizer, scheduler, env, accum=accum, grad_clip=cfg.optim.grad_clip,
                           precision=cfg.train.precision, prepare=prepare, scaler=p.scaler)

    start_step, status, last_ckpt, nonfinite_run, ok = step, "completed", resume_url, 0, False
    try:
        while step < cfg.train.steps:
            if hasattr(raw_model, "set_step"):
                raw_model.set_step(step)
            prepare.audio_step = step + 1 if logger.audio_due(step) else None
            r = train_step(batches, stop=stop.reason is not None, waited=waited)
            waited = 0.0
            if r.data_failed:
                raise data_failure(cfg, env, p, r, step, start_step, last_ckpt)
            step += 1
            logger.log_step(step, r, clips=cfg.train.global_batch_size, data_counters=loader.stats)
            nonfinite_run = nonfinite_run + 1 if r.skipped else 0
            if nonfinite_run >= cfg.train.max_nonfinite:
                last_ckpt = write_checkpoint(cfg, env, p, step)
                raise TrainingDiverged(
                    f"the loss was non-finite for {nonfinite_run} steps in a row (step {step}, "
                    f"{logger.nonfinite_total} skipped in all); checkpoint {last_ckpt}. Lower --optim.lr, set "
                    f"--optim.grad_clip, or resume from an earlier checkpoint in {cfg.checkpoint_dir}"
                )
            if r.stop:
                status, last_ckpt = "stopped", write_checkpoint(cfg, env, p, step)
                if env.master:
                    print(f"[train] stop requested: checkpoint {last_ckpt} written at step {step}; "
                          "continue with --resume auto", flush=True)
                break
            evals(step, raw_model, logger)
            if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
                last_ckpt = write_checkpoint(cfg, env, p, step)
        ok = True
    except torch.OutOfMemoryError as exc:
        advice = oom_advice(cfg, env.world, micro_batch, crop, step)
        print(f"[train] rank {env.rank}: {advice}", file=sys.stderr, flush=True)
        raise RuntimeError(advice) from exc
    finally:
        stop.restore()
        logger.finish(ok)
        if callable(getattr(stream_iter, "close", None)):
            stream_iter.close()  # stops the loader's worker processes now rather than at garbage collection
        env.close()

    summary = {
        "status": status, "preset": cfg.preset, "arch": cfg.arch, "world_size": env.world, "device": env.device.type,
        "step": step, "steps_run": step - start_step, "resumed_from": resume_url, **logger.totals(),
        "n_params": sum(q.numel() for q in raw_model.parameters()), "loader_stats": numbers(loader.stats()),
        "checkpoint": last_ckpt,
    }
    if env.master:
        fsio.write_bytes_atomic(os.path.join(cfg.out_dir, "summary.json"), json.dumps(summary, indent=2).encode())
    return summary


def oom_advice(cfg: Config, world: int, micro_batch: int, crop: int, step: int) -> str:
    acc = cfg.train.grad_accum
    return (
        f"out of memory at step {step} with a per-rank micro-batch of {micro_batch} clips x {cfg.views} views x "
        f"{crop} samples (--train.global_batch_size={cfg.train.global_batch_size} / (world {world} x "
        f"--train.grad_accum={acc})). To fit: --train.grad_accum={acc * 2} (same global batch, half the "
        f"activations per micro-step), or a smaller --train.global_batch_size, or a shorter "
        f"--data.crop_samples, or --train.precision=bf16 on GPU."
    )


def print_summary(s: dict[str, Any]) -> None:
    lines = [
        f"== {s['preset']} ({s['arch']}): {s['status']} at step {s['step']} ==",
        f"  steps this run     {s['steps_run']} on {s['world_size']} x {s['device']}"
        + (f" (resumed from {s['resumed_from']})" if s["resumed_from"] else ""),
        f"  loss (one step)    first {fmt(s['first_loss'], '.4f')} -> last {fmt(s['last_loss'], '.4f')}",
        f"  skipped            {s['samples_skipped']} samples (replaced), {s['nonfinite_skipped']} non-finite steps",
        f"  loop time          {fmt_duration(s['wall_s'])}  ({fmt(s['steps_per_s'], '.2f')} steps/s, "
        f"{fmt(s['clips_per_s'], '.1f')} clips/s, {fmt(s['audio_hours_per_s'], '.4f')} audio-h/s)",
        f"  data wait          {100 * s['data_wait_fraction']:.1f}% of step time",
        *(["  last evaluation    " + ", ".join(f"{k} {v:.4g}" for k, v in s["last_eval"].items())]
          if s.get("last_eval") else []),
        f"  loader             {json.dumps(s['loader_stats'])}",
        f"  checkpoint         {s['checkpoint']}",
        f"  metrics            {s['metrics']}",
        f"  W&B                run {s['wandb_run_id']}" + (f" in {s['wandb_dir']}" if s["wandb_dir"] else " (disabled)"),
    ]
    print("\n".join(lines))


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Self-supervised pre-training (CLMR / wav2vec 2.0 / CPC) on musicssl shards; "
        "single process or under torchrun. Any config key can be overridden with --section.key=value "
        "(see --print-config).",
        epilog="presets:\n" + "\n".join(f"  {n:18s} {fn.__doc__.splitlines()[0]}" for n, fn in tc.PRESETS.items())
        + "\n\nexamples:\n  python train.py --config clmr_tiny --optim.lr=3e-4 --train.steps=500\n"
        "  python train.py --config clmr_tiny --train.steps=500 --print-config run.yaml   # write a config file\n"
        "  python train.py --config run.yaml --optim.lr=1e-3                              # train from it\n"
        "  torchrun --standalone --nproc_per_node=8 train.py --config clmr_mtat --resume auto\n"
        "  python train.py --config clmr_tiny --data.valid_manifests=VALID.manifest.json --train.eval_every=50 \\\n"
        "      --eval.probe_data=LABELLED.manifest.json --eval.probe_every=50   # valid/ and probe/ curves\n"
        "  python train.py --config clmr_mtat --train.precision=fp16 --train.dist_timeout_s=3600\n\n"
        "docs/training.md: validation, the online probe, precision, long jobs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="PRESET|FILE",
                   help=f"a preset ({', '.join(tc.PRESETS)}) or a .json/.yaml/.toml file from --print-config FILE "
                   "(its `preset` key names the base; its other keys override it)")
    p.add_argument("--resume", default=None, metavar="auto|none|URL",
                   help="auto: continue from the newest checkpoint in --checkpoint.dir (if any); or a ckpt URL")
    p.add_argument("--print-config", nargs="?", const="-", default=None, metavar="FILE",
                   help="print the resolved config (as overridable flags) and exit; with FILE (.json/.yaml/.toml) "
                   "write it there as a config file for --config")
    p.add_argument("--format", choices=["flags", "json", "yaml", "toml"], default=None,
                   help="--print-config's format (default: flags on screen, the FILE's extension otherwise)")
    return p


def overrides_from(rest: list[str]) -> list[str]:
    """``--section.key=value`` / ``--section.key value`` items of the command line."""
    out: list[str] = []
    items = iter(rest)
    for item in items:
        if not item.startswith("--") or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"unrecognised argument {item!r}: overrides look like --section.key=value (see --print-config)")
        if "=" not in item:
            value = next(items, None)
            if value is None:
                raise ConfigError(f"{item} needs a value: {item}=VALUE")
            item = f"{item}={value}"
        out.append(item)
    return out


def config_from_argv(argv: list[str]) -> tuple[Config, argparse.Namespace]:
    """The resolved config of a command line, and its parsed train.py options."""
    args, rest = build_parser().parse_known_args(argv)
    overrides = overrides_from(rest)
    if args.resume is not None:
        overrides.append(f"--checkpoint.resume={args.resume}")
    try:
        base = tc.load_file(args.config) if tc.file_format(args.config) else tc.preset(args.config)
        return tc.apply_overrides(base, overrides), args
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def print_config(cfg: Config, target: str, fmt: str | None) -> None:
    """``--print-config [FILE] [--format F]``."""
    if target == "-":
        print(tc.dumps(cfg, fmt or "flags"), end="")
        return
    fmt = fmt or tc.file_format(target)
    if fmt is None or fmt == "flags":
        raise ConfigError(f"--print-config {target}: name a .json, .yaml or .toml file (or pass --format json|yaml|toml)")
    fsio.write_bytes_atomic(target, tc.dumps(cfg, fmt).encode())
    print(f"wrote {target} ({fmt}); train from it with: python train.py --config {target}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: every failure is one line (``--debug`` or MUSICSSL_DEBUG=1 shows the traceback)."""
    from pipeline.errors import run_cli

    return run_cli(_main, argv, "train.py")


def _main(argv: list[str]) -> int:
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg, args = config_from_argv(argv)
        if args.print_config is not None:
            print_config(cfg, args.print_config, args.format)
            return 0
        summary = train(cfg)
    except ConfigError as exc:  # the message names the flag; printed once, not by every rank
        if rank == 0:
            print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 1
    if rank == 0:
        print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
