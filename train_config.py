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
      eval       EvalConfig          the online probe (validation loss: data.valid_manifests, train.eval_every)

Presets are small functions (``PRESETS``). Code builds configs in Python (a preset, then
``dataclasses.replace``); the command line and config files go through one converter,
:func:`convert`, which reads each value by its field's type hint (a bool is never taken for a
number, nor a number for a bool): ``--section.key=value`` overrides (:func:`apply_overrides`),
JSON/YAML/TOML files (:func:`load_file`, written by :func:`dumps`) and a checkpoint's stored config
(:func:`from_dict`). The whole config is then rebuilt, so every ``__post_init__`` check runs on the
final values. Unknown keys are an error that names the key, the nearest existing one and the keys
that do exist.

Only the standard library is imported at module import time; the model, augmentation and loader
configs are imported when a preset or a checkpoint's config is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # the section types; imported for real only when a preset or config is built
    from models.clmr import CLMRConfig
    from models.cpc import CPCConfig
    from models.wav2vec2 import Wav2Vec2Config
    from pipeline.augment import AugmentConfig
    from pipeline.loader import LoaderConfig

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


def _require(ok: bool, flag: str, need: str, value: Any) -> None:
    """A section's check: ``ValueError("<flag> must be <need>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{flag} must be {need}, got {value!r}")


@dataclass(kw_only=True)
class DataConfig:
    """Shards and the streaming loader: the keys a user sets, with the trainer's defaults.

    ``pipeline.loader.LoaderConfig`` owns what these mean and checks them (:class:`Config` builds
    one at validation); :meth:`loader_config` is the one mapping from here to there, adding what
    the run decides (per-rank batch, views, crop, rate, seed).
    """

    manifests: list[str]  # split manifest URLs (local path, file://, s3://, gs://)
    weights: list[float] | None = None  # mixing weights per manifest; None = proportional to size
    crop_samples: int | None = None  # None = the model's input_samples (CLMR, CPC)
    sample_rate: int | None = None  # None = the manifests' rate (they must agree)
    variable_length: bool = False  # single-crop archs: clips shorter than the crop are taken whole
    pad_to: Literal["shortest", "longest"] = "shortest"  # variable_length batches: crop to shortest or pad
    short_policy: Literal["pad", "skip"] = "pad"
    shuffle_buffer_mb: float = 128.0  # MiB of compressed samples each loader worker's shuffle buffer holds
    shuffle_buffer: int | None = None  # also at most this many samples; None = the MiB budget alone
    num_workers: int = 4
    prefetch_factor: int = 2  # batches each loader worker keeps ready
    pin_memory: bool = True  # only used on CUDA
    on_error: Literal["skip", "raise"] = "skip"
    check_shards: bool = True  # at start: every shard exists with its manifest size (one LIST per bucket folder)
    io_timeout_s: float = 60.0  # the longest one remote open/read may take before it is retried
    io_retries: int = 3  # reopen attempts per shard read after a transient error or a timeout
    cache_dir: str | None = None  # node-local folder caching remote shards (sha256-verified); None = no cache
    cache_limit_gb: float = 100.0  # the most the shard cache holds; least recently used shards are evicted
    # Held-out split(s) scored every --train.eval_every steps (training/validate.py); [] = no validation
    valid_manifests: list[str] = field(default_factory=list)
    # Where augmentation runs is --augment.backend: "gpu" = batched on the training device after the
    # copy (which may be the CPU), "cpu" = pipeline.augment_cpu.CpuAugment in the loader workers.

    def __post_init__(self) -> None:
        for name in ("manifests", "valid_manifests"):
            value = getattr(self, name)
            setattr(self, name, [value] if isinstance(value, str) else list(value))

    def loader_config(self, *, batch_size: int, views: int, crop_samples: int, sample_rate: int | None, seed: int,
                      cuda: bool, valid: bool = False) -> LoaderConfig:
        """The ``LoaderConfig`` of one rank; ``ValueError`` messages name the ``--data.*`` flag.

        ``valid``: the validation stream (training/validate.py): ``valid_manifests`` read in the
        main process (``num_workers=0``), everything else (the cache included) as training's."""
        from pipeline.loader import LoaderConfig

        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name not in ("crop_samples", "sample_rate", "pin_memory", "valid_manifests")}
        if valid:
            shared |= {"manifests": self.valid_manifests, "weights": None, "num_workers": 0}
        try:
            return LoaderConfig(**shared, batch_size=batch_size, mode="pairs" if views == 2 else "single",
                                crop_samples=crop_samples, sample_rate=sample_rate, mono=True, seed=seed,
                                pin_memory=self.pin_memory and cuda)
        except ValueError as exc:
            text = str(exc).replace("data.manifests", "data.valid_manifests") if valid else str(exc)
            raise ValueError(re.sub(r"(?<![-\w])data\.", "--data.", text)) from None


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
        _require(self.lr > 0, "--optim.lr", "> 0", self.lr)
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "--optim.betas", "two values in [0, 1)",
                 self.betas)
        _require(self.eps > 0, "--optim.eps", "> 0", self.eps)
        _require(self.weight_decay >= 0, "--optim.weight_decay", ">= 0", self.weight_decay)
        _require(self.warmup_steps >= 0, "--optim.warmup_steps", ">= 0", self.warmup_steps)
        _require(0 <= self.final_lr_ratio <= 1, "--optim.final_lr_ratio", "in [0, 1]", self.final_lr_ratio)
        _require(self.grad_clip >= 0, "--optim.grad_clip", ">= 0 (0 = off)", self.grad_clip)


@dataclass(kw_only=True)
class TrainConfig:
    """The step loop: length, batch, device and numerics."""

    steps: int  # optimizer steps in the whole run (a resumed run continues to this step)
    global_batch_size: int  # clips per optimizer step over all ranks and micro-steps
    grad_accum: int = 1  # micro-steps per optimizer step (gradients synced on the last only)
    seed: int = 0
    device: str = "auto"  # auto = cuda:LOCAL_RANK when CUDA is available, else cpu
    # auto = bf16 autocast on CUDA, fp32 on CPU; fp16 = fp16 autocast with a gradient scaler (GPUs without bf16)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False  # torch.compile the model
    sync_batchnorm: bool = False  # nn.SyncBatchNorm across ranks (CUDA + DDP only)
    find_unused_parameters: bool = False  # DDP flag, for models with branches unused in some steps
    max_nonfinite: int = 20  # stop after this many non-finite steps in a row
    out_dir: str = ""  # local run folder (metrics.jsonl, summary.json, wandb/); "" = runs/<preset>
    dist_timeout_s: float = 1800.0  # torch.distributed collectives' timeout (a slow checkpoint upload by rank 0)
    eval_every: int = 1000  # score --data.valid_manifests every N steps (and at the end)
    eval_batches: int = 20  # validation micro-batches per rank, the same ones every time
    # warm start (eval_tools/weights.py warm_start): an export folder, a Hugging Face wav2vec2 folder, a
    # train.py checkpoint or a CLMR file of the same architecture; "" = fresh init. --resume wins.
    init_from: str = ""

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "--train.steps", ">= 1", self.steps)
        _require(self.global_batch_size >= 1, "--train.global_batch_size", ">= 1", self.global_batch_size)
        _require(self.grad_accum >= 1, "--train.grad_accum", ">= 1", self.grad_accum)
        _require(self.max_nonfinite >= 1, "--train.max_nonfinite", ">= 1", self.max_nonfinite)
        _require(self.dist_timeout_s > 0, "--train.dist_timeout_s", "> 0 seconds", self.dist_timeout_s)
        _require(self.eval_every >= 1, "--train.eval_every", ">= 1", self.eval_every)
        _require(self.eval_batches >= 1, "--train.eval_batches", ">= 1", self.eval_batches)
        _require(self.device == "auto" or self.device.startswith(("cpu", "cuda")), "--train.device", "auto, cpu or cuda[:N]",
                 self.device)


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
        _require(self.every >= 1, "--logging.every", ">= 1", self.every)
        _require(self.audio_every >= 0, "--logging.audio_every", ">= 0 (0 = never)", self.audio_every)
        _require(self.audio_examples >= 1, "--logging.audio_examples", ">= 1", self.audio_examples)


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints (docs/architecture.md §5)."""

    every: int = 1000  # also written on SIGTERM, on divergence and at the end
    keep: int = 3  # newest K checkpoints kept
    dir: str = ""  # URL (local or bucket); "" = <train.out_dir>/checkpoints
    resume: str = "none"  # none | auto (latest in dir, if any) | a checkpoint URL

    def __post_init__(self) -> None:
        _require(self.every >= 1, "--checkpoint.every", ">= 1", self.every)
        _require(self.keep >= 1, "--checkpoint.keep", ">= 1", self.keep)


@dataclass(kw_only=True)
class EvalConfig:
    """The online probe during pretraining (training/online_probe.py); off unless ``probe_data`` is set.
    Validation loss is ``--data.valid_manifests`` with ``--train.eval_every``."""

    probe_data: str | None = None  # a labelled <split>.manifest.json; None = no online probe
    probe_every: int = 1000  # probe every N steps (and at the last step)
    probe_max_clips: int = 256  # clips of probe_data held in memory and embedded, evenly spaced through it
    probe_max_seconds: float = 60.0  # a probe stops embedding after this long and scores what it has
    probe_k: int = 10  # neighbours of the kNN
    probe_batch: int = 16  # clips per embedding pass

    def __post_init__(self) -> None:
        _require(self.probe_every >= 1, "--eval.probe_every", ">= 1", self.probe_every)
        _require(self.probe_max_clips >= 4, "--eval.probe_max_clips", ">= 4 (two per half)", self.probe_max_clips)
        _require(self.probe_max_seconds > 0, "--eval.probe_max_seconds", "> 0", self.probe_max_seconds)
        _require(self.probe_k >= 1, "--eval.probe_k", ">= 1", self.probe_k)
        _require(self.probe_batch >= 1, "--eval.probe_batch", ">= 1", self.probe_batch)


@dataclass(kw_only=True)
class Config:
    """A whole run. Build it with a preset, then :func:`apply_overrides`."""

    preset: str
    arch: Literal["clmr", "wav2vec2", "cpc"]
    data: DataConfig
    augment: AugmentConfig
    model: CLMRConfig | Wav2Vec2Config | CPCConfig  # the arch's config class (models/<arch>.py)
    optim: OptimConfig
    train: TrainConfig
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

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
        crop = self.data.crop_samples if self.data.crop_samples is not None else 1
        self.data.loader_config(batch_size=1, views=self.views, crop_samples=crop, sample_rate=self.data.sample_rate,
                                seed=self.train.seed, cuda=False)  # the loader's own checks, at start

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


# The paper presets reproduce the papers' runs by default; each value cites the file and commit it
# was read from, and docs/reproduce.md lists the other readings with the override that selects them.
# tests/test_presets.py pins every value. Sources:
#   CLMR   Spijkervet/CLMR master 423414d (2021-11-11): README.md "Results", main.py,
#          config/config.yaml, clmr/modules/contrastive_learning.py; the v1 branch c6f4490.
#   CPC    Spijkervet/CLMR 4f984b2 "Added CPC model" and the v1 branch's config/config_cpc.yaml.
#   w2v2   facebookresearch/fairseq examples/wav2vec/config/pretraining/wav2vec2_base_librispeech.yaml
#          (07dfe9c), fairseq/data/data_utils_fast.pyx batch_by_size_fast, raw_audio_dataset.py.

CLMR_MTAT_TRAIN_CLIPS = 18_706  # Pons et al.'s MTAT training split, the one CLMR's magnatagatune.py reads
CLMR_BATCH = 48  # CLMR main.py DataLoader(batch_size=args.batch_size, drop_last=True); config.yaml batch_size: 48


def _clmr_optim() -> OptimConfig:
    # CLMR's configure_optimizers (clmr/modules/contrastive_learning.py at 423414d) hard-codes
    # torch.optim.Adam(self.model.parameters(), lr=3e-4): no weight decay (config.yaml's
    # weight_decay: 1.0e-6 is read only by its LARS branch), no scheduler. main.py's Trainer sets no
    # gradient_clip_val (Lightning's default, 0: no clipping).
    return OptimConfig(name="adam", lr=3e-4, weight_decay=0.0, grad_clip=0.0)


def _wav2vec2_optim(steps: int, warmup: int) -> OptimConfig:
    # fairseq's BASE yaml: adam (decoupled weight decay) betas (0.9, 0.98), eps 1e-6, weight_decay
    # 0.01, lr 5e-4, polynomial_decay (power 1: linear) to 0 after 32,000 warm-up updates. Clipping:
    # the yaml sets none and fairseq/dataclass/configs.py's clip_norm defaults to 0.0 (015b8f4);
    # fairseq's 2020 argparse options defaulted it to 25 (--optim.grad_clip=25 for that reading).
    return OptimConfig(
        name="adamw", lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
        schedule="warmup_linear", warmup_steps=warmup, final_lr_ratio=0.0, grad_clip=0.0,
    )


def clmr_mtat() -> Config:
    """CLMR on MagnaTagATune as in its README's 88.7 ROC-AUC run: 3,890,000 steps (10,000 epochs of
    18,706 clips at batch 48), Adam 3e-4 without weight decay or clipping, SyncBatchNorm, d = 64,
    one encoder call per view, 59049-sample crops at 22.05 kHz. The v1 run (1,550 epochs):
    --train.steps=602950."""
    model_cfg, _ = model_classes("clmr")
    epochs = 10_000  # README.md "Results" at 423414d: SampleCNN / CLMR, batch 48 / 10000 epochs, 88.7 / 35.6
    model = model_cfg.default()  # projection_dim 64 (config.yaml), encoder_calls per_view (SimCLR forward(x_i, x_j))
    return Config(
        preset="clmr_mtat", arch="clmr",
        # Shards built with Pons' split (shard-tools build mtat --split-files, docs/reproduce.md §1).
        data=DataConfig(manifests=["./shards/mtat/train.manifest.json"], sample_rate=22050, num_workers=8),
        augment=_augment_config_class()(),  # CLMR's chain, pipeline/augment.py
        model=model,
        optim=_clmr_optim(),
        # drop_last=True: 18,706 // 48 = 389 steps an epoch. Trainer(sync_batchnorm=True) in main.py.
        train=TrainConfig(steps=epochs * (CLMR_MTAT_TRAIN_CLIPS // CLMR_BATCH), global_batch_size=CLMR_BATCH,
                          sync_batchnorm=True),
        logging=LoggingConfig(every=50, audio_every=5000),
        checkpoint=CheckpointConfig(every=5000),
    )


def clmr_msd() -> Config:
    """CLMR on the Million Song Dataset previews as in its README: 1,000 epochs at batch 48, about
    4,200,000 steps; everything else as clmr_mtat."""
    cfg = clmr_mtat()
    # README.md "Results" at 423414d: SampleCNN / CLMR, batch 48 / 1000 epochs, 85.7 / 25.0. Pons'
    # MSD training split holds about 201.7k tracks (4,201 steps of 48 an epoch); the exact count is
    # your shards' (shard-tools info): --train.steps=1000 x (train clips // 48).
    return dataclasses.replace(
        cfg, preset="clmr_msd",
        data=dataclasses.replace(cfg.data, manifests=["./shards/msd/train.manifest.json"], num_workers=12),
        train=dataclasses.replace(cfg.train, steps=4_200_000),
    )


def wav2vec2_musicnet() -> Config:
    """wav2vec 2.0 BASE on MusicNet at 16 kHz with fairseq's per-update budget: 320 crops of 250,000
    samples an update (global batch 320, sized for 8 GPUs: 5 crops per GPU micro-step, 8 micro-steps),
    400,000 updates, no gradient clipping."""
    model_cfg, _ = model_classes("wav2vec2")
    steps = 400_000  # optimization.max_update
    # fairseq batches by max_tokens: 1,400,000 samples per GPU, crops of at most max_sample_size
    # 250,000, so a recording longer than 250,000 samples (every MusicNet one) fills a GPU's batch
    # with 5 crops (6 would be 1.5 M); distributed_world_size 64 -> 320 crops an update. Ours: 8 GPUs
    # x grad_accum 8 x 5 crops. On N GPUs keep the product: --train.grad_accum=64/N (1 GPU: 64).
    return Config(
        preset="wav2vec2_musicnet", arch="wav2vec2",
        data=DataConfig(manifests=["./shards/musicnet/train.manifest.json"], sample_rate=16000,
                        crop_samples=250_000, num_workers=8),
        augment=_augment_config_class()(enabled=False),  # wav2vec2 learns from masking, not augmentation
        model=model_cfg.base(),
        optim=_wav2vec2_optim(steps, warmup=32_000),
        # BASE uses LayerDrop 0.05: DDP must look for the parameters a skipped layer leaves unused
        train=TrainConfig(steps=steps, global_batch_size=320, grad_accum=8, find_unused_parameters=True),
        logging=LoggingConfig(every=100, audio_every=10_000),
        checkpoint=CheckpointConfig(every=5000),
    )


def cpc_mtat() -> Config:
    """CPC on MagnaTagATune as the CLMR study's baseline: Adam 3e-4, batch 48, an 81-frame anchor
    window, 15 negatives, K = 20, kaiming-uniform conv init, audio z-normalised by training-set
    statistics; 59049-sample crops at 22.05 kHz. Steps: no recorded value, set --train.steps."""
    model_cfg, _ = model_classes("cpc")
    # v1's config/config_cpc.yaml (c6f4490): batch_size 48, Adam, learning_rate 3.0e-4 (v1 model.py
    # load_optimizer: Adam(lr=args.learning_rate), no weight decay), prediction_step 20,
    # negative_samples 15, subsample True (modules/cpc/infonce.py: subsample_win = 81). Init:
    # model.apply(model.initialize), kaiming-uniform (CPCConfig.default()). z-normalisation:
    # 4f984b2's data/magnatagatune.py normalise_audio with the training set's statistics
    # (input_norm="dataset", models/cpc.py).
    model = dataclasses.replace(model_cfg.default(), window=81, input_norm="dataset")
    return Config(
        preset="cpc_mtat", arch="cpc",
        data=DataConfig(manifests=["./shards/mtat/train.manifest.json"], sample_rate=22050, num_workers=8),
        augment=_augment_config_class()(enabled=False),
        model=model,
        optim=OptimConfig(name="adam", lr=3e-4),
        # Neither CPC config records its run's length (4f984b2's epochs: 10000 is the file's generic
        # value); 300,000 steps is ours, about 770 epochs of MTAT.
        train=TrainConfig(steps=300_000, global_batch_size=CLMR_BATCH),
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
# Values: one converter for command-line strings, config files and checkpoints


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """A dataclass's resolved field types (``typing.get_type_hints``: its module's names)."""
    return typing.get_type_hints(cls)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def convert(value: Any, hint: Any, flag: str) -> Any:
    """``value`` as type ``hint``: a command-line string (``"3e-4"``, ``"a,b"``, ``"[[1,2]]"``,
    ``"none"``) or a value read from JSON/YAML/TOML. A bool is never taken for a number nor a
    number for a bool; errors name ``flag``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)

    def bad(expected: str) -> ValueError:
        return ValueError(f"{flag}={_text(value)}: expected {expected}")

    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null"))):
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return convert(value, a, flag)
            except ValueError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        for a in args:
            if a == value or (isinstance(value, str) and str(a) == value):
                return a
        raise ValueError(f"{flag}={_text(value)}: must be one of {', '.join(map(str, args))}")
    if origin in (list, tuple):
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [s.strip() for s in text.split(",") if s.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad("a list (comma-separated or JSON)")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad(f"{len(args)} comma-separated values")
            return tuple(convert(v, a, flag) for v, a in zip(value, args))
        items = [convert(v, args[0] if args else str, flag) for v in value]
        return tuple(items) if origin is tuple else items
    if hint in (bool, int, float, str):
        return _scalar(value, hint, bad)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return build(hint, value, flag[2:])
    raise ValueError(f"{flag}: fields of type {hint!r} cannot be set from text")


def _scalar(value: Any, hint: type, bad: Callable[[str], ValueError]) -> Any:
    """A bool, int, float or str from a command-line string or a parsed file's value."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("true or false")
    if hint is int:
        if isinstance(value, str):
            try:
                value = float(value.replace("_", "")) if any(c in value for c in ".eE") else int(value.replace("_", ""))
            except ValueError:
                raise bad("an integer") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            raise bad("an integer")
        return int(value)
    if hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):  # hint is str
        raise bad("a string")
    return str(value)


def _unknown_key(path: str, name: str, known: list[str]) -> ValueError:
    dotted = f"{path}.{name}" if path else name
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean --{path + '.' if path else ''}{close[0]}?)" if close else ""
    where = f"section {path!r}" if path else "the top level"
    return ValueError(f"unknown config key --{dotted}{hint}; keys in {where}: {', '.join(known)}")


def build(cls: type, d: dict[str, Any], path: str) -> Any:
    """Dataclass ``cls`` from a dict of its fields (values converted by :func:`convert`)."""
    if not isinstance(d, dict):
        raise ValueError(f"--{path} is a section: give a table of its keys, not {_text(d)}")
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in d:
        if key not in known:
            raise _unknown_key(path, key, known)
    hints = _hints(cls)
    kwargs = {k: convert(v, hints[k], f"--{path}.{k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key missing
        raise ValueError(f"section {path!r}: {exc}") from None


def _sections(arch: str) -> dict[str, type]:
    if arch not in MODELS:
        raise ValueError(f"arch must be one of {sorted(MODELS)}, got {arch!r}")
    return {"data": DataConfig, "augment": _augment_config_class(), "model": model_classes(arch)[0],
            "optim": OptimConfig, "train": TrainConfig, "logging": LoggingConfig, "checkpoint": CheckpointConfig,
            "eval": EvalConfig}


def from_dict(d: dict[str, Any]) -> Config:
    """A :class:`Config` from :func:`to_dict`'s output (a checkpoint's ``config``, a config file)."""
    sections = _sections(d.get("arch", ""))
    for key in d:
        if key not in ("preset", "arch", *sections):
            raise _unknown_key("", key, ["preset", "arch", *sections])
    return Config(preset=str(d["preset"]), arch=d["arch"],
                  **{name: build(cls, d.get(name, {}), name) for name, cls in sections.items()})


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


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Apply ``section.key=value`` strings (with or without the leading ``--``); the whole config
    is then rebuilt once, so every section's ``__post_init__`` checks the final values."""
    d = to_dict(cfg)
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise ValueError(f"override {item!r} must look like --section.key=value")
        key, raw = text.split("=", 1)
        if key in ("arch", "preset"):
            raise ValueError(f"--{key} cannot be overridden: pick another --config preset instead")
        node, parts = d, key.split(".")
        for i, name in enumerate(parts):
            here = ".".join(parts[:i])
            if not isinstance(node, dict):
                raise ValueError(f"--{here} is a value, not a section: --{key} does not exist")
            if name not in node:
                raise _unknown_key(here, name, list(node))
            if i < len(parts) - 1:
                node = node[name]
            elif isinstance(node[name], dict):
                raise ValueError(f"--{key} is a section: set one of its keys, e.g. --{key}.{next(iter(node[name]))}=...")
            else:
                node[name] = raw  # converted by the field's type when the config is rebuilt
    return from_dict(d)


# --------------------------------------------------------------------------------------------
# Config files: what --print-config FILE writes, --config FILE reads

FILE_FORMATS = {".json": "json", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}


def file_format(path: str) -> str | None:
    """``json`` | ``yaml`` | ``toml`` from a file name's extension, else None."""
    return FILE_FORMATS.get(os.path.splitext(path)[1].lower())


def dumps(cfg: Config, fmt: str) -> str:
    """The resolved config as ``flags`` (``--section.key=value`` lines), JSON, YAML or TOML."""
    if fmt == "flags":
        return "\n".join(describe(cfg)) + "\n"
    d = to_dict(cfg)
    if fmt == "json":
        return json.dumps(d, indent=2) + "\n"
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(d, sort_keys=False)
    if fmt == "toml":  # TOML has no null: None is written as "none", which every optional key reads as None
        lines = [f"{k} = {_toml(v)}" for k, v in d.items() if not isinstance(v, dict)]
        for name, section in d.items():
            if isinstance(section, dict):
                lines += ["", f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in section.items())]
        return "\n".join(lines) + "\n"
    raise ValueError(f"--format: unknown format {fmt!r}; use flags, json, yaml or toml")


def _toml(v: Any) -> str:
    if v is None:
        return '"none"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string


def load_file(path: str) -> Config:
    """A config file (JSON/YAML/TOML): ``preset`` names the base, every other key overrides it,
    so a whole file from ``--print-config FILE`` and a three-line file both work."""
    fmt = file_format(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if fmt == "json":
            d = json.loads(data)
        elif fmt == "yaml":
            import yaml

            d = yaml.safe_load(data)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            d = tomllib.loads(data.decode())
    except OSError as exc:
        raise ValueError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
    except Exception as exc:  # noqa: BLE001 - each parser has its own error type
        raise ValueError(f"--config {path}: not valid {fmt.upper()} ({exc})") from None
    if not isinstance(d, dict) or "preset" not in d:
        raise ValueError(f"--config {path}: needs a top-level `preset` key naming the base preset ({', '.join(PRESETS)})")
    base = preset(str(d["preset"]))
    if d.get("arch", base.arch) != base.arch:
        raise ValueError(f"--config {path}: arch {d['arch']!r} does not match preset {base.preset!r} ({base.arch})")
    merged = to_dict(base)
    for key, value in d.items():
        merged[key] = {**merged[key], **value} if isinstance(merged.get(key), dict) and isinstance(value, dict) else value
    try:
        return from_dict(merged)
    except ValueError as exc:
        raise ValueError(f"--config {path}: {exc}") from None


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
