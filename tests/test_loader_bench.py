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
    assert set(out["ratios"]) == {"loader_vs_decode_limit", "loader_vs_webdataset", "loader_vs_perfile"}
    assert all(v > 0 for v in out["ratios"].values())
    for name in ("loader", "decode_limit", "webdataset", "perfile"):
        assert out["clips_per_s"][name] > 0
        assert abs(out["audio_seconds_per_s"][name] - out["clips_per_s"][name] * out["mean_clip_seconds"]) < 0.05 * out["audio_seconds_per_s"][name] + 0.1
    assert out["clips"] == 24 and out["source"] == "generated"
