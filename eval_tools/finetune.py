"""Training an encoder with labels: fine-tuning a pretrained encoder, and the supervised baseline.

Both are the same loop: the encoder's mean-pooled output (``embed()["pooled"]``: the last layer
mean-pooled over time, as the wav2vec2-music paper fine-tunes on NSynth) feeds one linear head per
task; cross-entropy for ``class`` tasks, binary cross-entropy for ``multi_hot`` tasks, summed. The
encoder has its own learning rate (fine-tuning: small; the supervised baseline trains a random
init, so encoder and heads share one rate). Training runs on random crops of the training clips
(crop length = the encoder's training crop) and is stopped by a step count and, optionally, a
wall-clock budget; every ``eval_every`` steps the whole valid clips are scored (crops averaged, as
in probing) and the best-scoring weights are kept.

The training clips are held in memory (one float32 array per clip). That suits NSynth-sized and
demo data; a full MTAT train split at 16 kHz takes ~30 GB.
"""

from __future__ import annotations

import dataclasses

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from eval_tools.data import Dataset, iter_clips
from eval_tools.encoders import Encoder
from eval_tools.probe import Task, score, valid_rows
from eval_tools.subset import label_fraction_subset
from pipeline.errors import UserError


@dataclass(kw_only=True)
class FinetuneConfig:
    steps: int = 500
    seconds: float | None = None  # stop after this wall-clock budget too (None = steps only)
    batch_size: int = 32
    head_lr: float = 1e-3
    encoder_lr: float = 1e-4
    weight_decay: float = 0.0
    eval_every: int = 100
    crop_samples: int | None = None  # None = the encoder's training crop length
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("--steps, --batch-size and --eval-every must be >= 1")
        if self.head_lr <= 0 or self.encoder_lr < 0:
            raise ValueError("--head-lr must be > 0 and --encoder-lr >= 0 (0 freezes the encoder)")


class ClipBank:
    """The training clips of a split in memory, with their encoded labels, for random crops."""

    def __init__(self, ds: Dataset, split: str, sample_rate: int, tasks: list[Task], *, fraction: float = 1.0, seed: int = 0):
        """``fraction`` < 1 keeps, per task, the stable class-balanced subset of its labels
        (``--label-fraction``, the same subset probes use); each task's loss masks the other rows."""
        self.clips: list[np.ndarray] = []
        self.keys: list[str] = []
        labels: dict[str, list] = {t.name: [] for t in tasks}
        for key, audio, lab in iter_clips(ds, split, sample_rate):
            self.keys.append(key)
            self.clips.append(audio)
            for t in tasks:
                labels[t.name].append(lab[t.name])
        if not self.clips:
            raise ValueError(f"{ds.manifests[split]}: no training clips to fine-tune on")
        self.label_arrays = {k: np.stack([np.asarray(v) for v in vals]) for k, vals in labels.items()}
        self.mask_arrays = {}
        for t in tasks:
            y = self.label_arrays[t.name]
            rows = valid_rows(t, y)
            if fraction < 1.0:
                rows = rows[label_fraction_subset([self.keys[i] for i in rows], y[rows], fraction, kind=t.kind, seed=seed)]
            mask = np.zeros(len(y), dtype=bool)
            mask[rows] = True
            self.mask_arrays[t.name] = mask

    @property
    def labelled_rows(self) -> dict[str, int]:
        return {k: int(m.sum()) for k, m in self.mask_arrays.items()}

    def batch(self, rng: np.random.Generator, batch_size: int, crop: int, min_samples: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Random crops of ``crop`` samples; shorter clips are taken whole and the batch is only as
        wide as its longest clip (at least ``min_samples``), with ``lengths`` for the model's masks."""
        idx = rng.integers(0, len(self.clips), batch_size)
        width = max(min_samples, min(crop, max(len(self.clips[i]) for i in idx)))
        out = np.zeros((batch_size, width), dtype=np.float32)
        lengths = np.empty(batch_size, dtype=np.int64)
        for j, i in enumerate(idx):
            c = self.clips[i]
            if len(c) <= width:
                out[j, : len(c)] = c
            else:
                s = int(rng.integers(0, len(c) - width + 1))
                out[j] = c[s : s + width]
            lengths[j] = max(min_samples, min(len(c), width))
        labels = {}
        for k, arr in self.label_arrays.items():
            v = arr[idx]
            labels[k] = torch.as_tensor(v, dtype=torch.long if v.ndim == 1 else torch.float32)
            labels[k + "__mask"] = torch.as_tensor(self.mask_arrays[k][idx])
        return torch.from_numpy(out), torch.from_numpy(lengths), labels


class Heads(nn.Module):
    def __init__(self, dim: int, tasks: list[Task]):
        super().__init__()
        self.tasks = tasks
        self.heads = nn.ModuleDict({t.name: nn.Linear(dim, len(t.names)) for t in tasks})

    def forward(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(pooled) for name, head in self.heads.items()}


def as_saved_heads(heads: Heads) -> list:
    """The fine-tuned linear heads as eval_tools/heads.py ``Head`` objects (no standardisation)."""
    from eval_tools.heads import Head
    from eval_tools.probe import Probe, ProbeConfig

    out = []
    for t in heads.tasks:
        lin = heads.heads[t.name]
        probe = Probe(dim=lin.in_features, n_out=lin.out_features, cfg=ProbeConfig(probe="linear"),
                      mean=np.zeros(lin.in_features), std=np.ones(lin.in_features))
        probe.net.load_state_dict({k: v.detach().cpu() for k, v in lin.state_dict().items()})
        out.append(Head(task=t, probe=probe.eval()))
    return out


def _loss(tasks: list[Task], logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    total = logits[tasks[0].name].sum() * 0.0  # keeps the graph when a batch has no usable label
    for t in tasks:
        mask = labels[t.name + "__mask"]
        if t.kind == "class":
            y = torch.where(mask, labels[t.name], -1)
            if (y >= 0).any():
                total = total + nn.functional.cross_entropy(logits[t.name], y, ignore_index=-1)
        elif mask.any():
            total = total + nn.functional.binary_cross_entropy_with_logits(logits[t.name][mask], labels[t.name][mask])
    return total


def _step(enc: Encoder, heads: Heads, tasks: list[Task], opt: torch.optim.Optimizer, x: torch.Tensor, lengths: torch.Tensor,
          y: dict[str, torch.Tensor]) -> torch.Tensor:
    dev = enc.device
    pin = dev.type == "cuda"
    x, lengths = x.to(dev, non_blocking=pin), lengths.to(dev, non_blocking=pin)
    y = {k: v.to(dev, non_blocking=pin) for k, v in y.items()}
    with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=enc.precision == "bf16"):
        # CLMR crops are never padded past min_samples and its embed takes no lengths
        out = enc.model.embed(x, lengths) if enc.arch != "clmr" else enc.model.embed(x)
        logits = heads(out["pooled"])
    loss = _loss(tasks, {k: v.float() for k, v in logits.items()}, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def evaluate_heads(enc: Encoder, heads: Heads, ds: Dataset, split: str, tasks: list[Task]) -> dict[str, dict]:
    """Score the heads on whole clips (the clip embedding is the encoder's crop average)."""
    from eval_tools.extract import extract

    # the heads were trained on embed()["pooled"] (the last layer): score them on that, whatever
    # layer choice the encoder carries for probing (wav2vec2's layer="all" gives (N, L, D))
    emb = extract(dataclasses.replace(enc, layer=-1), ds, split, cache_dir=None, progress=False)
    heads.eval()
    out = {}
    with torch.no_grad():
        logits = heads(torch.as_tensor(emb.x, dtype=torch.float32, device=enc.device))
    for t in tasks:
        lg = logits[t.name].float()
        probs = (lg.softmax(-1) if t.kind == "class" else lg.sigmoid()).cpu().numpy()
        out[t.name] = score(t, emb.labels[t.name], probs)
    return out


def _mean_primary(res: dict[str, dict], tasks: list[Task]) -> float:
    vals = [res[t.name][t.primary] for t in tasks]
    return float(np.nanmean(vals)) if np.isfinite(vals).any() else -1.0


def finetune(enc: Encoder, ds: Dataset, tasks: list[Task], cfg: FinetuneConfig, *, fraction: float = 1.0,
             progress: bool = True) -> dict:
    """Train ``enc.model`` (in place) with linear heads; returns the run's summary.

    ``fraction`` < 1 restricts each task's training labels (``--label-fraction``). The encoder ends with the
    weights of the best valid evaluation; the summary holds valid/test scores of the heads."""
    from tqdm import tqdm

    model = enc.model
    if model is None:
        raise ValueError("fine-tuning needs a neural encoder, not log-mel statistics")
    crop = int(cfg.crop_samples or enc.crop_samples or enc.window)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    bank = ClipBank(ds, "train", enc.sample_rate, tasks, fraction=fraction, seed=cfg.seed)
    model.eval()
    with torch.no_grad():
        dim = model.embed(torch.zeros(2, max(enc.min_samples, 16), device=enc.device))["pooled"].shape[-1]
    heads = Heads(dim, tasks).to(enc.device)
    groups = [{"params": heads.parameters(), "lr": cfg.head_lr}]
    if cfg.encoder_lr > 0:
        groups.append({"params": model.parameters(), "lr": cfg.encoder_lr})
    else:
        model.requires_grad_(False)
    opt = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    best = (-np.inf, None, None, 0)
    history = []
    t0 = time.perf_counter()
    eval_seconds = 0.0
    step = 0
    bar = tqdm(total=cfg.steps, desc=f"train {enc.name}", unit="step", disable=not progress, leave=False)
    while step < cfg.steps:
        model.train(cfg.encoder_lr > 0)
        heads.train()
        x, lengths, y = bank.batch(rng, cfg.batch_size, crop, enc.min_samples)
        try:
            loss = _step(enc, heads, tasks, opt, x, lengths, y)
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory on {enc.device} fine-tuning {cfg.batch_size} crops of up to {x.shape[1]} samples; "
                            "lower --batch-size (or --supervised-batch-size)") from None
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        out_of_time = cfg.seconds is not None and time.perf_counter() - t0 >= cfg.seconds
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            t_eval = time.perf_counter()
            model.eval()
            valid = evaluate_heads(enc, heads, ds, "valid", tasks)
            eval_seconds += time.perf_counter() - t_eval
            m = _mean_primary(valid, tasks)
            history.append({"step": step, "loss": loss.item(), "valid": m})
            if m > best[0]:
                best = (m, copy.deepcopy(model.state_dict()), copy.deepcopy(heads.state_dict()), step)
        if out_of_time:
            break
    bar.close()
    train_seconds = time.perf_counter() - t0
    model.load_state_dict(best[1])
    heads.load_state_dict(best[2])
    model.eval()
    model.requires_grad_(True)
    return {
        "heads": heads, "steps": step, "best_step": best[3], "train_seconds": train_seconds,
        "loop_seconds": train_seconds - eval_seconds, "history": history,
        "train_clips": len(bank.clips), "labelled_rows": bank.labelled_rows, "valid": evaluate_heads(enc, heads, ds, "valid", tasks),
        "test": evaluate_heads(enc, heads, ds, "test", tasks),
    }
