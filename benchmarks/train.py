"""Trainer throughput on a CLMR preset with augmentation on: steps/s, clips/s, data-wait fraction.

    .venv/bin/python benchmarks/train.py            # clmr_tiny, 2 loader workers, full CLMR augmentation chain
    .venv/bin/python benchmarks/train.py --quick    # tiny sizes (CI keeps it from rotting)
    .venv/bin/python benchmarks/train.py --preset clmr_mtat --device cuda --batch 48 --workers 16 --paths device
                                                    # CLMR's full model and batch on a GPU (benchmarks/gpu.py)

Two runs of ``train.train`` in this process on the same generated shards (tests/shardgen.py:
tones in noise at the preset's rate), the same model, batch and step count (``--paths`` picks them):

- ``device``   augmentation batched on the training device after the copy (``--augment.backend=gpu``;
               the CPU unless ``--device cuda``), the trainer's default.
- ``workers``  the same chain per example in the loader's worker processes
               (``--augment.backend=cpu``, pipeline.augment_cpu.CpuAugment / audiomentations).

Steady state: the first ``--warmup`` steps (worker start-up, first allocations) are left out; the
figures come from the per-step ``time_s`` / ``wait_s`` that train.py writes to metrics.jsonl.

The last line printed is one JSON object. ``ratios``:

- ``device_augment_vs_worker_augment``: clips/s of the default (device) path over the worker path.
- ``train_vs_data_wait_goal``: the goal (data wait under 2 % of step time) over the measured
  data-wait fraction of the default path; above 1 means the goal is met.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import train  # noqa: E402
import train_config as tc  # noqa: E402
from tests import shardgen  # noqa: E402

GOAL_WAIT_FRACTION = 0.02


def run(manifest: str, out: str, *, backend: str, steps: int, warmup: int, workers: int, batch: int,
        channels: str | None, preset: str = "clmr_tiny", device: str = "cpu") -> dict:
    cfg = tc.apply_overrides(tc.preset(preset), [
        f"--data.manifests={manifest}", f"--train.out_dir={out}", f"--train.steps={steps}",
        f"--train.global_batch_size={batch}", f"--data.num_workers={workers}", f"--augment.backend={backend}",
        *([f"--model.channels={channels}"] if channels else []), f"--train.device={device}",
        "--logging.wandb_mode=disabled", f"--logging.every={max(1, steps // 4)}", f"--checkpoint.every={steps}",
    ])
    t0 = time.perf_counter()
    summary = train.train(cfg)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f][warmup:]
    step_time = sum(r["time_s"] for r in records)
    wait = sum(r["wait_s"] for r in records)
    return {
        "backend": backend, "device": device, "steps_measured": len(records), "crop_samples": cfg.crop_samples,
        "steps_per_s": len(records) / step_time, "clips_per_s": len(records) * batch / step_time,
        "data_wait_fraction": wait / step_time, "wall_s_incl_startup": wall,
        "final_loss": summary["last_loss"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds), for CI")
    p.add_argument("--steps", type=int, default=60, help="steps per run (default 60)")
    p.add_argument("--warmup", type=int, default=10, help="first steps left out of the figures (default 10)")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes (default 2)")
    p.add_argument("--batch", type=int, default=16, help="global batch (clips) (default 16)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the training process (default 1)")
    p.add_argument("--preset", default="clmr_tiny", choices=["clmr_tiny", "clmr_mtat"],
                   help="clmr_tiny (default; its SampleCNN is cut to 6 blocks) or clmr_mtat (CLMR's full SampleCNN, "
                        "59049-sample crops at 22.05 kHz)")
    p.add_argument("--device", default="cpu", help="--train.device (default cpu; cuda: bf16 autocast, pinned prefetch)")
    p.add_argument("--paths", default="device,workers",
                   help="comma-separated runs: device (augment on the training device), workers (in the loader "
                        "workers)")
    p.add_argument("--clips", type=int, default=None, help="generated clips (default 128; --quick 32)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.workers = 8, 2, 1
    torch.set_num_threads(args.threads)
    paths = [x for x in args.paths.split(",") if x]
    if not paths or set(paths) - {"device", "workers"}:
        p.error(f"--paths: comma-separated device and/or workers, got {args.paths!r}")
    full = args.preset != "clmr_tiny"
    # the tiny preset's SampleCNN (6 blocks, 2187-sample crops); --quick uses 5 blocks (729 samples)
    channels = None if full else "16,16,32,32,32" if args.quick else "16,16,32,32,32,64"
    sr = tc.preset(args.preset).data.sample_rate or 16000
    seconds = 3.0 if full else 1.0  # crops (59049 samples at 22.05 kHz: 2.68 s) fit in every clip
    n_clips = args.clips or (32 if args.quick else 128)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        clips = shardgen.make_clips(n_clips, sample_rate=sr, seconds=(seconds, seconds), seed=0)
        manifest = shardgen.write_split(os.path.join(tmp, "shards"), clips, [8] * (len(clips) // 8))
        results = {}
        for backend, name in (("gpu", "device"), ("cpu", "workers")):
            if name not in paths:
                continue
            print(f"[bench] {name}: {args.preset} on {args.device}, {args.steps} steps, batch {args.batch}, "
                  f"{args.workers} workers", flush=True)
            results[name] = run(manifest, os.path.join(tmp, name), backend=backend, steps=args.steps,
                                warmup=args.warmup, workers=args.workers, batch=args.batch, channels=channels,
                                preset=args.preset, device=args.device)
    first = results[paths[0]]
    print(f"\n{'path':10s} {'steps/s':>8s} {'clips/s':>8s} {'data wait':>10s}")
    for name, r in results.items():
        print(f"{name:10s} {r['steps_per_s']:8.2f} {r['clips_per_s']:8.1f} {100 * r['data_wait_fraction']:9.2f}%")
    print(f"goal: data wait < {100 * GOAL_WAIT_FRACTION:.0f}% of step time ({paths[0]} path: "
          f"{'met' if first['data_wait_fraction'] < GOAL_WAIT_FRACTION else 'NOT met'})")
    ratios = {}
    if len(results) == 2:
        dev, wrk = results["device"], results["workers"]
        ratios["device_augment_vs_worker_augment"] = dev["clips_per_s"] / wrk["clips_per_s"]
    ratios["train_vs_data_wait_goal"] = GOAL_WAIT_FRACTION / max(first["data_wait_fraction"], 1e-6)
    report = {
        "benchmark": "train", "quick": args.quick, "preset": args.preset, "device": args.device, "steps": args.steps,
        "warmup": args.warmup, "workers": args.workers, "batch": args.batch, "threads": args.threads,
        "cpu_count": os.cpu_count(), "results": results, "ratios": ratios,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
