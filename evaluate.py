"""Evaluate music representations: frozen-encoder probes, fine-tuning, label-efficiency sweeps and
embedding export, with baselines (random init, supervised, log-mel statistics).

On the demo shards (``shard-tools demo --out demo_shards``) after ``python train.py --config clmr_tiny``::

    python evaluate.py probe --data demo_shards/nsynth --data demo_shards/mtat \\
        --checkpoint runs/clmr_tiny/checkpoints/ckpt-00000200.pt --baselines random,supervised,logmel
    python evaluate.py sweep --data demo_shards/nsynth --checkpoint ... --fractions 0.01,0.1,1
    python evaluate.py finetune --data demo_shards/nsynth --checkpoint ... --encoder-lr 1e-4
    python evaluate.py embed --checkpoint ... --out emb/ song1.wav folder_of_audio/ shards/test.manifest.json
    python evaluate.py probe --data demo_shards/mtat --checkpoint ... --save-models --out runs/eval
    python evaluate.py predict --model runs/eval/models/mtat-pretrained song.mp3 folder_of_audio/
    python evaluate.py export --checkpoint ... --out exported/ [--format hf]
    python evaluate.py probe --data demo_shards/nsynth --checkpoint ... --baselines random,logmel,hf:path/to/hf_folder

Encoders from elsewhere (docs/weights.md): ``--checkpoint export:DIR`` (an export), ``--hf-model DIR``
(a local Hugging Face folder, every layer probeable), ``--checkpoint clmr:PATH`` (CLMR's released
SampleCNN weights); ``--baselines hf:DIR,export:DIR`` put them in the same table.

Protocols (``probe``/``sweep`` ``--protocol``, eval_tools/protocols.py cites each rule's source):

- ``musicssl`` (default): every encoder embeds every clip with its weights frozen (CLMR:
  non-overlapping crops of the model's input length, averaged per clip; wav2vec2: mean over valid
  frames of one layer, or of each layer with ``--layer all``; CPC: context features mean-pooled),
  after its BatchNorm statistics are recomputed on clean training crops; a linear probe (or
  ``--probe mlp``) on standardised features, Adam 1e-3, early stopping on the valid split's primary
  metric, the best epoch scored once on the test split. ``--probe logreg`` instead fits the linear
  probe to convergence (full-batch L-BFGS) for each L2 penalty from 1 down to 1e-4 and keeps the one
  best on valid (eval_tools/probe.py; the quickstart's probe). The default because it is defined for
  every encoder and baseline here (log-mel statistics included) and puts them on one footing.
- ``clmr``: Spijkervet/CLMR ``linear_evaluation.py`` (commit 423414d): one random 59,049-sample crop
  per training clip, the checkpoint's BatchNorm statistics, raw features, Adam 1e-3 / wd 1e-6,
  batch 48, plateau schedule and early stopping on the valid loss, test = mean of the per-crop
  sigmoid outputs over each clip's non-overlapping crops.
- ``marble``: the MARBLE benchmark's probe (a43992899/MARBLE-Benchmark, commit d9300e3): raw
  whole-clip features, MLP (512, dropout 0.2), a learned layer mix for ``--layer all``, the
  learning rate chosen on valid from 1e-2 ... 1e-4.

Scores: accuracy for single-label fields (NSynth pitch, instrument family), macro ROC-AUC and
PR-AUC for multi-label tags. Writes ``results.json``, ``results.md`` and PNG plots to ``--out`` and
logs them to W&B (``--wandb-mode``). ``--device``/``--precision`` pick the hardware (bf16 autocast on
CUDA by default); under ``torchrun`` every rank embeds its share of each split.

``finetune`` (and the ``supervised`` baseline) train through ``training/`` like ``train.py``: DDP
under ``torchrun``, a checkpoint with every valid scoring in ``OUT/runs/<run>/checkpoints``, and
``--resume auto`` to continue after a kill or preemption (docs/evaluation.md)::

    torchrun --standalone --nproc_per_node=8 evaluate.py finetune --data nsynth --checkpoint ckpt.pt --tasks pitch
    python evaluate.py finetune --data nsynth --checkpoint ckpt.pt --tasks pitch --resume auto
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import UserError

POOLS = ("mean", "meanstd")  # eval_tools.encoders.POOLS, spelled here so --help needs no torch
PROBES = ("linear", "mlp", "logreg")  # eval_tools.probe.PROBES, likewise
BASELINES = ("random", "supervised", "logmel")
EXTERNAL = ("hf:", "export:")  # --baselines hf:DIR / export:DIR: any encoder folder (eval_tools/weights.py)


class OptionError(UserError, ValueError):
    """A bad option value: one line naming the flag (``UserError``), still a ``ValueError`` for callers."""
TITLES = {"instrument_family_str": "family", "instrument_family": "family", "instrument_source_str": "source"}


_PRESET_WITH_CHECKPOINT = ("--preset/--set: not used with --checkpoint (the checkpoint holds its architecture and "
                           "config); drop them, or drop --checkpoint for a random-init encoder of that preset")


@dataclass(kw_only=True)
class EvalOptions:
    """Everything ``probe`` and ``sweep`` need (the quickstart builds one in-process)."""

    data: list[str]  # dataset folders holding {train,valid,test}.manifest.json
    out: str = "runs/eval"
    checkpoint: str | None = None  # a train.py checkpoint, or hf:DIR / export:DIR / clmr:PATH (eval_tools/weights.py)
    trust_remote_code: bool = False  # HF folders that ship their own model code (MERT)
    preset: str | None = None  # architecture for random/supervised baselines when no checkpoint
    overrides: list[str] = field(default_factory=list)  # --set section.key=value on that preset
    baselines: list[str] = field(default_factory=lambda: ["random", "logmel"])
    tasks: list[str] | None = None  # label fields; None = every field with >= 2 names
    fractions: list[float] = field(default_factory=lambda: [1.0])
    layer: int | str = -1
    pool: str = "mean"  # over time: "mean" or "meanstd" (mean and standard deviation; not for log-mel, already both)
    protocol: str = "musicssl"  # eval_tools/protocols.py: musicssl | clmr | marble
    probe: str | None = None  # linear | mlp | logreg; None = the protocol's (musicssl/clmr: linear, marble: mlp)
    lr: float | None = None  # None = the protocol's (marble: chosen on valid from its grid)
    max_epochs: int | None = None  # None = the protocol's (musicssl/clmr 200, marble 100)
    patience: int | None = None  # None = the protocol's (musicssl 20, clmr/marble 10)
    sample_rate: int | None = None
    recalibrate_bn: bool = True
    calib_crops: int = 512
    supervised_steps: int | None = None  # None = the checkpoint's step count, else fine-tuning's 20,000
    supervised_steps_per_dataset: dict[str, int] = field(default_factory=dict)  # dataset name -> steps (wins)
    supervised_seconds: float | None = None
    supervised_batch_size: int = 32
    supervised_lr: float = 1e-3
    workers: int = 2  # loader worker processes of the supervised baseline's training stream
    cache: str | None = None  # embedding cache folder; None = <out>/cache; "" disables
    device: str = "auto"  # auto | cuda | cuda:N | cpu (eval_tools/runtime.py)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    embed_batch: int = 16  # clips per extraction pass
    resample: bool = True  # False: refuse shards whose rate differs from the encoder's
    min_read: float = 0.99  # refuse a split that read less than this fraction of its manifest's samples
    allow_incomplete: bool = False  # evaluate on what was read, however little (said at the top of the table)
    save_models: bool = False  # write OUT/models/<dataset>-<encoder>/ (encoder + heads + vocabularies) for `predict`
    dist_timeout: float = 7200.0  # seconds a rank waits for the others under torchrun
    seed: int = 0
    wandb_mode: str = field(default_factory=lambda: os.environ.get("WANDB_MODE", "disabled"))
    wandb_project: str = "musicssl-eval"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.data:
            raise OptionError("--data: give at least one dataset folder (e.g. demo_shards/nsynth)")
        bad = [b for b in self.baselines if b not in BASELINES and not b.startswith(EXTERNAL)]
        if bad:
            raise OptionError(f"--baselines: unknown {bad}; choose from {', '.join(BASELINES)}, hf:DIR or export:DIR")
        if self.checkpoint is not None and (self.preset is not None or self.overrides):
            raise OptionError(_PRESET_WITH_CHECKPOINT)
        if self.checkpoint is None and self.preset is None and any(b in ("random", "supervised") for b in self.baselines):
            raise OptionError("--baselines random/supervised need an architecture: pass --checkpoint or --preset (e.g. clmr_tiny)")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise OptionError(f"--fractions/--label-fraction must be in (0, 1], got {self.fractions}")
        if self.wandb_mode not in ("online", "offline", "disabled"):
            raise OptionError(f"--wandb-mode must be online, offline or disabled, got {self.wandb_mode!r}")
        if self.embed_batch < 1:
            raise OptionError(f"--embed-batch must be >= 1, got {self.embed_batch}")
        if not 0 <= self.min_read <= 1:
            raise OptionError(f"--min-read must be in [0, 1], got {self.min_read}")
        from eval_tools import protocols

        if self.protocol not in protocols.PROTOCOLS:
            raise OptionError(f"--protocol {self.protocol!r}: choose from {', '.join(protocols.PROTOCOLS)}")
        try:
            protocols.check_layer(protocols.PROTOCOLS[self.protocol], self.layer)
        except UserError as exc:
            raise OptionError(str(exc)) from None
        if self.pool not in POOLS:
            raise OptionError(f"--pool {self.pool!r}: choose from {', '.join(POOLS)}")
        if self.pool != "mean" and self.protocol != "musicssl":
            raise OptionError(f"--pool {self.pool}: --protocol {self.protocol} follows its paper's code, which pools by the "
                              f"mean; use --protocol musicssl for other pooling")


def _log(msg: str) -> None:
    print(f"[evaluate] {msg}", flush=True)


def run_evaluation(opts: EvalOptions) -> dict | None:
    """Probe the checkpoint and the baselines on every dataset and fraction; write and return results.

    Under torchrun every rank embeds its share of each split; rank 0 probes, writes and returns the
    results, the other ranks return None."""
    from eval_tools import runtime
    from eval_tools.data import Dataset
    from eval_tools.encoders import preset_config
    from eval_tools.weights import arch_config

    t_start = time.perf_counter()
    rt = runtime.setup(opts.device, opts.precision, timeout_s=opts.dist_timeout)
    log = _log if rt.is_main else (lambda msg: None)
    log(f"device {rt.device}, precision {rt.precision}" + (f", {rt.world_size} ranks" if rt.distributed else ""))
    arch_cfg = (preset_config(opts.preset, opts.overrides) if opts.preset
                else arch_config(opts.checkpoint) if opts.checkpoint else None)  # None: log-mel and external only
    if arch_cfg is None and any(b in ("random", "supervised") for b in opts.baselines):
        raise OptionError(f"--baselines random/supervised: {opts.checkpoint} is not a musicssl architecture; pass --preset "
                          "(e.g. wav2vec2_tiny) for those baselines, or drop them")
    datasets = [Dataset.from_dir(folder) for folder in opts.data]
    _check_tasks(opts.tasks, datasets)
    results = {
        "format": "musicssl-eval/1", "datasets": {}, "tasks": {}, "rows": [], "encoders": {},
        "config": {k: v for k, v in dataclasses.asdict(opts).items() if k != "progress"},
    }
    for ds in datasets:
        requested = None if opts.tasks is None else [t for t in opts.tasks if t in ds.spec]
        if requested == []:
            log(f"{ds.name}: none of --tasks {','.join(opts.tasks)} is a label field here; skipping")
            continue
        _evaluate_dataset(ds, requested, arch_cfg, opts, rt, results, log)
    if not rt.is_main:
        return None
    if not results["rows"]:
        raise UserError("nothing was evaluated: check --data, --tasks and --baselines")
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    write_outputs(results, opts)
    return results


def _check_tasks(tasks: list[str] | None, datasets: list) -> None:
    if tasks is None:
        return
    known = {t for ds in datasets for t in ds.spec}
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise UserError(f"--tasks {','.join(unknown)}: no such label field in {', '.join(ds.name for ds in datasets)}; "
                        f"known fields: {', '.join(sorted(known))}")


def encoder_rate(ds, arch_cfg, opts: EvalOptions) -> int:
    """The rate the encoders run at; shards at another rate are resampled on the fly, or refused
    with ``--no-resample``."""
    sr = opts.sample_rate or (arch_cfg.data.sample_rate if arch_cfg is not None and arch_cfg.data.sample_rate else None) or ds.sample_rate
    if sr is None:
        raise UserError(f"--data {ds.name}: its shards mix sample rates and the encoder names none; pass --sample-rate")
    check_rate(ds, int(sr), resample=opts.resample)
    return int(sr)


def check_rate(ds, sr: int, *, resample: bool) -> None:
    """Shards at another rate than the encoder's ``sr``: said (and resampled on the fly), or refused
    with ``--no-resample``; either way naming both rates."""
    if ds.sample_rate is not None and ds.sample_rate != sr:
        if not resample:
            raise UserError(f"--data {ds.name}: the shards are {ds.sample_rate} Hz but the encoder expects {sr} Hz; "
                            "drop --no-resample to resample on the fly, or rebuild the shards with --sample-rate")
        _log(f"{ds.name}: shards are {ds.sample_rate} Hz, the encoder expects {sr} Hz: resampling on the fly")


def _evaluate_dataset(ds, requested: list[str] | None, arch_cfg, opts: EvalOptions, rt, results: dict, log) -> None:
    """Every encoder (checkpoint, baselines) on one dataset: extraction on all ranks, probes on rank 0."""
    from eval_tools import protocols
    from eval_tools.encoders import logmel_encoder, random_encoder
    from eval_tools.finetune import FinetuneConfig
    from eval_tools.runner import check_labels, embed_splits, make_tasks, probe_encoder
    from eval_tools.weights import open_encoder

    tasks = make_tasks(ds, requested, {k: f"{ds.name} {TITLES.get(k, k)}" for k in ds.spec})
    sr = encoder_rate(ds, arch_cfg, opts)
    results["datasets"][ds.name] = {"manifests": ds.manifests, "num_samples": ds.num_samples, "sample_rate": sr}
    for t in tasks:
        results["tasks"][f"{ds.name}/{t.name}"] = {"kind": t.kind, "names": t.names, "title": t.title, "dataset": ds.name, "field": t.name}
    log(f"{ds.name}: {ds.num_samples} clips, tasks {', '.join(t.name for t in tasks)}, {sr} Hz")
    protocol = protocols.get(opts.protocol)
    probe_cfg, lrs = protocols.configure(protocol, probe=opts.probe, lr=opts.lr, max_epochs=opts.max_epochs,
                                         patience=opts.patience, seed=opts.seed)
    cache = os.path.join(opts.out, "cache") if opts.cache is None else (opts.cache or None)
    results.setdefault("protocol", {"name": protocol.name, "source": protocol.source, "probe": dataclasses.asdict(probe_cfg),
                                    "lrs": list(lrs)})

    def add_rows(enc, fractions: list[float]) -> None:
        t0 = time.perf_counter()
        if enc.arch != "logmel":  # log-mel statistics are a mean and a std already
            enc.pool = opts.pool
        enc.to(rt.device, rt.precision)
        embs = embed_splits(enc, ds, cache_dir=cache, recalibrate=opts.recalibrate_bn and protocol.recalibrate_bn,
                            progress=opts.progress, calib_crops=opts.calib_crops, seed=opts.seed, batch=opts.embed_batch, rt=rt,
                            views=protocol.views(protocol.crop_for(enc), opts.seed),
                            min_read=0.0 if opts.allow_incomplete else opts.min_read)
        if embs is None:  # not rank 0: the probes are rank 0's
            return
        note_incomplete(results, ds, embs, log)
        check_labels(ds, tasks, embs)
        t_embed = time.perf_counter() - t0
        rows = probe_encoder(enc.name, embs, tasks, probe_cfg, fractions=fractions, seed=opts.seed, lrs=lrs,
                             per_layer=protocol.per_layer)
        heads = [r.pop("_head") for r in rows]
        if opts.save_models:
            _save_heads(enc, ds, protocol, rows, heads, opts, log)
        for r in rows:
            r["task"] = f"{ds.name}/{r['task']}"
            r["protocol"] = protocol.name
            r["embed_seconds"] = round(t_embed, 1)
            r["dim"] = int(embs["train"].x.shape[-1])
            if any(e.excluded for e in embs.values()):  # clips read but left out by the protocol (CLMR: shorter than a crop)
                r["excluded"] = {s: e.excluded for s, e in embs.items()}
        results["rows"].extend(rows)
        results["encoders"][enc.name] = {"arch": enc.arch, "ident": enc.ident, **enc.meta}
        for r in rows:
            log(f"  {r['encoder']:<12} {r['task']:<32} frac {r['fraction']:<5g} "
                + " ".join(f"{k}={v:.3f}" for k, v in r["test"].items() if k != "n"))

    ckpt_step = None
    if opts.checkpoint:
        from eval_tools.weights import source_kind

        own_rate = source_kind(opts.checkpoint)[0] in ("hf", "export")  # the folder names its rate
        enc = open_encoder(opts.checkpoint, layer=opts.layer, sample_rate=opts.sample_rate if own_rate else sr,
                           fallback_rate=ds.sample_rate, trust_remote_code=opts.trust_remote_code)
        ckpt_step = enc.meta.get("step")
        add_rows(enc, opts.fractions)
    if "random" in opts.baselines:
        add_rows(random_encoder(arch_cfg, sample_rate=sr, seed=opts.seed, layer=opts.layer), opts.fractions)
    if "supervised" in opts.baselines:
        steps = opts.supervised_steps_per_dataset.get(ds.name) or opts.supervised_steps or ckpt_step or FinetuneConfig().steps
        for f in opts.fractions:
            enc = _supervised_baseline(ds, tasks, arch_cfg, sr, steps, f, opts, rt, log)
            add_rows(enc, [f])
    if "logmel" in opts.baselines:
        add_rows(logmel_encoder(sr), opts.fractions)
    for b in opts.baselines:
        if b.startswith(EXTERNAL):  # its own rate: the shards are resampled to it
            kind, folder = b.split(":", 1)
            enc = open_encoder(b, name=f"{kind}:{os.path.basename(os.path.normpath(folder))}", layer=opts.layer,
                               trust_remote_code=opts.trust_remote_code, flag="--baselines")
            if enc.sample_rate != sr:
                log(f"{ds.name}: {enc.name} runs at {enc.sample_rate} Hz: resampling on the fly")
            add_rows(enc, opts.fractions)


def _save_heads(enc, ds, protocol, rows: list[dict], heads: list, opts: EvalOptions, log) -> None:
    """The heads of the largest label fraction, with the encoder they were trained on (eval_tools/heads.py)."""
    from eval_tools.heads import save_model

    top = max(r["fraction"] for r in rows)
    keep = [(r, h) for r, h in zip(rows, heads) if r["fraction"] == top]
    folder = os.path.join(opts.out, "models", f"{ds.name}-{enc.name.replace(' ', '_').replace(':', '-')}")
    view = protocol.views(protocol.crop_for(enc), opts.seed)["test"]
    save_model(folder, enc, [h for _, h in keep], view=view,
               meta={"dataset": ds.name, "protocol": protocol.name, "fraction": top, "encoder_meta": enc.meta},
               scores={h.task.name: {"valid": r["valid"], "test": r["test"]} for r, h in keep})
    log(f"  saved {enc.name} + {len(keep)} heads -> {folder} (evaluate.py predict --model {folder} ...)")


def note_incomplete(results: dict, ds, embs: dict, log) -> None:
    """Record (once per split) every split that was not read whole: the table starts with it."""
    for split, emb in embs.items():
        rep = emb.report
        key = f"{ds.name}/{split}"
        if rep is not None and not rep.complete and key not in results.setdefault("incomplete", {}):
            results["incomplete"][key] = {"listed": rep.listed, "read": rep.read, "not_read": rep.not_read,
                                          "summary": rep.summary(), "skipped": rep.skipped}
            log(f"WARNING {key}: {rep.summary()}")


def incomplete_banner(results: dict) -> str:
    """The lines that head the table when a split was evaluated on fewer samples than it lists."""
    inc = results.get("incomplete") or {}
    if not inc:
        return ""
    lines = [f"**INCOMPLETE DATA** - scores below are on fewer samples than the manifests list "
             f"(--allow-incomplete or above --min-read):"]
    lines += [f"- {k}: {v['summary']}" for k, v in inc.items()]
    return "\n".join(lines) + "\n\n"


def _supervised_baseline(ds, tasks, arch_cfg, sr: int, steps: int, fraction: float, opts: EvalOptions, rt, log):
    """A random init of the architecture trained on the labels by ``eval_tools.finetune.finetune``
    (every torchrun rank takes part). Its run folder is named by everything that shapes it, and
    resumed with ``auto``: a rerun of the same command continues (or reuses) the same run."""
    import hashlib

    from eval_tools.encoders import random_encoder
    from eval_tools.finetune import FinetuneConfig, finetune

    enc = random_encoder(arch_cfg, sample_rate=sr, seed=opts.seed, layer=opts.layer, name="supervised").to(rt.device, rt.precision)
    try:
        ft_cfg = FinetuneConfig(steps=steps, seconds=opts.supervised_seconds, batch_size=opts.supervised_batch_size,
                                head_lr=opts.supervised_lr, encoder_lr=opts.supervised_lr, eval_every=max(1, steps // 5),
                                seed=opts.seed, num_workers=opts.workers, min_read=0.0 if opts.allow_incomplete else opts.min_read)
    except ValueError as exc:
        raise OptionError(str(exc).replace("--steps", "--supervised-steps").replace("--batch-size", "--supervised-batch-size")) from None
    ident = f"{enc.ident},{ds.manifest_hash('train')},{fraction},{dataclasses.asdict(ft_cfg)},{rt.world_size}"
    run_dir = os.path.join(opts.out, "runs", f"supervised-{ds.name}-f{fraction:g}-{hashlib.sha256(ident.encode()).hexdigest()[:10]}")
    log(f"supervised baseline on {ds.name} train labels (fraction {fraction:g}): {steps} steps, batch {ft_cfg.batch_size} "
        f"in {run_dir}")
    summary = finetune(enc, ds, tasks, ft_cfg, run_dir=run_dir, fraction=fraction, resume="auto", rt=rt, progress=opts.progress,
                       wandb_mode=opts.wandb_mode, wandb_project=opts.wandb_project, run_name=f"supervised-{ds.name}",
                       batch_flag="--supervised-batch-size")
    if summary["status"] != "completed":
        raise UserError(f"the supervised baseline stopped at step {summary['steps']} ({summary['status']}); rerun the same "
                        f"command to continue it from {summary['checkpoint']}")
    enc.ident += f"+supervised({ds.name},{ds.manifest_hash('train')},{fraction},{steps},{opts.supervised_seconds},{opts.seed})"
    enc.meta.update({"supervised_steps": summary["steps"], "supervised_seconds": round(summary["train_seconds"], 1),
                     "supervised_best_step": summary["best_step"], "supervised_run": run_dir})
    return enc


def write_outputs(results: dict, opts: EvalOptions) -> None:
    """results.json, results.md, PNG plots, and the W&B run."""
    from eval_tools import report

    os.makedirs(opts.out, exist_ok=True)
    plots_dir = os.path.join(opts.out, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    images = []
    for key, t in results["tasks"].items():
        safe = key.replace("/", "__")
        if t["kind"] == "multi_hot":
            images.append(report.plot_per_tag_auc(results, key, os.path.join(plots_dir, f"per_tag_auc-{safe}.png")))
        else:
            for r in results["rows"]:
                if r["task"] == key and r["fraction"] == max(opts.fractions) and "confusion" in r:
                    enc = r["encoder"].replace(" ", "_")
                    images.append(report.plot_confusion(np.array(r["confusion"]), t["names"], f"{t['title']}: {r['encoder']} (test)",
                                                        os.path.join(plots_dir, f"confusion-{safe}-{enc}.png")))
        if len(opts.fractions) > 1:
            images.append(report.plot_sweep(results, key, os.path.join(plots_dir, f"sweep-{safe}.png")))
    md = incomplete_banner(results) + report.markdown_table(results, fraction=max(opts.fractions))
    if len(opts.fractions) > 1:
        md += "\n\n" + report.sweep_table(results)
    with open(os.path.join(opts.out, "results.md"), "w") as f:
        f.write(md + "\n")
    results["plots"] = images
    results["table_markdown"] = md
    results["wandb_run_id"] = report.log_wandb(results, mode=opts.wandb_mode, project=opts.wandb_project,
                                               run_name=os.path.basename(opts.out.rstrip("/")), images=images, table_md=md,
                                               out_dir=opts.out)
    report.write_json(results, os.path.join(opts.out, "results.json"))


# ------------------------------------------------------------------------------------------------
# CLI


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.01,0.1,1, got {text!r}") from None


def _layer(text: str) -> int | str:
    if text in ("all", "concat"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer takes an integer (-1 = last), 'all' or 'concat', got {text!r}") from None


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="a train.py checkpoint (ckpt-<step>.pt; its config rebuilds the encoder), "
                   "export:DIR (evaluate.py export), hf:DIR (a local Hugging Face folder) or clmr:PATH (CLMR's released "
                   ".ckpt/.pt); folders and CLMR files are also recognised without the prefix")
    p.add_argument("--hf-model", metavar="DIR", help="a local Hugging Face model folder (Wav2Vec2Model, HubertModel, "
                   "anything AutoModel loads) as the encoder; the same as --checkpoint hf:DIR. Nothing is downloaded")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let an HF folder that ships its own model code (MERT) run it")
    p.add_argument("--preset", help="train.py preset whose architecture the random/supervised baselines use when "
                   "there is no --checkpoint (e.g. clmr_tiny, wav2vec2_tiny, cpc_tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a preset key, e.g. --set model.temperature=0.1 (repeatable)")
    p.add_argument("--layer", type=_layer, default=-1, help="wav2vec2: layer to probe (-1 = last, 0 = transformer input), 'all' (one probe per "
                   "layer, best on valid) or 'concat' (the conv features and every layer's mean side by side); CLMR: -1 (last block) or 'concat' (every block's pooled output, concatenated)")
    p.add_argument("--sample-rate", type=int, help="resample clips to this rate (default: the encoder's training rate)")
    p.add_argument("--no-resample", action="store_true",
                   help="refuse shards whose sample rate differs from the encoder's instead of resampling them")
    p.add_argument("--pool", choices=POOLS, default="mean",
                   help="how probe and embed features summarise time (inside each crop or window, before the clip's pieces "
                   "are averaged): mean, or meanstd (the mean and the standard deviation over time side by side, twice "
                   "the width; the quickstart's choice, docs/quickstart-calibration.md). Log-mel is always mean + std; "
                   "fine-tuned and supervised heads read the mean (default: mean)")
    _add_device_args(p)


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda, cuda:N or cpu; under torchrun "
                   "each rank takes cuda:LOCAL_RANK")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast of the encoder's forward passes: auto = bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--embed-batch", type=int, default=16, help="clips per extraction pass (lower it on out-of-memory)")
    p.add_argument("--dist-timeout", type=float, default=7200.0,
                   help="under torchrun: seconds a rank waits for the others (rank 0 trains probes meanwhile)")


def _add_eval_args(p: argparse.ArgumentParser, *, sweep: bool) -> None:
    p.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="dataset folder with train/valid/test.manifest.json (repeatable), e.g. demo_shards/nsynth")
    _add_encoder_args(p)
    p.add_argument("--baselines", default="random,supervised,logmel" if sweep else "random,logmel",
                   help=f"comma list from {','.join(BASELINES)}, or '' for none")
    p.add_argument("--tasks", help="comma list of label fields to probe (default: every field with >= 2 names)")
    if sweep:
        p.add_argument("--fractions", type=_floats, default=[0.01, 0.1, 1.0], help="label fractions (default 0.01,0.1,1)")
    else:
        p.add_argument("--label-fraction", type=float, default=1.0,
                       help="train probes (and the supervised baseline) on a stable, class-balanced fraction of the labels")
    p.add_argument("--protocol", choices=["musicssl", "clmr", "marble"], default="musicssl",
                   help="musicssl (default): whole-clip embeddings, BatchNorm recalibrated on clean crops, standardised "
                   "features, Adam 1e-3, early stopping on the valid metric, best epoch (eval_tools/protocols.py). "
                   "clmr: Spijkervet/CLMR linear_evaluation.py @ 423414d: one random 59049-sample crop per training "
                   "clip, the checkpoint's BatchNorm statistics, raw features, Adam 1e-3 wd 1e-6, batch 48, "
                   "ReduceLROnPlateau and early stopping on the valid loss, test = mean over non-overlapping crops of "
                   "the per-crop sigmoid outputs. marble: a43992899/MARBLE-Benchmark probers.py @ d9300e3: raw "
                   "whole-clip features, MLP 512 dropout 0.2 (a learned layer mix for --layer all), Adam batch 64, "
                   "plateau/early stopping on the valid metric, best checkpoint, lr chosen on valid from "
                   "1e-2,5e-3,1e-3,5e-4,1e-4")
    p.add_argument("--probe", choices=list(PROBES),
                   help="probe head (default: the protocol's; marble: mlp): linear or mlp (Adam, early stopping), or logreg "
                        "(a linear probe fitted by full-batch L-BFGS for each L2 penalty 1 ... 1e-4, the best on valid kept; "
                        "no learned layer mix, so not with --protocol marble)")
    p.add_argument("--lr", type=float, help="probe learning rate (default: the protocol's; marble searches its grid)")
    p.add_argument("--max-epochs", type=int, help="default: the protocol's (musicssl, clmr 200; marble 100)")
    p.add_argument("--patience", type=int,
                   help="early stopping: epochs without a better monitored valid value (default: musicssl 20, clmr/marble 10)")
    p.add_argument("--no-bn-recalibration", action="store_true",
                   help="keep the checkpoint's BatchNorm statistics (clmr and marble always do)")
    p.add_argument("--calib-crops", type=int, default=512, help="clean training crops for BatchNorm recalibration")
    p.add_argument("--supervised-steps", type=int,
                   help="steps of the supervised baseline (default: the checkpoint's steps, else fine-tuning's 20,000)")
    p.add_argument("--supervised-seconds", type=float, help="also stop the supervised baseline after this wall-clock budget")
    p.add_argument("--supervised-batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="loader worker processes of the supervised baseline (default 2)")
    p.add_argument("--min-read", type=float, default=0.99,
                   help="refuse a split that read less than this fraction of the samples its manifest lists (default 0.99)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="evaluate on whatever was read (the table and results.json still say what was missing)")
    p.add_argument("--save-models", action="store_true",
                   help="also write OUT/models/<dataset>-<encoder>/: the encoder, one trained head per task and the label "
                   "vocabularies, for `evaluate.py predict --model`")
    p.add_argument("--out", default="runs/eval", help="output folder: results.json, results.md, plots/, cache/, models/")
    p.add_argument("--cache", help="embedding cache folder (default OUT/cache; '' disables)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default=os.environ.get("WANDB_MODE", "disabled"))
    p.add_argument("--wandb-project", default="musicssl-eval")
    p.add_argument("--no-progress", action="store_true")


def _checkpoint_arg(a: argparse.Namespace) -> str | None:
    if a.hf_model and a.checkpoint:
        raise OptionError("pass --checkpoint or --hf-model, not both (use --baselines hf:DIR to compare an HF model)")
    return f"hf:{a.hf_model}" if a.hf_model else a.checkpoint


def _opts_from_args(a: argparse.Namespace, *, sweep: bool) -> EvalOptions:
    return EvalOptions(
        data=a.data, out=a.out, checkpoint=_checkpoint_arg(a), trust_remote_code=a.trust_remote_code, preset=a.preset,
        overrides=a.overrides,
        baselines=[b for b in a.baselines.split(",") if b], tasks=a.tasks.split(",") if a.tasks else None,
        fractions=a.fractions if sweep else [a.label_fraction], layer=a.layer, pool=a.pool, protocol=a.protocol, probe=a.probe,
        lr=a.lr, max_epochs=a.max_epochs,
        patience=a.patience, sample_rate=a.sample_rate, recalibrate_bn=not a.no_bn_recalibration, calib_crops=a.calib_crops,
        supervised_steps=a.supervised_steps, supervised_seconds=a.supervised_seconds,
        supervised_batch_size=a.supervised_batch_size, cache=a.cache, seed=a.seed, wandb_mode=a.wandb_mode,
        wandb_project=a.wandb_project, progress=not a.no_progress, device=a.device, precision=a.precision,
        embed_batch=a.embed_batch, resample=not a.no_resample, dist_timeout=a.dist_timeout, min_read=a.min_read,
        allow_incomplete=a.allow_incomplete, save_models=a.save_models, workers=a.workers,
    )


def print_summary(results: dict, out: str) -> None:
    print()
    print(results["table_markdown"])
    print()
    plots = f"plots: {len(results['plots'])} PNG in {os.path.join(out, 'plots')}  " if results["plots"] else ""
    print(f"results: {os.path.join(out, 'results.json')}  table: {os.path.join(out, 'results.md')}  {plots}"
          f"({results['seconds']:.0f} s)")
    if results.get("wandb_run_id"):
        print(f"W&B run: {results['wandb_run_id']}")


def cmd_probe(argv: list[str], *, sweep: bool) -> int:
    name = "sweep" if sweep else "probe"
    desc = ("Label-efficiency sweep: probe scores against the fraction of training labels, for the checkpoint and "
            "the baselines." if sweep else "Frozen-encoder probes (linear or MLP) of a checkpoint and baselines on shards.")
    p = argparse.ArgumentParser(prog=f"evaluate.py {name}", description=desc)
    _add_eval_args(p, sweep=sweep)
    a = p.parse_args(argv)
    opts = _opts_from_args(a, sweep=sweep)
    results = run_evaluation(opts)
    if results is not None:  # rank 0 (or a single process)
        print_summary(results, opts.out)
    return 0


def cmd_finetune(argv: list[str]) -> int:
    from eval_tools import report, runtime
    from eval_tools.data import Dataset
    from eval_tools.finetune import FinetuneConfig
    from eval_tools.runner import make_tasks

    d = FinetuneConfig()
    p = argparse.ArgumentParser(
        prog="evaluate.py finetune",
        description=(
            "Fine-tune an encoder end to end (or train one from scratch with --preset): the encoder's pooled\n"
            "output + a linear head per task (models/supervised.py), trained by the trainer's own machinery\n"
            "(training/: DDP under torchrun, bf16 per --precision, checkpoints in OUT/runs/<run>/checkpoints,\n"
            "--resume auto, metrics.jsonl, W&B). The encoder has its own learning rate; crops are streamed from\n"
            "the training shards; the valid split is scored every --eval-every steps and the best weights are\n"
            "kept (in the checkpoint too); the test split is scored once, at the end.\n\n"
            "One run per task by default (the wav2vec2-music paper reports NSynth pitch and instrument\n"
            "separately); --joint trains one model with every head. Defaults are sized for NSynth (289,205\n"
            f"training notes): {d.steps:,} steps x {d.batch_size} crops."),
        epilog="examples:\n  python evaluate.py finetune --data nsynth --checkpoint ckpt.pt --tasks pitch\n"
               "  torchrun --standalone --nproc_per_node=8 evaluate.py finetune --data nsynth --checkpoint ckpt.pt "
               "--batch-size 256\n  python evaluate.py finetune --data nsynth --checkpoint ckpt.pt --resume auto   "
               "# after a kill or preemption",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder with train/valid/test.manifest.json")
    _add_encoder_args(p)
    p.add_argument("--tasks", help="comma list of label fields (default: every field with >= 2 names), one run each")
    p.add_argument("--joint", action="store_true", help="one model with a head per task instead of one run per task")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps per run (default {d.steps:,})")
    p.add_argument("--seconds", type=float, help="also stop after this wall-clock budget")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"crops per step over all ranks (default {d.batch_size}; lower it on out-of-memory)")
    p.add_argument("--encoder-lr", type=float, default=d.encoder_lr, help="encoder learning rate (0 freezes it: a linear probe on crops)")
    p.add_argument("--head-lr", type=float, default=d.head_lr)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help=f"steps between valid scorings (default {d.eval_every:,})")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: --eval-every)")
    p.add_argument("--log-every", type=int, default=d.log_every, help=f"steps between console lines (default {d.log_every})")
    p.add_argument("--resume", default="none", metavar="none|auto|URL",
                   help="auto: continue each run from the newest checkpoint in OUT/runs/<run>/checkpoints (a finished "
                        "run is reused); none (default) refuses a run folder that holds checkpoints")
    p.add_argument("--crop-samples", type=int, help="training crop (default: the encoder's own training crop)")
    p.add_argument("--workers", type=int, default=d.num_workers, help=f"loader worker processes per rank (default {d.num_workers})")
    p.add_argument("--label-fraction", type=float, default=1.0)
    p.add_argument("--min-read", type=float, default=0.99, help="refuse a valid/test split read below this fraction")
    p.add_argument("--allow-incomplete", action="store_true", help="score valid/test on whatever was read")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/finetune", help="output folder: results.json, results.md, models/<run>/, runs/<run>/")
    p.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default=os.environ.get("WANDB_MODE", "disabled"),
                   help="W&B for every run (training curves, valid scores) and the results (default: $WANDB_MODE or disabled)")
    p.add_argument("--wandb-project", default="musicssl-eval")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    a.checkpoint = _checkpoint_arg(a)
    if not a.checkpoint and not a.preset:
        p.error("pass --checkpoint (fine-tune a pretrained encoder) or --preset (train that architecture from scratch)")
    if a.checkpoint and (a.preset or a.overrides):
        raise OptionError(_PRESET_WITH_CHECKPOINT)
    if not 0 < a.label_fraction <= 1:
        raise OptionError(f"--label-fraction must be in (0, 1], got {a.label_fraction}")
    if a.resume not in ("none", "auto") and not os.path.exists(a.resume):
        raise OptionError(f"--resume {a.resume}: no such checkpoint; use none, auto or a ckpt-<step>.pt path")
    try:
        ft = FinetuneConfig(steps=a.steps, seconds=a.seconds, batch_size=a.batch_size, head_lr=a.head_lr, encoder_lr=a.encoder_lr,
                            eval_every=a.eval_every, checkpoint_every=a.checkpoint_every, log_every=a.log_every,
                            crop_samples=a.crop_samples, num_workers=a.workers, seed=a.seed,
                            min_read=0.0 if a.allow_incomplete else a.min_read)
    except ValueError as exc:
        raise OptionError(str(exc)) from None
    rt = runtime.setup(a.device, a.precision, timeout_s=a.dist_timeout)
    ds = Dataset.from_dir(a.data)
    tasks = make_tasks(ds, a.tasks.split(",") if a.tasks else None, {k: f"{ds.name} {TITLES.get(k, k)}" for k in ds.spec})
    runs = [tasks] if a.joint or len(tasks) == 1 else [[t] for t in tasks]
    if a.resume not in ("none", "auto") and len(runs) > 1:
        raise OptionError("--resume URL names one run's checkpoint: pass one task (--tasks) or --joint, or use --resume auto")
    results = {
        "format": "musicssl-eval/1", "datasets": {ds.name: {"manifests": ds.manifests, "num_samples": ds.num_samples}},
        "tasks": {f"{ds.name}/{t.name}": {"kind": t.kind, "names": t.names, "title": t.title} for t in tasks},
        "rows": [], "encoders": {}, "finetune": {}, "models": {},
    }
    t0 = time.perf_counter()
    for group in runs:
        name = "joint" if len(group) > 1 else group[0].name
        enc, summary, folder = _finetune_run(a, ds, group, ft, rt, name)
        if summary["status"] != "completed":
            if rt.is_main:
                print(f"[evaluate] {name}: stopped at step {summary['steps']}; checkpoint {summary['checkpoint']}. "
                      "Continue with the same command and --resume auto", flush=True)
            return 0
        if not rt.is_main:
            continue
        results["rows"] += [{"encoder": enc.name, "task": f"{ds.name}/{t.name}", "fraction": a.label_fraction,
                             "valid": summary["valid"][t.name], "test": summary["test"][t.name], "run": name} for t in group]
        results["encoders"][enc.name] = {"arch": enc.arch, **enc.meta}
        results["finetune"][name] = {k: v for k, v in summary.items() if k not in ("heads", "valid", "test")}
        results["models"][name] = folder
        print(f"[evaluate] {name}: {summary['steps']} steps ({summary['train_seconds']:.0f} s), best valid at step "
              f"{summary['best_step']}; model + heads in {folder}", flush=True)
    if not rt.is_main:
        return 0
    results["config"] = dataclasses.asdict(ft) | {"joint": a.joint, "label_fraction": a.label_fraction,
                                                  "world_size": rt.world_size, "device": rt.device.type, "precision": rt.precision}
    os.makedirs(a.out, exist_ok=True)
    md = report.markdown_table(results)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md + "\n")
    results["table_markdown"] = md
    results["plots"] = []
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["wandb_run_id"] = report.log_wandb(results, mode=a.wandb_mode, project=a.wandb_project, run_name="finetune",
                                               images=[], table_md=md, out_dir=a.out)
    report.write_json(results, os.path.join(a.out, "results.json"))
    print_summary(results, a.out)
    print("tag your own audio: " + "; ".join(f"evaluate.py predict --model {f} song.wav" for f in results["models"].values()))
    return 0


def _finetune_run(a: argparse.Namespace, ds, tasks: list, ft, rt, name: str):
    """One fine-tune from a fresh encoder (the checkpoint's weights, or the preset's seeded init),
    in ``OUT/runs/<name>``; rank 0 saves the model for ``predict``."""
    from eval_tools.encoders import preset_config, random_encoder
    from eval_tools.extract import View
    from eval_tools.weights import open_encoder
    from eval_tools.finetune import as_saved_heads, finetune
    from eval_tools.heads import save_model

    if a.checkpoint:
        enc = open_encoder(a.checkpoint, layer=-1, sample_rate=a.sample_rate, fallback_rate=ds.sample_rate, name="fine-tuned",
                           trust_remote_code=a.trust_remote_code)
    else:
        cfg = preset_config(a.preset, a.overrides)
        enc = random_encoder(cfg, sample_rate=a.sample_rate or cfg.data.sample_rate or ds.sample_rate, seed=a.seed, name="from scratch")
    check_rate(ds, enc.sample_rate, resample=not a.no_resample)
    enc.to(rt.device, rt.precision)
    summary = finetune(enc, ds, tasks, ft, run_dir=os.path.join(a.out, "runs", name), fraction=a.label_fraction,
                       resume=a.resume, rt=rt, progress=not a.no_progress, wandb_mode=a.wandb_mode,
                       wandb_project=a.wandb_project, run_name=f"finetune-{ds.name}-{name}")
    folder = None
    if summary["status"] == "completed" and rt.is_main:
        folder = save_model(os.path.join(a.out, "models", name), enc, as_saved_heads(summary["heads"], tasks), view=View(),
                            meta={"dataset": ds.name, "run": name, "steps": summary["steps"], "best_step": summary["best_step"]},
                            scores={t.name: {"valid": summary["valid"][t.name], "test": summary["test"][t.name]} for t in tasks})
    return enc, summary, folder


AUDIO_EXTS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")


def _expand_inputs(inputs: list[str], command: str = "embed") -> tuple[list[str], list[str]]:
    """Split inputs into audio files (folders expanded, sorted) and shard manifests. Folder
    entries are listed whatever they are (FIFOs, dangling links): the reader skips and reports them."""
    files, manifests = [], []
    for item in inputs:
        if item.endswith(".manifest.json"):
            manifests.append(item)
        elif os.path.isdir(item):
            for root, dirs, names in os.walk(item):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(AUDIO_EXTS)]
        elif os.path.lexists(item):
            files.append(item)
        else:
            raise UserError(f"{command}: {item} is not an audio file, a folder or a *.manifest.json")
    return files, manifests


def _embed_encoder(a: argparse.Namespace, p: argparse.ArgumentParser):
    from eval_tools.encoders import logmel_encoder, preset_config, random_encoder
    from eval_tools.weights import open_encoder

    a.checkpoint = _checkpoint_arg(a)
    if a.checkpoint:
        return open_encoder(a.checkpoint, layer=a.layer, sample_rate=a.sample_rate, fallback_rate=16000,
                            trust_remote_code=a.trust_remote_code)
    if a.logmel:
        return logmel_encoder(a.sample_rate or 16000)
    if a.preset:
        cfg = preset_config(a.preset, a.overrides)
        return random_encoder(cfg, sample_rate=a.sample_rate or cfg.data.sample_rate or 16000, seed=a.seed, layer=a.layer)
    p.error("pass --checkpoint, --preset (random init) or --logmel")


def cmd_embed(argv: list[str]) -> int:
    from tqdm import tqdm

    from eval_tools import runtime
    from eval_tools.read import ReadReport, iter_files, iter_split, rank_range

    p = argparse.ArgumentParser(
        prog="evaluate.py embed",
        description="Audio files, folders or shard manifests -> one embedding per clip: OUT/embeddings.npy (N, D), "
                    "OUT/keys.txt (one line per row) and OUT/embeddings.npz (keys + x). Files that cannot be read "
                    "(not audio, truncated, a FIFO or dangling link, a missing shard) are listed, not fatal.")
    p.add_argument("inputs", nargs="+", help="audio files, folders (searched recursively) or *.manifest.json")
    _add_encoder_args(p)
    p.add_argument("--logmel", action="store_true", help="log-mel statistics instead of a neural encoder")
    p.add_argument("--seed", type=int, default=0, help="seed of a random-init encoder (--preset without --checkpoint)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch", type=int, dest="embed_batch", help="alias of --embed-batch")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.checkpoint and (a.preset or a.overrides):
        raise OptionError(_PRESET_WITH_CHECKPOINT)
    files, manifests = _expand_inputs(a.inputs)
    if not files and not manifests:
        p.error("no audio files found in the inputs")
    rt = runtime.setup(a.device, a.precision, timeout_s=a.dist_timeout)
    enc = _embed_encoder(a, p).to(rt.device, rt.precision)
    if enc.arch != "logmel":
        enc.pool = a.pool
    sr = enc.sample_rate
    lo, hi = rank_range(len(files), rt.rank, rt.world_size)
    reports = [ReadReport(source="files")] + [ReadReport(source=m) for m in manifests]

    def clips():
        yield from iter_files(files[lo:hi], reports[0], sample_rate=sr)
        for m, rep in zip(manifests, reports[1:]):
            yield from iter_split(m, rep, sample_rate=sr, rank=rt.rank, world_size=rt.world_size)

    keys: list[str] = []
    bar = tqdm(desc=f"embed ({enc.arch}, {sr} Hz)", unit="clip", disable=a.no_progress or not rt.is_main)

    def audio():
        for clip in clips():
            keys.append(clip.key)
            yield clip.audio

    vecs = list(enc.embed_stream(audio(), a.embed_batch or 16, bar.update))
    bar.close()
    parts = runtime.gather_to_main((keys, np.concatenate(vecs) if vecs else None, [r.to_dict() for r in reports]), rt)
    if parts is None:
        return 0
    keys = [k for part in parts for k in part[0]]
    x_parts = [part[1] for part in parts if part[1] is not None]
    merged = [ReadReport.from_dict(d) for d in parts[0][2]]
    for part in parts[1:]:
        merged = [m.merge(ReadReport.from_dict(d)) for m, d in zip(merged, part[2])]
    skipped = [s for r in merged for s in r.skipped]
    not_read = sum(r.not_read for r in merged)
    if not keys:
        raise UserError(f"embed: no clip could be read ({not_read} not read, e.g. "
                        f"{skipped[0]['where']}: {skipped[0]['reason']})" if skipped else "embed: no clip could be read")
    x = np.concatenate(x_parts)
    os.makedirs(a.out, exist_ok=True)
    np.save(os.path.join(a.out, "embeddings.npy"), x)
    with open(os.path.join(a.out, "keys.txt"), "w") as f:
        f.write("\n".join(keys) + "\n")
    np.savez(os.path.join(a.out, "embeddings.npz"), keys=np.array(keys), x=x)
    report = {"embedded": len(keys), "not_embedded": not_read, "sources": [r.to_dict() for r in merged]}
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"\n{len(keys)} clips -> {os.path.join(a.out, 'embeddings.npy')} {tuple(x.shape)} ({enc.arch}, {sr} Hz, {rt.device}); "
          f"keys in keys.txt; {not_read} not embedded (report.json)")
    for s_ in skipped[:10]:
        print(f"  skipped {s_['where']}: {s_['reason']}" + (f" ({s_['samples']} samples)" if s_["samples"] > 1 else ""))
    if len(skipped) > 10:
        print(f"  ... {len(skipped) - 10} more in report.json")
    return 0


def cmd_predict(argv: list[str]) -> int:
    from tqdm import tqdm

    from eval_tools import runtime
    from eval_tools.heads import load_model
    from eval_tools.read import ReadReport, iter_files

    p = argparse.ArgumentParser(
        prog="evaluate.py predict",
        description="Tag your own audio with a saved model (a folder from `probe --save-models` or `finetune`): "
                    "the top tags with their scores for multi-label tasks, the top classes (pitch, instrument family, "
                    "...) with their probabilities for single-label ones.")
    p.add_argument("inputs", nargs="+", help="audio files or folders (searched recursively)")
    p.add_argument("--model", required=True, metavar="DIR", help="folder with model.json, encoder.pt, heads.pt")
    p.add_argument("--top", type=int, default=5, help="labels shown per task (default 5)")
    p.add_argument("--threshold", type=float, help="multi-label tasks: show only tags scoring at least this")
    p.add_argument("--json", metavar="FILE", help="also write every score of every file to FILE")
    _add_device_args(p)
    a = p.parse_args(argv)
    if a.top < 1:
        raise OptionError(f"--top must be >= 1, got {a.top}")
    files, manifests = _expand_inputs(a.inputs, "predict")
    if manifests:
        raise UserError(f"predict takes audio files and folders, not manifests ({manifests[0]}); use `embed` for shards")
    if not files:
        raise UserError("predict: no audio files found in the inputs")
    rt = runtime.setup(a.device, a.precision)
    model = load_model(a.model, device=rt.device, precision=rt.precision)
    report = ReadReport(source="files")
    out: dict[str, dict] = {}
    bar = tqdm(total=len(files), desc="predict", unit="file", leave=False)
    for clip in iter_files(files, report, sample_rate=model.encoder.sample_rate):
        probs = model.predict([clip.audio])
        out[clip.key] = {h.task.name: {str(n): float(v) for n, v in zip(h.task.names, probs[h.task.name][0])} for h in model.heads}
        lines = [clip.key]
        for h in model.heads:
            ranked = sorted(out[clip.key][h.task.name].items(), key=lambda kv: -kv[1])
            if h.task.kind == "multi_hot" and a.threshold is not None:
                ranked = [kv for kv in ranked if kv[1] >= a.threshold]
            shown = "  ".join(f"{n} {v:.2f}" for n, v in ranked[: a.top]) or "(none above the threshold)"
            lines.append(f"  {h.task.name}: {shown}")
        bar.write("\n".join(lines), file=sys.stdout)  # above the progress bar, not through it
        bar.update(1)
    bar.close()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "predictions": out, "skipped": report.skipped}, f, indent=2)
    tasks = ", ".join(f"{h.task.name} ({h.task.kind}, {len(h.task.names)} labels)" for h in model.heads)
    print(f"\n{len(out)} of {len(files)} files tagged with {model.encoder.name} ({model.encoder.arch}) heads: {tasks}; "
          f"{report.not_read} skipped" + (f"; scores in {a.json}" if a.json else ""))
    for s_ in report.skipped[:10]:
        print(f"  skipped {s_['where']}: {s_['reason']}")
    if not out:
        first = report.skipped[0] if report.skipped else {"where": files[0], "reason": "unreadable"}
        raise UserError(f"predict: no file could be read ({report.not_read} skipped, e.g. {first['where']}: {first['reason']})")
    return 0


def cmd_export(argv: list[str]) -> int:
    from eval_tools.weights import export

    p = argparse.ArgumentParser(
        prog="evaluate.py export",
        description="Write a checkpoint's encoder for others to load (docs/weights.md): OUT/model.safetensors (the "
                    "tensors embed() needs, no projection head or quantizer; never a pickle), OUT/config.json "
                    "(architecture, sample rate, input length, the run config, label vocabularies of --heads) and "
                    "OUT/README.md (a model card). Load it back with eval_tools.weights.load_export(OUT) or "
                    "--checkpoint export:OUT. --format hf writes a wav2vec2 checkpoint as a Hugging Face "
                    "Wav2Vec2Model folder (transformers.AutoModel.from_pretrained(OUT)).")
    p.add_argument("--checkpoint", required=True, help="a train.py checkpoint (ckpt-<step>.pt)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--format", choices=["musicssl", "hf"], default="musicssl",
                   help="musicssl (default): safetensors + config.json; hf: a transformers Wav2Vec2Model folder (wav2vec2 only)")
    p.add_argument("--heads", metavar="DIR", help="a saved-model folder (probe --save-models, finetune) whose label "
                   "vocabularies go into config.json")
    p.add_argument("--results", metavar="FILE", help="an evaluate.py results.json whose rows for this checkpoint go into the model card")
    p.add_argument("--sample-rate", type=int, help="the encoder's rate when the run config does not name one")
    a = p.parse_args(argv)
    r = export(a.checkpoint, a.out, fmt=a.format, heads=a.heads, results=a.results, sample_rate=a.sample_rate)
    size = sum(os.path.getsize(os.path.join(a.out, f)) for f in r["files"] if os.path.isfile(os.path.join(a.out, f)))
    print(f"exported {r['arch']} encoder (step {r['step']}, {r['parameters']:,} parameters, {r['sample_rate']} Hz) "
          f"-> {a.out} [{r['format']}]: {', '.join(r['files'])} ({size / 1e6:.1f} MB)")
    print("load it: " + ("transformers.AutoModel.from_pretrained(" + repr(a.out) + ")" if r["format"] == "hf"
                         else f"eval_tools.weights.load_export({a.out!r}), or evaluate.py probe --checkpoint export:{a.out}"))
    return 0


COMMANDS = {
    "probe": lambda argv: cmd_probe(argv, sweep=False),
    "sweep": lambda argv: cmd_probe(argv, sweep=True),
    "finetune": cmd_finetune,
    "embed": cmd_embed,
    "predict": cmd_predict,
    "export": cmd_export,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point: every failure is one line (``--debug`` or MUSICSSL_DEBUG=1 shows the traceback)."""
    from pipeline.errors import run_cli

    return run_cli(_main, argv, "evaluate.py")


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print("\ncommands: " + ", ".join(COMMANDS) + "   (evaluate.py COMMAND --help for each)")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    finally:
        if "eval_tools.runtime" in sys.modules:  # a torchrun process group, if this run made one
            sys.modules["eval_tools.runtime"].shutdown()


if __name__ == "__main__":
    sys.exit(main())
