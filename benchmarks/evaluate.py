"""Evaluation throughput: embedding extraction batched across clips against one clip at a time, and
fine-tuning steps/s; on the CPU, and on CUDA (fp32 and bf16 autocast) when a GPU is present.

    .venv/bin/python benchmarks/evaluate.py                 # wav2vec2_tiny, 4 s notes (NSynth length)
    .venv/bin/python benchmarks/evaluate.py --preset cpc_tiny --seconds 29.1   # MTAT-length clips
    .venv/bin/python benchmarks/evaluate.py --quick         # tiny sizes (CI keeps it from rotting)

Extraction: ``--clips`` clips of ``--seconds`` (lengths drawn +-25 % so batches really are padded,
as on real data) embedded by the same random-init encoder in this process, two ways, in
interleaved rounds (median of ``--rounds``):

- ``per_clip``  one clip per forward pass: the path before issue 12 (``Encoder.embed_clips([clip])``
                for each clip).
- ``batched``   ``--batch`` clips per pass (``Encoder.embed_stream``): pieces sorted by length,
                zero-padded with ``lengths``, pinned and copied non-blocking on CUDA.

Fine-tune: ``eval_tools.finetune.finetune`` on generated shards (the same clips' lengths), steps/s
over ``--ft-steps`` steps of batch ``--ft-batch``: the trainer's machinery (``training.step.TrainStep``,
``RunLogger``, the checkpoint written at the end; valid scoring excluded).

GPU rows run when ``torch.cuda.is_available()`` (or on ``--gpu-device``): the same extraction on
``cuda`` in fp32 and in bf16 autocast, with ``--gpu-preset`` (default wav2vec2_musicnet, the fairseq
BASE size), and fine-tuning in bf16. ``--gpu-only`` leaves the CPU rows out (benchmarks/gpu.py);
``--gpu-device cpu`` runs the GPU rows' code on the CPU (its ``--dry-run``).

The last line printed is one JSON object. ``ratios``: ``batched_vs_per_clip`` (clips/s, CPU),
and with a GPU ``batched_vs_per_clip_cuda`` (bf16) and ``bf16_vs_fp32_cuda`` (batched clips/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from eval_tools.encoders import preset_config, random_encoder  # noqa: E402

SR = 16000


def make_clips(n: int, seconds: float, seed: int = 0) -> list[np.ndarray]:
    """Tones in noise, lengths uniform in [0.75, 1.25] x ``seconds``."""
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        t = np.arange(int(seconds * SR * rng.uniform(0.75, 1.25))) / SR
        clips.append((0.3 * np.sin(2 * np.pi * (110 + 13 * i) * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32))
    return clips


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def extraction(preset: str, clips: list[np.ndarray], *, batch: int, rounds: int, device: str, precision: str) -> dict:
    enc = random_encoder(preset_config(preset), sample_rate=SR, seed=0).to(device, precision)
    enc.embed_clips(clips[:2])  # warm-up: allocations, kernels
    ways = {"per_clip": lambda: [enc.embed_clips([c]) for c in clips],
            "batched": lambda: list(enc.embed_stream(clips, batch))}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(rounds):  # interleaved, so a change in machine load hits both
        for name, fn in ways.items():
            _sync(enc.device)
            t0 = time.perf_counter()
            fn()
            _sync(enc.device)
            times[name].append(time.perf_counter() - t0)
    out = {"preset": preset, "device": device, "precision": precision, "clips": len(clips), "batch": batch, "rounds": rounds}
    for name, ts in times.items():
        out[f"{name}_clips_per_s"] = len(clips) / statistics.median(ts)
    return out


def finetune_speed(preset: str, clips: list[np.ndarray], *, steps: int, batch: int, device: str, precision: str) -> dict:
    from eval_tools.data import Dataset
    from eval_tools.finetune import FinetuneConfig, finetune
    from eval_tools.runner import make_tasks
    from tests import shardgen

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        labels = {"pitch": {"kind": "class", "names": list(range(40, 52))}}
        for split, part in (("train", clips), ("valid", clips[:4]), ("test", clips[:4])):
            rows = [{"key": f"{split}-{i:05d}", "audio": c[None], "sample_rate": SR, "labels": {"pitch": 40 + i % 12}}
                    for i, c in enumerate(part)]
            shardgen.write_split(tmp, rows, [len(rows)], split=split, dataset="bench", labels=labels)
        ds = Dataset.from_dir(tmp)
        enc = random_encoder(preset_config(preset), sample_rate=SR, seed=0).to(device, precision)
        cfg = FinetuneConfig(steps=steps, batch_size=batch, eval_every=steps, seed=0)
        summary = finetune(enc, ds, make_tasks(ds, ["pitch"]), cfg, run_dir=os.path.join(tmp, "run"), progress=False)
    return {"preset": preset, "device": device, "precision": precision, "steps": summary["steps"], "batch": batch,
            "steps_per_s": summary["steps"] / summary["loop_seconds"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="wav2vec2_tiny", help="encoder for the CPU rows (default wav2vec2_tiny)")
    p.add_argument("--gpu-preset", default="wav2vec2_musicnet", help="encoder for the GPU rows (default: fairseq BASE size)")
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--seconds", type=float, default=4.0, help="mean clip length (default 4 s, an NSynth note)")
    p.add_argument("--batch", type=int, default=16, help="clips per batched pass (default 16)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ft-steps", type=int, default=20)
    p.add_argument("--ft-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared CPU, OpenMP spin-waits swamp small per-clip passes)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds), for CI")
    p.add_argument("--gpu-device", default="auto",
                   help="device of the GPU rows: auto (cuda when available, else none), cuda[:N], cpu, or none")
    p.add_argument("--gpu-only", action="store_true", help="leave out the CPU rows (extraction and fine-tune)")
    a = p.parse_args(argv)
    gpu_device = ("cuda" if torch.cuda.is_available() else "none") if a.gpu_device == "auto" else a.gpu_device
    if gpu_device == "none" and a.gpu_only:
        p.error("--gpu-only: no GPU rows to run (no CUDA device; pass --gpu-device cpu to run their code on the CPU)")
    if a.quick:
        a.clips, a.seconds, a.rounds, a.ft_steps, a.ft_batch, a.batch = 8, 0.5, 1, 3, 4, 4
    torch.set_num_threads(a.threads)
    clips = make_clips(a.clips, a.seconds)
    rows, ft, ratios = [], [], {}
    if not a.gpu_only:
        rows.append(extraction(a.preset, clips, batch=a.batch, rounds=a.rounds, device="cpu", precision="fp32"))
        ft.append(finetune_speed(a.preset, clips, steps=a.ft_steps, batch=a.ft_batch, device="cpu", precision="fp32"))
        ratios["batched_vs_per_clip"] = rows[0]["batched_clips_per_s"] / rows[0]["per_clip_clips_per_s"]
    if gpu_device != "none":
        tag = torch.device(gpu_device).type  # "cuda"; "cpu" when the GPU rows' code runs on the CPU
        gpu = {prec: extraction(a.gpu_preset, clips, batch=a.batch, rounds=a.rounds, device=gpu_device, precision=prec)
               for prec in ("fp32", "bf16")}
        rows += list(gpu.values())
        ft.append(finetune_speed(a.gpu_preset, clips, steps=a.ft_steps, batch=a.ft_batch, device=gpu_device,
                                 precision="bf16"))
        ratios[f"batched_vs_per_clip_{tag}"] = gpu["bf16"]["batched_clips_per_s"] / gpu["bf16"]["per_clip_clips_per_s"]
        ratios[f"bf16_vs_fp32_{tag}"] = gpu["bf16"]["batched_clips_per_s"] / gpu["fp32"]["batched_clips_per_s"]
    print(f"\n{'extraction':34s} {'per clip':>10s} {'batched':>10s}  clips/s")
    for r in rows:
        print(f"{r['preset'] + ' ' + r['device'] + ' ' + r['precision']:34s} {r['per_clip_clips_per_s']:10.1f} "
              f"{r['batched_clips_per_s']:10.1f}")
    for r in ft:
        print(f"fine-tune {r['preset']} {r['device']} {r['precision']}: {r['steps_per_s']:.2f} steps/s (batch {r['batch']})")
    print(json.dumps({"benchmark": "evaluate", "quick": a.quick, "seconds": a.seconds, "threads": a.threads,
                      "cpu_count": os.cpu_count(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                      "extraction": rows, "finetune": ft, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
