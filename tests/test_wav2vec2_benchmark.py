"""benchmarks/models.py --quick runs end to end and its last line is the JSON result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_models_benchmark_quick_prints_json_ratios():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "models.py"), "--quick", "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ratio = result["ratios"]["wav2vec2_vs_hf"]
    w2v = result["wav2vec2"]
    assert ratio > 0 and ratio == pytest.approx(w2v["hf_ms"] / w2v["ours_ms"])
    assert w2v["config"] == "tiny" and w2v["frames"] == 49 and w2v["masked_per_clip"] >= 2
    assert len(w2v["ours_ms_all"]) == len(w2v["hf_ms_all"]) == 2
    for case in ("full", "padded"):  # the fine-tuning step, against HF's Wav2Vec2Model
        ft = result["wav2vec2_finetune"][case]
        key = "wav2vec2_finetune_vs_hf" if case == "full" else "wav2vec2_finetune_padded_vs_hf"
        assert ft["padded"] == (case == "padded") and result["ratios"][key] == pytest.approx(ft["hf_ms"] / ft["ours_ms"])
    # the CLMR / CPC steps ran through the model seam (or say which file is missing)
    for key in ("clmr_tiny", "cpc_tiny"):
        assert ("ms" in result[key] and result[key]["ms"] > 0) or "missing" in result[key]
