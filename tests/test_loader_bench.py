"""benchmarks/loader.py --quick runs and ends with its JSON line (keeps the benchmark from rotting)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_loader_benchmark_quick():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "loader.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    peers = ("decode_limit", "webdataset", "perfile")
    assert set(out["ratios"]) == {f"loader_vs_{p}{s}" for p in peers for s in ("", "_cpu")}
    for p in peers:  # the ratios are what the per-contender figures say
        assert abs(out["ratios"][f"loader_vs_{p}"] - out["clips_per_s"]["loader"] / out["clips_per_s"][p]) < 0.01
        assert abs(out["ratios"][f"loader_vs_{p}_cpu"] - out["cpu_ms_per_clip"][p] / out["cpu_ms_per_clip"]["loader"]) < 0.01
    assert all(v > 0 for v in out["ratios"].values())
    for name in ("loader", "decode_limit", "webdataset", "perfile"):
        assert out["clips_per_s"][name] > 0
        assert abs(out["audio_seconds_per_s"][name] - out["clips_per_s"][name] * out["mean_clip_seconds"]) < 0.05 * out["audio_seconds_per_s"][name] + 0.1
    assert out["clips"] == 24 and out["source"] == "generated"
