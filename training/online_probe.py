"""The online probe: every ``--eval.probe_every`` steps, how well the current encoder's embeddings
separate a small labelled split (``--eval.probe_data``, a ``<split>.manifest.json``; the demo's
``demo_shards/nsynth/valid.manifest.json`` works), by k-nearest neighbours.

At start (rank 0 only) :class:`OnlineProbe` reads at most ``--eval.probe_max_clips`` clips, evenly
spaced through the split, into memory (``eval_tools.read.iter_split``: resampled to the run's rate,
mono, every unread sample accounted for), with each label field of the manifest as a task. Each
probe then

1. embeds the clips with the live model through the evaluation seam
   (``eval_tools.encoders.build_encoder``: the same pieces, padding and pooling as ``evaluate.py``;
   ``model.eval()``, no gradients, the previous mode restored), stopping early when
   ``--eval.probe_max_seconds`` is spent (the log says how many clips it embedded);
2. splits the embedded clips in two by a fixed draw (fit half, scored half), centres them on the
   fit half's mean and scores the other half by cosine kNN (``--eval.probe_k``): a class task by the
   neighbours' vote (accuracy), a multi-hot task by their mean labels (macro ROC-AUC and PR-AUC),
   through ``eval_tools.probe.score``.

No weights are trained, so a probe costs one embedding pass. It runs on rank 0 only; the other
ranks wait for it at the next step's all-reduce (keep it well under ``--train.dist_timeout_s``).
Results: ``{"probe/<task>_<metric>", "probe/clips", "probe/seconds"}``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from training.errors import ConfigError

if TYPE_CHECKING:
    from train_config import Config
    from training.distributed import Dist

MIN_CLIPS = 4  # fewer embedded clips than this: no score (two per half)


class OnlineProbe:
    """``probe(model) -> {"probe/...": value}`` (see the module docstring). Build it on rank 0 only."""

    def __init__(self, cfg: Config, env: Dist, *, sample_rate: int):
        from eval_tools.probe import Task
        from eval_tools.read import ReadReport, iter_split
        from pipeline.errors import UserError
        from pipeline.manifest import load_manifest
        from pipeline.shards import LabelEncoder

        e, url = cfg.eval, cfg.eval.probe_data
        self.cfg, self.env, self.sample_rate, self.e = cfg, env, sample_rate, e
        try:
            manifest = load_manifest(url)
        except UserError as exc:
            raise ConfigError(f"--eval.probe_data: {exc}") from None
        self.tasks = [Task(name=name, kind=spec["kind"], names=list(spec["names"]))
                      for name, spec in sorted(manifest.labels.items())
                      if spec.get("kind") in ("class", "multi_hot") and spec.get("names")]
        if not self.tasks:
            raise ConfigError(f"--eval.probe_data {url}: its manifest lists no class or multi_hot labels to probe; "
                              "give a labelled split (e.g. demo_shards/nsynth/valid.manifest.json)")
        n = manifest.num_samples
        chosen = set(np.linspace(0, n - 1, min(n, e.probe_max_clips)).round().astype(int).tolist()) if n else set()
        self.report = ReadReport(source=url)
        enc = LabelEncoder(manifest.labels)
        self.clips: list[np.ndarray] = []
        self.labels: dict[str, list] = {t.name: [] for t in self.tasks}
        for clip in iter_split(url, self.report, sample_rate=sample_rate, select=chosen.__contains__):
            self.clips.append(clip.audio)
            lab = enc.encode(clip.meta)
            for t in self.tasks:
                self.labels[t.name].append(lab[t.name])
        if len(self.clips) < MIN_CLIPS:
            raise ConfigError(f"--eval.probe_data {url}: read {len(self.clips)} clips ({self.report.summary()}); the "
                              f"probe needs at least {MIN_CLIPS}: raise --eval.probe_max_clips or give a larger split")
        # the fit/score halves: a fixed draw, the same for every probe of the run
        order = np.random.default_rng(cfg.train.seed).permutation(len(self.clips))
        self.fit_mask = np.zeros(len(self.clips), dtype=bool)
        self.fit_mask[order[: len(order) // 2]] = True
        if env.master:
            print(f"[train] online probe: {len(self.clips)} clips of {url} ({', '.join(t.name for t in self.tasks)}; "
                  f"{self.report.summary()}), kNN k={e.probe_k} every {e.probe_every} steps, at most "
                  f"{e.probe_max_seconds:g} s a probe", flush=True)

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from eval_tools.encoders import build_encoder
        from eval_tools.probe import score

        t0 = time.perf_counter()
        was_training = model.training
        cfg, e = self.cfg, self.e
        enc = build_encoder(name="online", arch=cfg.arch, model=model, model_cfg=cfg.model, sample_rate=self.sample_rate,
                            crop_samples=cfg.crop_samples, ident="online")  # sets model.eval()
        enc.device = self.env.device
        enc.precision = "bf16" if cfg.train.precision == "bf16" or (
            cfg.train.precision == "auto" and self.env.device.type == "cuda") else "fp32"
        rows: list[np.ndarray] = []
        try:
            with torch.random.fork_rng(devices=[self.env.device] if self.env.device.type == "cuda" else []):
                for chunk in range(0, len(self.clips), e.probe_batch):
                    rows.append(enc.embed_clips(self.clips[chunk: chunk + e.probe_batch]))
                    if time.perf_counter() - t0 > e.probe_max_seconds:
                        break
        finally:
            model.train(was_training)
        x = np.concatenate(rows).astype(np.float64)
        n = len(x)
        out: dict[str, float] = {"probe/clips": n}
        fit, held = np.flatnonzero(self.fit_mask[:n]), np.flatnonzero(~self.fit_mask[:n])
        if len(fit) >= 2 and len(held) >= 2:
            sims = _cosine(x, fit, held)
            k = min(e.probe_k, len(fit))
            near = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # (held, k) indices into fit
            for t in self.tasks:
                y = np.asarray(self.labels[t.name][:n])
                probs = _knn_scores(t.kind, len(t.names), y[fit], near)
                for metric, value in score(t, y[held], probs).items():
                    if metric != "n":
                        out[f"probe/{t.name}_{metric}"] = float(value)
        out["probe/seconds"] = round(time.perf_counter() - t0, 3)
        if n < len(self.clips):
            print(f"[train] online probe: --eval.probe_max_seconds={e.probe_max_seconds:g} spent after {n} of "
                  f"{len(self.clips)} clips; scored those", flush=True)
        return out


def _cosine(x: np.ndarray, fit: np.ndarray, held: np.ndarray) -> np.ndarray:
    """``(held, fit)`` cosine similarities of the rows centred on the fit rows' mean. Centred, not
    standardised: dividing by each dimension's spread would lift dimensions that carry only noise
    to the weight of those that separate the clips."""
    flat = x.reshape(len(x), -1)
    z = flat - flat[fit].mean(0)
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
    return z[held] @ z[fit].T


def _knn_scores(kind: str, n_out: int, y_fit: np.ndarray, near: np.ndarray) -> np.ndarray:
    """``(held, n_out)``: the neighbours' class vote fractions, or their mean multi-hot labels."""
    if kind == "class":
        votes = np.zeros((len(near), n_out))
        labels = y_fit[near]  # (held, k); -1 = no label
        for j in range(near.shape[1]):
            ok = labels[:, j] >= 0
            votes[np.flatnonzero(ok), labels[ok, j]] += 1
        return votes / np.maximum(votes.sum(1, keepdims=True), 1)
    return y_fit[near].mean(axis=1)
