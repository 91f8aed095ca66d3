"""Results: JSON, a Markdown table, PNG plots (matplotlib Agg), and W&B logging (lazy import)."""

from __future__ import annotations

import json
import math
import os

import numpy as np


def _fmt(v: float | None, pct: bool) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def columns(results: dict) -> list[tuple[str, str, str]]:
    """``(task, metric, header)`` for every reported column, in task order."""
    cols = []
    for name, t in results["tasks"].items():
        label = t.get("title", name)
        if t["kind"] == "class":
            cols.append((name, "accuracy", f"{label} acc %"))
        else:
            cols.append((name, "roc_auc", f"{label} ROC-AUC"))
            cols.append((name, "pr_auc", f"{label} PR-AUC"))
    return cols


def markdown_table(results: dict, *, fraction: float | None = None) -> str:
    """One row per encoder, one column per task metric (test split)."""
    cols = columns(results)
    rows = [r for r in results["rows"] if fraction is None or r["fraction"] == fraction]
    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    head = "| encoder | " + " | ".join(c[2] for c in cols) + " |"
    sep = "|---|" + "|".join("---:" for _ in cols) + "|"
    lines = [head, sep]
    for e in encoders:
        cells = []
        for task, metric, _ in cols:
            match = [r for r in rows if r["encoder"] == e and r["task"] == task]
            cells.append(_fmt(match[0]["test"].get(metric), metric == "accuracy") if match else "")
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(results: dict) -> str:
    """Primary test metric per (encoder, fraction) for every task."""
    fractions = sorted({r["fraction"] for r in results["rows"]})
    lines = []
    for name, t in results["tasks"].items():
        metric = "accuracy" if t["kind"] == "class" else "pr_auc"
        lines.append(f"\n{t.get('title', name)} ({metric}, test) by label fraction\n")
        lines.append("| encoder | " + " | ".join(f"{100 * f:g} %" for f in fractions) + " |")
        lines.append("|---|" + "|".join("---:" for _ in fractions) + "|")
        for e in dict.fromkeys(r["encoder"] for r in results["rows"]):
            cells = []
            for f in fractions:
                m = [r for r in results["rows"] if r["encoder"] == e and r["task"] == name and r["fraction"] == f]
                cells.append(_fmt(m[0]["test"].get(metric), metric == "accuracy") if m else "")
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
    return "\n".join(lines).strip()


def write_json(results: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_per_tag_auc(results: dict, task: str, path: str) -> str:
    """Grouped bars: per-tag test ROC-AUC of every encoder."""
    plt = _plt()
    names = results["tasks"][task]["names"]
    rows = [r for r in results["rows"] if r["task"] == task and r["fraction"] == 1.0 and "per_tag_roc_auc" in r]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) * max(1, len(rows)) / 2), 4))
    width = 0.8 / max(1, len(rows))
    x = np.arange(len(names))
    for i, r in enumerate(rows):
        vals = np.array([np.nan if v is None else v for v in r["per_tag_roc_auc"]], dtype=float)
        ax.bar(x + i * width - 0.4 + width / 2, np.nan_to_num(vals, nan=0.0), width, label=r["encoder"])
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, [str(n) for n in names], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("test ROC-AUC")
    ax.set_ylim(0, 1)
    ax.set_title(f"{task}: per-tag test ROC-AUC")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, names: list, title: str, path: str) -> str:
    """Row-normalised confusion matrix (rows: true class)."""
    plt = _plt()
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(names)
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.35 * n), min(11, 1.5 + 0.35 * n)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    step = max(1, n // 40)
    ax.set_xticks(range(0, n, step), [str(names[i]) for i in range(0, n, step)], rotation=90, fontsize=7)
    ax.set_yticks(range(0, n, step), [str(names[i]) for i in range(0, n, step)], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(results: dict, task: str, path: str) -> str:
    """Test score against label fraction (log x), one line per encoder."""
    plt = _plt()
    t = results["tasks"][task]
    metric = "accuracy" if t["kind"] == "class" else "pr_auc"
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for e in dict.fromkeys(r["encoder"] for r in results["rows"]):
        pts = sorted((r["fraction"], r["test"].get(metric)) for r in results["rows"] if r["encoder"] == e and r["task"] == task)
        if pts:
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=e)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training data (%)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{task}: label efficiency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_wandb(results: dict, *, mode: str, project: str, run_name: str | None, images: list[str], table_md: str,
              out_dir: str | None = None) -> str | None:
    """Log the results table, scalars and PNGs to W&B; ``mode`` is online/offline/disabled.
    W&B keeps its files in ``$WANDB_DIR/wandb`` when that is set, else ``<out_dir>/wandb`` (None: the current folder)."""
    if mode == "disabled":
        return None
    import wandb

    out_dir = os.environ.get("WANDB_DIR") or out_dir
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    run = wandb.init(project=project, name=run_name, mode=mode, job_type="eval", config=results.get("config", {}), dir=out_dir)
    cols = ["encoder", "task", "fraction", "metric", "value"]
    table = wandb.Table(columns=cols)
    scalars = {}
    for r in results["rows"]:
        for k, v in r["test"].items():
            if k == "n" or v is None:
                continue
            table.add_data(r["encoder"], r["task"], r["fraction"], k, v)
            scalars[f"{r['task']}/{r['encoder']}/frac{r['fraction']:g}/{k}"] = v
    run.log({"results": table, **scalars, **{os.path.basename(p): wandb.Image(p) for p in images}})
    run.summary["table_markdown"] = table_md
    run_id = run.id
    run.finish()
    return run_id
