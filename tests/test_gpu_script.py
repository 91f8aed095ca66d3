"""benchmarks/gpu.py cannot rot before a GPU arrives: its --dry-run runs every part on the CPU and
ends with the JSON it promises; a failing or hanging part is recorded and the script goes on."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "benchmarks", "gpu.py"))
gpu = sys.modules["bench_gpu"] = importlib.util.module_from_spec(_spec)  # registered first: it defines a dataclass
_spec.loader.exec_module(gpu)

PARTS = ["tests", "augment", "models", "train", "evaluate"]


def test_dry_run_runs_every_part_on_the_cpu_and_ends_with_the_json():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--dry-run"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "gpu" and out["mode"] == "dry-run" and out["failed"] == []
    assert list(out["parts"]) == PARTS and all(p["ok"] and p["seconds"] > 0 for p in out["parts"].values())
    tests = out["parts"]["tests"]["result"]
    assert tests["tests"] >= 20 and tests["failures"] == tests["errors"] == 0 and tests["failed"] == []
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]  # on a CPU every cuda test skips
    rows, ratios = out["rows"], out["ratios"]
    assert set(ratios) == {"augment_gpu_vs_audiomentations", "wav2vec2_vs_hf", "train_vs_data_wait_goal",
                           "extraction_bf16_vs_fp32", "extraction_batched_vs_per_clip"}
    assert all(isinstance(v, float) and v > 0 for v in ratios.values()), ratios
    aug = rows["augment_clips_per_s"]
    assert aug["ours_on_device"] > 0 and aug["audiomentations_per_example"] > 0 and aug["audiomentations_workers"] == 1
    steps = rows["train_steps_per_s"]
    assert steps["precision"] == "bf16" and steps["clmr_preset"] == "tiny" and steps["wav2vec2_config"] == "tiny"
    assert all(steps[k] > 0 for k in ("clmr", "cpc", "wav2vec2_ours", "wav2vec2_hf"))
    assert 0 <= rows["trainer"]["data_wait_fraction"] < 1 and rows["trainer"]["steps_per_s"] > 0
    assert all(v > 0 for v in rows["extraction_clips_per_s"].values())
    assert out["parts"]["models"]["result"]["device"] == "cpu" and out["parts"]["train"]["result"]["device"] == "cpu"


def test_a_failing_or_hanging_part_is_recorded_and_summarised_as_missing(tmp_path):
    env = dict(os.environ)
    fail = gpu.Part("models", [sys.executable, "-c", "import sys; print('half'); sys.exit(3)"], 30, "s", gpu._last_json)
    rec = gpu.run_part(fail, 30, str(tmp_path), env)
    assert not rec["ok"] and rec["error"].startswith("exit 3; no result (ValueError: printed no JSON line)")
    assert "half" in rec["tail"]
    hang = gpu.Part("train", [sys.executable, "-c", "import time; print('{}', flush=True); time.sleep(60)"], 1.5, "s",
                    gpu._last_json)
    rec2 = gpu.run_part(hang, 1.5, str(tmp_path), env)
    assert not rec2["ok"] and rec2["error"] == "timed out after 2 s" and rec2["seconds"] < 10
    spent = gpu.run_part(hang, 0.5, str(tmp_path), env)
    assert not spent["ok"] and spent["error"].startswith("skipped")
    rows, ratios = gpu.summarise({"models": rec, "train": rec2})
    assert all(v is None for v in ratios.values()) and rows["trainer"]["data_wait_fraction"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_without_cuda_it_says_to_use_a_gpu_node_or_dry_run():
    with pytest.raises(UserError, match="no CUDA device here.*--dry-run"):
        gpu.main([])


@pytest.mark.parametrize("mode", ["full", "quick"])
def test_the_gpu_modes_pass_only_flags_their_benchmarks_define(mode, tmp_path):
    """The full and quick sizes never run in CI (they need CUDA): every flag they pass must at least
    be one the benchmark's parser defines, so a renamed flag fails here and not on the GPU node."""
    seen = set()
    for part in gpu.parts(mode, str(tmp_path), 16):
        script = part.argv[1] if part.argv[1].endswith(".py") else None  # else python -m pytest
        if script is None:
            assert part.name == "tests" and part.argv[1:5] == ["-m", "pytest", "-m", "cuda"]
            continue
        source = open(script).read()
        for flag in (a for a in part.argv if a.startswith("--")):
            assert f'add_argument("{flag}"' in source, (part.name, flag)
        seen.add(part.name)
    assert seen == set(PARTS) - {"tests"}
