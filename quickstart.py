"""The main job on a fresh machine: show self-supervised pretraining working on real instruments.

    python quickstart.py                         # CLMR and wav2vec2, one table (README: measured time)
    python quickstart.py --seed 1                # the same run with another seed (the run-to-run noise)
    python quickstart.py --model clmr            # one method only (also: wav2vec2, cpc, or a list: clmr,cpc)
    python quickstart.py --tiny                  # a 2-minute smoke run (what CI runs)

Interrupted (Ctrl-C, SIGTERM), the same command continues in the same ``--out``: pretraining
resumes from the checkpoint it wrote on the signal, finished methods are reused, and the table
is the one an uninterrupted run prints. ``--out`` belongs to one plan (``<out>/plan.json``).

Steps, top to bottom in :func:`run` and :func:`run_method`:

1. **Demo shards** (``shard-tools demo``): notes of 76 General MIDI instruments rendered with the
   soundfont pretty_midi ships, in NSynth's layout and split (valid/test instruments never occur in
   train), plus multi-instrument clips in MagnaTagATune's layout (tags: instruments, tempo, solo).
2. **Per method** (CLMR, wav2vec2; one process each, running side by side on the cores: small
   models gain little from a second thread), with its tiny preset and quickstart settings:
   pretraining (``train.train``) on the unlabelled train audio of both datasets for a fixed step
   count (deterministic, unlike a time budget; CLMR 800, wav2vec2 and CPC 600) and, because pitch
   is probed, without pitch-shift or speed augmentation (CLMR also without band filters and
   reverb; docs/quickstart-calibration.md);
   then probes (``evaluate.run_evaluation``): linear probes on frozen embeddings for NSynth pitch
   and instrument family (held-out instruments) and MTAT tags (held-out clips; CLMR: every block's
   mean and standard deviation over time, concatenated; wav2vec2: every layer's mean, the best on
   valid) of the pretrained encoder
   and two baselines of the same architecture: random init, and trained supervised on the labels
   with the same compute (as many training crops as pretraining saw). Log-mel statistics are the
   third baseline, scored once.
3. **The table**, printed as measured: every method's rows and log-mel, the margins of each
   pretrained encoder over its random init, and where everything was written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import time

MODELS = ("clmr", "wav2vec2", "cpc")
LABELS = {"clmr": "CLMR", "wav2vec2": "wav2vec2", "cpc": "CPC"}
TASKS = ("pitch", "instrument_family_str", "tags")


@dataclasses.dataclass(kw_only=True)
class Plan:
    """What the quickstart runs; ``--tiny`` and the flags change it."""

    models: tuple[str, ...] = ("clmr", "wav2vec2")
    steps: int = 600  # pretraining optimizer steps (every method but CLMR when clmr_steps is set)
    # CLMR's steps: 800 beat 600 on the valid split's pitch and family margins in seeds 0, 1, 2, its tags
    # about even (docs/quickstart-calibration.md, seventh session); None = ``steps``
    clmr_steps: int | None = 800
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
    # CLMR's pooling over time: "meanstd" (each block's mean and standard deviation) kept the margin
    # over random init on another soundfont's notes where the mean lost it (docs/quickstart-calibration.md);
    # wav2vec2 pools by the mean (its std lifts the random init to the pretrained scores)
    clmr_pool: str = "meanstd"
    probe_epochs: int = 200
    probe_patience: int = 20
    calib_crops: int = 512
    workers: int = 2  # CPU cores to use: rendering, and methods side by side (each gets cores // jobs)
    jobs: int = 0  # methods run at once; 0 = as many as there are methods, at most ``workers``
    seed: int = 0  # pretraining, the baselines' init and the probes (the demo data stay seed 0)

    def steps_for(self, model: str) -> int:
        return self.clmr_steps if model == "clmr" and self.clmr_steps else self.steps

    def parallel(self) -> int:
        return max(1, min(len(self.models), self.jobs or self.workers))


def tiny_plan(models: tuple[str, ...]) -> Plan:
    return Plan(models=models, steps=12, clmr_steps=None, batch_size=16, demo_notes=3, demo_programs=3, demo_clips=32,
                demo_clip_seconds=2.0, probe_epochs=20, probe_patience=5, calib_crops=32, clmr_blocks=6)


def pretrain_config(plan: Plan, model: str, demo: str, out: str, workers: int):
    """The ``<model>_tiny`` preset with the quickstart's pretraining settings (all of them are here
    and in :class:`Plan`)."""
    import train_config

    cfg = train_config.preset(f"{model}_tiny")
    r = dataclasses.replace
    steps = plan.steps_for(model)
    cfg = r(
        cfg,
        data=r(cfg.data, manifests=[f"{demo}/nsynth/train.manifest.json", f"{demo}/mtat/train.manifest.json"],
               num_workers=max(0, workers - 1) if workers > 1 else 1),
        train=r(cfg.train, steps=steps, global_batch_size=plan.batch_size, device="cpu", out_dir=out, seed=plan.seed),
        # auto: a re-run of an interrupted quickstart continues (run() checks the folder holds this plan's run);
        # a checkpoint every quarter, so a kill that no handler sees (SIGKILL, the OOM killer) loses at most a
        # quarter (writing them changes nothing: a run checkpointing every 200 steps wrote the same weights)
        checkpoint=r(cfg.checkpoint, every=max(1, steps // 4), keep=1, resume="auto"),
        logging=r(cfg.logging, every=max(1, steps // 20), wandb_mode="disabled", audio_every=0),
    )
    if model == "clmr":
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


def run_method(plan: Plan, model: str, *, out: str, demo: str, cores: int, eval_cores: int, logmel: bool,
               progress: bool = True) -> dict:
    """Pretrain ``model`` on ``cores`` CPU cores, then probe it against its random init and
    supervised baselines (and log-mel when ``logmel``) on ``eval_cores``; write ``out/method.json``
    and return it. The thread counts are part of the result: floating-point sums run in another
    order with another count, so the same plan on the same machine gives the same table."""
    import torch

    import evaluate
    import train
    from pipeline.shards import load_manifest

    method_path = os.path.join(out, "method.json")
    if os.path.exists(method_path):  # run() checked that the folder holds this plan's run
        print(f"[quickstart] {model}: done in an earlier run ({method_path})", flush=True)
        with open(method_path) as f:
            return json.load(f)
    torch.set_num_threads(cores)
    t0 = time.perf_counter()
    cfg = pretrain_config(plan, model, demo, os.path.join(out, "pretrain"), cores)
    summary = _finished_pretraining(cfg)
    if summary is None:
        print(f"[quickstart] {model}: pretraining ({model}_tiny preset, {plan.steps_for(model)} steps, batch {plan.batch_size})", flush=True)
        summary = train.train(cfg)
        if summary["status"] != "completed":  # a stop signal: train checkpointed; nothing half-trained is probed
            raise KeyboardInterrupt
    else:
        print(f"[quickstart] {model}: pretraining done in an earlier run ({summary['checkpoint']})", flush=True)
    t_pretrain = time.perf_counter() - t0
    # The supervised baseline gets the pretraining's compute: as many training crops in all, split
    # over the datasets as the pretraining stream split them (in proportion to their clip counts).
    crops_seen = plan.steps_for(model) * plan.batch_size * cfg.views
    clips = {d: load_manifest(f"{demo}/{d}/train.manifest.json").num_samples for d in ("nsynth", "mtat")}
    sup_steps = {d: max(1, round(crops_seen * n / sum(clips.values()) / plan.batch_size)) for d, n in clips.items()}

    print(f"[quickstart] {model}: probes of the pretrained encoder, random init, supervised"
          + (", log-mel" if logmel else ""), flush=True)
    t1 = time.perf_counter()
    torch.set_num_threads(eval_cores)
    opts = evaluate.EvalOptions(
        data=[f"{demo}/nsynth", f"{demo}/mtat"], out=os.path.join(out, "eval"), checkpoint=summary["checkpoint"],
        baselines=["random", "supervised"] + (["logmel"] if logmel else []), tasks=list(TASKS),
        probe="linear", max_epochs=plan.probe_epochs, patience=plan.probe_patience, calib_crops=plan.calib_crops,
        layer={"wav2vec2": "all", "clmr": plan.clmr_layer}.get(model, -1), pool=plan.clmr_pool if model == "clmr" else "mean",
        workers=eval_cores,
        supervised_steps_per_dataset=sup_steps, supervised_batch_size=plan.batch_size, wandb_mode="disabled", seed=plan.seed,
        progress=progress,
    )
    results = evaluate.run_evaluation(opts)
    method = {"model": model, "cores": {"pretrain": cores, "evaluate": eval_cores}, "results": os.path.join(out, "eval", "results.json"),
              "timings_s": {"pretrain": round(t_pretrain, 1), "evaluate": round(time.perf_counter() - t1, 1)},
              "pretrain_summary": {k: summary[k] for k in ("step", "first_loss", "last_loss", "wall_s", "checkpoint",
                                                           "resumed_from")},
              "rows": results["rows"], "tasks": results["tasks"], "datasets": results["datasets"]}
    with open(method_path, "w") as f:
        json.dump(method, f, indent=2)
    return method


def _finished_pretraining(cfg) -> dict | None:
    """The summary ``train.train`` wrote for this pretraining when an earlier run of the same
    plan completed it (its checkpoint still there), else None."""
    path = os.path.join(cfg.out_dir, "summary.json")
    try:
        with open(path) as f:
            s = json.load(f)
    except (OSError, ValueError):
        return None
    done = s.get("status") == "completed" and s.get("step") == cfg.train.steps
    return s if done and s.get("checkpoint") and os.path.exists(s["checkpoint"]) else None


PLAN_FILE = "plan.json"


def claim_out(out: str, plan: Plan) -> None:
    """Make ``out`` this plan's run folder, or raise a one-line :class:`RuntimeError` naming it.

    ``out/plan.json`` records the plan of the run that owns the folder. The same plan again
    continues it: finished methods are reused, an interrupted pretraining resumes from its
    checkpoint and the probes reuse their caches. Another plan (seed, steps, ...) in the same
    folder would mix two runs, and a folder with checkpoints but no plan is someone else's."""
    mine = {**dataclasses.asdict(plan), "models": list(plan.models)}
    path = os.path.join(out, PLAN_FILE)
    try:
        with open(path) as f:
            theirs = json.load(f)
    except FileNotFoundError:
        theirs = None
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"--out {out}: {path} is unreadable ({exc}); pick another --out, or delete {out}") from None
    if theirs is not None and theirs != mine:
        changed = ", ".join(f"{k} {theirs.get(k)!r} -> {mine.get(k)!r}" for k in sorted(set(theirs) | set(mine))
                            if theirs.get(k) != mine.get(k))
        raise RuntimeError(f"--out {out} holds a run of another plan ({changed}); re-run with its flags to continue "
                           f"it, pick another --out, or delete {out}")
    if theirs is None:
        earlier = [m for m in MODELS if os.path.isdir(os.path.join(out, m, "pretrain", "checkpoints"))]
        if earlier or os.path.exists(os.path.join(out, "quickstart.json")):
            raise RuntimeError(f"--out {out} holds an earlier run ({', '.join(earlier) or 'quickstart.json'}) without "
                               f"its {PLAN_FILE}; pick another --out, or delete {out}")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(mine, f, indent=2)


def machine() -> dict:
    """The CPU the table was measured on: its model name and the kernels torch dispatches to.
    Part of the result: the same seed gives the same table on the same kind of CPU, while another
    CPU's kernels (AVX-512 against AVX2, another BLAS blocking) sum in another order and move the
    scores by about the seed noise (docs/quickstart-calibration.md)."""
    import platform

    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "torch": torch.__version__,
            "kernels": torch.backends.cpu.get_cpu_capability()}


def _method_dir(out: str, model: str) -> str:
    return os.path.join(out, model)


def _last_line(path: str, width: int = 70) -> str:
    """The last non-empty line a child wrote (progress bars end in carriage returns), shortened."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "starting"
    lines = [s.strip() for s in re.split(r"[\r\n]", text) if s.strip()]
    line = re.sub(r"^\[(quickstart|evaluate|finetune|musicssl)\]\s*", "", lines[-1]) if lines else "starting"
    return line if len(line) <= width else line[: width - 3] + "..."


def _run_side_by_side(plan: Plan, *, out: str, demo: str) -> dict[str, dict]:
    """Each method in its own process, ``plan.parallel()`` at a time, its output in
    ``out/<model>/log.txt``; one status line per method while they run. Each gets an equal share
    of the cores, except for the probes of the last method, which get them all: by then the
    others are done or nearly so (clmr,wav2vec2 on the 2-core Intel Xeon box, 2026-12-03:
    wav2vec2's probes start at 5.2 min, CLMR is done at 10.6 min, wav2vec2 at 11.9 min)."""
    cores = max(1, plan.workers // plan.parallel())
    pending, running, done = list(plan.models), {}, {}
    tty, last_print = sys.stdout.isatty(), 0.0
    # PASSIVE: an OpenMP thread waiting for work sleeps instead of spinning on a core the other method
    # needs (the last method's probes use every core while the others finish: a wav2vec2 supervised
    # step beside a busy 1-thread process took 0.70 s spinning, 0.44 s passive; alone 0.30 / 0.29 s)
    env = {**os.environ, "OMP_NUM_THREADS": str(cores), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    try:
        while pending or running:
            while pending and len(running) < plan.parallel():
                model = pending.pop(0)
                folder = _method_dir(out, model)
                os.makedirs(folder, exist_ok=True)
                log = open(os.path.join(folder, "log.txt"), "w")
                eval_cores = plan.workers if model == plan.models[-1] else cores
                args = [json.dumps(dataclasses.asdict(plan)), model, folder, demo, str(cores), str(eval_cores),
                        str(int(model == plan.models[0]))]
                running[model] = (subprocess.Popen([sys.executable, "-c", "import quickstart, sys; sys.exit(quickstart._child(sys.argv[1:]))",
                                                    *args], stdout=log, stderr=subprocess.STDOUT, env=env), log)
                print(f"[quickstart] {model}: started ({cores} core{'s' * (cores > 1)}; output in {folder}/log.txt)", flush=True)
            time.sleep(1.0)
            for model, (proc, log) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[model]
                path = os.path.join(_method_dir(out, model), "log.txt")
                if proc.returncode == 130:  # the child's own Ctrl-C / SIGTERM: it checkpointed; so do the others
                    raise KeyboardInterrupt
                if proc.returncode != 0:
                    with open(path, errors="replace") as f:
                        tail = "".join(f.readlines()[-15:])
                    raise RuntimeError(f"{model} stopped with exit code {proc.returncode}; the end of {path}:\n{tail}\n"
                                       f"The demo shards in {demo} are kept; fix what the log names and re-run.")
                with open(os.path.join(_method_dir(out, model), "method.json")) as f:
                    done[model] = json.load(f)
                print(("\n" if tty else "") + f"[quickstart] {model}: done in "
                      f"{sum(done[model]['timings_s'].values()) / 60:.1f} min", flush=True)
            now = time.perf_counter()
            if running and (tty or now - last_print >= 30):
                status = " | ".join(f"{m}: {_last_line(os.path.join(_method_dir(out, m), 'log.txt'), 60 if tty else 100)}"
                                    for m in running)
                print(f"\r{status[:160]:<160}" if tty else f"[quickstart] {status}", end="" if tty else "\n", flush=True)
                last_print = now
    finally:
        for proc, log in running.values():  # Ctrl-C or a failed method: stop the others too
            proc.terminate()
            proc.wait()
            log.close()
    return done


def _child(argv: list[str]) -> int:
    """Entry of a method's process (:func:`_run_side_by_side`)."""
    plan_d, model, folder, demo, cores, eval_cores, logmel = argv
    d = json.loads(plan_d)
    plan = Plan(**{**d, "models": tuple(d["models"])})
    try:
        run_method(plan, model, out=folder, demo=demo, cores=int(cores), eval_cores=int(eval_cores),
                   logmel=bool(int(logmel)), progress=False)
    except KeyboardInterrupt:  # Ctrl-C or the parent's terminate(): pretraining checkpointed if it was running
        print(f"[quickstart] {model}: interrupted", flush=True)
        return 130
    return 0


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a scheduler's preemption, ``kill``) becomes a KeyboardInterrupt while the methods'
    processes run, so they are stopped (and checkpoint) rather than left running without a parent."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(plan: Plan, *, out: str, demo: str) -> dict:
    """Demo shards, then every method of the plan (side by side, or in this process when one
    runs at a time); writes ``out/quickstart.json`` and ``out/results.md`` and returns the former."""
    t0 = time.perf_counter()
    claim_out(out, plan)
    print(f"[quickstart] 1/2 demo shards -> {demo}", flush=True)
    demo_info = ensure_demo(demo, plan)
    t_demo = time.perf_counter() - t0
    print(f"[quickstart] 2/2 {', '.join(plan.models)}: pretraining, then probes against baselines", flush=True)
    if plan.parallel() > 1:
        with _sigterm_interrupts():
            done = _run_side_by_side(plan, out=out, demo=demo)  # in the order they finished
        methods = {m: done[m] for m in plan.models}
    else:
        methods = {m: run_method(plan, m, out=_method_dir(out, m), demo=demo, cores=plan.workers, eval_cores=plan.workers,
                                 logmel=(m == plan.models[0]))
                   for m in plan.models}
    q = {"plan": dataclasses.asdict(plan), "command": " ".join(["python", *sys.argv]), "machine": machine(), "demo": demo_info,
         "timings_s": {"demo": round(t_demo, 1), "methods": round(time.perf_counter() - t0 - t_demo, 1),
                       "total": round(time.perf_counter() - t0, 1)},
         "methods": {m: {k: v for k, v in d.items() if k not in ("rows", "tasks", "datasets")} for m, d in methods.items()},
         **combine(plan, methods)}
    with open(os.path.join(out, "quickstart.json"), "w") as f:
        json.dump(q, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(q["table_markdown"] + "\n")
    return q


def combine(plan: Plan, methods: dict[str, dict]) -> dict:
    """One table from every method's rows: ``<METHOD> pretrained / random init / supervised``,
    then log-mel; and each method's margin over its random init, per column (test split)."""
    from eval_tools.report import columns, markdown_table

    first = methods[plan.models[0]]
    rows = []
    for m in plan.models:
        for r in methods[m]["rows"]:
            rows.append({**r, "encoder": r["encoder"] if r["encoder"] == "log-mel" else f"{LABELS[m]} {r['encoder']}"})
    rows.sort(key=lambda r: r["encoder"] == "log-mel")  # log-mel last
    merged = {"tasks": first["tasks"], "rows": rows}
    margins = {}
    for m in plan.models:
        by = {(r["encoder"], r["task"]): r["test"] for r in rows}
        margins[m] = {f"{task}/{metric}": by[(f"{LABELS[m]} pretrained", task)][metric] - by[(f"{LABELS[m]} random init", task)][metric]
                      for task, metric, _ in columns(merged)}
    return {"table_markdown": markdown_table(merged), "rows": rows, "tasks": first["tasks"], "datasets": first["datasets"],
            "margins": margins}


def print_report(q: dict, out: str) -> None:
    from eval_tools.report import columns

    t = q["timings_s"]
    print()
    for m, d in q["methods"].items():
        ps = d["pretrain_summary"]
        resumed = f", resumed from {ps['resumed_from']}" if ps.get("resumed_from") else ""
        loss = f"{ps['first_loss']:.3f} -> {ps['last_loss']:.3f}" if ps["first_loss"] is not None else f"{ps['last_loss']:.3f}"
        print(f"Pretrained {LABELS[m]} for {ps['step']} steps (loss {loss}{resumed}) "
              f"in {d['timings_s']['pretrain']:.0f} s; probes + baselines {d['timings_s']['evaluate']:.0f} s")
    print("Probed on held-out data (test split):")
    print()
    print(q["table_markdown"])
    print()
    cols = columns(q)
    for m, mg in q["margins"].items():
        cells = [f"{100 * mg[f'{task}/{metric}']:+.1f}" if metric == "accuracy" else f"{mg[f'{task}/{metric}']:+.3f}"
                 for task, metric, _ in cols]
        print(f"  {LABELS[m]} pretrained - random init: " + " / ".join(cells))
    for name, d in q["datasets"].items():
        print(f"  {name}: " + ", ".join(f"{s} {c}" for s, c in d["num_samples"].items()) + " clips")
    print("  pitch / family: accuracy on NSynth-layout notes of instruments never seen in training; "
          "tags: macro ROC-AUC / PR-AUC on held-out MTAT-layout clips")
    print(f"  time: demo {t['demo']:.0f} s, methods {t['methods']:.0f} s "
          f"({'side by side' if q['plan']['jobs'] != 1 and len(q['methods']) > 1 else 'one after another'}), "
          f"total {t['total'] / 60:.1f} min")
    mc = q["machine"]
    print(f"  machine: {mc['cpu']}, {mc['cores']} cores, torch {mc['torch']} ({mc['kernels']} kernels); the same seed "
          "prints this table again on this kind of CPU")
    print(f"  results: {out}/quickstart.json, table {out}/results.md; per method {out}/<method>/ "
          "(eval/results.json, eval/plots/, pretrain/checkpoints/, log.txt)")


def _models(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    bad = [n for n in names if n not in MODELS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: pick from {', '.join(MODELS)}, comma-separated (e.g. clmr,wav2vec2)")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="quickstart.py", description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", type=_models, default=Plan().models,
                   help="methods to pretrain and score, comma-separated (default: clmr,wav2vec2; also cpc)")
    p.add_argument("--steps", type=int, help="pretraining steps of every method (default: CLMR 800, the others 600; "
                   "--tiny: 12)")
    p.add_argument("--batch-size", type=int, help="pretraining batch (default: 64; --tiny: 16)")
    p.add_argument("--tiny", action="store_true", help="a small demo set and a few steps: a ~2-minute smoke run")
    p.add_argument("--out", default="runs/quickstart", help="run folder (default: runs/quickstart); the same command "
                   "again continues an interrupted run there")
    p.add_argument("--demo", default="demo_shards", help="demo shard folder, built if missing (default: demo_shards)")
    p.add_argument("--seed", type=int, default=0, help="seed of pretraining, the baselines' init and the probes "
                   "(default: 0; the demo data do not change); run-to-run noise: docs/quickstart-calibration.md")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="CPU cores to use (default: up to 2): rendering, and the methods' processes")
    p.add_argument("--jobs", type=int, default=0, help="methods run at once (default: one per core, at most one per "
                   "method; 1 = one after another in this process, each with every core)")
    a = p.parse_args(argv)
    plan = tiny_plan(a.model) if a.tiny else Plan(models=a.model)
    if a.steps is not None:
        plan = dataclasses.replace(plan, steps=a.steps, clmr_steps=None)
    if a.batch_size is not None:
        plan = dataclasses.replace(plan, batch_size=a.batch_size)
    plan = dataclasses.replace(plan, workers=a.workers, seed=a.seed, jobs=a.jobs)
    if plan.steps < 1 or plan.batch_size < 2:
        p.error("--steps must be >= 1 and --batch-size >= 2")
    if plan.workers < 1 or plan.jobs < 0:
        p.error("--workers must be >= 1 and --jobs >= 0")
    demo = a.demo if not a.tiny or a.demo != "demo_shards" else "demo_shards_tiny"
    try:
        q = run(plan, out=a.out, demo=demo)
    except RuntimeError as exc:
        print(f"quickstart.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nquickstart.py: interrupted; run the same command again to continue (the demo shards in {demo}, "
              f"finished methods and pretraining checkpoints in {a.out} are kept)", file=sys.stderr)
        return 130
    print_report(q, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
