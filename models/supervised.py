"""A supervised model on the models seam: an encoder plus one linear head per task.

Fine-tuning a pretrained encoder and the supervised baseline (the same architecture trained from
random init on the labels) are both this model trained like any other (docs/architecture.md §4):
``model(batch) -> (loss, metrics)``, so a trainer that steps a self-supervised model steps it too.

- ``encoder``: any module whose ``embed(audio, lengths)`` (or, for CLMR, ``embed(audio)``) returns
  ``{"pooled": (B, D), ...}`` pooled over valid samples: CLMR's SampleCNN, wav2vec2's context
  network (the last layer mean-pooled over time, as the wav2vec2-music paper fine-tunes on
  NSynth), CPC's GRU context. From a checkpoint or at random (``eval_tools.encoders``).
- one ``nn.Linear(D, n)`` per task; ``class`` tasks: cross-entropy over labels ``>= 0`` (``-1`` =
  missing or left out by ``--label-fraction``); ``multi_hot`` tasks: binary cross-entropy over the
  rows whose ``labels["<task>__mask"]`` is set (all rows without a mask).
- the loss is the sum over tasks of each task's mean; a task with no usable label in the batch
  adds zero (and keeps the graph).
- ``freeze_encoder``: the encoder gets no gradients and stays in eval mode whatever ``train()``
  says (its BatchNorm statistics and dropout as at inference): a linear probe trained on crops.

Usage::

    model = Supervised(encoder, SupervisedConfig(tasks=(TaskHead(name="pitch", kind="class", classes=128),)), dim=768)
    loss, metrics = model({"audio": audio, "lengths": lengths, "labels": {"pitch": y}})  # audio (B, 1, 1, T)
    logits = model.logits(audio[:, 0, 0], lengths)   # {"pitch": (B, 128)}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Supervised", "SupervisedConfig", "TaskHead"]


@dataclass(frozen=True, kw_only=True)
class TaskHead:
    name: str  # the manifest label field
    kind: str  # "class" | "multi_hot"
    classes: int  # outputs: class count or tag count

    def __post_init__(self) -> None:
        if self.kind not in ("class", "multi_hot"):
            raise ValueError(f"task {self.name!r}: kind must be 'class' or 'multi_hot', got {self.kind!r}")
        if self.classes < 1:
            raise ValueError(f"task {self.name!r}: needs at least one class, got {self.classes}")


@dataclass(frozen=True, kw_only=True)
class SupervisedConfig:
    tasks: tuple[TaskHead, ...]
    takes_lengths: bool = True  # False: the encoder's embed takes fixed crops only (CLMR)
    freeze_encoder: bool = False  # no gradients, always in eval mode

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("SupervisedConfig.tasks: give at least one task (--tasks)")


class Supervised(nn.Module):
    """Encoder + one linear head per task; ``forward(batch) -> (loss, metrics)``."""

    def __init__(self, encoder: nn.Module, config: SupervisedConfig, *, dim: int) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.heads = nn.ModuleDict({t.name: nn.Linear(dim, t.classes) for t in config.tasks})
        if config.freeze_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> Supervised:
        super().train(mode)
        if self.config.freeze_encoder:
            self.encoder.eval()
        return self

    def pooled(self, audio: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``audio`` (B, T), zero-padded after ``lengths`` -> (B, D)."""
        if self.config.takes_lengths:
            return self.encoder.embed(audio, lengths)["pooled"]
        return self.encoder.embed(audio)["pooled"]

    def logits(self, audio: Tensor, lengths: Tensor | None = None) -> dict[str, Tensor]:
        h = self.pooled(audio, lengths)  # (B, D)
        return {name: head(h) for name, head in self.heads.items()}

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        audio = batch["audio"]
        if audio.dim() == 4:
            if audio.shape[1] != 1 or audio.shape[2] != 1:
                raise ValueError(f"Supervised takes one mono view: batch['audio'] (B, 1, 1, T), got {tuple(audio.shape)}")
            audio = audio[:, 0, 0]
        logits = self.logits(audio, batch.get("lengths"))
        labels = batch["labels"]
        total = sum(lg.sum() for lg in logits.values()) * 0.0  # zero with a graph, for batches without labels
        metrics: dict[str, Tensor] = {}
        for t in self.config.tasks:
            lg = logits[t.name].float()
            y = labels[t.name]
            if t.kind == "class":
                valid = y >= 0
                n = valid.sum()
                # mean over labelled rows; written without boolean indexing so no host sync
                ce = F.cross_entropy(lg, y.clamp_min(0), reduction="none")
                loss = (ce * valid).sum() / n.clamp_min(1)
                with torch.no_grad():
                    metrics[f"acc_{t.name}"] = ((lg.argmax(-1) == y) & valid).sum() / n.clamp_min(1)
            else:
                mask = labels.get(f"{t.name}__mask")
                w = torch.ones(lg.shape[0], device=lg.device) if mask is None else mask.float()
                bce = F.binary_cross_entropy_with_logits(lg, y.float(), reduction="none").mean(-1)
                loss = (bce * w).sum() / w.sum().clamp_min(1)
            total = total + loss
            metrics[f"loss_{t.name}"] = loss.detach()
        return total, metrics
