"""benchmarks/evaluate.py --quick runs and ends with its JSON line (keeps the benchmark from rotting)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_benchmark_quick_prints_ratios_last(capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_evaluate", os.path.join(ROOT, "benchmarks", "evaluate.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "batched_vs_per_clip" in report["ratios"] and all(math.isfinite(v) and v > 0 for v in report["ratios"].values())
    (cpu,) = [r for r in report["extraction"] if r["device"] == "cpu"]
    assert cpu["clips"] == 8 and report["ratios"]["batched_vs_per_clip"] == cpu["batched_clips_per_s"] / cpu["per_clip_clips_per_s"]
    assert report["finetune"][0]["steps"] == 3 and report["finetune"][0]["steps_per_s"] > 0
