"""Probes on frozen embeddings: a linear layer or a one-hidden-layer MLP trained with Adam, early
stopping on the valid split, or (``logreg``) a linear layer fitted to convergence by full-batch
L-BFGS with an L2 penalty chosen on the valid split; the test split scored once. What varies between
the evaluation protocols (standardisation, widths, optimiser, schedule, what early stopping
follows, best or last weights, a learned layer mix) is a :class:`ProbeConfig`;
eval_tools/protocols.py sets it per protocol and cites where each value comes from.
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


PROBES = ("linear", "mlp", "logreg")
# 1e-4 .. 1 in half decades: with n training rows, sklearn's LogisticRegression(C) is l2 = 1 / (C * n)
L2_GRID = tuple(round(10.0 ** (e / 2), 6) for e in range(-8, 1))
LOGREG_CUDA_VALUES = 10_000_000  # logreg fits this many training feature values or more on CUDA when present


@dataclass(kw_only=True)
class ProbeConfig:
    """How one probe is trained; eval_tools/protocols.py holds each protocol's values and sources."""

    probe: str = "linear"  # "linear", "mlp" (one hidden layer; both Adam) or "logreg" (L-BFGS, L2 chosen on valid)
    hidden: int | None = 512  # MLP width; None = the feature dimension (CLMR's finetuner_mlp)
    dropout: float = 0.2  # MLP only, after the ReLU
    standardize: bool = True  # features minus the training mean, over the training std
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    max_epochs: int = 200
    patience: int = 20  # epochs without a better monitored value before stopping
    # what early stopping (and the best weights, and a plateau schedule) follow: "metric" = the valid
    # primary metric, "metric+loss" = the same with ties going to the lower valid loss, "loss" = valid loss
    monitor: str = "metric+loss"
    plateau: tuple[float, int] | None = None  # ReduceLROnPlateau (factor, patience) on the monitor, threshold 1e-4 rel
    restore_best: bool = True  # False: test with the last epoch's weights (a Lightning fit without a checkpoint)
    layer_mix: bool = False  # (N, L, D) features: a learned softmax-weighted sum over layers (MARBLE)
    seed: int = 0
    # logreg: L2 penalties (on the mean loss, as (l2 / 2) * |W|^2) fitted from the largest down, each
    # from the last one's weights, the one best on valid kept; and L-BFGS iterations per penalty
    l2_grid: tuple[float, ...] = L2_GRID
    max_iter: int = 100  # scikit-learn LogisticRegression's defaults: max_iter 100, tol 1e-4
    tol: float = 1e-4  # L-BFGS stops when no gradient entry exceeds this

    def __post_init__(self) -> None:
        if self.probe not in PROBES:
            raise ValueError(f"--probe must be one of {', '.join(PROBES)}, got {self.probe!r}")
        if not self.l2_grid or min(self.l2_grid) <= 0 or self.max_iter < 1:
            raise ValueError("probe l2_grid must hold positive penalties and max_iter must be positive")
        if self.lr <= 0 or self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise ValueError("--lr, --batch-size, --max-epochs and --patience must be positive")
        if self.monitor not in ("metric", "metric+loss", "loss"):
            raise ValueError(f"probe monitor must be metric, metric+loss or loss, got {self.monitor!r}")


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
    """(Layer mix) -> (standardisation) -> linear layer or MLP; ``forward`` returns logits."""

    def __init__(self, *, dim: int, n_out: int, cfg: ProbeConfig, mean: np.ndarray, std: np.ndarray,
                 layers: int | None = None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        # MARBLE's aggregator: nn.Parameter(torch.randn((1, n_layers, 1))), softmax over layers
        self.mix = nn.Parameter(torch.randn(1, layers, 1)) if layers else None
        if cfg.probe in ("linear", "logreg"):
            self.net = nn.Linear(dim, n_out)
        else:
            hidden = cfg.hidden or dim
            drop = [nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else []
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), *drop, nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) or (B, L, D) with a layer mix -> (B, K)
        if self.mix is not None:
            x = (x * self.mix.softmax(dim=1)).sum(dim=1)
        return self.net((x - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, x: np.ndarray, kind: str) -> np.ndarray:
        """Probabilities ``(N, K)``: softmax for ``class``, sigmoid for ``multi_hot``."""
        self.eval()
        logits = self(torch.as_tensor(np.asarray(x), dtype=torch.float32))
        return (logits.softmax(-1) if kind == "class" else logits.sigmoid()).numpy()


def clip_probabilities(probe: Probe, x: np.ndarray, kind: str, owner: np.ndarray | None = None,
                       n_clips: int | None = None) -> np.ndarray:
    """Per-clip probabilities ``(clips, K)``. With ``owner`` (rows are crops, ``owner[r]`` the clip
    of row ``r``) each clip's are the mean over its crops of the per-crop softmax/sigmoid outputs,
    as CLMR's ``evaluate`` does (``output.mean(dim=0)`` after ``torch.sigmoid``): not the outputs
    of the mean embedding, nor of the mean logits."""
    probs = probe.predict(x, kind)
    if owner is None:
        return probs
    n = int(n_clips if n_clips is not None else owner.max() + 1)
    sums = np.zeros((n, probs.shape[1]), dtype=np.float64)
    np.add.at(sums, owner, probs)
    return (sums / np.bincount(owner, minlength=n)[:, None]).astype(np.float32)


@dataclass
class ProbeFit:
    probe: Probe
    best_epoch: int
    epochs_run: int
    valid: dict[str, float]  # the valid scores of the weights kept (best or last epoch)
    history: list[float]  # valid primary metric per epoch
    lr: float = 0.0  # the learning rate it started with
    final_lr: float = 0.0  # after any plateau reductions
    l2: float | None = None  # logreg: the penalty kept (best on valid)
    l2_candidates: list[dict] = field(default_factory=list)  # logreg: every penalty's valid scores


def _loss_fn(task: Task) -> nn.Module:
    return nn.CrossEntropyLoss() if task.kind == "class" else nn.BCEWithLogitsLoss()


def train_probe(task: Task, x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray, cfg: ProbeConfig) -> ProbeFit:
    """Fit a probe on ``(x_train, y_train)``, early-stopped on the valid split per ``cfg.monitor``."""
    # A probe's matmuls are tiny: one thread avoids OpenMP sync overhead that otherwise costs
    # more than the arithmetic (measured 10x slower with 2 threads on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if cfg.probe == "logreg":
            return _fit_logreg(task, x_train, y_train, x_valid, y_valid, cfg)
        return _train_probe(task, x_train, y_train, x_valid, y_valid, cfg)
    finally:
        torch.set_num_threads(threads)


class _Monitor:
    """Early stopping and best-weights bookkeeping, PyTorch Lightning's rules: an epoch improves
    when its monitored value is strictly better than the best so far; stop after ``patience``
    epochs in a row without one. ``metric+loss`` keeps the best weights by (metric, -loss) but
    counts patience on the metric alone (a saturated accuracy with a falling loss must stop)."""

    def __init__(self, mode: str, patience: int) -> None:
        self.mode, self.patience = mode, patience
        self.best_key: tuple[float, ...] | None = None
        self.best_value, self.best_value_epoch = None, 0

    def value(self, valid: dict, primary: str) -> float:
        if self.mode == "loss":
            return -valid["loss"]
        v = valid[primary]
        return -1.0 if not np.isfinite(v) else v  # higher is better in both cases

    def update(self, epoch: int, valid: dict, primary: str) -> tuple[bool, bool]:
        """(keep these weights, stop now)."""
        v = self.value(valid, primary)
        key = (v, -valid["loss"]) if self.mode == "metric+loss" else (v,)
        keep = self.best_key is None or key > self.best_key
        if keep:
            self.best_key = key
        if self.best_value is None or v > self.best_value:
            self.best_value, self.best_value_epoch = v, epoch
        return keep, epoch - self.best_value_epoch >= self.patience


@dataclass
class _Data:
    """A probe's labelled training and valid rows, and the standardisation it applies."""

    x: np.ndarray
    y: np.ndarray
    xv: np.ndarray
    yv: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    layered: bool  # (N, L, D) rows under a learned layer mix


def _labelled(task: Task, x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray, cfg: ProbeConfig) -> _Data:
    rows = valid_rows(task, y_train)
    if len(rows) == 0:
        raise ValueError(f"task {task.name!r}: no labelled training rows; check the manifest's label spec")
    vrows = valid_rows(task, y_valid)
    if len(vrows) == 0:
        raise ValueError(f"task {task.name!r}: the valid split has no labelled rows; early stopping needs some")
    x = np.asarray(x_train, dtype=np.float32)[rows]
    layered = cfg.layer_mix and x.ndim == 3
    dim = x.shape[-1]
    if cfg.standardize:
        flat = x.reshape(-1, dim) if layered else x
        mean, std = flat.mean(axis=0), flat.std(axis=0) + 1e-6
    else:
        mean, std = np.zeros(dim, dtype=np.float32), np.ones(dim, dtype=np.float32)
    return _Data(x=x, y=np.asarray(y_train)[rows], xv=np.asarray(x_valid, dtype=np.float32)[vrows], yv=np.asarray(y_valid)[vrows],
                 mean=mean, std=std, layered=layered)


def _fit_logreg(task: Task, x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray, cfg: ProbeConfig) -> ProbeFit:
    """Multinomial (``class``) or per-tag (``multi_hot``) logistic regression on standardised
    features: for each penalty in ``cfg.l2_grid``, largest first and warm-started from the previous
    one's weights, full-batch L-BFGS (strong Wolfe line search) minimises the mean loss plus
    ``l2 / 2 * |W|^2`` (the bias is not penalised); the weights best on valid (``cfg.monitor``) are
    kept. The objective is convex, so the result does not depend on the seed or the batch order: the
    linear evaluation of Kornblith et al. 2019 ("Do Better ImageNet Models Transfer Better?") and
    CLIP's linear probes (L-BFGS logistic regression, the penalty searched on a validation split)."""
    d = _labelled(task, x_train, y_train, x_valid, y_valid, cfg)
    if d.layered:
        raise ValueError("--probe logreg fits one layer at a time: use --layer all (one probe per layer), not a learned layer mix")
    probe = Probe(dim=d.x.shape[-1], n_out=len(task.names), cfg=cfg, mean=d.mean, std=d.std)
    # A GPU for the large fits (a million clips of an MSD-size split); on the CPU the caller's one thread.
    device = torch.device("cuda") if torch.cuda.is_available() and d.x.size >= LOGREG_CUDA_VALUES else torch.device("cpu")
    probe.to(device)
    kind = torch.long if task.kind == "class" else torch.float32
    xt = (torch.from_numpy(d.x).to(device) - probe.mean) / probe.std
    yt = torch.as_tensor(d.y, dtype=kind, device=device)
    xv = torch.from_numpy(d.xv).to(device)
    yv = torch.as_tensor(d.yv, dtype=kind, device=device)
    lin = probe.net
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)

    def data_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if task.kind == "class":
            return nn.functional.cross_entropy(logits, y)
        # each tag its own logistic regression: summed over tags, averaged over rows
        return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") / len(y)

    monitor = _Monitor(cfg.monitor, patience=len(cfg.l2_grid))
    best_state, best_valid, best_l2, candidates, history, iters = None, {}, None, [], [], 0
    for l2 in sorted(cfg.l2_grid, reverse=True):
        opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=cfg.max_iter, history_size=20, tolerance_grad=cfg.tol,
                                tolerance_change=1e-10, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            loss = data_loss(lin(xt), yt) + 0.5 * l2 * lin.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        iters += int(opt.state[lin.weight].get("n_iter", 0))
        with torch.no_grad():
            logits = probe(xv)
            vloss = float(_loss_fn(task)(logits, yv))  # as the Adam probes report it (mean over rows, and tags)
            probs = (logits.softmax(-1) if task.kind == "class" else logits.sigmoid()).cpu().numpy()
        valid = score(task, d.yv, probs) | {"loss": vloss}
        candidates.append({"l2": l2, "valid": valid})
        history.append(valid[task.primary])
        keep, _ = monitor.update(len(candidates), valid, task.primary)
        if keep:
            best_state, best_valid, best_l2 = copy.deepcopy(probe.state_dict()), valid, l2
    probe.load_state_dict(best_state)
    probe.cpu()
    # no epochs here: best_epoch / epochs_run report the L-BFGS iterations over the whole penalty path
    return ProbeFit(probe=probe, best_epoch=iters, epochs_run=iters, valid=best_valid, history=history, lr=0.0, final_lr=0.0,
                    l2=best_l2, l2_candidates=candidates)


def _train_probe(task: Task, x_train: np.ndarray, y_train: np.ndarray, x_valid: np.ndarray, y_valid: np.ndarray, cfg: ProbeConfig) -> ProbeFit:
    d = _labelled(task, x_train, y_train, x_valid, y_valid, cfg)
    x, y, mean, std, layered = d.x, d.y, d.mean, d.std, d.layered
    dim = x.shape[-1]
    torch.manual_seed(cfg.seed)
    probe = Probe(dim=dim, n_out=len(task.names), cfg=cfg, mean=mean, std=std, layers=x.shape[1] if layered else None)
    opt = torch.optim.Adam(probe.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    plateau = None
    if cfg.plateau is not None:
        factor, patience = cfg.plateau
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min" if cfg.monitor == "loss" else "max", factor=factor,
                                                             patience=patience, threshold=1e-4, threshold_mode="rel")
    loss_fn = _loss_fn(task)
    xt = torch.from_numpy(x)
    yt = torch.as_tensor(y, dtype=torch.long if task.kind == "class" else torch.float32)
    gen = torch.Generator().manual_seed(cfg.seed)
    monitor = _Monitor(cfg.monitor, cfg.patience)
    best_state, best_epoch, best_valid, last_valid = None, 0, {}, {}
    history: list[float] = []
    xv = torch.as_tensor(d.xv)
    yv_np = d.yv
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
        last_valid = score(task, yv_np, probs) | {"loss": vloss}
        history.append(monitor.value(last_valid, task.primary) if cfg.monitor != "loss" else last_valid[task.primary])
        keep, stop = monitor.update(epoch, last_valid, task.primary)
        if keep:
            best_epoch, best_valid = epoch, last_valid
            best_state = copy.deepcopy(probe.state_dict())
        if stop:
            break
        if plateau is not None:
            plateau.step(monitor.value(last_valid, task.primary) * (-1 if cfg.monitor == "loss" else 1))
    final_lr = float(opt.param_groups[0]["lr"])
    if cfg.restore_best:
        probe.load_state_dict(best_state)
    return ProbeFit(probe=probe, best_epoch=best_epoch, epochs_run=epoch, valid=best_valid if cfg.restore_best else last_valid,
                    history=history, lr=cfg.lr, final_lr=final_lr)
