"""benchmarks/train.py --quick runs and ends with its JSON line (keeps the benchmark from rotting)."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_quick_prints_ratios_last(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(ROOT, "benchmarks", "train.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick"]) == 0
    finally:
        torch.set_num_threads(threads)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads(last)
    assert set(report["ratios"]) == {"device_augment_vs_worker_augment", "train_vs_data_wait_goal"}
    assert all(math.isfinite(v) and v > 0 for v in report["ratios"].values())
    for name in ("device", "workers"):
        r = report["results"][name]
        assert r["steps_measured"] == 6 and 0 <= r["data_wait_fraction"] < 1
        assert r["clips_per_s"] == pytest.approx(r["steps_per_s"] * 16)
        assert 0 < r["final_loss"] < 10
    # the ratio is computed from the figures it reports
    dev, wrk = report["results"]["device"], report["results"]["workers"]
    assert report["ratios"]["device_augment_vs_worker_augment"] == dev["clips_per_s"] / wrk["clips_per_s"]
