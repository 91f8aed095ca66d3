"""The GPU check (issue 18): every CUDA test, then the GPU rows of the benchmarks, in one command.

    python benchmarks/gpu.py             # full: under 8 min on one H100-class GPU with 16 cores
    python benchmarks/gpu.py --quick     # a two-minute subset
    python benchmarks/gpu.py --dry-run   # the same parts on the CPU at tiny sizes (CI: tests/test_gpu_script.py)

Nothing to prepare beyond the README's install (``pip install -e '.[test]'``): every part builds its
own data. Parts run in order, each a subprocess with its own timeout; its output is echoed with a
``  | `` prefix. A part that fails or times out records its error in the JSON and the script goes on
(exit status 1 if any part failed). Each timeout is also cut to what is left of the whole budget
(470 s full, 120 s quick), so the script ends in time whatever hangs. Sizes (full / quick):

- ``tests``     ``pytest -m cuda tests`` (tests/test_cuda.py and the CUDA tests of the loader, trainer
                and evaluation files) / tests/test_cuda.py without torch.compile and torchrun. 180 s / 40 s.
- ``augment``   benchmarks/augment.py: CLMR's chain on batches of 48 x 59049 samples at 22.05 kHz on the
                GPU (6 timed batches / 2) against audiomentations per example in one worker per core
                (2 batches / 1); torch-audiomentations left out. 75 s / 20 s.
- ``models``    benchmarks/models.py, bf16 autocast: our wav2vec2 BASE against HF
                ``Wav2Vec2ForPreTraining`` on 4 / 2 crops of 250,000 samples (fairseq's), CLMR and CPC
                at their default presets, batch 48; 10 / 3 timed steps each (a step: zero_grad, forward,
                backward, as benchmarks/models.py times it; no optimizer). 75 s / 20 s.
- ``train``     benchmarks/train.py: train.py with clmr_mtat's model, crops and augmentation on the GPU,
                CLMR's batch of 48, one loader worker per core, 80 steps of which the first 20 are left
                out / 30 and 10; the trainer's data wait. 90 s / 25 s.
- ``evaluate``  benchmarks/evaluate.py GPU rows: extraction with wav2vec2 BASE (wav2vec2_musicnet),
                64 clips of 4 s +- 25 %, batch 16, fp32 and bf16, 3 rounds / 16 clips, 1 round; and
                fine-tune steps/s. 60 s / 15 s.

``--dry-run`` runs the same parts through the same code on the CPU (CUDA tests skip; each benchmark at
tiny sizes with ``--device cpu``), so the script cannot rot before a GPU arrives.

The last line printed is one JSON object: ``parts`` (each part's status, seconds, size and JSON),
``rows`` (the headline figures) and ``ratios`` (>1: ours better): ``augment_gpu_vs_audiomentations``
(clips/s), ``wav2vec2_vs_hf`` (HF's step time over ours), ``train_vs_data_wait_goal`` (2 % over the
measured data-wait fraction), ``extraction_bf16_vs_fp32`` and ``extraction_batched_vs_per_clip``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.errors import UserError, run_cli  # noqa: E402

BUDGET_S = {"full": 470.0, "quick": 120.0, "dry-run": 600.0}


@dataclass
class Part:
    name: str
    argv: list[str]
    timeout_s: float
    size: str
    parse: Callable[[str, str], dict]  # (stdout, tmp dir) -> result


def _last_json(out: str, _tmp: str) -> dict:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("printed no JSON line")


def _junit(out: str, tmp: str) -> dict:
    root = ET.parse(os.path.join(tmp, "cuda-tests.xml")).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed}


# The GPU modes differ only in sizes and timeouts (s); the dry run below has its own CPU commands.
GPU_SIZES: dict[str, dict[str, Any]] = {
    "full": dict(tests=(["tests"], 180, "pytest -m cuda tests"),
                 augment=(6, 2, 75), models=(4, 10, 75), train=(80, 20, 192, 90), evaluate=(64, 3, 20, 16, 60)),
    "quick": dict(tests=(["tests/test_cuda.py", "-k", "not torchrun and not compile"], 40,
                         "tests/test_cuda.py without torchrun and torch.compile"),
                  augment=(2, 1, 20), models=(2, 3, 20), train=(30, 10, 96, 25), evaluate=(16, 1, 5, 8, 15)),
}


def _gpu_parts(s: dict[str, Any], bench: Callable[[str], list[str]], pytest: list[str], cores: int) -> list[Part]:
    test_args, test_timeout, test_size = s["tests"]
    batches, peer_batches, aug_timeout = s["augment"]
    w2v_batch, model_steps, model_timeout = s["models"]
    steps, warmup, clips, train_timeout = s["train"]
    ev_clips, rounds, ft_steps, ft_batch, ev_timeout = s["evaluate"]
    return [
        Part("tests", [*pytest, *test_args], test_timeout, test_size, _junit),
        Part("augment", [*bench("augment"), "--device", "cuda", "--batch", "48", "--samples", "59049",
                         "--sr", "22050", "--batches", str(batches), "--peer-batches", str(peer_batches),
                         "--workers", str(cores), "--skip-torch-audiomentations"], aug_timeout,
             f"batch 48 x 59049 samples, {batches} GPU batches; audiomentations {peer_batches} "
             f"batch{'es' if peer_batches > 1 else ''} on {cores} workers", _last_json),
        Part("models", [*bench("models"), "--device", "cuda", "--precision", "bf16", "--w2v-config", "base",
                        "--batch", str(w2v_batch), "--seconds", "15.625", "--seam-batch", "48", "--presets", "default",
                        "--steps", str(model_steps)], model_timeout,
             f"bf16; wav2vec2 BASE {w2v_batch} x 250000 samples; CLMR / CPC default at batch 48; {model_steps} steps",
             _last_json),
        Part("train", [*bench("train"), "--preset", "clmr_mtat", "--device", "cuda", "--batch", "48",
                       "--workers", str(cores), "--steps", str(steps), "--warmup", str(warmup), "--paths", "device",
                       "--clips", str(clips), "--threads", "4"], train_timeout,
             f"clmr_mtat model, batch 48, {cores} workers, {steps} steps (first {warmup} left out)", _last_json),
        Part("evaluate", [*bench("evaluate"), "--gpu-only", "--gpu-preset", "wav2vec2_musicnet", "--clips", str(ev_clips),
                          "--seconds", "4", "--batch", "16", "--rounds", str(rounds), "--ft-steps", str(ft_steps),
                          "--ft-batch", str(ft_batch), "--threads", "4"], ev_timeout,
             f"wav2vec2 BASE, {ev_clips} clips of 4 s, batch 16, fp32 + bf16, {rounds} round{'s' if rounds > 1 else ''}; "
             f"fine-tune {ft_steps} steps", _last_json),
    ]


def parts(mode: str, tmp: str, cores: int) -> list[Part]:
    py = sys.executable
    bench = lambda name: [py, os.path.join(ROOT, "benchmarks", f"{name}.py")]  # noqa: E731
    xml = ["--junitxml", os.path.join(tmp, "cuda-tests.xml")]
    pytest = [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *xml]
    if mode in GPU_SIZES:
        return _gpu_parts(GPU_SIZES[mode], bench, pytest, cores)
    # dry-run: every part's code on the CPU at tiny sizes
    return [
        Part("tests", [*pytest, "tests/test_cuda.py"], 120, "tests/test_cuda.py (CUDA tests skip on a CPU)", _junit),
        Part("augment", [*bench("augment"), "--device", "cpu", "--batch", "2", "--samples", "4096", "--batches", "1",
                         "--peer-batches", "1", "--workers", "1", "--threads", "1", "--skip-torch-audiomentations"],
             120, "CPU, batch 2 x 4096 samples, 1 batch, 1 worker", _last_json),
        Part("models", [*bench("models"), "--device", "cpu", "--precision", "bf16", "--w2v-config", "tiny",
                        "--batch", "2", "--seconds", "0.5", "--seam-batch", "2", "--presets", "tiny", "--steps", "1",
                        "--threads", "1"], 120, "CPU, bf16, tiny models, batch 2, 1 step", _last_json),
        Part("train", [*bench("train"), "--quick", "--device", "cpu", "--batch", "4", "--paths", "device"], 120,
             "CPU, clmr_tiny cut to 5 blocks, batch 4, 8 steps, 1 worker", _last_json),
        Part("evaluate", [*bench("evaluate"), "--quick", "--gpu-only", "--gpu-device", "cpu", "--gpu-preset",
                          "wav2vec2_tiny"], 120, "CPU, wav2vec2 tiny, 8 clips of 0.5 s", _last_json),
    ]


def run_part(part: Part, timeout_s: float, tmp: str, env: dict[str, str]) -> dict[str, Any]:
    """Run one part, echoing its output; its result, or its error, never an exception."""
    print(f"[gpu] {part.name}: {part.size} (timeout {timeout_s:.0f} s)", flush=True)
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"size": part.size, "timeout_s": round(timeout_s)}
    if timeout_s < 1:
        return {**rec, "ok": False, "seconds": 0.0, "error": "skipped: the script's time budget is spent"}
    # its own session, so a timeout ends its loader workers too
    proc = subprocess.Popen(part.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            print("  | " + line, end="", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout_s)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc, timed_out = proc.wait(), True
    reader.join(5)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    out = "".join(lines)
    if timed_out:
        return {**rec, "ok": False, "error": f"timed out after {timeout_s:.0f} s", "tail": out[-1500:]}
    try:
        result = part.parse(out, tmp)
    except Exception as exc:  # noqa: BLE001 - any parse failure is this part's error, not the script's
        return {**rec, "ok": False, "error": f"exit {rc}; no result ({type(exc).__name__}: {exc})", "tail": out[-1500:]}
    if rc != 0:
        return {**rec, "ok": False, "error": f"exit {rc}", "result": result, "tail": out[-1500:]}
    return {**rec, "ok": True, "result": result}


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def summarise(done: dict[str, dict]) -> tuple[dict, dict]:
    """The headline rows and ratios from the parts' JSON (None where a part gave none)."""
    res = {name: rec.get("result") or {} for name, rec in done.items()}
    aug, mod, trn, ev = res.get("augment", {}), res.get("models", {}), res.get("train", {}), res.get("evaluate", {})
    steps_per_s = lambda ms: None if ms is None else 1000.0 / ms  # noqa: E731
    w2v = mod.get("wav2vec2") or {}
    size = "default" if "clmr_default" in mod else "tiny"  # the dry-run times the tiny presets
    run = next(iter((trn.get("results") or {}).values()), {})
    ext = {r.get("precision"): r for r in ev.get("extraction", [])}  # --gpu-only: the GPU rows alone
    rows = {
        "augment_clips_per_s": {"ours_on_device": _get(aug, "clips_per_s", "ours"),
                                "audiomentations_per_example": _get(aug, "clips_per_s", "audiomentations"),
                                "audiomentations_workers": _get(aug, "config", "workers"),
                                "batch": _get(aug, "config", "batch"), "samples": _get(aug, "config", "samples")},
        "train_steps_per_s": {"precision": mod.get("precision"),
                              "clmr_preset": size if f"clmr_{size}" in mod else None,
                              "clmr": steps_per_s(_get(mod, f"clmr_{size}", "ms")),
                              "cpc": steps_per_s(_get(mod, f"cpc_{size}", "ms")),
                              "wav2vec2_ours": steps_per_s(w2v.get("ours_ms")),
                              "wav2vec2_hf": steps_per_s(w2v.get("hf_ms")),
                              "wav2vec2_config": w2v.get("config"), "wav2vec2_batch": w2v.get("batch"),
                              "seam_batch": _get(mod, f"clmr_{size}", "batch")},
        "trainer": {"data_wait_fraction": run.get("data_wait_fraction"), "steps_per_s": run.get("steps_per_s"),
                    "clips_per_s": run.get("clips_per_s"), "batch": trn.get("batch"), "workers": trn.get("workers"),
                    "preset": trn.get("preset")},
        "extraction_clips_per_s": {f"{p}_{way}": _get(ext, p, f"{way}_clips_per_s")
                                   for p in ("fp32", "bf16") for way in ("batched", "per_clip")},
    }
    e = rows["extraction_clips_per_s"]
    ratios = {
        "augment_gpu_vs_audiomentations": _get(aug, "ratios", "ours_vs_audiomentations"),
        "wav2vec2_vs_hf": _get(mod, "ratios", "wav2vec2_vs_hf"),
        "train_vs_data_wait_goal": _get(trn, "ratios", "train_vs_data_wait_goal"),
        "extraction_bf16_vs_fp32": (e["bf16_batched"] / e["fp32_batched"]
                                    if e["bf16_batched"] and e["fp32_batched"] else None),
        "extraction_batched_vs_per_clip": (e["bf16_batched"] / e["bf16_per_clip"]
                                           if e["bf16_batched"] and e["bf16_per_clip"] else None),
    }
    return rows, ratios


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Sizes and timeouts of each part: the docstring of benchmarks/gpu.py.")
    mode_group = ap.add_mutually_exclusive_group()
    mode_group.add_argument("--quick", action="store_true", help="a two-minute subset")
    mode_group.add_argument("--dry-run", action="store_true", help="the same parts on the CPU at tiny sizes (CI)")
    ap.add_argument("--only", nargs="+", choices=["tests", "augment", "models", "train", "evaluate"],
                    help="run only these parts")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                    help="loader / audiomentations workers (default: this node's cores)")
    args = ap.parse_args(argv)
    mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"

    import torch

    if mode != "dry-run" and not torch.cuda.is_available():
        raise UserError("benchmarks/gpu.py: no CUDA device here; run it on a GPU node, or pass --dry-run "
                        "to run the same parts on the CPU")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(f"[gpu] {mode} on {gpu or 'cpu'}, {os.cpu_count()} cores, torch {torch.__version__}", flush=True)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), WANDB_MODE="disabled")
    t0 = time.perf_counter()
    done: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for part in parts(mode, tmp, args.cores):
            if args.only and part.name not in args.only:
                continue
            left = BUDGET_S[mode] - (time.perf_counter() - t0)
            done[part.name] = run_part(part, min(part.timeout_s, left), tmp, env)
            rec = done[part.name]
            print(f"[gpu] {part.name}: {'ok' if rec['ok'] else 'FAILED: ' + rec['error']} ({rec['seconds']} s)",
                  flush=True)
    rows, ratios = summarise(done)
    tests = _get(done, "tests", "result") or {}
    failed = [n for n, r in done.items() if not r["ok"]]
    print(f"\n[gpu] {len(done) - len(failed)}/{len(done)} parts ok in {time.perf_counter() - t0:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    if tests:
        print(f"[gpu] cuda tests: {tests.get('passed')} passed, {tests.get('skipped')} skipped, "
              f"{tests.get('failures', 0) + tests.get('errors', 0)} failed")
    for k, v in ratios.items():
        print(f"[gpu] {k}: {'-' if v is None else f'{v:.2f}'}")
    print(json.dumps({
        "benchmark": "gpu", "mode": mode, "gpu": gpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - t0, 1), "failed": failed, "rows": rows, "ratios": ratios, "parts": done,
    }))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], "benchmarks/gpu.py"))
