"""Typed configuration for ``train.py``: one dataclass per component, presets, dotted overrides.

A run is described by one :class:`Config`::

    Config
      preset, arch          which preset built it; "clmr" | "wav2vec2" | "cpc"
      data       DataConfig          shards, crops, loader workers, where augmentation runs
      augment    AugmentConfig       pipeline.augment's own config (chain, probabilities, backend)
      model      CLMRConfig | Wav2Vec2Config | CPCConfig   the model file's own config
      optim      OptimConfig         optimizer, learning-rate schedule, gradient clipping
      train      TrainConfig         steps, global batch, accumulation, device, precision
      logging    LoggingConfig       console / W&B cadence and mode
      checkpoint CheckpointConfig    where, how often, how many, resume

Presets are small functions (``PRESETS``); ``--section.key=value`` overrides are parsed against the
field's type hint and rebuilt through ``dataclasses.replace`` so that every ``__post_init__`` check
runs again. Unknown keys are an error that names the key and the keys that do exist.

Only the standard library is imported at module import time; the model and augmentation configs are
imported when a preset or a checkpoint's config is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# arch -> (module, config class, model class). Imported lazily: a preset only needs its own model.
MODELS: dict[str, tuple[str, str, str]] = {
    "clmr": ("models.clmr", "CLMRConfig", "CLMR"),
    "wav2vec2": ("models.wav2vec2", "Wav2Vec2Config", "Wav2Vec2Pretrain"),
    "cpc": ("models.cpc", "CPCConfig", "CPC"),
}

DEMO_NSYNTH = "./demo_shards/nsynth/train.manifest.json"
DEMO_MTAT = "./demo_shards/mtat/train.manifest.json"


def model_classes(arch: str) -> tuple[type, type]:
    """``(config class, model class)`` for an arch name, importing its model file."""
    if arch not in MODELS:
        raise ValueError(f"arch must be one of {sorted(MODELS)}, got {arch!r}")
    module, cfg_name, model_name = MODELS[arch]
    mod = importlib.import_module(module)
    return getattr(mod, cfg_name), getattr(mod, model_name)


def _augment_config_class() -> type:
    from pipeline.augment import AugmentConfig

    return AugmentConfig


# --------------------------------------------------------------------------------------------
# The sections


@dataclass(kw_only=True)
class DataConfig:
    """Shards and the streaming loader (pipeline/loader.py)."""

    manifests: list[str]  # split manifest URLs (local path, file://, s3://, gs://)
    weights: list[float] | None = None  # mixing weights per manifest; None = proportional to size
    crop_samples: int | None = None  # None = the model's input_samples (CLMR, CPC)
    sample_rate: int | None = None  # None = the manifests' rate (they must agree)
    variable_length: bool = False  # single-crop archs: clips shorter than the crop are taken whole
    pad_to: Literal["shortest", "longest"] = "shortest"  # variable_length batches: crop to shortest or pad
    short_policy: Literal["pad", "skip"] = "pad"
    shuffle_buffer: int = 1000
    num_workers: int = 4
    prefetch_factor: int = 2  # batches each loader worker keeps ready
    pin_memory: bool = True  # only used on CUDA
    on_error: Literal["skip", "raise"] = "skip"
    # Where augmentation runs is --augment.backend: "gpu" = batched on the training device after the
    # copy (which may be the CPU), "cpu" = pipeline.augment_cpu.CpuAugment in the loader workers.

    def __post_init__(self) -> None:
        if isinstance(self.manifests, str):
            self.manifests = [self.manifests]
        self.manifests = list(self.manifests)
        if not self.manifests:
            raise ValueError("--data.manifests is empty: give at least one <split>.manifest.json URL")
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if len(self.weights) != len(self.manifests):
                raise ValueError(
                    f"--data.weights has {len(self.weights)} values but --data.manifests has "
                    f"{len(self.manifests)}: give one weight per manifest"
                )
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"--data.weights must be non-negative with a positive sum, got {self.weights}")
        if self.crop_samples is not None and self.crop_samples < 1:
            raise ValueError(f"--data.crop_samples must be positive, got {self.crop_samples}")
        if self.sample_rate is not None and self.sample_rate < 1:
            raise ValueError(f"--data.sample_rate must be positive, got {self.sample_rate}")
        if self.num_workers < 0:
            raise ValueError(f"--data.num_workers must be >= 0, got {self.num_workers}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"--data.shuffle_buffer must be >= 1 (1 = no shuffling), got {self.shuffle_buffer}")
        if self.prefetch_factor < 1:
            raise ValueError(f"--data.prefetch_factor must be >= 1, got {self.prefetch_factor}")


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer, learning-rate schedule and gradient clipping."""

    name: Literal["adam", "adamw"] = "adam"  # adamw = decoupled weight decay (fairseq's "adam")
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    # constant | warmup_linear (linear warmup, then linear decay to final_lr_ratio * lr at the last
    # step) | warmup_cosine (linear warmup, then cosine decay to final_lr_ratio * lr)
    schedule: Literal["constant", "warmup_linear", "warmup_cosine"] = "constant"
    warmup_steps: int = 0
    final_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping (the norm is still logged)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if not self.lr > 0:
            raise ValueError(f"--optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"--optim.betas must be two values in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"--optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"--optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"--optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.final_lr_ratio <= 1:
            raise ValueError(f"--optim.final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"--optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


@dataclass(kw_only=True)
class TrainConfig:
    """The step loop: length, batch, device and numerics."""

    steps: int  # optimizer steps in the whole run (a resumed run continues to this step)
    global_batch_size: int  # clips per optimizer step over all ranks and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step (gradients synced on the last only)
    seed: int = 0
    device: str = "auto"  # auto = cuda:LOCAL_RANK when CUDA is available, else cpu
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model
    sync_batchnorm: bool = False  # nn.SyncBatchNorm across ranks (CUDA + DDP only)
    find_unused_parameters: bool = False  # DDP flag, for models with branches unused in some steps
    max_nonfinite: int = 20  # stop after this many non-finite steps in a row
    out_dir: str = ""  # local run folder (metrics.jsonl, summary.json, wandb/); "" = runs/<preset>

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--train.steps must be >= 1, got {self.steps}")
        if self.global_batch_size < 1:
            raise ValueError(f"--train.global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.grad_accum < 1:
            raise ValueError(f"--train.grad_accum must be >= 1, got {self.grad_accum}")
        if self.max_nonfinite < 1:
            raise ValueError(f"--train.max_nonfinite must be >= 1, got {self.max_nonfinite}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            raise ValueError(f"--train.device must be auto, cpu or cuda[:N], got {self.device!r}")


@dataclass(kw_only=True)
class LoggingConfig:
    """Console, metrics.jsonl and Weights & Biases."""

    every: int = 10  # console line and W&B scalars every N steps (metrics.jsonl gets every step)
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online iff WANDB_API_KEY
    wandb_project: str = "musicssl"
    wandb_entity: str | None = None
    run_name: str | None = None  # W&B display name; None = the preset name
    audio_every: int = 2000  # log augmented audio examples every N steps (and on the first step); 0 = never
    audio_examples: int = 4  # clips per audio log (each with all its views, clean and augmented)

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"--logging.every must be >= 1, got {self.every}")
        if self.audio_every < 0:
            raise ValueError(f"--logging.audio_every must be >= 0 (0 = never), got {self.audio_every}")
        if self.audio_examples < 1:
            raise ValueError(f"--logging.audio_examples must be >= 1, got {self.audio_examples}")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints (docs/architecture.md §5)."""

    every: int = 1000  # also written on SIGTERM, on divergence and at the end
    keep: int = 3  # newest K checkpoints kept
    dir: str = ""  # URL (local or bucket); "" = <train.out_dir>/checkpoints
    resume: str = "none"  # none | auto (latest in dir, if any) | a checkpoint URL

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"--checkpoint.every must be >= 1, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"--checkpoint.keep must be >= 1, got {self.keep}")


@dataclass(kw_only=True)
class Config:
    """A whole run. Build it with a preset, then :func:`apply_overrides`."""

    preset: str
    arch: Literal["clmr", "wav2vec2", "cpc"]
    data: DataConfig
    augment: Any  # pipeline.augment.AugmentConfig
    model: Any  # the arch's config class (models/<arch>.py)
    optim: OptimConfig
    train: TrainConfig
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if self.arch not in MODELS:
            raise ValueError(f"arch must be one of {sorted(MODELS)}, got {self.arch!r}")
        expected = MODELS[self.arch][1]
        if type(self.model).__name__ != expected:
            raise ValueError(f"arch {self.arch!r} needs a {expected} in `model`, got {type(self.model).__name__}")
        # LayerDrop skips whole layers on some steps; DDP then errors on the parameters that got no
        # gradient unless it is told to look for them.
        if getattr(self.model, "layerdrop", 0.0) > 0 and not self.train.find_unused_parameters:
            raise ValueError(
                f"--model.layerdrop={self.model.layerdrop} needs --train.find_unused_parameters=true "
                "(DDP fails on steps that skip a layer); or set --model.layerdrop=0"
            )

    @property
    def out_dir(self) -> str:
        return self.train.out_dir or f"runs/{self.preset}"

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.out_dir.rstrip('/')}/checkpoints"

    @property
    def crop_samples(self) -> int:
        """The loader's crop length: ``data.crop_samples``, else the model's ``input_samples``."""
        if self.data.crop_samples is not None:
            return self.data.crop_samples
        samples = getattr(self.model, "input_samples", None)
        if samples is None:
            raise ValueError(f"--data.crop_samples is required for arch {self.arch!r} (its config has no input_samples)")
        return int(samples)

    @property
    def views(self) -> int:
        """Views per clip the loader yields: two crops for CLMR's contrastive pairs, else one."""
        return 2 if self.arch == "clmr" else 1


# --------------------------------------------------------------------------------------------
# Presets: small functions. Real-data presets expect shards built by shard-tools under ./shards/.


def _clmr_optim() -> OptimConfig:
    # CLMR: Adam, lr 3e-4, constant; the reference config's weight decay 1e-6.
    return OptimConfig(name="adam", lr=3e-4, weight_decay=1e-6)


def _wav2vec2_optim(steps: int, warmup: int) -> OptimConfig:
    # wav2vec 2.0 BASE (fairseq): Adam (0.9, 0.98), eps 1e-6, decoupled wd 0.01, lr 5e-4,
    # linear warmup then linear decay to zero.
    return OptimConfig(
        name="adamw", lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
        schedule="warmup_linear", warmup_steps=warmup, final_lr_ratio=0.0, grad_clip=10.0,
    )


def clmr_mtat() -> Config:
    """CLMR on MagnaTagATune: SampleCNN, 59049-sample crops at 22.05 kHz, batch 48, Adam 3e-4."""
    model_cfg, _ = model_classes("clmr")
    return Config(
        preset="clmr_mtat", arch="clmr",
        data=DataConfig(manifests=["./shards/mtat/train.manifest.json"], sample_rate=22050, num_workers=8),
        augment=_augment_config_class()(),
        model=model_cfg.default(),
        optim=_clmr_optim(),
        train=TrainConfig(steps=300_000, global_batch_size=48),
        logging=LoggingConfig(every=50, audio_every=5000),
        checkpoint=CheckpointConfig(every=5000),
    )


def clmr_msd() -> Config:
    """CLMR on the Million Song Dataset previews: as clmr_mtat, longer."""
    cfg = clmr_mtat()
    return dataclasses.replace(
        cfg, preset="clmr_msd",
        data=dataclasses.replace(cfg.data, manifests=["./shards/msd/train.manifest.json"], num_workers=12),
        train=dataclasses.replace(cfg.train, steps=1_000_000),
    )


def wav2vec2_musicnet() -> Config:
    """wav2vec 2.0 BASE on MusicNet at 16 kHz: 250k-sample crops, global batch 64, 400k steps."""
    model_cfg, _ = model_classes("wav2vec2")
    steps = 400_000
    return Config(
        preset="wav2vec2_musicnet", arch="wav2vec2",
        data=DataConfig(manifests=["./shards/musicnet/train.manifest.json"], sample_rate=16000,
                        crop_samples=250_000, num_workers=8),
        augment=_augment_config_class()(enabled=False),  # wav2vec2 learns from masking, not augmentation
        model=model_cfg.base(),
        optim=_wav2vec2_optim(steps, warmup=32_000),
        # BASE uses LayerDrop 0.05: DDP must look for the parameters a skipped layer leaves unused
        train=TrainConfig(steps=steps, global_batch_size=64, find_unused_parameters=True),
        logging=LoggingConfig(every=100, audio_every=10_000),
        checkpoint=CheckpointConfig(every=5000),
    )


def cpc_mtat() -> Config:
    """CPC on MagnaTagATune at 22.05 kHz with CLMR's 59049-sample crops: Adam 2e-4, global batch 64."""
    model_cfg, _ = model_classes("cpc")
    return Config(
        preset="cpc_mtat", arch="cpc",
        data=DataConfig(manifests=["./shards/mtat/train.manifest.json"], sample_rate=22050, num_workers=8),
        augment=_augment_config_class()(enabled=False),
        model=model_cfg.default(),
        optim=OptimConfig(name="adam", lr=2e-4),
        train=TrainConfig(steps=300_000, global_batch_size=64),
        logging=LoggingConfig(every=50, audio_every=5000),
        checkpoint=CheckpointConfig(every=5000),
    )


def _tiny_common() -> dict[str, Any]:
    return dict(
        train=TrainConfig(steps=200, global_batch_size=16, device="cpu"),
        logging=LoggingConfig(every=10, audio_every=100, audio_examples=2),
        checkpoint=CheckpointConfig(every=50, keep=2),
    )


def clmr_tiny() -> Config:
    """CPU smoke run: tiny SampleCNN on the demo NSynth-layout shards (`shard-tools demo`)."""
    model_cfg, _ = model_classes("clmr")
    return Config(
        preset="clmr_tiny", arch="clmr",
        data=DataConfig(manifests=[DEMO_NSYNTH], num_workers=1, shuffle_buffer=64),
        augment=_augment_config_class()(),
        model=model_cfg.tiny(),
        optim=OptimConfig(name="adam", lr=1e-3),
        **_tiny_common(),
    )


def wav2vec2_tiny() -> Config:
    """CPU smoke run: a two-layer wav2vec2 on the demo shards, 1 s crops, warmup + linear decay."""
    model_cfg, _ = model_classes("wav2vec2")
    cfg = Config(
        preset="wav2vec2_tiny", arch="wav2vec2",
        data=DataConfig(manifests=[DEMO_NSYNTH], num_workers=1, shuffle_buffer=64, sample_rate=16000,
                        crop_samples=16000),
        augment=_augment_config_class()(enabled=False),
        model=model_cfg.tiny(),
        optim=dataclasses.replace(_wav2vec2_optim(200, warmup=20), lr=1e-3),
        **_tiny_common(),
    )
    return cfg


def cpc_tiny() -> Config:
    """CPU smoke run: a small CPC on the demo shards."""
    model_cfg, _ = model_classes("cpc")
    return Config(
        preset="cpc_tiny", arch="cpc",
        data=DataConfig(manifests=[DEMO_NSYNTH], num_workers=1, shuffle_buffer=64),
        augment=_augment_config_class()(enabled=False),
        model=model_cfg.tiny(),
        optim=OptimConfig(name="adam", lr=1e-3),
        **_tiny_common(),
    )


PRESETS: dict[str, Callable[[], Config]] = {
    "clmr_mtat": clmr_mtat,
    "clmr_msd": clmr_msd,
    "wav2vec2_musicnet": wav2vec2_musicnet,
    "cpc_mtat": cpc_mtat,
    "clmr_tiny": clmr_tiny,
    "wav2vec2_tiny": wav2vec2_tiny,
    "cpc_tiny": cpc_tiny,
}


def preset(name: str) -> Config:
    """Build a preset by name; an unknown name lists the known ones."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"--config: unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


# --------------------------------------------------------------------------------------------
# Overrides, dicts


def _field_type(cls: type, name: str) -> Any:
    """The resolved type hint of one field (string annotations evaluated in the class's module)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    hint = f.type
    if isinstance(hint, str):
        namespace = dict(vars(typing))
        namespace.update(vars(sys.modules[cls.__module__]))
        hint = eval(hint, namespace)  # noqa: S307 - annotations of our own dataclasses
    return hint


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_value(raw: str, hint: Any, flag: str) -> Any:
    """Parse a command-line string into ``hint`` (bool, int, float, str, Literal, Optional, list, tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.strip().lower() in ("none", "null"):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return parse_value(raw, a, flag)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{flag}: cannot parse {raw!r}")
    if origin is Literal:
        for a in args:
            if str(a) == raw:
                return a
        raise ValueError(f"{flag}={raw}: must be one of {', '.join(map(str, args))}")
    if origin in (list, tuple, Sequence) or hint in (list, tuple):
        text = raw.strip()
        items: list[Any]
        if text.startswith("["):
            items = json.loads(text)
        else:
            items = [s for s in (p.strip() for p in text.split(",")) if s] if text else []
        inner = args[0] if args else str
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(items):
                raise ValueError(f"{flag}={raw}: expected {len(args)} comma-separated values")
            return tuple(parse_value(str(v), a, flag) for v, a in zip(items, args))
        values = [parse_value(str(v) if not isinstance(v, str) else v, inner, flag) for v in items]
        return tuple(values) if origin is tuple else values
    if hint is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"{flag}={raw}: expected true or false")
    if hint is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            try:
                as_float = float(raw)
            except ValueError:
                raise ValueError(f"{flag}={raw}: expected an integer") from None
            if not as_float.is_integer():
                raise ValueError(f"{flag}={raw}: expected an integer") from None
            return int(as_float)
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{flag}={raw}: expected a number") from None
    if hint is str or hint is Any:
        return raw
    raise ValueError(f"{flag}: fields of type {hint!r} cannot be set from the command line")


def _unknown_key(path: str, name: str, obj: Any) -> ValueError:
    known = [f.name for f in dataclasses.fields(obj)]
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean --{path + '.' if path else ''}{close[0]}?)" if close else ""
    where = f"section {path!r}" if path else "the top level"
    return ValueError(f"unknown config key --{path + '.' if path else ''}{name}{hint}; keys in {where}: {', '.join(known)}")


def _set_path(obj: Any, parts: list[str], raw: str, done: list[str]) -> Any:
    """A copy of dataclass ``obj`` with the dotted field set; ``dataclasses.replace`` re-validates."""
    name = parts[0]
    path = ".".join(done)
    if not dataclasses.is_dataclass(obj):
        raise ValueError(f"--{path} is a value, not a section: --{path}.{'.'.join(parts)} does not exist")
    if name not in {f.name for f in dataclasses.fields(obj)}:
        raise _unknown_key(path, name, obj)
    flag = "--" + ".".join([*done, name])
    if len(parts) == 1:
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            raise ValueError(f"{flag} is a section: set one of its keys, e.g. {flag}.{dataclasses.fields(current)[0].name}=...")
        value = parse_value(raw, _field_type(type(obj), name), flag)
    else:
        value = _set_path(getattr(obj, name), parts[1:], raw, [*done, name])
    try:
        return dataclasses.replace(obj, **{name: value})
    except TypeError as exc:
        raise ValueError(f"{flag}={raw}: {exc}") from exc


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Apply ``section.key=value`` strings (with or without the leading ``--``) in order."""
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ValueError(f"override {item!r} must look like --section.key=value")
        key, raw = text.split("=", 1)
        if key in ("arch", "preset"):
            raise ValueError(f"--{key} cannot be overridden: pick another --config preset instead")
        cfg = _set_path(cfg, key.split("."), raw, [])
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain Python values (JSON-able; safe for ``torch.load(weights_only=True)``)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _from_dict(cls: type, d: dict[str, Any], path: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        if key not in names:
            raise ValueError(f"config key {path}{key} is unknown to {cls.__name__} (written by another version?)")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in d or not f.init:
            continue
        v = d[f.name]
        hint = _field_type(cls, f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(v, dict):
            v = _from_dict(hint, v, f"{path}{f.name}.")
        elif typing.get_origin(hint) is tuple and isinstance(v, list):
            v = tuple(v)
        elif typing.get_origin(hint) in (typing.Union, types.UnionType) and isinstance(v, list):
            if any(typing.get_origin(a) is tuple for a in typing.get_args(hint)):
                v = tuple(v)
        kwargs[f.name] = v
    return cls(**kwargs)


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :func:`to_dict`'s output (e.g. a checkpoint's ``config``)."""
    d = dict(d)
    arch = d["arch"]
    model_cfg_cls, _ = model_classes(arch)
    return Config(
        preset=d["preset"],
        arch=arch,
        data=_from_dict(DataConfig, d["data"], "data."),
        augment=_from_dict(_augment_config_class(), d["augment"], "augment."),
        model=_from_dict(model_cfg_cls, d["model"], "model."),
        optim=_from_dict(OptimConfig, d["optim"], "optim."),
        train=_from_dict(TrainConfig, d["train"], "train."),
        logging=_from_dict(LoggingConfig, d.get("logging", {}), "logging."),
        checkpoint=_from_dict(CheckpointConfig, d.get("checkpoint", {}), "checkpoint."),
    )


def describe(cfg: Any, prefix: str = "") -> list[str]:
    """``--section.key=value`` lines for every leaf (for --print-config and the run header)."""
    lines: list[str] = []
    if isinstance(cfg, Config):
        lines.append(f"# preset {cfg.preset} (arch {cfg.arch}); any line below can be passed as an override")
    for f in dataclasses.fields(cfg):
        if isinstance(cfg, Config) and f.name in ("preset", "arch"):
            continue
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            lines += describe(v, f"{prefix}{f.name}.")
        else:
            if isinstance(v, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in v):
                text = json.dumps(to_dict(v))  # nested, e.g. wav2vec2's conv_layers
            elif isinstance(v, (list, tuple)):
                text = ",".join(map(str, v))
            else:
                text = str(v)
            lines.append(f"--{prefix}{f.name}={text}")
    return lines


def diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two :func:`to_dict` outputs."""
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out
