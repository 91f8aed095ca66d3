"""A trained model that lasts: an encoder, one head per task and the label vocabularies, in a folder
that ``evaluate.py predict --model DIR`` loads to tag a user's own audio.

The folder (this module is the one reader and writer of the format)::

    DIR/model.json   {"format": "musicssl-model/1", "encoder": {...}, "view": {...}, "tasks": [...], ...}
    DIR/encoder.pt   {"config": <train.py config dict>, "model": <state_dict>}   (absent for log-mel and HF)
    DIR/encoder_hf/  a Hugging Face model folder (save_pretrained, safetensors) for ``--hf-model`` encoders
    DIR/heads.pt     {<task name>: <Probe state_dict>}

``encoder`` holds ``arch``, ``name``, ``sample_rate``, ``layer``, ``max_window_seconds`` (and the
log-mel parameters for ``arch: "logmel"``); the weights are the ones the heads were trained on
(BatchNorm statistics recalibrated, or fine-tuned), so the folder needs nothing else. ``view`` is
how a clip becomes features: ``{"kind": "clip"}`` or CLMR's ``{"kind": "crops", "crop": n}`` (the
clip's prediction is then the mean over its crops' outputs). Each task: ``name``, ``kind``
(``class`` | ``multi_hot``), ``names`` (the vocabulary, index order), ``layer`` (which layer of
``(N, L, D)`` features, or null), ``layer_mix``, ``probe`` (``probe``/``hidden``/``dropout``),
``dim``, ``n_layers`` (of the mix), and the ``valid``/``test`` scores it was selected with. Every
tensor file loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from eval_tools.encoders import Encoder, build_encoder, logmel_encoder
from eval_tools.extract import View
from eval_tools.probe import Probe, ProbeConfig, Task, clip_probabilities
from pipeline.errors import UserError

FORMAT = "musicssl-model/1"


@dataclass
class Head:
    task: Task
    probe: Probe
    layer: int | None = None  # select this layer of (N, L, D) features
    layer_mix: bool = False  # MARBLE's mix over layers 1..

    def features(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 3:
            return x
        if self.layer_mix:
            return x[:, 1:] if x.shape[1] > 1 else x
        return x[:, self.layer if self.layer is not None else -1]


@dataclass
class SavedModel:
    encoder: Encoder
    view: View
    heads: list[Head]
    meta: dict

    @torch.no_grad()
    def predict(self, clips: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Per task ``(len(clips), K)`` probabilities (softmax or sigmoid), crops averaged per clip."""
        segments, owner = [], []
        for i, c in enumerate(clips):
            segs = self.view.segments(str(i), c) or [c]
            segments += segs
            owner += [i] * len(segs)
        x = self.encoder.embed_clips(segments)
        own = np.asarray(owner) if self.view.kind == "crops" else None
        return {h.task.name: clip_probabilities(h.probe, h.features(x), h.task.kind, own, len(clips)) for h in self.heads}


def save_model(folder: str, enc: Encoder, heads: list[Head], *, view: View, meta: dict | None = None,
               scores: dict[str, dict] | None = None) -> str:
    """Write ``folder`` (atomically per file); returns it."""
    os.makedirs(folder, exist_ok=True)
    encoder = {"arch": enc.arch, "name": enc.name, "sample_rate": enc.sample_rate, "layer": enc.layer, "pool": enc.pool,
               "max_window_seconds": (enc.window / enc.sample_rate) if enc.window and enc.arch != "clmr" else 30.0}
    if enc.arch == "logmel":
        mel = enc.model
        encoder["logmel"] = {"n_mels": mel.n_mels, "n_fft": mel.n_fft, "hop": mel.hop_length}
    elif enc.arch.startswith("hf-"):  # a Hugging Face model (eval_tools/weights.py): its own folder format
        enc.model.model.save_pretrained(os.path.join(folder, "encoder_hf"), safe_serialization=True)
        encoder["hf_model"] = "encoder_hf"
        encoder["normalize"] = bool(enc.model.normalize)
    else:
        train_cfg = enc.train_config
        if train_cfg is None:
            raise ValueError(f"encoder {enc.name!r} carries no train config; cannot save it")
        _save_torch({"config": train_cfg, "model": {k: v.detach().cpu() for k, v in enc.model.state_dict().items()}},
                    os.path.join(folder, "encoder.pt"))
    tasks = []
    for h in heads:
        net = h.probe.net
        first = net if isinstance(net, torch.nn.Linear) else net[0]
        tasks.append({
            "name": h.task.name, "kind": h.task.kind, "names": list(h.task.names), "layer": h.layer, "layer_mix": h.layer_mix,
            "probe": {"probe": "linear" if isinstance(net, torch.nn.Linear) else "mlp",
                      "hidden": None if isinstance(net, torch.nn.Linear) else int(first.out_features),
                      "dropout": float(next((m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)), 0.0))},
            "dim": int(first.in_features), "n_layers": None if h.probe.mix is None else int(h.probe.mix.shape[1]),
            **({"scores": scores[h.task.name]} if scores and h.task.name in scores else {}),
        })
    _save_torch({h.task.name: {k: v.detach().cpu() for k, v in h.probe.state_dict().items()} for h in heads},
                os.path.join(folder, "heads.pt"))
    doc = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "encoder": encoder,
           "view": {"kind": view.kind, "crop": view.crop}, "tasks": tasks, "meta": meta or {}}
    tmp = os.path.join(folder, "model.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=str)
    os.replace(tmp, os.path.join(folder, "model.json"))
    return folder


def _save_torch(obj: object, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_torch(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--model: {path} is missing; the folder is incomplete (write it again with --save-model)") from None
    except Exception as exc:  # noqa: BLE001 - truncated file, non-tensor objects
        raise UserError(f"--model: {path} is not readable ({type(exc).__name__}); it is damaged or holds objects other "
                        "than tensors, and will not be loaded") from None


def load_model(folder: str, *, device: torch.device | str = "cpu", precision: str = "fp32") -> SavedModel:
    path = os.path.join(folder, "model.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--model {folder}: no model.json there; pass a folder written by `evaluate.py probe --save-model` "
                        "or `evaluate.py finetune`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--model {folder}: model.json is not valid JSON ({exc})") from None
    if doc.get("format") != FORMAT:
        raise UserError(f"--model {folder}: format {doc.get('format')!r}, expected {FORMAT!r}")
    e = doc["encoder"]
    if e["arch"] == "logmel":
        enc = logmel_encoder(int(e["sample_rate"]), **e["logmel"])
    elif "hf_model" in e:
        from eval_tools.weights import hf_encoder

        enc = hf_encoder(os.path.join(folder, e["hf_model"]), name=e["name"], layer=e["layer"], sample_rate=int(e["sample_rate"]),
                         max_window_seconds=float(e["max_window_seconds"]), flag="--model")
        enc.model.normalize = bool(e.get("normalize", False))
    else:
        import train_config

        saved = _load_torch(os.path.join(folder, "encoder.pt"))
        cfg = train_config.from_dict(saved["config"])
        _, model_cls = train_config.model_classes(cfg.arch)
        model = model_cls(cfg.model)
        model.load_state_dict(saved["model"])
        enc = build_encoder(name=e["name"], arch=cfg.arch, model=model, model_cfg=cfg.model, sample_rate=int(e["sample_rate"]),
                            crop_samples=cfg.crop_samples, ident=f"model:{folder}", layer=e["layer"],
                            max_window_seconds=float(e["max_window_seconds"]), train_config=saved["config"])
    enc.pool = e.get("pool", "mean")  # folders saved before --pool existed were mean-pooled
    enc.to(device, precision)
    states = _load_torch(os.path.join(folder, "heads.pt"))
    heads = []
    for t in doc["tasks"]:
        task = Task(name=t["name"], kind=t["kind"], names=t["names"])
        cfg = ProbeConfig(probe=t["probe"]["probe"], hidden=t["probe"]["hidden"], dropout=t["probe"]["dropout"])
        probe = Probe(dim=t["dim"], n_out=len(task.names), cfg=cfg, mean=np.zeros(t["dim"]), std=np.ones(t["dim"]),
                      layers=t.get("n_layers"))
        probe.load_state_dict(states[t["name"]])
        heads.append(Head(task=task, probe=probe.eval(), layer=t["layer"], layer_mix=bool(t["layer_mix"])))
    v = doc["view"]
    return SavedModel(encoder=enc, view=View(kind=v["kind"], crop=v.get("crop")), heads=heads, meta=doc.get("meta", {}))
