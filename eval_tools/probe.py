"""Probes on frozen embeddings, MARBLE's protocol: a linear layer or a one-hidden-layer MLP trained
with Adam (lr 1e-3) and early stopping on the valid split; the test split is scored once, with the
weights of the best valid epoch.

Features are standardised with the training split's mean and std first, so one learning rate suits
encoders whose embeddings live on very different scales (log-mel statistics vs a SampleCNN).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from eval_tools import metrics


@dataclass(kw_only=True)
class Task:
    """One downstream target: a manifest label field and how it is scored."""

    name: str  # manifest label field, e.g. "pitch", "instrument_family_str", "tags"
    kind: str  # "class" (softmax, accuracy) or "multi_hot" (sigmoid, macro ROC-AUC / PR-AUC)
    names: list = field(default_factory=list)  # class or tag names, from the manifest spec

    def __post_init__(self) -> None:
        if self.kind not in ("class", "multi_hot"):
            raise ValueError(f"task {self.name!r}: kind must be 'class' or 'multi_hot', got {self.kind!r}")
        if not self.names:
            raise ValueError(f"task {self.name!r}: the manifest's label spec lists no names")

    @property
    def primary(self) -> str:
        """The metric early stopping and tables use first."""
        return "accuracy" if self.kind == "class" else "roc_auc"


@dataclass(kw_only=True)
class ProbeConfig:
    probe: str = "linear"  # "linear" or "mlp" (one hidden layer)
    hidden: int = 512
    dropout: float = 0.2  # MLP only
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    max_epochs: int = 200
    patience: int = 20  # epochs without a better valid score before stopping
    seed: int = 0

    def __post_init__(self) -> None:
        if self.probe not in ("linear", "mlp"):
            raise ValueError(f"--probe must be 'linear' or 'mlp', got {self.probe!r}")
        if self.lr <= 0 or self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise ValueError("--lr, --batch-size, --max-epochs and --patience must be positive")


def valid_rows(task: Task, y: np.ndarray) -> np.ndarray:
    """Rows that carry a label for ``task`` (class index >= 0; any row for multi_hot)."""
    y = np.asarray(y)
    if task.kind == "class":
        return np.flatnonzero(y >= 0)
    return np.arange(len(y))


def score(task: Task, y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Metrics of ``probs`` (``(N, K)`` softmax or sigmoid outputs) against labels ``y``."""
    rows = valid_rows(task, y)
    y, probs = np.asarray(y)[rows], np.asarray(probs)[rows]
    if task.kind == "class":
        return {"accuracy": metrics.accuracy(y, probs.argmax(axis=1)), "n": int(len(y))}
    return {"roc_auc": metrics.macro_roc_auc(y, probs), "pr_auc": metrics.macro_pr_auc(y, probs), "n": int(len(y))}


class Probe(nn.Module):
    """Standardisation + linear layer or MLP; ``forward`` returns logits."""

    def __init__(self, *, dim: int, n_out: int, cfg: ProbeConfig, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        if cfg.probe == "linear":
            self.net = nn.Linear(dim, n_out)
        else:
            self.net = nn.Sequential(nn.Linear(dim, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, K)
        return self.net((x - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, x: np.ndarray, kind: str) -> np.ndarray:
        """Probabilities ``(N, K)``: softmax for ``class``, sigmoid for ``multi_hot``."""
        self.eval()
        logits = self(torch.as_tensor(np.asarray(x), dtype=torch.float32))
        return (logits.softmax(-1) if kind == "class" else logits.sigmoid()).numpy()


@dataclass
class ProbeFit:
    probe: Probe
    best_epoch: int
    epochs_run: int
    valid: dict[str, float]
    history: list[float]  # valid primary metric per epoch


def _loss_fn(task: Task) -> nn.Module:
    return nn.CrossEntropyLoss() if task.kind == "class" else nn.BCEWithLogitsLoss()


def train_probe(task: Task, x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray, cfg: ProbeConfig) -> ProbeFit:
    """Fit a probe on ``(x_train, y_train)``; keep the epoch with the best valid primary metric."""
    # A probe's matmuls are tiny: one thread avoids OpenMP sync overhead that otherwise costs
    # more than the arithmetic (measured 10x slower with 2 threads on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_probe(task, x_train, y_train, x_valid, y_valid, cfg)
    finally:
        torch.set_num_threads(threads)


def _train_probe(task: Task, x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray, cfg: ProbeConfig) -> ProbeFit:
    rows = valid_rows(task, y_train)
    if len(rows) == 0:
        raise ValueError(f"task {task.name!r}: no labelled training rows; check the manifest's label spec")
    vrows = valid_rows(task, y_valid)
    if len(vrows) == 0:
        raise ValueError(f"task {task.name!r}: the valid split has no labelled rows; early stopping needs some")
    x = np.asarray(x_train, dtype=np.float32)[rows]
    y = np.asarray(y_train)[rows]
    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-6
    torch.manual_seed(cfg.seed)
    probe = Probe(dim=x.shape[1], n_out=len(task.names), cfg=cfg, mean=mean, std=std)
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = _loss_fn(task)
    xt = torch.from_numpy(x)
    yt = torch.as_tensor(y, dtype=torch.long if task.kind == "class" else torch.float32)
    gen = torch.Generator().manual_seed(cfg.seed)
    best_key: tuple[float, float] | None = None
    best_metric, best_metric_epoch = -np.inf, 0
    best_state, best_epoch, best_valid = None, 0, {}
    history: list[float] = []
    xv = torch.as_tensor(np.asarray(x_valid, dtype=np.float32)[vrows])
    yv_np = np.asarray(y_valid)[vrows]
    yv = torch.as_tensor(yv_np, dtype=torch.long if task.kind == "class" else torch.float32)
    epoch = 0
    for epoch in range(1, cfg.max_epochs + 1):
        probe.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            loss = loss_fn(probe(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        probe.eval()
        with torch.no_grad():
            logits = probe(xv)
            vloss = float(loss_fn(logits, yv))
            probs = (logits.softmax(-1) if task.kind == "class" else logits.sigmoid()).numpy()
        valid = score(task, yv_np, probs)
        valid["loss"] = vloss
        prim = valid[task.primary]
        prim = -1.0 if not np.isfinite(prim) else prim
        history.append(prim)
        key = (prim, -vloss)  # ties in the metric go to the lower valid loss
        if best_key is None or key > best_key:
            best_key, best_epoch, best_valid = key, epoch, valid
            best_state = copy.deepcopy(probe.state_dict())
        # patience counts epochs without a better metric: a saturated accuracy with a still
        # falling loss must not keep training forever
        if prim > best_metric:
            best_metric, best_metric_epoch = prim, epoch
        elif epoch - best_metric_epoch >= cfg.patience:
            break
    probe.load_state_dict(best_state)
    return ProbeFit(probe=probe, best_epoch=best_epoch, epochs_run=epoch, valid=best_valid, history=history)
