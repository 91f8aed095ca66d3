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

``python train.py --help`` lists the presets; ``--print-config`` prints every key of the resolved
config as a ``--section.key=value`` line that can be overridden.

What one step does, top to bottom in :func:`train`: for each of ``train.grad_accum`` micro-steps take
a batch from ``pipeline.loader`` (raw crops, ``(B, V, C, T)``), move it to the device, augment
``(B*V, C, T)`` there with ``pipeline.augment`` (or the loader workers did it, ``--augment.backend=cpu``),
run the model under bf16 autocast on CUDA and back-propagate (DDP syncs gradients on the last
micro-step only); then clip, step the optimizer and the schedule. One all-reduce per step agrees on
the mean loss and metrics, on a non-finite loss (the step is skipped on every rank) and on a stop
request (SIGTERM on any rank). Checkpoints follow docs/architecture.md §5; every rank's data-stream
position, augmentation generator and RNG states are kept, so a resumed run repeats an uninterrupted
run's losses. Rank 0 appends every step to ``<out_dir>/metrics.jsonl`` and logs to W&B.

Call :func:`train` in-process for quickstarts and evaluation scripts: ``train(config) -> summary``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import random
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import train_config as tc
from pipeline import fsio
from pipeline.errors import UserError
from train_config import Config

CKPT_FORMAT = "musicssl-ckpt/1"


class ConfigError(UserError, ValueError):
    """A problem with the configuration or its inputs found at start; the message names the flag."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint was written before raising."""


# --------------------------------------------------------------------------------------------
# Validation at start: every error names the flag to change.


def read_manifest(url: str) -> dict[str, Any]:
    """Read and check one shard manifest (``pipeline.manifest``); errors name ``--data.manifests``."""
    from pipeline.manifest import load_manifest

    try:
        return load_manifest(url).record
    except UserError as exc:
        raise ConfigError(f"--data.manifests: {exc}") from exc


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
    rates = set()
    for url in cfg.data.manifests:
        manifest = read_manifest(url)
        rates.add(manifest.get("sample_rate"))
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
    if cfg.checkpoint.resume == "none":
        found = list_checkpoints(cfg.checkpoint_dir)
        if found:
            raise ConfigError(
                f"--checkpoint.dir {cfg.checkpoint_dir} already holds checkpoints of an earlier run (newest "
                f"{found[-1][1]}); continue it with --resume auto, or start afresh in another --train.out_dir "
                "or --checkpoint.dir (a new run there would rotate the old checkpoints away)"
            )
    elif cfg.checkpoint.resume != "auto" and not fsio.exists(cfg.checkpoint.resume):
        raise ConfigError(f"--resume / --checkpoint.resume: {cfg.checkpoint.resume} does not exist; use auto or a ckpt-*.pt URL")
    return {"sample_rate": sample_rate, "crop_samples": crop}


# --------------------------------------------------------------------------------------------
# Distributed setup from torchrun's environment


def setup_distributed(cfg: Config) -> tuple[int, int, torch.device, bool]:
    """``(rank, world_size, device, we_initialised)`` from RANK / WORLD_SIZE / LOCAL_RANK."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.train.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.train.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--train.device=cuda but CUDA is not available; use --train.device=cpu or auto")
        torch.cuda.set_device(device)
    initialised = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        initialised = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, device, initialised


# --------------------------------------------------------------------------------------------
# Learning-rate schedule


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


def build_optimizer(cfg: Config, model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    optimizer = cls(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    sched, warm, total, final = o.schedule, o.warmup_steps, cfg.train.steps, o.final_lr_ratio

    # A closure, not a callable object: LambdaLR.state_dict() stores callable objects' __dict__,
    # which would put non-tensor objects into the checkpoint.
    def factor(step: int) -> float:
        return lr_factor(step, schedule=sched, warmup=warm, total=total, final=final)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------
# Checkpoints (docs/architecture.md §5)


def checkpoint_url(folder: str, step: int) -> str:
    return fsio.join_url(folder, f"ckpt-{step:08d}.pt")


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """``(step, url)`` of the ``ckpt-<step>.pt`` files in ``folder``, oldest first."""
    out = []
    for name in fsio.list_dir(folder):
        if name.startswith("ckpt-") and name.endswith(".pt") and name[5:-3].isdigit():
            out.append((int(name[5:-3]), fsio.join_url(folder, name)))
    return sorted(out)


def save_checkpoint(folder: str, state: dict[str, Any], keep: int) -> str:
    """Write ``ckpt-<step>.pt`` atomically (temp file + rename, or one PUT), then keep the newest ``keep``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    url = checkpoint_url(folder, state["step"])
    fsio.makedirs(folder)
    fsio.write_bytes_atomic(url, buf.getvalue())
    for _, old in list_checkpoints(folder)[:-keep]:
        fsio.remove(old)
    return url


def load_checkpoint(url: str) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (plain tensors and Python values only)."""
    state = torch.load(io.BytesIO(fsio.read_bytes(url)), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise ValueError(f"{url} is not a {CKPT_FORMAT} checkpoint")
    return state


def find_resume(resume: str, folder: str) -> str | None:
    """The checkpoint to resume from: ``none`` -> None, ``auto`` -> the newest in ``folder`` (or None)."""
    if resume == "none":
        return None
    if resume != "auto":
        return resume
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def load_model_from_checkpoint(url: str, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """Rebuild the model a checkpoint was trained with and load its weights (for evaluation)."""
    state = load_checkpoint(url)
    cfg = tc.from_dict(state["config"])
    _, model_cls = tc.model_classes(cfg.arch)
    model = model_cls(cfg.model)
    model.load_state_dict(state["model"])
    return model.to(map_location), cfg


def rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        # numpy/python states as tensors/lists: weights_only loading refuses numpy arrays
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": _to_lists(random.getstate()),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# --------------------------------------------------------------------------------------------
# Weights & Biases (rank 0 only)


def init_wandb(cfg: Config, run_id: str, out_dir: str) -> Any:
    """Start or continue W&B run ``run_id``; None when disabled. Offline when no API key is set."""
    mode = cfg.logging.wandb_mode
    if mode == "auto":
        env_mode = os.environ.get("WANDB_MODE", "").lower()
        if env_mode in ("online", "offline", "disabled"):
            mode = env_mode
        elif env_mode == "dryrun":
            mode = "offline"
        elif os.environ.get("WANDB_API_KEY"):
            mode = "online"
        else:
            mode = "offline"
            print("[train] W&B: WANDB_API_KEY is not set, logging offline under "
                  f"{os.path.join(out_dir, 'wandb')} (upload later with `wandb sync <run folder>`)")
    if mode == "disabled":
        print("[train] W&B: disabled (--logging.wandb_mode=disabled)")
        return None
    import wandb

    def start(mode: str) -> Any:
        return wandb.init(
            project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
            name=cfg.logging.run_name or cfg.preset, id=run_id, resume="allow", dir=out_dir, mode=mode,
            config=tc.to_dict(cfg), settings=wandb.Settings(console="off", quiet=True),
        )

    try:
        run = start(mode)
    except Exception as exc:  # noqa: BLE001 - no network or a bad key must not cost the training run
        if mode != "online":
            raise
        print(f"[train] W&B: online start failed ({exc}); logging offline instead (`wandb sync` it later)")
        mode = "offline"
        run = start(mode)
    print(f"[train] W&B: {mode} run {run_id} ({run.dir})")
    return run


def log_audio_examples(run: Any, step: int, clean: torch.Tensor, augmented: torch.Tensor,
                       params: dict[str, torch.Tensor], keys: list[str], sample_rate: int, n: int,
                       out_dir: str, no_params: str = "no augmentation") -> int:
    """Log ``n`` clips (every view, clean and augmented) to W&B and as WAVs + params.json on disk.

    W&B gets one ``wandb.Audio`` panel per augmented view (caption = its parameters) and a table of
    clean/augmented pairs with the parameters; ``<out_dir>/examples/step-<step>/`` gets the
    augmented views via ``pipeline.augment.write_examples``. ``no_params`` is the caption of a view
    without recorded parameters. Returns the number of views logged.
    """
    import wandb

    from pipeline.augment import example_params, write_examples

    clean, augmented = clean[:n].float().cpu(), augmented[:n].float().cpu()  # (n, V, C, T)
    n, views = clean.shape[0], clean.shape[1]
    flat_aug = augmented.reshape(n * views, *augmented.shape[2:])  # the (B*V, C, T) the chain saw
    table = wandb.Table(columns=["step", "key", "view", "clean", "augmented", "params"])
    panels: dict[str, Any] = {}
    for i in range(n):
        key = keys[i] if i < len(keys) else str(i)
        for v in range(views):
            # the first n*V rows of the flattened batch are these clips' views, in this order
            row = i * views + v
            p = example_params(params, row) if params else {}
            applied = [k[: -len(".apply")] for k, t in params.items() if k.endswith(".apply") and bool(t[row])]
            p = {name: p.get(name, {}) for name in applied}  # transforms without parameters (polarity) too
            caption = f"{key} view {v}: " + (", ".join(
                f"{name}({', '.join(f'{k}={x:.3g}' if isinstance(x, float) else f'{k}={x}' for k, x in q.items())})"
                if q else name for name, q in p.items()) or no_params)
            a_clean = wandb.Audio(clean[i, v].mean(0).numpy(), sample_rate=sample_rate, caption=f"{key} view {v} clean")
            a_aug = wandb.Audio(augmented[i, v].mean(0).numpy(), sample_rate=sample_rate, caption=caption)
            panels[f"examples/clip{i}_view{v}"] = wandb.Audio(augmented[i, v].mean(0).numpy(),
                                                              sample_rate=sample_rate, caption=caption)
            table.add_data(step, key, v, a_clean, a_aug, json.dumps(p))
    run.log({"examples/table": table, **panels}, step=step)
    if params:
        sub = {k: (t if t.dim() == 0 else t[: n * views]) for k, t in params.items()}
        write_examples(flat_aug, sub, os.path.join(out_dir, "examples", f"step-{step:08d}"), sample_rate, n * views)
    return n * views


# --------------------------------------------------------------------------------------------
# Signals: a flag the loop reads at step boundaries


class StopFlag:
    """SIGTERM (preemption) or a first Ctrl-C sets the flag; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        print(f"[train] {self.reason} received: checkpointing at the end of this step, then exiting", flush=True)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (in-process callers)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------------------------
# Small helpers for the loop


def oom_advice(cfg: Config, world: int, micro_batch: int, crop: int, step: int) -> str:
    acc = cfg.train.grad_accum
    return (
        f"out of memory at step {step} with a per-rank micro-batch of {micro_batch} clips x {cfg.views} views x "
        f"{crop} samples (--train.global_batch_size={cfg.train.global_batch_size} / (world {world} x "
        f"--train.grad_accum={acc})). To fit: --train.grad_accum={acc * 2} (same global batch, half the "
        f"activations per micro-step), or a smaller --train.global_batch_size, or a shorter "
        f"--data.crop_samples, or --train.precision=bf16 on GPU."
    )


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop metrics.jsonl records after ``last_step`` (steps a killed run logged past its checkpoint)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by kill -9
            if record["step"] <= last_step:
                keep.append(json.dumps(record) + "\n")
    fsio.write_bytes_atomic(path, "".join(keep).encode())


def loader_stats_numbers(stats: Any) -> dict[str, int | float]:
    """Numeric entries of ``loader.stats()`` (nested dicts flattened with '/')."""
    out: dict[str, int | float] = {}
    if isinstance(stats, dict):
        for k, v in stats.items():
            if isinstance(v, dict):
                out.update({f"{k}/{kk}": vv for kk, vv in loader_stats_numbers(v).items()})
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[str(k)] = v
    return out


# --------------------------------------------------------------------------------------------
# The trainer


def train(cfg: Config) -> dict[str, Any]:
    """Train to ``cfg.train.steps`` (resuming per ``cfg.checkpoint.resume``); return the run summary.

    Under torchrun every rank calls this. The summary (also ``<out_dir>/summary.json`` on rank 0)
    has ``status`` "completed" | "stopped" (SIGTERM/SIGINT, checkpointed). Too many non-finite
    losses in a row raise :class:`TrainingDiverged` after writing a checkpoint.
    """
    from pipeline.augment import build_augment
    from pipeline.loader import DevicePrefetcher, LoaderConfig, StreamingLoader

    # ---- distributed, validation -------------------------------------------------------------
    rank, world, device, we_initialised_dist = setup_distributed(cfg)
    master = rank == 0
    facts = validate(cfg, world)
    sample_rate, crop = facts["sample_rate"], facts["crop_samples"]
    accum = cfg.train.grad_accum
    micro_batch = cfg.train.global_batch_size // (world * accum)
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    out_dir, ckpt_dir = cfg.out_dir, cfg.checkpoint_dir
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if master:
        os.makedirs(out_dir, exist_ok=True)
        print(f"[train] {cfg.preset}: {cfg.arch} on {world} x {device.type}, global batch "
              f"{cfg.train.global_batch_size} = {world} ranks x {accum} micro-steps x {micro_batch} clips, "
              f"{crop} samples @ {sample_rate} Hz, {'bf16' if use_bf16 else 'fp32'}, out {out_dir}")

    # ---- model, optimizer, schedule (same init on every rank; DDP also broadcasts rank 0's) -----
    torch.manual_seed(cfg.train.seed)
    _, model_cls = tc.model_classes(cfg.arch)
    raw_model = model_cls(cfg.model).to(device)
    if cfg.train.sync_batchnorm and world > 1 and device.type == "cuda":
        raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    optimizer, scheduler = build_optimizer(cfg, raw_model)
    model: nn.Module = torch.compile(raw_model) if cfg.train.compile else raw_model
    ddp: nn.parallel.DistributedDataParallel | None = None
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.train.find_unused_parameters,
        )
        model = ddp
    n_params = sum(p.numel() for p in raw_model.parameters())

    # ---- data and augmentation ------------------------------------------------------------------
    augment_on_device = cfg.augment.enabled and cfg.augment.backend == "gpu"  # "gpu" = the training device
    transform = None
    if cfg.augment.enabled and cfg.augment.backend == "cpu":
        from pipeline.augment_cpu import CpuAugment

        transform = CpuAugment(cfg.augment, sample_rate=sample_rate)
    loader = StreamingLoader(
        LoaderConfig(
            manifests=list(cfg.data.manifests), weights=cfg.data.weights, batch_size=micro_batch,
            mode="pairs" if cfg.views == 2 else "single", crop_samples=crop,
            variable_length=cfg.data.variable_length, pad_to=cfg.data.pad_to, short_policy=cfg.data.short_policy,
            sample_rate=sample_rate, mono=True, shuffle_buffer=cfg.data.shuffle_buffer,
            num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor, seed=cfg.train.seed,
            pin_memory=cfg.data.pin_memory and device.type == "cuda", on_error=cfg.data.on_error,
        ),
        rank=rank, world_size=world, transform=transform,
    )
    # One generator per rank: each rank augments its own clips differently.
    augmenter = build_augment(cfg.augment, sample_rate=sample_rate, seed=cfg.train.seed + 7919 * rank).to(device)

    # ---- resume -------------------------------------------------------------------------------
    step, nonfinite_total, clips_total = 0, 0, 0
    run_id: str | None = None
    resume_url = find_resume(cfg.checkpoint.resume, ckpt_dir)
    ckpt: dict[str, Any] | None = None
    if resume_url is not None:
        ckpt = load_checkpoint(resume_url)
        if ckpt["model_name"] != cfg.arch:
            raise ConfigError(f"--resume: {resume_url} holds a {ckpt['model_name']} model, this run is {cfg.arch}")
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step = int(ckpt["step"])
        counters = ckpt.get("counters", {})
        nonfinite_total, clips_total = int(counters.get("nonfinite_total", 0)), int(counters.get("clips", 0))
        run_id = ckpt.get("wandb_run_id")
        per_rank = ckpt.get("ranks", [])
        mine = per_rank[rank] if len(per_rank) == world else None
        if mine is None and master:
            print(f"[train] warning: {resume_url} was written by {len(per_rank)} ranks, this run has {world}; "
                  "every rank resumes from rank 0's data position and generator, so the loss sequence "
                  "will differ from an uninterrupted run")
        # The loader's state is rank-agnostic; strict=False continues at the next epoch when the
        # world size or worker count changed (an exact mid-epoch resume needs the same layout).
        loader.load_state_dict(ckpt["loader"], strict=mine is not None)
        augmenter.load_state_dict((mine or ckpt)["augment"])
        if master:
            changed = tc.diff(ckpt["config"], tc.to_dict(cfg))
            print(f"[train] resuming from {resume_url} at step {step}"
                  + (f"; config changed: {'; '.join(changed)}" if changed else ""))
            truncate_metrics(metrics_path, step)
    elif master and os.path.exists(metrics_path):
        os.replace(metrics_path, metrics_path + ".old")  # a fresh run starts a fresh metrics file
    if run_id is None:
        run_id = secrets.token_hex(4)
        if world > 1:  # every rank stores the same id in its view of the run
            holder = [run_id]
            dist.broadcast_object_list(holder, src=0)
            run_id = holder[0]

    wandb_run = init_wandb(cfg, run_id, out_dir) if master else None
    if master and wandb_run is not None:
        wandb_run.summary["n_params"] = n_params

    # The trainer counts the batches it consumed: the DevicePrefetcher holds one batch more than
    # that, so loader.state_dict()'s own step runs ahead by one on CUDA.
    loader_step0 = int(loader.state_dict()["step"])
    stream: Any = DevicePrefetcher(loader, device) if device.type == "cuda" else loader
    stream_iter: Iterator[dict[str, Any]] = iter(stream)
    # Installed before the first batch, which can take long (worker start-up, remote shards). Only
    # this process is covered: torch's DataLoader workers reinstall their own SIGTERM handler, so a
    # SIGTERM or Ctrl-C sent to the whole process group kills them unless the loader makes them
    # ignore it (it does, and stops them itself at exit).
    stop = StopFlag()
    stop.install()
    # Take the first batch now, before seeding/restoring the RNGs: starting the loader's worker
    # processes draws torch's global generator once, and this keeps that draw out of the sequence
    # a resumed run must repeat.
    tw = time.perf_counter()
    try:
        first_batch = next(stream_iter)
    except BaseException:
        stop.restore()
        raise
    pending_wait = time.perf_counter() - tw
    batches = itertools.chain([first_batch], stream_iter)
    # RNG last: the loader iterator and W&B may draw from the global generators.
    if ckpt is not None:
        mine = ckpt.get("ranks", [])
        set_rng_state(mine[rank]["rng"] if len(mine) == world else ckpt["rng"], device)
    else:
        torch.manual_seed(cfg.train.seed + rank)
        np.random.seed((cfg.train.seed + rank) % 2**32)
        random.seed(cfg.train.seed + rank)
    del ckpt

    # ---- checkpoint writer (all ranks call it: per-rank states are gathered to rank 0) ----------
    last_ckpt: str | None = resume_url

    consumed = 0  # batches taken from the stream by this run

    def write_checkpoint() -> str | None:
        loader_state = loader.state_dict()
        loader_state["step"] = loader_step0 + consumed
        loader_state["epoch"] = loader_state["step"] // max(1, loader.steps_per_epoch)
        mine = {"loader": loader_state, "augment": augmenter.state_dict(), "rng": rng_state(device)}
        ranks = [mine]
        if world > 1:
            ranks = [None] * world  # type: ignore[list-item]
            dist.all_gather_object(ranks, mine)
        url = None
        if master:
            state = {
                "format": CKPT_FORMAT, "step": step, "epoch": step // steps_per_epoch if steps_per_epoch else 0,
                "model_name": cfg.arch, "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "loader": mine["loader"], "augment": mine["augment"], "rng": mine["rng"],
                "ranks": ranks,  # every rank's loader / augment / rng, for an exact resume
                "counters": {"nonfinite_total": nonfinite_total, "clips": clips_total},
                "config": tc.to_dict(cfg), "wandb_run_id": run_id,
            }
            url = save_checkpoint(ckpt_dir, state, cfg.checkpoint.keep)
        if world > 1:
            dist.barrier()
        return url

    steps_per_epoch = int(getattr(loader, "steps_per_epoch", 0) or 0) // accum

    # ---- the loop -------------------------------------------------------------------------------
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16)
    metric_names: list[str] | None = None
    status = "completed"
    start_step, t_start = step, time.perf_counter()
    window = {"steps": 0, "time": 0.0, "wait": 0.0, "clips": 0, "loss": 0.0, "finite": 0}
    totals = {"time": 0.0, "wait": 0.0, "clips": 0}
    first_loss: float | None = None
    last_loss = float("nan")
    nonfinite_run = 0
    audio_logged = 0
    views = cfg.views
    clip_seconds = crop / sample_rate
    finished_cleanly = False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        while step < cfg.train.steps:
            t0 = time.perf_counter() - pending_wait
            wait, pending_wait = pending_wait, 0.0  # the first batch was taken before the loop
            model.train()
            if hasattr(raw_model, "set_step"):
                raw_model.set_step(step)
            want_audio = (master and wandb_run is not None and cfg.logging.audio_every > 0
                          and (step % cfg.logging.audio_every == 0 or step == start_step))
            loss_sum = torch.zeros((), device=device)
            metric_sum: dict[str, torch.Tensor] = {}
            keys: list[str] = []
            for micro in range(accum):
                tw = time.perf_counter()
                batch = next(batches)
                consumed += 1
                wait += time.perf_counter() - tw
                audio = batch["audio"].to(device, non_blocking=True)  # (B, V, C, T); no-op after the prefetcher
                clean = audio.clone() if want_audio and micro == 0 else None
                if augment_on_device:
                    with torch.no_grad():
                        b, v, c, t = audio.shape
                        audio = augmenter(audio.reshape(b * v, c, t)).reshape(b, v, c, t)
                if clean is not None:
                    keys = list(batch.get("keys", []))
                    params = augmenter.last_params if augment_on_device else {}
                    no_params = ("augmented in the loader workers (--augment.backend=cpu; parameters not recorded)"
                                 if cfg.augment.enabled and not augment_on_device else "no augmentation")
                    audio_logged += log_audio_examples(wandb_run, step + 1, clean, audio, params, keys,
                                                       sample_rate, cfg.logging.audio_examples, out_dir, no_params)
                batch = {**batch, "audio": audio, "lengths": batch["lengths"].to(device, non_blocking=True)}
                sync = ddp.no_sync() if ddp is not None and micro < accum - 1 else contextlib.nullcontext()
                with sync:
                    with autocast:
                        loss, metrics = model(batch)
                    (loss / accum).backward()
                loss_sum += loss.detach().float()
                for k, val in metrics.items():
                    metric_sum[k] = metric_sum.get(k, 0) + val.detach().float()

            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), clip)
            # One all-reduce (and one host sync) agrees on the loss, the model metrics, a non-finite
            # loss on any rank and a stop request; the grad norm is already the same on every rank.
            if metric_names is None:
                metric_names = sorted(metric_sum)
            zero = torch.zeros((), device=device)
            packed = torch.stack([
                loss_sum / accum,
                (~torch.isfinite(loss_sum)).float(),
                torch.tensor(float(stop.reason is not None), device=device),
                grad_norm.detach().float() / world,
                *[metric_sum.get(k, zero) / accum for k in metric_names],
            ])
            if world > 1:
                dist.all_reduce(packed)
                packed[0] /= world
                packed[4:] /= world
            values = packed.tolist()
            loss_value, any_bad, stop_requested, gnorm = values[0], values[1] > 0, values[2] > 0, values[3]
            skip = any_bad or not math.isfinite(gnorm)
            if skip:
                nonfinite_run += 1
                nonfinite_total += 1
            else:
                optimizer.step()
                nonfinite_run = 0
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            step_clips = cfg.train.global_batch_size
            clips_total += step_clips

            dt = time.perf_counter() - t0
            window["steps"] += 1
            window["time"] += dt
            window["wait"] += wait
            window["clips"] += step_clips
            totals["time"] += dt
            totals["wait"] += wait
            totals["clips"] += step_clips
            if not skip:
                window["loss"] += loss_value
                window["finite"] += 1
                first_loss = loss_value if first_loss is None else first_loss
                last_loss = loss_value
            model_metrics = {k: values[4 + i] for i, k in enumerate(metric_names)}
            if master:
                append_jsonl(metrics_path, {
                    "step": step, "loss": loss_value if math.isfinite(loss_value) else None, "lr": lr,
                    "grad_norm": gnorm if math.isfinite(gnorm) else None,
                    "skipped": skip, "time_s": round(dt, 6), "wait_s": round(wait, 6), **model_metrics,
                })

            log_now = step % cfg.logging.every == 0 or step == cfg.train.steps or stop_requested
            data_stats = loader_stats_numbers(loader.stats()) if log_now else {}
            if log_now and world > 1:  # skipped-sample counts summed over ranks (all ranks agree on log_now)
                names = sorted(data_stats)
                summed = torch.tensor([data_stats[k] for k in names], dtype=torch.float64, device=device)
                dist.all_reduce(summed)
                data_stats = {k: int(v) if float(v).is_integer() else v for k, v in zip(names, summed.tolist())}
            if master and log_now:
                span = max(window["time"], 1e-9)
                clips_s = window["clips"] / span
                record = {
                    "train/loss": window["loss"] / max(1, window["finite"]),
                    "train/lr": lr, "train/grad_norm": gnorm,
                    **{f"model/{k}": v for k, v in model_metrics.items()},
                    "perf/steps_per_s": window["steps"] / span, "perf/clips_per_s": clips_s,
                    "perf/audio_hours_per_s": clips_s * views * clip_seconds / 3600,
                    "perf/data_wait_fraction": window["wait"] / span,
                    "train/nonfinite_skipped": nonfinite_total, "train/epoch": step / steps_per_epoch if steps_per_epoch else 0,
                    **{f"data/{k}": v for k, v in data_stats.items()},
                }
                if device.type == "cuda":
                    record["perf/gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    torch.cuda.reset_peak_memory_stats(device)
                if wandb_run is not None:
                    wandb_run.log(record, step=step)
                done = step - start_step
                eta = (cfg.train.steps - step) * (time.perf_counter() - t_start) / max(1, done)
                extras = " | ".join(f"{k} {v:.3g}" for k, v in model_metrics.items())
                print(f"step {step}/{cfg.train.steps} | loss {record['train/loss']:.4f} | lr {lr:.2e} | "
                      f"gnorm {gnorm:.3g}" + (f" | {extras}" if extras else "")
                      + f" | {clips_s:.1f} clips/s | wait {100 * record['perf/data_wait_fraction']:.1f}% | "
                      f"skipped {nonfinite_total} | eta {fmt_duration(eta)}", flush=True)
                window = {k: 0 if isinstance(v, int) else 0.0 for k, v in window.items()}

            if nonfinite_run >= cfg.train.max_nonfinite:
                last_ckpt = write_checkpoint()
                raise TrainingDiverged(
                    f"the loss was non-finite for {nonfinite_run} steps in a row (step {step}, "
                    f"{nonfinite_total} skipped in all); checkpoint {last_ckpt}. Lower --optim.lr, set "
                    f"--optim.grad_clip, or resume from an earlier checkpoint in {ckpt_dir}"
                )
            if stop_requested:
                status = "stopped"
                last_ckpt = write_checkpoint()
                if master:
                    print(f"[train] stop requested: checkpoint {last_ckpt} written at step {step}; "
                          "continue with --resume auto", flush=True)
                break
            if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
                last_ckpt = write_checkpoint()
        finished_cleanly = True
    except torch.OutOfMemoryError as exc:
        advice = oom_advice(cfg, world, micro_batch, crop, step)
        print(f"[train] rank {rank}: {advice}", file=sys.stderr, flush=True)
        raise RuntimeError(advice) from exc
    finally:
        stop.restore()
        if wandb_run is not None:
            wandb_run.finish(exit_code=0 if finished_cleanly else 1)
        close = getattr(stream_iter, "close", None)
        if callable(close):
            close()  # stops the loader's worker processes now rather than at garbage collection
        if we_initialised_dist:
            dist.destroy_process_group()

    # ---- summary ------------------------------------------------------------------------------
    span = max(totals["time"], 1e-9)
    summary = {
        "status": status, "preset": cfg.preset, "arch": cfg.arch, "world_size": world, "device": device.type,
        "step": step, "steps_run": step - start_step, "resumed_from": resume_url,
        "first_loss": first_loss, "last_loss": last_loss, "nonfinite_skipped": nonfinite_total,
        "wall_s": time.perf_counter() - t_start, "steps_per_s": (step - start_step) / span,
        "clips_per_s": totals["clips"] / span, "audio_hours_per_s": totals["clips"] * views * clip_seconds / 3600 / span,
        "data_wait_fraction": totals["wait"] / span, "n_params": n_params,
        "loader_stats": loader_stats_numbers(loader.stats()), "audio_examples_logged": audio_logged,
        "checkpoint": last_ckpt, "metrics": metrics_path, "wandb_run_id": run_id,
        "wandb_dir": wandb_run.dir if wandb_run is not None else None,
    }
    if master:
        fsio.write_bytes_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=2).encode())
    return summary


def print_summary(s: dict[str, Any]) -> None:
    def f(x: Any, spec: str) -> str:
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)

    lines = [
        f"== {s['preset']} ({s['arch']}): {s['status']} at step {s['step']} ==",
        f"  steps this run     {s['steps_run']} on {s['world_size']} x {s['device']}"
        + (f" (resumed from {s['resumed_from']})" if s["resumed_from"] else ""),
        f"  loss (one step)    first {f(s['first_loss'], '.4f')} -> last {f(s['last_loss'], '.4f')}",
        f"  non-finite skipped {s['nonfinite_skipped']}",
        f"  loop time          {fmt_duration(s['wall_s'])}  ({f(s['steps_per_s'], '.2f')} steps/s, "
        f"{f(s['clips_per_s'], '.1f')} clips/s, {f(s['audio_hours_per_s'], '.4f')} audio-h/s)",
        f"  data wait          {100 * s['data_wait_fraction']:.1f}% of step time",
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
        "  torchrun --standalone --nproc_per_node=8 train.py --config clmr_mtat --resume auto",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, metavar="PRESET", help=f"preset: {', '.join(tc.PRESETS)}")
    p.add_argument("--resume", default=None, metavar="auto|none|URL",
                   help="auto: continue from the newest checkpoint in --checkpoint.dir (if any); or a ckpt URL")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as overridable flags and exit")
    return p


def config_from_argv(argv: list[str]) -> tuple[Config, bool]:
    """Parse the command line into a resolved config; ``(config, print_only)``."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    overrides: list[str] = []
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--") or "." not in item.split("=", 1)[0]:
            raise ValueError(f"unrecognised argument {item!r}: overrides look like --section.key=value (see --print-config)")
        if "=" not in item:
            if i + 1 >= len(rest):
                raise ValueError(f"{item} needs a value: {item}=VALUE")
            item = f"{item}={rest[i + 1]}"
            i += 1
        overrides.append(item)
        i += 1
    if args.resume is not None:
        overrides.append(f"--checkpoint.resume={args.resume}")
    cfg = tc.apply_overrides(tc.preset(args.config), overrides)
    return cfg, args.print_config


def main(argv: list[str] | None = None) -> int:
    """Entry point: every failure is one line (``--debug`` or MUSICSSL_DEBUG=1 shows the traceback)."""
    from pipeline.errors import run_cli

    return run_cli(_main, argv, "train.py")


def _main(argv: list[str]) -> int:
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg, print_only = config_from_argv(argv)
    except ValueError as exc:
        if rank == 0:
            print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    if print_only:
        print("\n".join(tc.describe(cfg)))
        return 0
    try:
        summary = train(cfg)
    except ConfigError as exc:  # problems found at start (the message names the flag)
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
