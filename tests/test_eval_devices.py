"""Where extraction runs: batched across clips of different lengths, bf16 autocast, torchrun ranks,
and the bad inputs of issue 12 (sample-rate mismatch, a split without labels, out of memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
from pipeline.errors import UserError
from tests import evaldata, shardgen
from tests.notes import rendered_note

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000
NOTES = ((0, 60, 1.0), (40, 67, 0.5), (73, 48, 0.8), (24, 55, 2.0), (56, 72, 0.3))

# bf16 autocast bound, measured on CPU with random-init tiny models on rendered notes (relative L2
# per clip: wav2vec2 <= 0.9 %, CLMR <= 0.3 %, CPC <= 0.1 %); the test allows twice the worst
BF16_REL_L2 = 0.02


def _notes() -> list[np.ndarray]:
    return [rendered_note(p, k, seconds=s, sample_rate=SR) for p, k, s in NOTES]


def _encoder(preset: str, layer: int | str = -1):
    from eval_tools.encoders import preset_config, random_encoder

    return random_encoder(preset_config(preset), sample_rate=SR, seed=0, layer=layer)


def _rel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("preset,layer", [("wav2vec2_tiny", -1), ("wav2vec2_tiny", "all"), ("cpc_tiny", -1), ("clmr_tiny", -1)])
def test_batched_extraction_equals_one_clip_at_a_time(preset, layer) -> None:
    """Five notes of 0.3-2 s in one padded batch give each note's own embedding."""
    enc = _encoder(preset, layer)
    clips = _notes()
    batched = enc.embed_clips(clips)
    alone = np.concatenate([enc.embed_clips([c]) for c in clips])
    assert batched.shape == alone.shape and batched.shape[0] == 5
    assert _rel(batched, alone).max() < 1e-5
    # pieces really were batched: small max_batch_pieces gives the same values
    enc.max_batch_pieces = 2
    assert _rel(enc.embed_clips(clips), alone).max() < 1e-5


def test_logmel_batched_equals_per_clip() -> None:
    from eval_tools.encoders import logmel_encoder

    enc = logmel_encoder(SR)
    clips = _notes()
    assert _rel(enc.embed_clips(clips), np.concatenate([enc.embed_clips([c]) for c in clips])).max() < 1e-6


@pytest.mark.parametrize("preset,layer", [("wav2vec2_tiny", -1), ("wav2vec2_tiny", "all"), ("cpc_tiny", -1), ("clmr_tiny", -1)])
def test_bf16_autocast_embeddings_agree_with_fp32(preset, layer) -> None:
    enc = _encoder(preset, layer)
    clips = _notes()
    fp32 = enc.embed_clips(clips)
    enc.precision = "bf16"
    bf16 = enc.embed_clips(clips)
    rel = _rel(bf16, fp32)
    assert rel.max() < BF16_REL_L2, rel
    assert rel.max() > 0  # autocast really ran in bf16
    assert enc.cache_id != _encoder(preset, layer).cache_id  # bf16 and fp32 embeddings never share a cache entry


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    return evaldata.write_toy(str(tmp_path_factory.mktemp("devdata") / "toy"), sizes=(24, 12, 12))


def _probe_accuracy(toy: str, out: str, device: str, precision: str) -> float:
    opts = evaluate.EvalOptions(data=[toy], out=out, preset="cpc_tiny", baselines=["random"], tasks=["pitch"],
                                max_epochs=40, patience=10, device=device, precision=precision, progress=False, cache="")
    return evaluate.run_evaluation(opts)["rows"][0]["test"]["accuracy"]


def test_bf16_probe_scores_match_fp32(toy, tmp_path) -> None:
    """The metric a user reads does not move with bf16 autocast beyond noise (here: not at all)."""
    scores = {p: _probe_accuracy(toy, str(tmp_path / p), "cpu", p) for p in ("fp32", "bf16")}
    assert abs(scores["fp32"] - scores["bf16"]) <= 1 / 12 + 1e-9, scores


def test_device_flag_errors() -> None:
    from eval_tools.runtime import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UserError, match="--device .tpu.: use auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device cuda: CUDA is not available"):
            resolve_device("cuda")


def test_out_of_memory_names_the_batch_flag(monkeypatch) -> None:
    enc = _encoder("wav2vec2_tiny")

    def oom(audio, lengths):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(enc, "forward_pieces", oom)
    with pytest.raises(UserError, match=r"out of memory on cpu embedding \d+ pieces .*lower --embed-batch"):
        enc.embed_clips(_notes())


def test_sample_rate_mismatch_is_resampled_or_refused(tmp_path, capsys) -> None:
    """22.05 kHz shards for a 16 kHz wav2vec2: resampled by default (said once), refused with
    --no-resample naming both rates."""
    folder = evaldata.write_toy(str(tmp_path / "toy22"), sizes=(8, 4, 4), sample_rate=22050)
    opts = dict(data=[folder], preset="wav2vec2_tiny", baselines=["random"], tasks=["pitch"], max_epochs=5, patience=2,
                progress=False, cache="")
    res = evaluate.run_evaluation(evaluate.EvalOptions(out=str(tmp_path / "a"), **opts))
    assert "shards are 22050 Hz, the encoder expects 16000 Hz: resampling on the fly" in capsys.readouterr().out
    assert res["datasets"]["toy22"]["sample_rate"] == 16000 and res["rows"][0]["test"]["n"] == 4
    with pytest.raises(UserError, match="shards are 22050 Hz but the encoder expects 16000 Hz"):
        evaluate.run_evaluation(evaluate.EvalOptions(out=str(tmp_path / "b"), resample=False, **opts))


def test_split_without_labels_for_a_task_names_task_and_split(tmp_path) -> None:
    folder = str(tmp_path / "nolab")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("valid", 4), ("test", 4)):
        clips = [evaldata.toy_clip(rng, i, split) for i in range(n)]
        if split == "valid":
            for c in clips:
                c["labels"].pop("pitch")
        shardgen.write_split(folder, clips, [n], split=split, dataset="nolab", labels=evaldata.SPEC)
    opts = evaluate.EvalOptions(data=[folder], out=str(tmp_path / "e"), baselines=["logmel"], tasks=["pitch"], progress=False)
    with pytest.raises(UserError, match="--tasks pitch: the valid split of nolab has no pitch labels"):
        evaluate.run_evaluation(opts)


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT)


def test_torchrun_two_ranks_embed_and_probe_like_one_process(toy, tmp_path) -> None:
    """Two gloo ranks split each split's samples; rank 0 gathers them in split order: the same keys,
    the same embeddings and the same probe table as one process."""
    manifest = os.path.join(toy, "train.manifest.json")
    common = ["--preset", "wav2vec2_tiny", "--device", "cpu", "--no-progress", manifest]
    assert evaluate.main(["embed", "--out", str(tmp_path / "one"), *common]) == 0
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py"]
    two = subprocess.run([*run, "embed", "--out", str(tmp_path / "two"), *common],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert (tmp_path / "one" / "keys.txt").read_text() == (tmp_path / "two" / "keys.txt").read_text()
    x1, x2 = np.load(tmp_path / "one" / "embeddings.npy"), np.load(tmp_path / "two" / "embeddings.npy")
    assert x1.shape == (24, 64) and np.abs(x1 - x2).max() < 1e-5
    assert json.load(open(tmp_path / "two" / "report.json"))["embedded"] == 24

    probe = ["probe", "--data", toy, "--baselines", "logmel", "--tasks", "pitch", "--max-epochs", "20", "--patience", "5",
             "--device", "cpu", "--no-progress", "--cache", ""]
    assert evaluate.main([*probe, "--out", str(tmp_path / "p1")]) == 0
    p2 = subprocess.run([*run, *probe, "--out", str(tmp_path / "p2")], cwd=ROOT, env=_env(), capture_output=True, text=True,
                        timeout=300)
    assert p2.returncode == 0, p2.stdout + p2.stderr
    assert "2 ranks" in p2.stdout
    r1, r2 = (json.load(open(tmp_path / p / "results.json")) for p in ("p1", "p2"))
    assert r1["rows"][0]["test"] == r2["rows"][0]["test"] and r2["rows"][0]["n_train"] == 24


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_matches_cpu_within_bf16_tolerance() -> None:
    clips = _notes()
    for preset in ("wav2vec2_tiny", "cpc_tiny", "clmr_tiny"):
        cpu = _encoder(preset).embed_clips(clips)
        enc = _encoder(preset).to("cuda", "bf16")
        gpu = enc.embed_clips(clips)
        assert next(enc.model.parameters()).device.type == "cuda"
        assert _rel(gpu, cpu).max() < BF16_REL_L2, preset
        fp32 = _encoder(preset).to("cuda", "fp32").embed_clips(clips)
        assert _rel(fp32, cpu).max() < 1e-3, preset  # TF32 matmuls may differ from the CPU slightly


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_probe_scores_match_cpu(toy, tmp_path) -> None:
    """Extraction and probe training on CUDA give the CPU's test accuracy within one of the 12 test clips."""
    scores = {(d, p): _probe_accuracy(toy, str(tmp_path / f"{d}-{p}"), d, p)
              for d, p in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16"))}
    for key, acc in scores.items():
        assert abs(acc - scores["cpu", "fp32"]) <= 1 / 12 + 1e-9, scores
