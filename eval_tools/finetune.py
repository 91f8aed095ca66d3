"""Training an encoder with labels: fine-tuning a pretrained encoder, and the supervised baseline.

Fine-tuning is training: both train ``models.supervised.Supervised`` (the encoder's pooled output,
one linear head per task; cross-entropy for ``class`` tasks, binary cross-entropy for
``multi_hot`` ones, summed) with the trainer's own machinery (``training/``), not a loop of their
own:

- the data: ``pipeline.loader.StreamingLoader`` over the training shards (this rank's share under
  torchrun): random crops of the encoder's training crop length (shorter clips whole, padded,
  with ``lengths``) shuffled through the loader's bounded buffer, so memory does not grow with the
  split (tests/test_eval_finetune.py: the peak RSS of a 4x larger training split);
- the step: ``training.step.TrainStep`` (bf16 autocast per ``--precision``, DDP under torchrun,
  one all-reduce a step); the encoder has its own learning rate (fine-tuning: small; 0 freezes it
  and keeps it in eval mode; the supervised baseline trains a random init with one rate for all);
- the run: ``training.log.RunLogger`` (console, ``<run_dir>/metrics.jsonl``, W&B offline or
  online) and ``training.checkpoint`` (``<run_dir>/checkpoints/ckpt-<step>.pt``: model, optimizer,
  every rank's data position and RNG, the best weights so far and the valid history, so
  ``resume="auto"`` continues with the losses an uninterrupted run has);
- selection: every ``eval_every`` steps the whole valid clips are scored (all ranks embed their
  share, crops or windows averaged as in probing) and the best weights are kept; the test split is
  scored once, at the end, with them.

``--label-fraction`` < 1 keeps, per task, the stable class-balanced subset of the training labels
that probes use; finding it reads the training split's sample JSON once (audio bytes are passed
over, not decoded); the other rows' labels are masked out of that task's loss.

Defaults are sized for NSynth (289,205 training notes): 20,000 steps of 32 crops, about 2.2
epochs, the valid split scored (and a checkpoint written) every 1,000 steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from eval_tools.data import Dataset
from eval_tools.encoders import Encoder
from eval_tools.probe import Task, score, valid_rows
from eval_tools.read import ReadReport, iter_split
from eval_tools.runtime import Runtime, broadcast_from_main
from eval_tools.subset import label_fraction_subset
from models.supervised import Supervised, SupervisedConfig, TaskHead
from pipeline.errors import UserError


@dataclass(kw_only=True)
class FinetuneConfig:
    steps: int = 20_000
    seconds: float | None = None  # stop after this wall-clock budget too (None = steps only)
    batch_size: int = 32  # crops per optimizer step over all ranks
    head_lr: float = 1e-3
    encoder_lr: float = 1e-4
    weight_decay: float = 0.0
    eval_every: int = 1_000
    checkpoint_every: int | None = None  # None = eval_every (checkpoints also at the end and on SIGTERM)
    keep: int = 2  # newest checkpoints kept
    log_every: int = 100  # console line (and W&B scalars) every N steps
    crop_samples: int | None = None  # None = the encoder's training crop length
    num_workers: int = 4  # loader worker processes per rank (0 = decode in this process)
    shuffle_buffer: int = 256  # samples (compressed bytes) each loader worker holds for shuffling: the memory bound
    min_read: float = 0.99  # refuse a valid/test split that read less of its samples (0: score on whatever was read)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1 or self.log_every < 1:
            raise ValueError("--steps, --batch-size, --eval-every and --log-every must be >= 1")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.head_lr <= 0 or self.encoder_lr < 0:
            raise ValueError("--head-lr must be > 0 and --encoder-lr >= 0 (0 freezes the encoder)")
        if self.num_workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.num_workers}")
def label_subsets(ds: Dataset, tasks: list[Task], fraction: float, seed: int) -> dict[str, set[str]]:
    """Per task, the training keys whose labels are kept at ``fraction`` (one pass over the JSON)."""
    from pipeline.shards import LabelEncoder

    labels_of = LabelEncoder(ds.spec)
    keys: list[str] = []
    ys: dict[str, list] = {t.name: [] for t in tasks}
    report = ReadReport(source=ds.manifests["train"])
    for clip in iter_split(ds.manifests["train"], report, sample_rate=None, decode=False):
        keys.append(clip.key)
        lab = labels_of.encode(clip.meta)
        for t in tasks:
            ys[t.name].append(lab[t.name])
    out = {}
    for t in tasks:
        y = np.stack([np.asarray(v) for v in ys[t.name]])
        rows = valid_rows(t, y)
        if not (len(rows) if t.kind == "class" else (y > 0.5).any()):
            raise UserError(f"--tasks {t.name}: the train split of {ds.name} has no {t.name} labels ({len(keys)} clips "
                            f"in {ds.manifests['train']}); pick other --tasks or rebuild the split")
        sub = label_fraction_subset([keys[i] for i in rows], y[rows], fraction, kind=t.kind, seed=seed)
        out[t.name] = {keys[rows[i]] for i in sub}
    return out


def supervised_model(enc: Encoder, tasks: list[Task], *, freeze_encoder: bool = False) -> Supervised:
    """``enc.model`` with one head per task (the encoder is shared with ``enc``, not copied)."""
    heads = tuple(TaskHead(name=t.name, kind=t.kind, classes=len(t.names)) for t in tasks)
    # the heads read embed()["pooled"] (the last layer), whatever features the encoder probes
    # (CLMR's layer="concat" is wider)
    dim = dataclasses.replace(enc, layer=-1, pool="mean").dim
    cfg = SupervisedConfig(tasks=heads, takes_lengths=enc.arch != "clmr", freeze_encoder=freeze_encoder)
    return Supervised(enc.model, cfg, dim=dim).to(enc.device)




def _loader(enc: Encoder, ds: Dataset, cfg: FinetuneConfig, crop: int, rt: Runtime):
    from pipeline.loader import LoaderConfig, StreamingLoader

    lc = LoaderConfig(manifests=[ds.manifests["train"]], batch_size=cfg.batch_size // rt.world_size, mode="single",
                      crop_samples=crop, variable_length=True, pad_to="longest", short_policy="pad",
                      sample_rate=enc.sample_rate, mono=True, num_workers=cfg.num_workers,
                      shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, pin_memory=enc.device.type == "cuda")
    return StreamingLoader(lc, rank=rt.rank, world_size=rt.world_size)


class Prepare:
    """A loader batch -> the model's input, on the device: at least ``min_samples`` wide,
    ``lengths`` at least ``min_samples`` (shorter clips' padding counts as signal, as in
    extraction), labels outside the label fraction masked; counts the labelled rows per task."""

    def __init__(self, enc: Encoder, tasks: list[Task], subsets: dict[str, set[str]] | None):
        self.device, self.min_samples, self.tasks, self.subsets = enc.device, enc.min_samples, tasks, subsets
        self.seen = {t.name: torch.zeros((), dtype=torch.int64, device=enc.device) for t in tasks}

    def __call__(self, batch: dict, micro: int) -> dict:
        from training.step import to_device

        batch = to_device(batch, self.device)
        audio, lengths = batch["audio"], batch["lengths"]
        if audio.shape[-1] < self.min_samples:
            audio = nn.functional.pad(audio, (0, self.min_samples - audio.shape[-1]))
        labels = dict(batch["labels"])
        for t in self.tasks:
            keep = None
            if self.subsets is not None:
                keep = torch.tensor([k in self.subsets[t.name] for k in batch["keys"]], device=self.device)
                if t.kind == "class":
                    labels[t.name] = torch.where(keep, labels[t.name], -1)
                else:
                    labels[f"{t.name}__mask"] = keep
            y = labels[t.name]
            # labelled rows the loss sees, counted on the device (no host sync); for tags, rows with a
            # positive tag (a split whose clips carry no tag at all teaches nothing)
            if t.kind == "class":
                self.seen[t.name] += (y >= 0).sum()
            else:
                positive = (y > 0).any(-1)
                self.seen[t.name] += (positive & keep).sum() if keep is not None else positive.sum()
        return {"audio": audio, "lengths": lengths.clamp_min(self.min_samples), "labels": labels}


def evaluate_heads(enc: Encoder, heads: nn.ModuleDict, ds: Dataset, split: str, tasks: list[Task], min_read: float = 0.0,
                   rt: Runtime | None = None) -> dict[str, dict]:
    """Score the heads on whole clips (the clip embedding is the encoder's piece average); every
    rank embeds its share and gets rank 0's scores. A task without labels in ``split`` is a
    :class:`UserError` naming both."""
    from eval_tools.extract import LOCAL, extract

    rt = rt or dataclasses.replace(LOCAL, device=enc.device, precision=enc.precision)
    # the heads were trained on embed()["pooled"] (the last layer): score them on that, whatever
    # layer choice the encoder carries for probing (wav2vec2's layer="all" gives (N, L, D))
    emb = extract(dataclasses.replace(enc, layer=-1, pool="mean"), ds, split, cache_dir=None, progress=False, min_read=min_read, rt=rt)
    out, problem = None, None
    if emb is not None:
        heads.eval()
        out = {}
        with torch.no_grad():
            x = torch.as_tensor(emb.x, dtype=torch.float32, device=enc.device)
            for t in tasks:
                y = emb.labels.get(t.name, np.zeros((0,)))
                if not len(emb.keys) or not ((y >= 0).any() if t.kind == "class" else (y > 0.5).any()):
                    problem = (f"--tasks {t.name}: the {split} split of {ds.name} has no {t.name} labels ({len(emb.keys)} "
                               f"clips read from {ds.manifests[split]}); pick other --tasks or rebuild the split")
                    break
                lg = heads[t.name](x).float()
                probs = (lg.softmax(-1) if t.kind == "class" else lg.sigmoid()).cpu().numpy()
                out[t.name] = score(t, y, probs)
    problem = broadcast_from_main(problem, rt)
    if problem:
        raise UserError(problem)
    return broadcast_from_main(out, rt)


def _mean_primary(res: dict[str, dict], tasks: list[Task]) -> float:
    vals = [res[t.name][t.primary] for t in tasks]
    return float(np.nanmean(vals)) if np.isfinite(vals).any() else -1.0


def _scalars(res: dict[str, dict]) -> dict[str, dict[str, float]]:
    """The scalar scores (plain floats: a checkpoint holds no numpy objects)."""
    def plain(v: Any) -> int | float:
        return int(v) if isinstance(v, (int, np.integer)) else float(v)

    return {k: {m: plain(v) for m, v in d.items() if isinstance(v, (int, float, np.number))} for k, d in res.items()}


# What a resumed fine-tune must share with its checkpoint, and the flag that sets each.
RESUME_FIXED = {"tasks": "--tasks", "batch_size": "--batch-size", "seed": "--seed", "train_manifest": "--data",
                "crop_samples": "--crop-samples", "label_fraction": "--label-fraction",
                "encoder": "--checkpoint/--preset", "freeze_encoder": "--encoder-lr"}


def _restore(state: dict, url: str, fixed: dict, env: Any, *, raw: nn.Module, optimizer: Any, scheduler: Any, stream: Any,
             logger: Any, prepare: Prepare) -> tuple[int, str | None, dict, dict, list, bool]:
    """Load a fine-tune checkpoint into the run's parts; ``(step, W&B run id, this rank's RNG
    state, best, history, done)``. A checkpoint of another run is a ConfigError naming the flags."""
    from training import checkpoint
    from training.errors import ConfigError

    was = state.get("finetune") or {}
    changed = [f"{flag} ({was.get(k)!r} -> {fixed[k]!r})" for k, flag in RESUME_FIXED.items() if was.get(k) != fixed[k]]
    if changed:
        raise ConfigError(f"--resume: {url} cannot continue with a changed {'; '.join(changed)}; drop those changes, "
                          "or start afresh in another --out")
    raw.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    mine, exact = checkpoint.rank_state(state, env.rank, env.world)
    try:
        stream.load_state_dict(mine["loader"], strict=exact)
    except ValueError as exc:
        raise ConfigError(f"--resume: {url}: {exc}") from None
    logger.load_state_dict(state.get("counters", {}))
    for k, v in mine.get("labels_seen", {}).items():
        prepare.seen[k] += int(v)
    return (int(state["step"]), state.get("wandb_run_id"), mine["rng"], state["best"], list(state["history"]),
            bool(state.get("done")))


def finetune(enc: Encoder, ds: Dataset, tasks: list[Task], cfg: FinetuneConfig, *, run_dir: str, fraction: float = 1.0,
             resume: str = "none", rt: Runtime | None = None, progress: bool = True, wandb_mode: str = "disabled",
             wandb_project: str = "musicssl-eval", run_name: str = "finetune", batch_flag: str = "--batch-size") -> dict:
    """Train ``enc.model`` (in place) with one linear head per task; returns the run's summary.

    Every rank of a torchrun job calls this (``rt``; default: one process on ``enc.device``).
    ``run_dir`` gets ``metrics.jsonl``, ``checkpoints/`` and W&B's files; ``resume`` is ``none``
    (refused when ``run_dir`` already holds checkpoints), ``auto`` or a checkpoint URL. The
    encoder ends with the weights of the best valid evaluation; the summary holds the heads
    (``heads``, an ``nn.ModuleDict``), their valid/test scores and ``status`` (``completed``, or
    ``stopped`` after SIGTERM/Ctrl-C: checkpointed, no test scores). An out-of-memory is a
    :class:`UserError` naming ``batch_flag``."""
    import train_config as tc
    from eval_tools.extract import LOCAL
    from pipeline.loader import DevicePrefetcher
    from training import checkpoint
    from training.distributed import Dist, StopFlag
    from training.errors import ConfigError, DataStreamError
    from training.log import RunLogger
    from training.step import TrainStep, first_batch

    if enc.model is None:
        raise UserError("fine-tuning needs a neural encoder (--checkpoint or --preset), not log-mel statistics")
    rt = rt or dataclasses.replace(LOCAL, device=enc.device, precision=enc.precision)
    if cfg.batch_size % rt.world_size:
        raise ConfigError(f"{batch_flag} {cfg.batch_size} is not divisible by the {rt.world_size} ranks; "
                          f"use a multiple of {rt.world_size}")
    env = Dist(rank=rt.rank, world=rt.world_size, device=enc.device)
    crop = int(cfg.crop_samples or enc.crop_samples or enc.window)
    frozen = cfg.encoder_lr == 0
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    checkpoint.refuse_fresh_run(ckpt_dir, resume, flag="--out: run folder", elsewhere="in another --out")
    fixed = {"tasks": [t.name for t in tasks], "batch_size": cfg.batch_size, "seed": cfg.seed,
             "train_manifest": ds.manifests["train"], "crop_samples": crop, "label_fraction": fraction,
             "encoder": enc.ident, "freeze_encoder": frozen}

    subsets = label_subsets(ds, tasks, fraction, cfg.seed) if fraction < 1.0 else None
    raw, model, optimizer, scheduler = _build_model(enc, tasks, cfg, env, frozen=frozen)
    loader = _loader(enc, ds, cfg, crop, rt)
    stream = DevicePrefetcher(loader, env.device) if env.device.type == "cuda" else loader
    log_cfg = tc.LoggingConfig(every=cfg.log_every, wandb_mode=wandb_mode,
                               wandb_project=wandb_project, run_name=run_name, audio_every=0)
    config = {"finetune": dataclasses.asdict(cfg), **fixed, "encoder_config": enc.train_config}
    logger = RunLogger(log_cfg, env, out_dir=run_dir, total_steps=cfg.steps, run_name=run_name, config=config,
                       audio_seconds=crop / enc.sample_rate, steps_per_epoch=loader.steps_per_epoch, tag="finetune",
                       console=progress)
    prepare = Prepare(enc, tasks, subsets)

    say = print if env.master else (lambda _: None)
    url, state = checkpoint.resume_point(resume, ckpt_dir, say=say)
    step, run_id, rng, done = 0, None, None, False
    best: dict[str, Any] = {"step": 0, "score": -math.inf, "model": None}
    history: list[dict] = []
    if state is not None:
        step, run_id, rng, best, history, done = _restore(state, url, fixed, env, raw=raw, optimizer=optimizer,
                                                          scheduler=scheduler, stream=stream, logger=logger, prepare=prepare)
        say(f"[finetune] resuming from {url} at step {step} (best valid {best['score']:.4g} at step {best['step']})")
    del state
    logger.start(step=step, resumed=url is not None, run_id=run_id)

    def save(at: int, rewind: int = 0, done: bool = False) -> str | None:
        mine = {"loader": stream.state_dict(held=rewind), "rng": checkpoint.rng_state(env.device),
                "labels_seen": {k: int(v) for k, v in prepare.seen.items()}}

        def shared() -> dict[str, Any]:
            return {"model_name": "supervised", "model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "counters": logger.state_dict(), "finetune": fixed,
                    "run_config": config, "wandb_run_id": logger.run_id, "best": best, "history": history,
                    "done": done}

        return checkpoint.save_run(ckpt_dir, cfg.keep, env, step=at, mine=mine, shared=shared)

    def check_train_labels(at: int) -> None:
        seen = torch.stack([prepare.seen[t.name] for t in tasks]).float()
        env.all_reduce_(seen)
        for t, n in zip(tasks, seen.tolist()):
            if n == 0:
                what = "clip with a positive tag" if t.kind != "class" else f"{t.name} labels"
                raise UserError(f"--tasks {t.name}: the train split of {ds.name} gave no {what} in {at} steps "
                                f"({at * cfg.batch_size} crops from {ds.manifests['train']}); pick other --tasks or "
                                "rebuild the split")

    stop = StopFlag()
    stop.install()
    stream_iter: Any = iter(())  # a finished run (``done``) starts no loader workers
    batches, waited = stream_iter, 0.0
    try:
        if step < cfg.steps and not done:
            stream_iter = iter(stream)
            batches, waited = first_batch(stream_iter)
    except BaseException:
        stop.restore()
        raise
    checkpoint.seed_or_restore_rng(rng, seed=cfg.seed, rank=env.rank, device=env.device)
    train_step = TrainStep(model, optimizer, scheduler, env, precision=enc.precision, prepare=prepare)
    ckpt_every = cfg.checkpoint_every or cfg.eval_every
    start_step, status, last_ckpt, ok = step, "completed", url, False
    t0, eval_seconds = time.perf_counter(), 0.0
    try:
        while step < cfg.steps and not done:  # done: the checkpoint is a finished run's last (a --seconds budget)
            try:
                r = train_step(batches, stop=stop.reason is not None, waited=waited)
            except torch.OutOfMemoryError:
                raise UserError(f"out of memory on {env.device} fine-tuning {cfg.batch_size // env.world} crops of up to "
                                f"{crop} samples per rank; lower {batch_flag} (or --crop-samples)") from None
            waited = 0.0
            if r.data_failed:
                kept = save(step, rewind=r.consumed) if step > start_step else last_ckpt
                raise DataStreamError(f"the training stream failed in step {step + 1}: {r.data_error}; last checkpoint "
                                      f"{kept}; check the shards (`shard-tools verify`), then continue with --resume auto")
            step += 1
            logger.log_step(step, r, clips=cfg.batch_size, data_counters=loader.stats)
            out_of_time = bool(cfg.seconds is not None and env.broadcast_object(time.perf_counter() - t0 >= cfg.seconds))
            if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
                check_train_labels(step)
                t_eval = time.perf_counter()
                best = _score_valid(enc, raw, ds, tasks, cfg, rt, step=step, loss=float(r.loss), best=best,
                                    history=history, logger=logger, say=say)
                eval_seconds += time.perf_counter() - t_eval
            if r.stop:
                status, last_ckpt = "stopped", save(step)
                say(f"[finetune] stop requested: checkpoint {last_ckpt} at step {step}; continue with --resume auto")
                break
            if step % ckpt_every == 0 or step == cfg.steps or out_of_time:
                last_ckpt = save(step, done=step == cfg.steps or out_of_time)
            if out_of_time:
                break
        ok = True
    finally:
        stop.restore()
        logger.finish(ok)
        if callable(getattr(stream_iter, "close", None)):
            stream_iter.close()  # stops the loader's worker processes now
    train_seconds = time.perf_counter() - t0
    seen = torch.stack([prepare.seen[t.name] for t in tasks]).float()
    env.all_reduce_(seen)
    summary: dict[str, Any] = {
        "status": status, "steps": step, "steps_run": step - start_step, "resumed_from": url, "checkpoint": last_ckpt,
        "best_step": best["step"], "train_seconds": train_seconds, "loop_seconds": train_seconds - eval_seconds,
        "history": history, "crop_samples": crop, "world_size": env.world, "run_dir": run_dir,
        "labelled_rows": {k: len(v) for k, v in subsets.items()} if subsets is not None else None,
        "labels_seen": {t.name: int(n) for t, n in zip(tasks, seen.tolist())}, "loader": loader.stats(),
        "metrics": logger.metrics_path, "wandb_run_id": logger.run_id,
    }
    if status == "stopped":
        return summary
    return summary | _final_scores(enc, raw, ds, tasks, cfg, rt, best=best, run_dir=run_dir, master=env.master)


def _build_model(enc: Encoder, tasks: list[Task], cfg: FinetuneConfig, env, *, frozen: bool):
    """``(raw, model, optimizer, scheduler)``: the Supervised model (heads seeded alike on every
    rank), its DDP wrapper under torchrun (else itself), Adam with the heads' and the encoder's
    learning rates, and a constant schedule."""
    from training.step import constant_schedule

    torch.manual_seed(cfg.seed)  # the heads' init: the same on every rank
    raw = supervised_model(enc, tasks, freeze_encoder=frozen)
    groups = [{"params": list(raw.heads.parameters()), "lr": cfg.head_lr}]
    if not frozen:
        groups.append({"params": list(raw.encoder.parameters()), "lr": cfg.encoder_lr})
    optimizer = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    model: nn.Module = raw
    if env.world > 1:
        # the SSL model's own heads (projector, quantizer) are not in the supervised loss
        model = nn.parallel.DistributedDataParallel(raw, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                                    find_unused_parameters=True)
    return raw, model, optimizer, constant_schedule(optimizer)


def _score_valid(enc: Encoder, raw: Supervised, ds: Dataset, tasks: list[Task], cfg: FinetuneConfig, rt, *, step: int,
                 loss: float, best: dict[str, Any], history: list[dict], logger, say) -> dict[str, Any]:
    """Score the valid split at ``step`` (every rank embeds its share), log it, append it to
    ``history``; returns ``best`` or, when this step beats it, the new best (weights on the CPU)."""
    valid = _scalars(evaluate_heads(enc, raw.heads, ds, "valid", tasks, cfg.min_read, rt))
    m = _mean_primary(valid, tasks)
    history.append({"step": step, "loss": loss, "valid": m, "scores": valid})
    logger.log_eval(step, {"valid/score": m, **{f"valid/{k}/{mk}": v for k, d in valid.items() for mk, v in d.items()}})
    say(f"[finetune] step {step}: valid {m:.4f}" + (" (best so far)" if m > best["score"] else ""))
    if m <= best["score"]:
        return best
    return {"step": step, "score": m, "model": {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}}


def _final_scores(enc: Encoder, raw: Supervised, ds: Dataset, tasks: list[Task], cfg: FinetuneConfig, rt, *,
                  best: dict[str, Any], run_dir: str, master: bool) -> dict[str, Any]:
    """Load the best valid weights, score valid and test once (rank 0 writes ``scores.json``);
    returns the summary's ``heads``, ``valid`` and ``test``."""
    if best["model"] is not None:
        raw.load_state_dict(best["model"])
    raw.eval()
    raw.encoder.requires_grad_(True)  # the encoder leaves as it came (a frozen one had its gradients switched off)
    out = {"heads": raw.heads,
           "valid": evaluate_heads(enc, raw.heads, ds, "valid", tasks, cfg.min_read, rt),
           "test": evaluate_heads(enc, raw.heads, ds, "test", tasks, cfg.min_read, rt)}
    if master:
        with open(os.path.join(run_dir, "scores.json"), "w") as f:
            json.dump({"best_step": best["step"], "valid": _scalars(out["valid"]), "test": _scalars(out["test"])}, f, indent=2)
    return out


def as_saved_heads(heads: nn.ModuleDict, tasks: list[Task]) -> list:
    """The fine-tuned linear heads as eval_tools/heads.py ``Head`` objects (no standardisation)."""
    from eval_tools.heads import Head
    from eval_tools.probe import Probe, ProbeConfig

    out = []
    for t in tasks:
        lin = heads[t.name]
        probe = Probe(dim=lin.in_features, n_out=lin.out_features, cfg=ProbeConfig(probe="linear"),
                      mean=np.zeros(lin.in_features), std=np.ones(lin.in_features))
        probe.net.load_state_dict({k: v.detach().cpu() for k, v in lin.state_dict().items()})
        out.append(Head(task=t, probe=probe.eval()))
    return out


__all__ = ["FinetuneConfig", "finetune", "evaluate_heads", "as_saved_heads", "label_subsets", "supervised_model"]
