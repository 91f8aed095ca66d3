"""The main job on a fresh machine: show self-supervised pretraining working on real instruments.

    python quickstart.py                     # CLMR; target: 15 min on 2 idle CPU cores (README: measured)
    python quickstart.py --seed 1            # the same run with another seed (the run-to-run noise)
    python quickstart.py --model wav2vec2    # the wav2vec2 tiny preset instead (also: --model cpc)
    python quickstart.py --tiny              # a 2-minute smoke run (what CI runs)

Steps, top to bottom in :func:`run`:

1. **Demo shards** (``shard-tools demo``): notes of 76 General MIDI instruments rendered with the
   soundfont pretty_midi ships, in NSynth's layout and split (valid/test instruments never occur in
   train), plus multi-instrument clips in MagnaTagATune's layout (tags: instruments, tempo, solo).
2. **Pretraining** (``train.train``) on the unlabelled train audio of both, with the tiny preset of
   ``--model`` and quickstart settings: a fixed step count (deterministic, unlike a time budget) and,
   because pitch is probed, no pitch-shift or speed augmentation (they would teach pitch invariance);
   CLMR also without band filters and reverb (docs/quickstart-calibration.md).
3. **Probes** (``evaluate.run_evaluation``): linear probes on frozen embeddings for NSynth pitch and
   instrument family (on held-out instruments) and MTAT tags (on held-out clips; CLMR: every
   block's pooled output concatenated, ``--layer concat``), for the
   pretrained encoder and three baselines: the same architecture at random init, the same
   architecture trained supervised on the labels with the same compute (as many training crops as
   pretraining saw), and log-mel statistics.
4. **The table**, printed as measured, plus where everything was written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

MODELS = ("clmr", "wav2vec2", "cpc")


@dataclasses.dataclass(kw_only=True)
class Plan:
    """What the quickstart runs; ``--tiny`` and the flags change it."""

    model: str = "clmr"
    steps: int = 600  # pretraining optimizer steps
    batch_size: int = 64
    temperature: float = 0.1  # CLMR: 0.1 beat 0.5 on unseen-instrument family in the calibration
    clmr_blocks: int = 7  # SampleCNN blocks: 7 -> 3**8 = 6561-sample crops (0.41 s at 16 kHz)
    demo_notes: int = 12  # notes per instrument in the demo
    demo_programs: int = 0  # 0 = every program of the 11 families
    # 480 clips of 4 s: 90 test / 30 valid tag clips (160 x 6 s gave 30 / 10: too few for a macro AUC)
    demo_clips: int = 480
    demo_clip_seconds: float = 4.0
    # CLMR's probed features: -1 = the last block, "concat" = every block's pooled output (see
    # docs/quickstart-calibration.md); wav2vec2 probes every layer and keeps the best on valid
    clmr_layer: int | str = "concat"
    probe_epochs: int = 200
    probe_patience: int = 20
    calib_crops: int = 512
    workers: int = 2
    seed: int = 0  # pretraining, the baselines' init and the probes (the demo data stay seed 0)


def tiny_plan(model: str) -> Plan:
    return Plan(model=model, steps=12, batch_size=16, demo_notes=3, demo_programs=3, demo_clips=32, demo_clip_seconds=2.0,
                probe_epochs=20, probe_patience=5, calib_crops=32, clmr_blocks=6)


def pretrain_config(plan: Plan, demo: str, out: str):
    """The ``<model>_tiny`` preset with the quickstart's pretraining settings (all of them are here
    and in :class:`Plan`)."""
    import train_config

    cfg = train_config.preset(f"{plan.model}_tiny")
    r = dataclasses.replace
    cfg = r(
        cfg,
        data=r(cfg.data, manifests=[f"{demo}/nsynth/train.manifest.json", f"{demo}/mtat/train.manifest.json"],
               num_workers=max(0, plan.workers - 1)),
        train=r(cfg.train, steps=plan.steps, global_batch_size=plan.batch_size, device="cpu", out_dir=out, seed=plan.seed),
        checkpoint=r(cfg.checkpoint, every=plan.steps, keep=1),
        logging=r(cfg.logging, every=max(1, plan.steps // 20), wandb_mode="disabled", audio_every=0),
    )
    if plan.model == "clmr":
        widths = (16, 16, 32, 32, 32, 64, 64, 64, 64)[: plan.clmr_blocks]
        cfg = r(cfg, model=r(cfg.model, temperature=plan.temperature, channels=widths),
                # pitch is probed: keep it (the calibration: pitch/speed changes taught invariance);
                # band filters and reverb off: docs/quickstart-calibration.md (valid pitch 15 -> 19 % on the last block)
                augment=r(cfg.augment, pitch_p=0.0, speed_p=0.0, filter_p=0.0, reverb_p=0.0))
    return cfg


def ensure_demo(demo: str, plan: Plan) -> dict:
    """Build the demo shards unless a previous run left a complete set in ``demo``."""
    from shard_tools.demo import DemoConfig, build_demo

    needed = [f"{demo}/{d}/{s}.manifest.json" for d in ("nsynth", "mtat") for s in ("train", "valid", "test")]
    stamp = os.path.join(demo, "quickstart-demo.json")
    cfg = DemoConfig(notes_per_instrument=plan.demo_notes, programs_per_family=plan.demo_programs, clips=plan.demo_clips,
                     clip_seconds=plan.demo_clip_seconds)
    if all(os.path.exists(p) for p in needed) and os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == dataclasses.asdict(cfg):
                return {"reused": True}
    summary = build_demo(demo, cfg=cfg, workers=plan.workers, progress=True, command=" ".join(sys.argv))
    bad = [n for n, r in summary["reports"].items() if r["files_skipped"] or r["samples_written"] == 0]
    if bad:
        raise RuntimeError(f"demo build: {', '.join(bad)} skipped files or wrote nothing; see the build reports in {demo}")
    with open(stamp, "w") as f:
        json.dump(dataclasses.asdict(cfg), f)
    return {"reused": False, "seconds": summary["wall_seconds"]}


def run(plan: Plan, *, out: str, demo: str) -> dict:
    import torch

    import evaluate
    import train

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    torch.set_num_threads(max(1, plan.workers))

    print(f"[quickstart] 1/3 demo shards -> {demo}", flush=True)
    demo_info = ensure_demo(demo, plan)
    timings["demo"] = time.perf_counter() - t0

    print(f"[quickstart] 2/3 pretraining {plan.model} ({plan.model}_tiny preset, {plan.steps} steps, batch {plan.batch_size})", flush=True)
    cfg = pretrain_config(plan, demo, os.path.join(out, "pretrain"))
    t1 = time.perf_counter()
    summary = train.train(cfg)
    timings["pretrain"] = time.perf_counter() - t1
    ckpt = summary["checkpoint"]
    # The supervised baseline gets the pretraining's compute: as many training crops in all, split
    # over the datasets as the pretraining stream split them (in proportion to their clip counts).
    from pipeline.shards import load_manifest

    crops_seen = plan.steps * plan.batch_size * cfg.views
    clips = {d: load_manifest(f"{demo}/{d}/train.manifest.json").num_samples for d in ("nsynth", "mtat")}
    sup_steps = {d: max(1, round(crops_seen * n / sum(clips.values()) / plan.batch_size)) for d, n in clips.items()}

    print("[quickstart] 3/3 probes: pretrained vs random init vs supervised vs log-mel", flush=True)
    t2 = time.perf_counter()
    opts = evaluate.EvalOptions(
        data=[f"{demo}/nsynth", f"{demo}/mtat"], out=os.path.join(out, "eval"), checkpoint=ckpt,
        baselines=["random", "supervised", "logmel"], tasks=["pitch", "instrument_family_str", "tags"],
        probe="linear", max_epochs=plan.probe_epochs, patience=plan.probe_patience, calib_crops=plan.calib_crops,
        layer={"wav2vec2": "all", "clmr": plan.clmr_layer}.get(plan.model, -1),
        supervised_steps_per_dataset=sup_steps, supervised_batch_size=plan.batch_size, wandb_mode="disabled", seed=plan.seed,
    )
    results = evaluate.run_evaluation(opts)
    timings["evaluate"] = time.perf_counter() - t2
    timings["total"] = time.perf_counter() - t0
    results["quickstart"] = {"plan": dataclasses.asdict(plan), "timings_s": {k: round(v, 1) for k, v in timings.items()},
                             "pretrain_summary": {k: summary[k] for k in ("step", "first_loss", "last_loss", "wall_s", "checkpoint")},
                             "demo": demo_info, "command": " ".join(["python", *sys.argv])}
    with open(os.path.join(out, "quickstart.json"), "w") as f:
        json.dump(results["quickstart"], f, indent=2)
    return results


def print_report(results: dict, out: str) -> None:
    q = results["quickstart"]
    t = q["timings_s"]
    ps = q["pretrain_summary"]
    n = results["datasets"]
    print()
    print(f"Pretrained {q['plan']['model']} for {ps['step']} steps (loss {ps['first_loss']:.3f} -> {ps['last_loss']:.3f}); "
          "probed on held-out data (test split):")
    print()
    print(results["table_markdown"])
    print()
    for name, d in n.items():
        print(f"  {name}: " + ", ".join(f"{s} {c}" for s, c in d["num_samples"].items()) + " clips")
    print("  pitch / family: accuracy on NSynth-layout notes of instruments never seen in training; "
          "tags: macro ROC-AUC / PR-AUC on held-out MTAT-layout clips")
    print(f"  time: demo {t['demo']:.0f} s, pretrain {t['pretrain']:.0f} s, probes + baselines {t['evaluate']:.0f} s, "
          f"total {t['total'] / 60:.1f} min")
    print(f"  results: {out}/eval/results.json, table {out}/eval/results.md, plots {out}/eval/plots/, checkpoint {ps['checkpoint']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quickstart.py", description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", choices=MODELS, default="clmr", help="which tiny preset to pretrain (default: clmr)")
    p.add_argument("--steps", type=int, help="pretraining steps (default: 600; --tiny: 12)")
    p.add_argument("--batch-size", type=int, help="pretraining batch (default: 64; --tiny: 16)")
    p.add_argument("--tiny", action="store_true", help="a small demo set and a few steps: a ~2-minute smoke run")
    p.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart)")
    p.add_argument("--demo", default="demo_shards", help="demo shard folder, built if missing (default: demo_shards)")
    p.add_argument("--seed", type=int, default=0, help="seed of pretraining, the baselines' init and the probes "
                   "(default: 0; the demo data do not change); run-to-run noise: docs/quickstart-calibration.md")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes for rendering and loading")
    a = p.parse_args(argv)
    plan = tiny_plan(a.model) if a.tiny else Plan(model=a.model)
    if a.steps is not None:
        plan = dataclasses.replace(plan, steps=a.steps)
    if a.batch_size is not None:
        plan = dataclasses.replace(plan, batch_size=a.batch_size)
    plan = dataclasses.replace(plan, workers=a.workers, seed=a.seed)
    if plan.steps < 1 or plan.batch_size < 2:
        p.error("--steps must be >= 1 and --batch-size >= 2")
    demo = a.demo if not a.tiny or a.demo != "demo_shards" else "demo_shards_tiny"
    results = run(plan, out=a.out, demo=demo)
    print_report(results, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
