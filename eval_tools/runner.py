"""Probing encoders on a dataset's tasks: embeddings -> label-fraction subset -> probe -> scores."""

from __future__ import annotations

import numpy as np

from eval_tools import metrics
from eval_tools.data import SPLITS, Dataset, Embeddings
from eval_tools.encoders import Encoder
from eval_tools.extract import LOCAL, extract, prepare_encoder
from eval_tools.runtime import Runtime
from pipeline.errors import UserError
from eval_tools.probe import ProbeConfig, Task, score, train_probe, valid_rows
from eval_tools.subset import label_fraction_subset


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


def probe_task(task: Task, train: Embeddings, valid: Embeddings, test: Embeddings, cfg: ProbeConfig, *, fraction: float = 1.0,
               seed: int = 0) -> dict:
    """One probe (per layer when embeddings are ``(N, L, D)``); the test score at the best valid epoch/layer."""
    idx = train_subset(train, task, fraction, seed)
    xs = train.x[idx]
    ys = train.labels[task.name][idx]
    layered = train.x.ndim == 3
    per_layer = []
    for layer in range(train.x.shape[1] if layered else 1):
        sel = (lambda a: a[:, layer]) if layered else (lambda a: a)
        fit = train_probe(task, sel(xs), ys, sel(valid.x), valid.labels[task.name], cfg)
        probs = fit.probe.predict(sel(test.x), task.kind)
        per_layer.append({"layer": layer, "valid": fit.valid, "test": score(task, test.labels[task.name], probs),
                          "best_epoch": fit.best_epoch, "epochs": fit.epochs_run, "_probs": probs})
    best = max(per_layer, key=lambda r: (r["valid"][task.primary], -r["layer"]))
    probs = best.pop("_probs")
    row = {"task": task.name, "fraction": fraction, "n_train": int(len(idx)), "valid": best["valid"], "test": best["test"],
           "best_epoch": best["best_epoch"], "epochs": best["epochs"]}
    if layered:
        row["layer"] = best["layer"]
        row["per_layer"] = [{k: v for k, v in r.items() if k != "_probs"} for r in per_layer]
    y = test.labels[task.name]
    rows = valid_rows(task, y)
    if task.kind == "multi_hot":
        aucs, aps = metrics.per_tag_scores(y[rows], probs[rows])
        row["per_tag_roc_auc"] = [None if np.isnan(v) else float(v) for v in aucs]
        row["per_tag_pr_auc"] = [None if np.isnan(v) else float(v) for v in aps]
    else:
        row["confusion"] = metrics.confusion_matrix(y[rows], probs[rows].argmax(1), len(task.names)).tolist()
    return row


def embed_splits(enc: Encoder, ds: Dataset, *, cache_dir: str | None, recalibrate: bool = True, progress: bool = True,
                 calib_crops: int = 512, seed: int = 0, batch: int = 16, rt: Runtime = LOCAL) -> dict[str, Embeddings] | None:
    """Train/valid/test embeddings (rank 0's; None on the other ranks under torchrun)."""
    prepare_encoder(enc, ds, recalibrate=recalibrate, n_crops=calib_crops, seed=seed)
    out = {s: extract(enc, ds, s, cache_dir=cache_dir, progress=progress, batch=batch, rt=rt) for s in SPLITS}
    return out if rt.is_main else None


def check_labels(ds: Dataset, tasks: list[Task], embs: dict[str, Embeddings]) -> None:
    """Every task needs labels in every split: a clear error naming the task and the split otherwise."""
    for split, emb in embs.items():
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
                  fractions: list[float] = (1.0,), seed: int = 0) -> list[dict]:
    rows = []
    for f in fractions:
        for t in tasks:
            row = probe_task(t, embs["train"], embs["valid"], embs["test"], cfg, fraction=f, seed=seed)
            rows.append({"encoder": enc_name, **row})
    return rows
