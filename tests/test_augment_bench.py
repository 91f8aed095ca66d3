"""Keep benchmarks/augment.py from rotting: its --quick run ends with the JSON line it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_quick_prints_ratios_json():
    proc = subprocess.run(
        [sys.executable, "benchmarks/augment.py", "--quick", "--skip-torch-audiomentations"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ratios = result["ratios"]
    assert {"ours_vs_audiomentations", "pitch_ours_vs_audiomentations", "cpu_path_vs_audiomentations",
            "ours_variants_vs_audiomentations"} <= set(ratios)
    assert all(v > 0 for v in ratios.values())
    assert all(v > 0 for v in result["clips_per_s"].values())
    # The benchmark's own accuracy check: our pitch shift lands within 0.3 semitone.
    assert result["pitch_accuracy"]["max_abs_error_semitones"] < 0.3
