"""Weights in and out (docs/weights.md): export an encoder, load it back, import published ones.

Out:

- :func:`export` writes a checkpoint's encoder as a folder (docs/architecture.md, "Export folder"):
  ``model.safetensors`` (the tensors ``embed()`` needs, never a pickle), ``config.json`` (the
  architecture, sample rate, input length, the run config that rebuilds it, the label
  vocabularies of saved heads) and ``README.md`` (a model card). ``fmt="hf"`` writes a wav2vec2
  checkpoint as a Hugging Face ``Wav2Vec2Model`` folder instead.
- :func:`load_export` reads such a folder back as an :class:`~eval_tools.encoders.Encoder`.

In:

- :func:`hf_encoder`: a local Hugging Face folder (``Wav2Vec2Model``, ``HubertModel``, anything
  ``AutoModel`` loads; MERT with ``trust_remote_code``) as an encoder, every layer probeable.
- :func:`read_clmr`: CLMR's released SampleCNN weights (Spijkervet/CLMR) on our ``SampleCNN``.
- :func:`open_encoder` / :func:`arch_config`: one spelling for all of them, ``--checkpoint
  hf:DIR | export:DIR | clmr:PATH | ckpt.pt`` (a folder or a non-musicssl file is recognised).
- :func:`warm_start`: ``train.py --train.init_from`` (an export, an HF wav2vec2 folder, a
  checkpoint, a CLMR file) into a freshly built model of the same architecture.

Nothing is downloaded and no file is unpickled with code execution: safetensors where we write
them, ``torch.load(weights_only=True)`` elsewhere (CLMR's Lightning files name a few Python classes
in their hyper-parameters; those are read as inert placeholders, never imported).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import time
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.errors import UserError

EXPORT_FORMAT = "musicssl-export/1"
WEIGHTS = "model.safetensors"
# Parameters only the self-supervised loss uses; an export leaves them out and a warm start keeps
# the fresh model's own (models/<arch>.py: what embed() never reads).
TRAINING_ONLY = {
    "clmr": ("projector.",),
    "wav2vec2": ("quantizer.", "project_q.", "final_proj.", "mask_emb"),
    "cpc": ("predictor.",),
}
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
CLMR_SAMPLE_RATE = 22050  # Spijkervet/CLMR config/config.yaml @ 423414d: sample_rate 22050


def _training_only(arch: str, key: str) -> bool:
    return key.startswith(TRAINING_ONLY.get(arch, ()))


def _file_sha(path: str, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


# ------------------------------------------------------------------------------------------------
# safetensors


def read_safetensors(path: str, *, flag: str) -> dict[str, Tensor]:
    """The tensors of a safetensors file; a pickle, a truncated file or another format is a
    :class:`UserError` naming ``flag`` and the file (a pickle is never loaded)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file; expected a {WEIGHTS} (evaluate.py export writes one)")
    with open(path, "rb") as f:
        head = f.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header's "{"
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    if not looks_safetensors and (head[:2] == b"PK" or head[:1] == b"\x80"):  # torch.save's zip, or a bare pickle
        raise UserError(f"{flag} {path} is a pickle (torch.save) file where safetensors was expected; it is not "
                        "loaded here: pass the train.py checkpoint with --checkpoint, or re-export it with evaluate.py export")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{flag} {path}: truncated or not a safetensors file ({os.path.getsize(path)} bytes; "
                        f"{str(exc).splitlines()[0]}); re-export it") from None


def _write_safetensors(tensors: dict[str, Tensor], path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# export


def export(checkpoint: str, out: str, *, fmt: str = "musicssl", heads: str | None = None, results: str | None = None,
           sample_rate: int | None = None) -> dict[str, Any]:
    """Write the encoder of train.py ``checkpoint`` to folder ``out``; returns what was written.

    ``heads``: a saved-model folder (``probe --save-models``, ``finetune``) whose label
    vocabularies go into ``config.json``; ``results``: an evaluate.py ``results.json`` whose rows
    for this checkpoint go into the model card."""
    from eval_tools.encoders import config_sample_rate, load_checkpoint, min_input_samples
    from training import checkpoint as ckpt_io
    import train_config as tc

    if fmt not in ("musicssl", "hf"):
        raise UserError(f"--format {fmt!r}: choose musicssl (safetensors + config.json) or hf (a transformers Wav2Vec2Model folder)")
    state = load_checkpoint(checkpoint)
    model, cfg = ckpt_io.model_from_state(state)
    if fmt == "hf" and cfg.arch != "wav2vec2":
        raise UserError(f"--format hf: {checkpoint} holds a {cfg.arch} model; only wav2vec2 has a Hugging Face "
                        "counterpart (Wav2Vec2Model). Export it with the default --format musicssl")
    try:
        sr = sample_rate or config_sample_rate(cfg, None)
    except ValueError as exc:
        raise UserError(f"export {checkpoint}: {exc}") from None
    vocab = _head_vocabularies(heads) if heads else {}
    scores = _scores_for(results, f"ckpt-{state['_sha']}") if results else []
    info = {
        "format": EXPORT_FORMAT, "arch": cfg.arch,
        "model": {"class": type(model).__name__, "config_class": type(cfg.model).__name__, "config": tc.to_dict(cfg.model)},
        "sample_rate": int(sr), "input_samples": int(cfg.crop_samples), "min_samples": min_input_samples(cfg.arch, cfg.model),
        "embedding_dim": _embedding_dim(cfg), "heads": vocab,
        "source": {"checkpoint": checkpoint, "sha256": state["_sha"], "step": int(state.get("step", 0)), "preset": cfg.preset,
                   "data": list(cfg.data.manifests)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_config": state["config"],
    }
    os.makedirs(out, exist_ok=True)
    if fmt == "hf":
        written = _export_hf(model, out, sr)
    else:
        tensors = {k: v for k, v in model.state_dict().items() if not _training_only(cfg.arch, k)}
        _write_safetensors(tensors, os.path.join(out, WEIGHTS), {"format": EXPORT_FORMAT, "arch": cfg.arch})
        _write_text(os.path.join(out, "config.json"), json.dumps(info, indent=2) + "\n")
        written = [WEIGHTS, "config.json"]
    _write_text(os.path.join(out, "README.md"), model_card(info, scores, fmt=fmt))
    return {"out": out, "format": fmt, "files": written + ["README.md"], "arch": cfg.arch, "sample_rate": int(sr),
            "step": info["source"]["step"], "tensors": None if fmt == "hf" else len(tensors),
            "parameters": sum(v.numel() for k, v in model.state_dict().items() if not _training_only(cfg.arch, k))}


def _embedding_dim(cfg) -> int:
    m = cfg.model
    return int({"clmr": lambda: m.last_channels, "wav2vec2": lambda: m.embed_dim, "cpc": lambda: m.context_dim}[cfg.arch]())


def _export_hf(model: nn.Module, out: str, sr: int) -> list[str]:
    transformers = _transformers("--format hf")

    from models.wav2vec2 import to_hf

    hf = to_hf(model).wav2vec2.eval()  # the Wav2Vec2Model inside Wav2Vec2ForPreTraining
    hf.config.architectures = ["Wav2Vec2Model"]
    hf.save_pretrained(out, safe_serialization=True)
    # our pre-training feeds raw waveforms (no per-clip normalisation), as fairseq's base models
    fe = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=int(sr), padding_value=0.0, do_normalize=False,
                                               return_attention_mask=model.config.extractor_mode == "layer_norm")
    fe.save_pretrained(out)
    return sorted(os.listdir(out))


def _head_vocabularies(folder: str) -> dict[str, dict]:
    path = os.path.join(folder, "model.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--heads {folder}: cannot read model.json ({exc}); pass a folder written by "
                        "`evaluate.py probe --save-models` or `finetune`") from None
    if doc.get("format") != "musicssl-model/1":
        raise UserError(f"--heads {folder}: model.json is not a musicssl-model/1 saved model")
    return {t["name"]: {"kind": t["kind"], "names": list(t["names"]), **({"scores": t["scores"]} if "scores" in t else {})}
            for t in doc.get("tasks", [])}


def _scores_for(path: str, ident: str) -> list[dict]:
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"--results {path}: cannot read it ({exc}); pass the results.json of an evaluate.py probe") from None
    names = [n for n, e in res.get("encoders", {}).items() if e.get("ident") == ident]
    if not names:
        raise UserError(f"--results {path}: no row of this checkpoint ({ident}) in it; pass the results.json of "
                        "`evaluate.py probe --checkpoint` with the same checkpoint")
    proto = (res.get("protocol") or {}).get("name", "?")
    return [{"task": r["task"], "fraction": r["fraction"], "protocol": r.get("protocol", proto),
             "test": {k: v for k, v in r["test"].items() if k != "n" and isinstance(v, (int, float))}}
            for r in res.get("rows", []) if r["encoder"] in names]


def model_card(info: dict, scores: list[dict], *, fmt: str) -> str:
    src = info["source"]
    load = ("```python\nfrom transformers import AutoModel\nmodel = AutoModel.from_pretrained(\"DIR\")  # Wav2Vec2Model\n```"
            if fmt == "hf" else
            "```python\nfrom eval_tools.weights import load_export\nenc = load_export(\"DIR\")\nx = enc.embed([clip])  "
            "# clip: mono float32 at enc.sample_rate -> (1, D)\n```\n\n"
            "or `evaluate.py probe --checkpoint export:DIR ...` / `--baselines export:DIR`")
    lines = [
        f"# musicssl {info['arch']} encoder", "",
        f"Exported from `{src['checkpoint']}` (sha256 {src['sha256']}) at step {src['step']:,} of preset `{src['preset']}` "
        f"on {info['created']}.", "",
        f"- architecture: {info['model']['class']} ({info['model']['config_class']}), {info['embedding_dim']}-d embeddings",
        f"- input: mono, {info['sample_rate']} Hz; trained on crops of {info['input_samples']} samples; "
        f"shortest input {info['min_samples']} samples",
        f"- training data: {', '.join(src['data']) or '(not recorded)'}",
        "- weights: " + ("Hugging Face Wav2Vec2Model (safetensors)" if fmt == "hf"
                         else f"{WEIGHTS} (encoder only; no projection head / quantizer)"),
    ]
    if info["heads"]:
        lines.append("- label vocabularies (config.json `heads`): "
                     + "; ".join(f"{k} ({v['kind']}, {len(v['names'])} labels)" for k, v in info["heads"].items()))
    lines += ["", "## Load", "", load, ""]
    if scores:
        lines += ["## Probe scores", "", "| task | protocol | fraction | " + " | ".join(sorted(scores[0]["test"])) + " |",
                  "|---|---|---|" + "---|" * len(scores[0]["test"])]
        for r in scores:
            lines.append(f"| {r['task']} | {r['protocol']} | {r['fraction']:g} | "
                         + " | ".join(f"{r['test'].get(k, float('nan')):.3f}" for k in sorted(scores[0]["test"])) + " |")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# load an export


def is_export(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("format") == EXPORT_FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _read_export(folder: str, *, flag: str) -> tuple[dict, dict[str, Tensor]]:
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise UserError(f"{flag} {folder}: no such folder; pass a folder written by evaluate.py export")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{flag} {folder}: cannot read config.json ({exc}); pass a folder written by evaluate.py export") from None
    if info.get("format") != EXPORT_FORMAT:
        hint = " (it looks like a Hugging Face folder: use hf:DIR or --hf-model)" if "model_type" in info else ""
        raise UserError(f"{flag} {folder}: config.json is not a {EXPORT_FORMAT} export{hint}")
    return info, read_safetensors(os.path.join(folder, WEIGHTS), flag=flag)


def _load_into(model: nn.Module, arch: str, tensors: dict[str, Tensor], *, what: str) -> list[str]:
    """Load ``tensors`` into ``model``; returns the training-only keys left at their init. Any
    other missing key, an unknown key or a shape mismatch is a :class:`UserError` naming them."""
    own = model.state_dict()
    unexpected = sorted(k for k in tensors if k not in own)
    shapes = sorted(f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in tensors
                    if k in own and tensors[k].shape != own[k].shape)
    missing = sorted(k for k in own if k not in tensors and not _training_only(arch, k))
    if unexpected or shapes or missing:
        parts = ([f"unexpected keys: {_short(unexpected)}"] if unexpected else []) + \
                ([f"missing keys: {_short(missing)}"] if missing else []) + ([f"other shapes: {_short(shapes, 4)}"] if shapes else [])
        raise UserError(f"{what} does not fit a {arch} model of this configuration ({'; '.join(parts)})")
    model.load_state_dict(tensors, strict=False)
    return sorted(k for k in own if k not in tensors)


def load_export(folder: str, *, name: str = "export", layer: int | str = -1, sample_rate: int | None = None,
                max_window_seconds: float = 30.0, flag: str = "export:"):
    """An export folder (:func:`export`) as an :class:`~eval_tools.encoders.Encoder`; ``enc.embed``
    (``embed_clips``) gives the same embeddings as the checkpoint it came from."""
    from eval_tools.encoders import build_encoder
    import train_config as tc

    info, tensors = _read_export(folder, flag=flag)
    cfg = tc.from_dict(info["train_config"])
    _, model_cls = tc.model_classes(cfg.arch)
    model = model_cls(cfg.model)
    _load_into(model, cfg.arch, tensors, what=f"{flag}{folder}/{WEIGHTS}")
    sha = _file_sha(os.path.join(folder, WEIGHTS))
    return build_encoder(name=name, arch=cfg.arch, model=model, model_cfg=cfg.model, sample_rate=int(sample_rate or info["sample_rate"]),
                         crop_samples=int(info["input_samples"]), ident=f"export-{sha}", layer=layer,
                         max_window_seconds=max_window_seconds, train_config=info["train_config"],
                         meta={"export": folder, "step": info["source"]["step"], "preset": info["source"]["preset"],
                               "heads": sorted(info.get("heads", {}))})


# ------------------------------------------------------------------------------------------------
# Hugging Face folders


def check_hf_folder(path: str, *, flag: str = "--hf-model") -> str:
    """``path`` if it is a local HF model folder with weights; else a :class:`UserError` (a hub id
    is told to be downloaded first: nothing is fetched here)."""
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise UserError(f"{flag} {path}: a file, not a folder; pass the folder holding config.json and the weights")
        raise UserError(f"{flag} {path}: no such folder. Models are not downloaded at run time; if this is a hub id, "
                        f"download it first (huggingface-cli download {path} --local-dir models/{os.path.basename(path)}) "
                        f"and pass that folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{flag} {path}: no config.json there; pass a folder written by save_pretrained or a hub download")
    if not any(os.path.isfile(os.path.join(path, w)) for w in HF_WEIGHT_FILES):
        have = ", ".join(sorted(os.listdir(path))[:8]) or "nothing"
        raise UserError(f"{flag} {path}: no weights there (expected {' or '.join(HF_WEIGHT_FILES[:3])}; found {have}); "
                        "download the model's weight files too")
    return path


def _transformers(flag: str):
    try:
        import transformers
    except ImportError:
        raise UserError(f"{flag}: Hugging Face models need transformers: pip install 'musicssl[hf]'") from None
    return transformers


def _hf_json(path: str, name: str) -> dict:
    try:
        with open(os.path.join(path, name)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


class HFEmbedder(nn.Module):
    """A transformers audio model with our ``embed(audio, lengths)``: ``pooled`` (mean of the last
    hidden state over valid frames), ``layers`` (every ``hidden_states`` entry, (B, T', D)),
    ``frame_lengths``.

    Rows of one length run together without padding, so a clip's vector never depends on what it
    was batched with (group-norm feature extractors see padding even with an attention mask).
    ``normalize``: the folder's feature extractor's per-clip zero-mean, unit-variance input
    (``do_normalize``, as ``Wav2Vec2FeatureExtractor``), over each clip's valid samples."""

    def __init__(self, model: nn.Module, *, normalize: bool) -> None:
        super().__init__()
        self.model = model
        self.normalize = normalize

    def embed(self, audio: Tensor, lengths: Tensor | None = None) -> dict[str, Any]:
        b, t = audio.shape
        lens = [t] * b if lengths is None else [min(int(n), t) for n in lengths.tolist()]
        rows: dict[int, tuple[Tensor, list[Tensor]]] = {}
        for n in sorted(set(lens)):
            idx = [i for i, m in enumerate(lens) if m == n]
            x = audio[idx, :n]
            if self.normalize:
                x = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-7)
            out = self.model(x, output_hidden_states=True, return_dict=True)
            for k, i in enumerate(idx):
                rows[i] = (out.last_hidden_state[k], [h[k] for h in out.hidden_states])
        frames = torch.tensor([rows[i][0].shape[0] for i in range(b)], device=audio.device)
        t_max = int(frames.max())

        def pad(x: Tensor) -> Tensor:
            return nn.functional.pad(x, (0, 0, 0, t_max - x.shape[0]))

        last = torch.stack([pad(rows[i][0]) for i in range(b)])  # (B, T', D)
        layers = [torch.stack([pad(rows[i][1][j]) for i in range(b)]) for j in range(len(rows[0][1]))]
        valid = (torch.arange(t_max, device=audio.device)[None, :] < frames[:, None]).to(last.dtype)[..., None]
        pooled = (last * valid).sum(1) / valid.sum(1).clamp_min(1)
        return {"pooled": pooled, "frames": last, "layers": layers, "frame_lengths": frames}


def _receptive_field(config) -> int:
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if not kernels or not strides:
        return 1
    rf, jump = 1, 1
    for k, s in zip(kernels, strides):
        rf += (k - 1) * jump
        jump *= s
    return int(rf)


def hf_encoder(path: str, *, name: str | None = None, layer: int | str = -1, sample_rate: int | None = None,
               trust_remote_code: bool = False, max_window_seconds: float = 30.0, flag: str = "--hf-model"):
    """A local Hugging Face folder as a :class:`~eval_tools.encoders.FrameEncoder` (``--hf-model DIR``).

    The sample rate is ``sample_rate`` if given, else the folder's ``preprocessor_config.json``
    ``sampling_rate``. ``trust_remote_code`` lets ``AutoModel`` run the Python a folder ships
    (MERT); without it such a folder is refused with that advice."""
    from eval_tools.encoders import FrameEncoder

    check_hf_folder(path, flag=flag)
    transformers = _transformers(flag)
    pre = _hf_json(path, "preprocessor_config.json")
    sr = sample_rate or pre.get("sampling_rate")
    if not sr:
        raise UserError(f"{flag} {path}: the folder names no sampling rate (no preprocessor_config.json sampling_rate); "
                        "pass --sample-rate with the rate the model was trained at")
    has_st = any(os.path.isfile(os.path.join(path, w)) for w in HF_WEIGHT_FILES[:2])
    try:
        # .bin weights are read by transformers with torch.load(weights_only=True)
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code,
                                                       use_safetensors=True if has_st else None)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(f"{flag} {path}: the folder ships its own model code; rerun with --trust-remote-code if you "
                            "trust it (it runs that Python)") from None
        raise UserError(f"{flag} {path}: transformers cannot load it ({str(exc).splitlines()[0]})") from None
    except (OSError, KeyError, RuntimeError, ImportError) as exc:
        raise UserError(f"{flag} {path}: transformers cannot load it ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    model.eval()
    cfg = model.config
    n = int(getattr(cfg, "num_hidden_layers", 0)) + 1
    if layer == "concat":
        raise UserError(f"--layer concat: {path} is a Hugging Face folder; 'concat' is for train.py's wav2vec2 and CLMR "
                        f"checkpoints (give 'all' to probe each of its hidden states, or one index)")
    if layer != "all" and not -n <= int(layer) < n:
        raise UserError(f"--layer {layer}: {path} has hidden states 0..{n - 1} (0 = transformer input, -1 = last) or 'all'")
    weights = next(os.path.join(path, w) for w in HF_WEIGHT_FILES if os.path.isfile(os.path.join(path, w)))
    # the weights, the architecture and the input preprocessing (do_normalize) identify the embeddings
    ident = hashlib.sha256((_file_sha(weights) + _file_sha(os.path.join(path, "config.json"))
                            + json.dumps(pre, sort_keys=True)).encode()).hexdigest()[:16]
    return FrameEncoder(
        name=name or f"hf:{os.path.basename(os.path.normpath(path))}", arch=f"hf-{cfg.model_type}", sample_rate=int(sr),
        model=HFEmbedder(model, normalize=bool(pre.get("do_normalize", False))), layer=layer,
        window=int(max_window_seconds * int(sr)), ident=f"hf-{ident}", min_samples=_receptive_field(cfg),
        meta={"hf_model": path, "model_type": cfg.model_type, "architectures": getattr(cfg, "architectures", None)},
    )


# ------------------------------------------------------------------------------------------------
# CLMR's released checkpoints


class _Inert:
    """Stands in for a Python class a checkpoint names (argparse.Namespace, Lightning's
    AttributeDict ...): takes any arguments and state, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        self.__dict__["_state"] = state

    def __setitem__(self, key, value) -> None:
        self.__dict__.setdefault("_items", {})[key] = value


def _torch_load_inert(path: str, *, flag: str) -> Any:
    """``torch.load(weights_only=True)``; classes the file names are inert placeholders (see _Inert)."""
    def load():
        return torch.load(path, map_location="cpu", weights_only=True)

    try:
        return load()
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):
            raise
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stubs = [(type(n.rsplit(".", 1)[-1], (_Inert,), {}), n) for n in names]
        with torch.serialization.safe_globals(stubs):
            return load()


def _clmr_state(path: str, flag: str) -> dict[str, Tensor]:
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file; pass CLMR's .ckpt (Lightning) or .pt (state dict)")
    try:
        obj = _torch_load_inert(path, flag=flag)
    except Exception as exc:  # noqa: BLE001 - truncated zip, EOF, bad magic, a refused callable ...
        why = re.search(r"WeightsUnpickler error: (.*)", str(exc))
        first = (why.group(1) if why else str(exc).split(". ")[0]).strip() or type(exc).__name__
        raise UserError(f"{flag} {path}: truncated or not a CLMR checkpoint ({os.path.getsize(path)} bytes; {first})") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise UserError(f"{flag} {path}: not a state dict (expected CLMR's Lightning .ckpt with 'state_dict', or a .pt "
                        "of tensors)")
    return sd


def clmr_key_map(sd: dict[str, Tensor], *, where: str) -> tuple[dict[str, Tensor], list[str]]:
    """CLMR SampleCNN keys onto our ``CLMR``'s: ``(tensors under our names, ignored keys)``.

    The original (Spijkervet/CLMR ``clmr/models/sample_cnn.py`` @ 09d32de) keeps its layers in
    ``self.sequential``: index 0 the strided conv (Conv1d k3 s3, BatchNorm1d, ReLU), 1..n the blocks
    (Conv1d k=stride p1, BatchNorm1d, ReLU, MaxPool1d), n+1 the 512->512 conv + BatchNorm + ReLU,
    then ``fc``. Our ``SampleCNN.blocks`` has the same indices and the same children, so
    ``sequential.i.j.*`` is ``encoder.blocks.i.j.*``. The Lightning module
    (``clmr/modules/contrastive_learning.py`` @ 3523e08) holds the encoder twice, as ``encoder.*``
    and ``model.encoder.*`` (SimCLR's), beside ``model.projector.*``; a plain ``.pt`` is the encoder's
    own state dict, with or without the ``encoder.`` prefix (``clmr/utils/checkpoint.py`` @
    8c0a0cd strips it). ``fc`` (SimCLR replaces it by an identity; a supervised head otherwise)
    and the projector are ignored; anything else is an unexpected key."""
    prefixes = ("model.encoder.", "encoder.", "module.", "")
    found: dict[str, Tensor] = {}
    ignored, unexpected = [], []
    for k, v in sd.items():
        rest = next(k[len(p):] for p in prefixes if k.startswith(p))
        if rest.startswith("sequential."):
            if rest in found and not torch.equal(found[rest], v):
                raise UserError(f"{where}: {k} and another copy of {rest} differ; which encoder is meant is unclear")
            found[rest] = v
        elif rest.startswith(("fc.", "projector.")) or k.startswith("model.projector."):
            ignored.append(k)
        else:
            unexpected.append(k)
    if unexpected:
        raise UserError(f"{where}: unexpected keys for a CLMR SampleCNN: {_short(sorted(unexpected))} (expected "
                        "[model.]encoder.sequential.N..., model.projector..., fc...)")
    if not found:
        raise UserError(f"{where}: no SampleCNN weights in it (no encoder.sequential.N... keys; found {_short(sorted(sd))})")
    return {"encoder.blocks." + k[len("sequential."):]: v for k, v in found.items()}, sorted(ignored)


def clmr_config_from(tensors: dict[str, Tensor], *, where: str):
    """Our ``CLMRConfig`` with the widths the weights have (kernel 3 everywhere, as CLMR's strides 3)."""
    from models.clmr import CLMRConfig

    convs = {}
    for k, v in tensors.items():
        m = re.fullmatch(r"encoder\.blocks\.(\d+)\.0\.weight", k)
        if m:
            convs[int(m.group(1))] = v
    idx = sorted(convs)
    if len(idx) < 3 or idx != list(range(len(idx))):
        raise UserError(f"{where}: SampleCNN blocks {idx} found; expected sequential.0 .. sequential.N in order (missing keys)")
    bad = [f"sequential.{i} kernel {convs[i].shape[-1]}" for i in idx if convs[i].dim() != 3 or convs[i].shape[-1] != 3]
    if bad:
        raise UserError(f"{where}: {', '.join(bad)}: our SampleCNN has kernel/stride 3 (CLMR's 3 x 9 strides); "
                        "other strides are not supported")
    return CLMRConfig(channels=tuple(int(convs[i].shape[0]) for i in idx[1:-1]), first_channels=int(convs[0].shape[0]),
                      last_channels=int(convs[idx[-1]].shape[0]))


def read_clmr(path: str, *, flag: str = "--checkpoint"):
    """``(CLMR model with the file's encoder weights, run Config, ignored keys)`` for CLMR's own files."""
    from models.clmr import CLMR
    import train_config as tc

    where = f"{flag} {path}"
    tensors, ignored = clmr_key_map(_clmr_state(path, flag), where=where)
    mcfg = clmr_config_from(tensors, where=where)
    model = CLMR(mcfg)
    _load_into(model, "clmr", tensors, what=where)
    cfg = tc.preset("clmr_mtat")  # CLMR's own training setup; the model section is the file's
    cfg.model = mcfg
    cfg.preset = "clmr (imported)"
    return model, cfg, ignored


def clmr_encoder(path: str, *, name: str = "clmr", sample_rate: int | None = None, flag: str = "--checkpoint"):
    from eval_tools.encoders import build_encoder
    import train_config as tc

    model, cfg, ignored = read_clmr(path, flag=flag)
    return build_encoder(name=name, arch="clmr", model=model, model_cfg=cfg.model, sample_rate=int(sample_rate or CLMR_SAMPLE_RATE),
                         crop_samples=cfg.model.input_samples, ident=f"clmr-{_file_sha(path)}", train_config=tc.to_dict(cfg),
                         meta={"clmr_checkpoint": path, "ignored_keys": len(ignored), "preset": cfg.preset})


# ------------------------------------------------------------------------------------------------
# one spelling for every source


def source_kind(spec: str) -> tuple[str, str]:
    """``(kind, path)``: kind ``hf`` | ``export`` | ``clmr`` | ``musicssl`` (a train.py checkpoint).

    Explicit prefixes win; a folder is an export when its config.json says so, else an HF folder;
    a file that is not a musicssl checkpoint is tried as CLMR's."""
    for kind in ("hf", "export", "clmr"):
        if spec.startswith(kind + ":"):
            return kind, spec[len(kind) + 1:]
    if os.path.isdir(spec):
        return ("export" if is_export(spec) else "hf"), spec
    return "musicssl", spec


def _musicssl_or_clmr(path: str, flag: str) -> str:
    """``musicssl`` or ``clmr`` for a file: CLMR when it reads but is not a musicssl checkpoint."""
    from training import checkpoint
    from training.errors import CheckpointError

    if "://" in path or not os.path.isfile(path):
        return "musicssl"  # a bucket URL or a missing file: the checkpoint reader says what is wrong
    try:  # a cheap look (tensors memory-mapped, not read) before the reader's full one
        peek = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the full read below names the problem
        peek = None
    if isinstance(peek, dict) and peek.get("format") == checkpoint.FORMAT:
        return "musicssl"
    try:
        checkpoint.read(path, flag=flag)
        return "musicssl"
    except CheckpointError as exc:
        if "is not a musicssl-ckpt" not in str(exc) and "non-tensor Python objects" not in str(exc):
            raise
        try:
            clmr_key_map(_clmr_state(path, flag), where=f"{flag} {path}")
        except UserError:
            raise UserError(f"{exc}; nor is it CLMR's SampleCNN weights: pass a ckpt-<step>.pt, export:DIR, hf:DIR "
                            "or clmr:PATH") from None
        return "clmr"


def open_encoder(spec: str, *, name: str = "pretrained", layer: int | str = -1, sample_rate: int | None = None,
                 fallback_rate: int | None = None, max_window_seconds: float = 30.0, trust_remote_code: bool = False,
                 flag: str = "--checkpoint"):
    """The encoder ``spec`` names (see :func:`source_kind`)."""
    from eval_tools.encoders import encoder_from_checkpoint

    kind, path = source_kind(spec)
    if kind == "musicssl":
        kind = _musicssl_or_clmr(path, flag)
    if kind == "hf":  # --checkpoint hf:DIR is --hf-model DIR
        return hf_encoder(path, name=name if name != "pretrained" else None, layer=layer, sample_rate=sample_rate,
                          trust_remote_code=trust_remote_code, max_window_seconds=max_window_seconds,
                          flag="--hf-model" if flag == "--checkpoint" else flag)
    if kind == "export":
        return load_export(path, name=name, layer=layer, sample_rate=sample_rate, max_window_seconds=max_window_seconds,
                           flag=flag)
    if kind == "clmr":
        if layer != -1:
            raise UserError("--layer applies to wav2vec2 only; clmr has one output (leave --layer at -1)")
        return clmr_encoder(path, name=name, sample_rate=sample_rate, flag=flag)
    return encoder_from_checkpoint(path, name=name, layer=layer, sample_rate=sample_rate, fallback_rate=fallback_rate,
                                   max_window_seconds=max_window_seconds)


def arch_config(spec: str, *, flag: str = "--checkpoint"):
    """The train.py Config of ``spec``'s architecture (for random/supervised baselines); None for
    an HF folder (no musicssl architecture: give --preset)."""
    from eval_tools.encoders import checkpoint_config
    import train_config as tc

    kind, path = source_kind(spec)
    if kind == "musicssl":
        kind = _musicssl_or_clmr(path, flag)
    if kind == "hf":
        check_hf_folder(path, flag="--hf-model" if flag == "--checkpoint" else flag)
        return None
    if kind == "export":
        return tc.from_dict(_read_export(path, flag=flag)[0]["train_config"])
    if kind == "clmr":
        return read_clmr(path, flag=flag)[1]
    return checkpoint_config(path)


# ------------------------------------------------------------------------------------------------
# warm start


def warm_start(model: nn.Module, arch: str, source: str, *, flag: str = "--train.init_from") -> dict[str, Any]:
    """Load ``source``'s encoder weights into ``model`` (a fresh ``arch`` model) in place.

    ``source``: an export folder, a Hugging Face wav2vec2 folder (wav2vec2 only), a train.py
    checkpoint (all of its model, training-only parts too where their shapes still fit) or a CLMR
    file. Training-only parts the source lacks (projection head, quantizer) keep their fresh init.
    Returns ``{"source", "kind", "loaded", "kept_init", "ignored"}``."""
    from models.wav2vec2 import hf_config_mismatches, state_dict_from_hf
    from training import checkpoint
    import train_config as tc

    kind, path = source_kind(source)
    if kind == "musicssl":
        kind = _musicssl_or_clmr(path, flag)
    extra: list[str] = []
    if kind == "export":
        info, tensors = _read_export(path, flag=flag)
        src_arch = info["arch"]
    elif kind == "hf":
        check_hf_folder(path, flag=flag)
        hf_cfg = _hf_json(path, "config.json")
        src_arch = "wav2vec2" if hf_cfg.get("model_type") == "wav2vec2" else f"hf-{hf_cfg.get('model_type')}"
        if src_arch == "wav2vec2" and arch == "wav2vec2":
            off = hf_config_mismatches(model.config, hf_cfg)
            if off:
                raise UserError(f"{flag} {path}: its config.json differs from this run's: {_short(off)} (theirs vs ours); "
                                "set --model.* to match it")
            st = os.path.join(path, "model.safetensors")
            if not os.path.isfile(st):
                raise UserError(f"{flag} {path}: warm start reads model.safetensors (found none; a sharded or .bin "
                                "checkpoint: re-save it with save_pretrained(safe_serialization=True))")
            tensors, extra = state_dict_from_hf(model.config, read_safetensors(st, flag=flag))
    elif kind == "clmr":
        m, _, extra = read_clmr(path, flag=flag)
        src_arch, tensors = "clmr", {k: v for k, v in m.state_dict().items() if k.startswith("encoder.")}
    else:
        state, _ = checkpoint.read(path, flag=flag)
        src_arch = tc.from_dict(state["config"]).arch
        own = model.state_dict()
        # the whole model (quantizer, projection head too), unless a training-only part changed shape
        tensors = {k: v for k, v in state["model"].items()
                   if not (_training_only(src_arch, k) and (k not in own or own[k].shape != v.shape))}
    if src_arch != arch:
        raise UserError(f"{flag} {path}: holds a {src_arch} model, this run trains {arch}; warm start needs the same architecture")
    kept = _load_into(model, arch, tensors, what=f"{flag} {path}")
    return {"source": path, "kind": kind, "loaded": len(tensors), "kept_init": kept, "ignored": extra}
