"""Evaluate music representations: frozen-encoder probes, fine-tuning, label-efficiency sweeps and
embedding export, with baselines (random init, supervised, log-mel statistics).

On the demo shards (``shard-tools demo --out demo_shards``) after ``python train.py --config clmr_tiny``::

    python evaluate.py probe --data demo_shards/nsynth --data demo_shards/mtat \\
        --checkpoint runs/clmr_tiny/checkpoints/ckpt-00000200.pt --baselines random,supervised,logmel
    python evaluate.py sweep --data demo_shards/nsynth --checkpoint ... --fractions 0.01,0.1,1
    python evaluate.py finetune --data demo_shards/nsynth --checkpoint ... --encoder-lr 1e-4
    python evaluate.py embed --checkpoint ... --out emb/ song1.wav folder_of_audio/ shards/test.manifest.json

Protocol (``probe``/``sweep``): each encoder embeds every clip of the train/valid/test split with its
weights frozen (CLMR: non-overlapping crops of the model's input length, averaged per clip;
wav2vec2: mean over time of one layer, or of each layer with ``--layer all``; CPC: context features
mean-pooled), after its BatchNorm statistics are recomputed on clean training crops. A linear probe
(or ``--probe mlp``: one hidden layer) is trained with Adam 1e-3 and early stopping on the valid
split (MARBLE), then scored once on the test split: accuracy for single-label fields (NSynth pitch,
instrument family), macro ROC-AUC and PR-AUC for multi-label tags. Writes ``results.json``,
``results.md`` and PNG plots to ``--out`` and logs them to W&B (``--wandb-mode``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

BASELINES = ("random", "supervised", "logmel")
TITLES = {"instrument_family_str": "family", "instrument_family": "family", "instrument_source_str": "source"}


@dataclass(kw_only=True)
class EvalOptions:
    """Everything ``probe`` and ``sweep`` need (the quickstart builds one in-process)."""

    data: list[str]  # dataset folders holding {train,valid,test}.manifest.json
    out: str = "runs/eval"
    checkpoint: str | None = None
    preset: str | None = None  # architecture for random/supervised baselines when no checkpoint
    overrides: list[str] = field(default_factory=list)  # --set section.key=value on that preset
    baselines: list[str] = field(default_factory=lambda: ["random", "logmel"])
    tasks: list[str] | None = None  # label fields; None = every field with >= 2 names
    fractions: list[float] = field(default_factory=lambda: [1.0])
    layer: int | str = -1
    probe: str = "linear"
    max_epochs: int = 200
    patience: int = 20
    sample_rate: int | None = None
    recalibrate_bn: bool = True
    calib_crops: int = 512
    supervised_steps: int | None = None  # None = the checkpoint's step count, else 500
    supervised_steps_per_dataset: dict[str, int] = field(default_factory=dict)  # dataset name -> steps (wins)
    supervised_seconds: float | None = None
    supervised_batch_size: int = 32
    supervised_lr: float = 1e-3
    cache: str | None = None  # embedding cache folder; None = <out>/cache; "" disables
    seed: int = 0
    wandb_mode: str = field(default_factory=lambda: os.environ.get("WANDB_MODE", "disabled"))
    wandb_project: str = "musicssl-eval"
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("--data: give at least one dataset folder (e.g. demo_shards/nsynth)")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"--baselines: unknown {bad}; choose from {', '.join(BASELINES)}")
        if self.checkpoint is None and self.preset is None and any(b in ("random", "supervised") for b in self.baselines):
            raise ValueError("--baselines random/supervised need an architecture: pass --checkpoint or --preset (e.g. clmr_tiny)")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise ValueError(f"--fractions/--label-fraction must be in (0, 1], got {self.fractions}")
        if self.wandb_mode not in ("online", "offline", "disabled"):
            raise ValueError(f"--wandb-mode must be online, offline or disabled, got {self.wandb_mode!r}")


def _log(msg: str) -> None:
    print(f"[evaluate] {msg}", flush=True)


def run_evaluation(opts: EvalOptions) -> dict:
    """Probe the checkpoint and the baselines on every dataset and fraction; write and return results."""
    import torch

    from eval_tools.data import Dataset
    from eval_tools.encoders import (checkpoint_config, encoder_from_checkpoint, logmel_encoder, preset_config,
                                     random_encoder)
    from eval_tools.finetune import FinetuneConfig, finetune
    from eval_tools.probe import ProbeConfig
    from eval_tools.runner import embed_splits, make_tasks, probe_encoder

    t_start = time.perf_counter()
    probe_cfg = ProbeConfig(probe=opts.probe, max_epochs=opts.max_epochs, patience=opts.patience, seed=opts.seed)
    cache = os.path.join(opts.out, "cache") if opts.cache is None else (opts.cache or None)
    arch_cfg = (checkpoint_config(opts.checkpoint) if opts.checkpoint
                else preset_config(opts.preset, opts.overrides) if opts.preset else None)  # None: log-mel only
    ckpt_step = None
    results = {
        "format": "musicssl-eval/1", "datasets": {}, "tasks": {}, "rows": [], "encoders": {},
        "config": {k: v for k, v in dataclasses.asdict(opts).items() if k != "progress"},
    }
    for folder in opts.data:
        ds = Dataset.from_dir(folder)
        requested = opts.tasks
        if requested is not None:
            requested = [t for t in requested if t in ds.spec]
            if not requested:
                _log(f"{folder}: none of --tasks {','.join(opts.tasks)} is a label field here; skipping")
                continue
        tasks = make_tasks(ds, requested, {k: f"{ds.name} {TITLES.get(k, k)}" for k in ds.spec})
        sr = opts.sample_rate or (arch_cfg.data.sample_rate if arch_cfg is not None and arch_cfg.data.sample_rate else None) or ds.sample_rate
        if sr is None:
            raise ValueError(f"--data {folder}: its shards mix sample rates; pass --sample-rate")
        results["datasets"][ds.name] = {"manifests": ds.manifests, "num_samples": ds.num_samples, "sample_rate": sr}
        for t in tasks:
            results["tasks"][f"{ds.name}/{t.name}"] = {"kind": t.kind, "names": t.names, "title": t.title, "dataset": ds.name, "field": t.name}
        _log(f"{ds.name}: {ds.num_samples} clips, tasks {', '.join(t.name for t in tasks)}, {sr} Hz")

        def add_rows(enc, fractions: list[float], *, label: str | None = None) -> None:
            t0 = time.perf_counter()
            embs = embed_splits(enc, ds, cache_dir=cache, recalibrate=opts.recalibrate_bn, progress=opts.progress,
                                calib_crops=opts.calib_crops, seed=opts.seed)
            t_embed = time.perf_counter() - t0
            rows = probe_encoder(label or enc.name, embs, tasks, probe_cfg, fractions=fractions, seed=opts.seed)
            for r in rows:
                r["task"] = f"{ds.name}/{r['task']}"
                r["embed_seconds"] = round(t_embed, 1)
                r["dim"] = int(embs["train"].x.shape[-1])
            results["rows"].extend(rows)
            results["encoders"][label or enc.name] = {"arch": enc.arch, "ident": enc.ident, **enc.meta}
            for r in rows:
                _log(f"  {r['encoder']:<12} {r['task']:<32} frac {r['fraction']:<5g} "
                     + " ".join(f"{k}={v:.3f}" for k, v in r["test"].items() if k != "n"))

        if opts.checkpoint:
            enc = encoder_from_checkpoint(opts.checkpoint, layer=opts.layer, sample_rate=sr, fallback_rate=ds.sample_rate)
            ckpt_step = enc.meta.get("step")
            add_rows(enc, opts.fractions)
        if "random" in opts.baselines:
            add_rows(random_encoder(arch_cfg, sample_rate=sr, seed=opts.seed, layer=opts.layer), opts.fractions)
        if "supervised" in opts.baselines:
            steps = opts.supervised_steps_per_dataset.get(ds.name) or opts.supervised_steps or ckpt_step or 500
            for f in opts.fractions:
                torch.manual_seed(opts.seed)
                enc = random_encoder(arch_cfg, sample_rate=sr, seed=opts.seed, layer=opts.layer, name="supervised")
                ft_cfg = FinetuneConfig(steps=steps, seconds=opts.supervised_seconds, batch_size=opts.supervised_batch_size,
                                        head_lr=opts.supervised_lr, encoder_lr=opts.supervised_lr,
                                        eval_every=max(1, steps // 5), seed=opts.seed)
                _log(f"supervised baseline on {ds.name} train labels (fraction {f:g}): {steps} steps, batch {ft_cfg.batch_size}")
                summary = finetune(enc, ds, tasks, ft_cfg, fraction=f, progress=opts.progress)
                enc.ident += f"+supervised({ds.name},{ds.manifest_hash('train')},{f},{steps},{opts.supervised_seconds},{opts.seed})"
                enc.meta.update({"supervised_steps": summary["steps"], "supervised_seconds": round(summary["train_seconds"], 1),
                                 "supervised_best_step": summary["best_step"]})
                add_rows(enc, [f])
        if "logmel" in opts.baselines:
            add_rows(logmel_encoder(sr), opts.fractions)

    if not results["rows"]:
        raise ValueError("nothing was evaluated: check --data, --tasks and --baselines")
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    write_outputs(results, opts)
    return results


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
    md = report.markdown_table(results, fraction=max(opts.fractions))
    if len(opts.fractions) > 1:
        md += "\n\n" + report.sweep_table(results)
    with open(os.path.join(opts.out, "results.md"), "w") as f:
        f.write(md + "\n")
    results["plots"] = images
    results["table_markdown"] = md
    results["wandb_run_id"] = report.log_wandb(results, mode=opts.wandb_mode, project=opts.wandb_project,
                                               run_name=os.path.basename(opts.out.rstrip("/")), images=images, table_md=md)
    report.write_json(results, os.path.join(opts.out, "results.json"))


# ------------------------------------------------------------------------------------------------
# CLI


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.01,0.1,1, got {text!r}") from None


def _layer(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer takes an integer (-1 = last) or 'all', got {text!r}") from None


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="a train.py checkpoint (ckpt-<step>.pt); its config rebuilds the encoder")
    p.add_argument("--preset", help="train.py preset whose architecture the random/supervised baselines use when "
                   "there is no --checkpoint (e.g. clmr_tiny, wav2vec2_tiny, cpc_tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a preset key, e.g. --set model.temperature=0.1 (repeatable)")
    p.add_argument("--layer", type=_layer, default=-1, help="wav2vec2: layer to probe (-1 = last, 0 = transformer input) or 'all'")
    p.add_argument("--sample-rate", type=int, help="resample clips to this rate (default: the encoder's training rate)")


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
    p.add_argument("--probe", choices=["linear", "mlp"], default="linear")
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--patience", type=int, default=20, help="early stopping: epochs without a better valid score")
    p.add_argument("--no-bn-recalibration", action="store_true", help="keep the checkpoint's BatchNorm statistics")
    p.add_argument("--calib-crops", type=int, default=512, help="clean training crops for BatchNorm recalibration")
    p.add_argument("--supervised-steps", type=int, help="steps of the supervised baseline (default: the checkpoint's steps, else 500)")
    p.add_argument("--supervised-seconds", type=float, help="also stop the supervised baseline after this wall-clock budget")
    p.add_argument("--supervised-batch-size", type=int, default=32)
    p.add_argument("--out", default="runs/eval", help="output folder: results.json, results.md, plots/, cache/")
    p.add_argument("--cache", help="embedding cache folder (default OUT/cache; '' disables)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default=os.environ.get("WANDB_MODE", "disabled"))
    p.add_argument("--wandb-project", default="musicssl-eval")
    p.add_argument("--no-progress", action="store_true")


def _opts_from_args(a: argparse.Namespace, *, sweep: bool) -> EvalOptions:
    return EvalOptions(
        data=a.data, out=a.out, checkpoint=a.checkpoint, preset=a.preset, overrides=a.overrides,
        baselines=[b for b in a.baselines.split(",") if b], tasks=a.tasks.split(",") if a.tasks else None,
        fractions=a.fractions if sweep else [a.label_fraction], layer=a.layer, probe=a.probe, max_epochs=a.max_epochs,
        patience=a.patience, sample_rate=a.sample_rate, recalibrate_bn=not a.no_bn_recalibration, calib_crops=a.calib_crops,
        supervised_steps=a.supervised_steps, supervised_seconds=a.supervised_seconds,
        supervised_batch_size=a.supervised_batch_size, cache=a.cache, seed=a.seed, wandb_mode=a.wandb_mode,
        wandb_project=a.wandb_project, progress=not a.no_progress,
    )


def print_summary(results: dict, out: str) -> None:
    print()
    print(results["table_markdown"])
    print()
    print(f"results: {os.path.join(out, 'results.json')}  table: {os.path.join(out, 'results.md')}  "
          f"plots: {len(results['plots'])} PNG in {os.path.join(out, 'plots')}  ({results['seconds']:.0f} s)")
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
    print_summary(results, opts.out)
    return 0


def cmd_finetune(argv: list[str]) -> int:
    from eval_tools import report
    from eval_tools.data import Dataset
    from eval_tools.encoders import encoder_from_checkpoint, preset_config, random_encoder
    from eval_tools.finetune import FinetuneConfig, finetune
    from eval_tools.runner import make_tasks

    p = argparse.ArgumentParser(
        prog="evaluate.py finetune",
        description="Fine-tune an encoder end to end: mean-pooled encoder output + one linear head per task, "
                    "the encoder with its own learning rate; early stopping on valid, scored on test.")
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder with train/valid/test.manifest.json")
    _add_encoder_args(p)
    p.add_argument("--tasks", help="comma list of label fields (default: every field with >= 2 names)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seconds", type=float, help="also stop after this wall-clock budget")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--encoder-lr", type=float, default=1e-4, help="encoder learning rate (0 freezes it: a linear probe on crops)")
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--label-fraction", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/finetune")
    p.add_argument("--wandb-mode", choices=["online", "offline", "disabled"], default=os.environ.get("WANDB_MODE", "disabled"))
    p.add_argument("--wandb-project", default="musicssl-eval")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if not a.checkpoint and not a.preset:
        p.error("pass --checkpoint (fine-tune a pretrained encoder) or --preset (train that architecture from scratch)")
    ds = Dataset.from_dir(a.data)
    tasks = make_tasks(ds, a.tasks.split(",") if a.tasks else None, {k: f"{ds.name} {TITLES.get(k, k)}" for k in ds.spec})
    if a.checkpoint:
        enc = encoder_from_checkpoint(a.checkpoint, layer=-1, sample_rate=a.sample_rate, fallback_rate=ds.sample_rate, name="fine-tuned")
    else:
        cfg = preset_config(a.preset, a.overrides)
        enc = random_encoder(cfg, sample_rate=a.sample_rate or cfg.data.sample_rate or ds.sample_rate, seed=a.seed, name="from scratch")
    ft = FinetuneConfig(steps=a.steps, seconds=a.seconds, batch_size=a.batch_size, head_lr=a.head_lr, encoder_lr=a.encoder_lr,
                        eval_every=a.eval_every, seed=a.seed)
    summary = finetune(enc, ds, tasks, ft, fraction=a.label_fraction, progress=not a.no_progress)
    results = {
        "format": "musicssl-eval/1", "datasets": {ds.name: {"manifests": ds.manifests, "num_samples": ds.num_samples}},
        "tasks": {f"{ds.name}/{t.name}": {"kind": t.kind, "names": t.names, "title": t.title} for t in tasks},
        "rows": [{"encoder": enc.name, "task": f"{ds.name}/{t.name}", "fraction": a.label_fraction, "valid": summary["valid"][t.name],
                  "test": summary["test"][t.name]} for t in tasks],
        "encoders": {enc.name: {"arch": enc.arch, **enc.meta}},
        "finetune": {k: v for k, v in summary.items() if k not in ("heads", "valid", "test")} | {"config": dataclasses.asdict(ft)},
    }
    os.makedirs(a.out, exist_ok=True)
    md = report.markdown_table(results)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(md + "\n")
    results["table_markdown"] = md
    results["plots"] = []
    results["seconds"] = summary["train_seconds"]
    results["wandb_run_id"] = report.log_wandb(results, mode=a.wandb_mode, project=a.wandb_project, run_name="finetune", images=[], table_md=md)
    report.write_json(results, os.path.join(a.out, "results.json"))
    print(f"\nfine-tuned {summary['steps']} steps ({summary['train_seconds']:.0f} s), best valid at step {summary['best_step']}")
    print_summary(results, a.out)
    return 0


AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


def _expand_inputs(inputs: list[str]) -> tuple[list[str], list[str]]:
    """Split inputs into audio files (folders expanded, sorted) and shard manifests."""
    files, manifests = [], []
    for item in inputs:
        if item.endswith(".manifest.json"):
            manifests.append(item)
        elif os.path.isdir(item):
            for root, _, names in sorted(os.walk(item)):
                files += [os.path.join(root, n) for n in sorted(names) if n.lower().endswith(AUDIO_EXTS)]
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"embed: {item} is not an audio file, a folder or a *.manifest.json")
    return files, manifests


def cmd_embed(argv: list[str]) -> int:
    from tqdm import tqdm

    from eval_tools.encoders import encoder_from_checkpoint, logmel_encoder, preset_config, random_encoder
    from pipeline.audio import AudioDecodeError, read_audio, resample, to_mono
    from pipeline.loader import iter_samples

    p = argparse.ArgumentParser(
        prog="evaluate.py embed",
        description="Audio files, folders or shard manifests -> one embedding per clip: OUT/embeddings.npy (N, D), "
                    "OUT/keys.txt (one line per row) and OUT/embeddings.npz (keys + x).")
    p.add_argument("inputs", nargs="+", help="audio files, folders (searched recursively) or *.manifest.json")
    _add_encoder_args(p)
    p.add_argument("--logmel", action="store_true", help="log-mel statistics instead of a neural encoder")
    p.add_argument("--seed", type=int, default=0, help="seed of a random-init encoder (--preset without --checkpoint)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch", type=int, default=8, help="clips per forward pass")
    a = p.parse_args(argv)
    files, manifests = _expand_inputs(a.inputs)
    if not files and not manifests:
        p.error("no audio files found in the inputs")
    if a.checkpoint:
        enc = encoder_from_checkpoint(a.checkpoint, layer=a.layer, sample_rate=a.sample_rate, fallback_rate=16000)
    elif a.logmel:
        enc = logmel_encoder(a.sample_rate or 16000)
    elif a.preset:
        cfg = preset_config(a.preset, a.overrides)
        enc = random_encoder(cfg, sample_rate=a.sample_rate or cfg.data.sample_rate or 16000, seed=a.seed, layer=a.layer)
    else:
        p.error("pass --checkpoint, --preset (random init) or --logmel")
    sr = enc.sample_rate

    skipped: list[tuple[str, str]] = []

    def clips():
        for path in files:
            try:
                audio, file_sr = read_audio(path)
            except AudioDecodeError as exc:  # reported in the summary, never dropped silently
                skipped.append((path, str(exc)))
                continue
            yield path, to_mono(resample(audio, file_sr, sr))[0]
        for m in manifests:
            for s in iter_samples([m], sample_rate=sr, mono=True):
                yield s["key"], s["audio"][0]

    keys: list[str] = []
    bar = tqdm(desc=f"embed ({enc.arch}, {sr} Hz)", unit="clip")

    def audio():
        for key, clip in clips():
            keys.append(key)
            yield np.ascontiguousarray(clip, dtype=np.float32)

    vecs = list(enc.embed_stream(audio(), a.batch, bar.update))
    bar.close()
    if not keys:
        print("embed: no clip could be read", file=sys.stderr)
        return 1
    x = np.concatenate(vecs)
    os.makedirs(a.out, exist_ok=True)
    np.save(os.path.join(a.out, "embeddings.npy"), x)
    with open(os.path.join(a.out, "keys.txt"), "w") as f:
        f.write("\n".join(keys) + "\n")
    np.savez(os.path.join(a.out, "embeddings.npz"), keys=np.array(keys), x=x)
    print(f"\n{len(keys)} clips -> {os.path.join(a.out, 'embeddings.npy')} {tuple(x.shape)} ({enc.arch}, {sr} Hz); "
          f"keys in keys.txt; {len(skipped)} skipped")
    for path, why in skipped[:10]:
        print(f"  skipped {path}: {why}")
    return 0


COMMANDS = {
    "probe": lambda argv: cmd_probe(argv, sweep=False),
    "sweep": lambda argv: cmd_probe(argv, sweep=True),
    "finetune": cmd_finetune,
    "embed": cmd_embed,
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
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
