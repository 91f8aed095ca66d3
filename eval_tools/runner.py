"""Probing encoders on a dataset's tasks: embeddings -> label-fraction subset -> probe -> scores."""

from __future__ import annotations

import dataclasses

import numpy as np

from eval_tools import metrics
from eval_tools.data import SPLITS, Dataset, Embeddings
from eval_tools.encoders import Encoder
from eval_tools.extract import LOCAL, View, extract, prepare_encoder
from eval_tools.heads import Head
from eval_tools.probe import ProbeConfig, Task, clip_probabilities, score, train_probe, valid_rows
from eval_tools.runtime import Runtime
from eval_tools.subset import label_fraction_subset
from pipeline.errors import UserError


def make_tasks(ds: Dataset, names: list[str] | None = None, titles: dict[str, str] | None = None) -> list[Task]:
    """Tasks from the dataset's label spec: the named fields, or every field with at least 2 names."""
    if names is None:
        names = [k for k, s in ds.spec.items() if len(s.get("names") or []) >= 2]
    missing = [n for n in names if n not in ds.spec]
    if missing:
        raise UserError(f"--tasks {','.join(missing)}: not in the manifests' label spec; known fields: {', '.join(ds.spec)}")
    tasks = [Task(name=n, kind=ds.spec[n]["kind"], names=list(ds.spec[n]["names"])) for n in names]
    for t in tasks:
        t.title = (titles or {}).get(t.name, t.name)  # type: ignore[attr-defined]
    return tasks


def train_subset(emb: Embeddings, task: Task, fraction: float, seed: int) -> np.ndarray:
    """Row indices of the labelled training rows kept at ``fraction`` (stable, class-balanced)."""
    y = emb.labels[task.name]
    rows = valid_rows(task, y)
    if fraction >= 1.0:
        return rows
    sub = label_fraction_subset([emb.keys[i] for i in rows], y[rows], fraction, kind=task.kind, seed=seed)
    return rows[sub]


def _layer_options(x: np.ndarray, per_layer: bool) -> list[tuple[int | None, object]]:
    """``(layer, select)`` pairs: one per layer (per_layer), MARBLE's mix over layers 1.. (not
    per_layer), or the features as they are (no layer axis)."""
    if x.ndim != 3:
        return [(None, lambda a: a)]
    if per_layer:
        return [(layer, (lambda a, l=layer: a[:, l])) for layer in range(x.shape[1])]
    return [(None, lambda a: a[:, 1:] if a.shape[1] > 1 else a)]


def probe_task(task: Task, train: Embeddings, valid: Embeddings, test: Embeddings, cfg: ProbeConfig, *, fraction: float = 1.0,
               seed: int = 0, lrs: tuple[float, ...] | None = None, per_layer: bool = True) -> dict:
    """Probes for every (layer, learning rate) candidate; the test score of the one best on valid.

    Candidates: one per layer for ``(N, L, D)`` embeddings when ``per_layer`` (else one learned layer
    mix), times every learning rate in ``lrs``. The test split may hold crops (``test.owner``):
    scored per clip from the mean of its crops' outputs (eval_tools/probe.py ``clip_probabilities``)."""
    idx = train_subset(train, task, fraction, seed)
    xs = train.x[idx]
    ys = train.labels[task.name][idx]
    fits = []
    for layer, sel in _layer_options(train.x, per_layer):
        for lr in lrs or (cfg.lr,):
            run_cfg = dataclasses.replace(cfg, lr=lr, layer_mix=train.x.ndim == 3 and not per_layer)
            fit = train_probe(task, sel(xs), ys, sel(valid.x), valid.labels[task.name], run_cfg)
            probs = clip_probabilities(fit.probe, sel(test.x), task.kind, test.owner, len(test.keys))
            fits.append({"layer": layer, "lr": lr, "valid": fit.valid, "test": score(task, test.labels[task.name], probs),
                         "best_epoch": fit.best_epoch, "epochs": fit.epochs_run, "l2": fit.l2, "l2_candidates": fit.l2_candidates, "_probs": probs,
                         "_head": Head(task=task, probe=fit.probe, layer=layer, layer_mix=run_cfg.layer_mix)})
    # the candidate whose kept weights score best on valid (ties: the lower layer, the larger lr, first in order)
    best = max(enumerate(fits), key=lambda e: (_valid_key(e[1]["valid"], task, cfg), -(e[1]["layer"] or 0), -e[0]))[1]
    probs = best.pop("_probs")
    head = best.pop("_head")
    row = {"task": task.name, "_head": head, "fraction": fraction, "n_train": int(len(idx)), "valid": best["valid"], "test": best["test"],
           "best_epoch": best["best_epoch"], "epochs": best["epochs"], "lr": best["lr"]}
    if best["l2"] is not None:  # logreg: the penalty kept, and every penalty's valid scores
        row["l2"], row["l2_candidates"] = best["l2"], best["l2_candidates"]
    if len(lrs or ()) > 1:
        row["lr_candidates"] = [{"lr": f["lr"], "layer": f["layer"], "valid": f["valid"]} for f in fits]
    if best["layer"] is not None:
        row["layer"] = best["layer"]
        row["per_layer"] = [{k: v for k, v in f.items() if not k.startswith("_") and k != "l2_candidates"} for f in fits]
    y = test.labels[task.name]
    rows = valid_rows(task, y)
    if task.kind == "multi_hot":
        aucs, aps = metrics.per_tag_scores(y[rows], probs[rows])
        row["per_tag_roc_auc"] = [None if np.isnan(v) else float(v) for v in aucs]
        row["per_tag_pr_auc"] = [None if np.isnan(v) else float(v) for v in aps]
    else:
        row["confusion"] = metrics.confusion_matrix(y[rows], probs[rows].argmax(1), len(task.names)).tolist()
    return row


def _valid_key(valid: dict, task: Task, cfg: ProbeConfig) -> float:
    """What candidates are compared on: the protocol's monitor (valid loss or primary metric)."""
    if cfg.monitor == "loss":
        return -valid["loss"]
    v = valid[task.primary]
    return v if np.isfinite(v) else -1.0


def embed_splits(enc: Encoder, ds: Dataset, *, cache_dir: str | None, recalibrate: bool = True, progress: bool = True,
                 calib_crops: int = 512, seed: int = 0, batch: int = 16, rt: Runtime = LOCAL,
                 views: dict[str, View] | None = None, min_read: float = 0.0) -> dict[str, Embeddings] | None:
    """Train/valid/test embeddings (rank 0's; None on the other ranks under torchrun); a split that
    read less than ``min_read`` of its samples is refused (eval_tools/extract.py)."""
    prepare_encoder(enc, ds, recalibrate=recalibrate, n_crops=calib_crops, seed=seed)
    views = views or {s: View() for s in SPLITS}
    out = {s: extract(enc, ds, s, view=views[s], cache_dir=cache_dir, progress=progress, batch=batch, rt=rt, min_read=min_read)
           for s in SPLITS}
    return out if rt.is_main else None


def check_labels(ds: Dataset, tasks: list[Task], embs: dict[str, Embeddings]) -> None:
    """Every task needs labels in every split: a clear error naming the task and the split otherwise."""
    for split, emb in embs.items():
        if not emb.keys and emb.excluded:
            raise UserError(f"--data {ds.name}: all {emb.excluded} clips of the {split} split are shorter than the "
                            "protocol's crop (--protocol clmr: 59049 samples, or the SampleCNN's input); use another --protocol")
        if not emb.keys:
            raise UserError(f"--data {ds.name}: no clip of the {split} split could be read ({ds.manifests[split]}); "
                            "run `shard-tools verify` on it")
        for t in tasks:
            y = emb.labels[t.name]
            labelled = (y >= 0).any() if t.kind == "class" else (y > 0.5).any()
            if not labelled:
                raise UserError(f"--tasks {t.name}: the {split} split of {ds.name} has no {t.name} labels "
                                f"({len(emb.keys)} clips read from {ds.manifests[split]}); pick other --tasks or rebuild the split")


def probe_encoder(enc_name: str, embs: dict[str, Embeddings], tasks: list[Task], cfg: ProbeConfig, *,
                  fractions: list[float] = (1.0,), seed: int = 0, lrs: tuple[float, ...] | None = None,
                  per_layer: bool = True) -> list[dict]:
    rows = []
    for f in fractions:
        for t in tasks:
            row = probe_task(t, embs["train"], embs["valid"], embs["test"], cfg, fraction=f, seed=seed, lrs=lrs, per_layer=per_layer)
            rows.append({"encoder": enc_name, **row})
    return rows
