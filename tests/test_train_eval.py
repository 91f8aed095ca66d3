"""Seeing a run learn: validation loss on fixed held-out batches (training/validate.py), the online
kNN probe (training/online_probe.py), and both through train.py with fp16 and kill -9 + resume.

Data as tests/test_train.py (one-second tones at 8 kHz, a 5-block SampleCNN), a 16-clip held-out
split, and tests/evaldata.py's four separable notes for the probe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
import train_config as tc
from tests import evaldata, shardgen
from tests.test_train import SMALL, TRAIN_PY, subprocess_env, wait_for_lines
from training import checkpoint
from training.distributed import Dist
from training.online_probe import OnlineProbe, _cosine, _knn_scores
from training.validate import Validator

CPU = Dist(rank=0, world=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("eval-shards")
    train_clips = shardgen.make_clips(48, sample_rate=8000, seconds=(1.0, 1.0), seed=3)
    valid_clips = shardgen.make_clips(16, sample_rate=8000, seconds=(1.0, 1.0), seed=11)
    evaldata.write_toy(str(folder / "toy"), sizes=(8, 64, 8))
    return {"train": shardgen.write_split(str(folder / "train"), train_clips, [12, 12, 12, 12]),
            "valid": shardgen.write_split(str(folder / "valid"), valid_clips, [8, 8]),
            "probe": str(folder / "toy" / "valid.manifest.json")}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(data: dict[str, str], out: str, *overrides: str) -> tc.Config:
    return tc.apply_overrides(tc.preset("clmr_tiny"), [
        f"--data.manifests={data['train']}", f"--data.valid_manifests={data['valid']}", f"--train.out_dir={out}",
        *SMALL, *overrides])


def rows(out: str, prefix: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        found = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not k.endswith("/seconds")} for r in found if any(k.startswith(prefix) for k in r)]


def test_validation_repeats_on_the_same_weights_and_leaves_model_and_rngs_alone(data, tmp_path):
    cfg = config(data, str(tmp_path), "--train.eval_batches=2", "--data.valid_manifests=" + data["valid"],
                 "--data.crop_samples=729", "--data.shuffle_buffer=4")
    _, cls = tc.model_classes(cfg.arch)
    torch.manual_seed(0)
    model = cls(cfg.model).train()
    v = Validator(cfg, CPU, sample_rate=8000, crop=729, micro_batch=4)
    assert v.batches == 2 and v.clips == 8
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    rng = torch.get_rng_state()
    first = v(model)
    second = v(model)
    assert {k: x for k, x in first.items() if k != "valid/seconds"} == {k: x for k, x in second.items() if k != "valid/seconds"}
    assert np.isfinite(first["valid/loss"]) and first["valid/clips"] == 8 and "valid/contrastive_acc" in first
    assert model.training  # the previous mode is back
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())  # BatchNorm statistics untouched
    assert torch.equal(torch.get_rng_state(), rng)  # the training generator did not move
    # other weights, another value: the set is fixed, the score is the model's
    with torch.no_grad():
        next(model.parameters()).mul_(1.5)
    assert v(model)["valid/loss"] != first["valid/loss"]
    # a split too small for one batch is refused with the flag to change
    small = config(data, str(tmp_path), "--train.global_batch_size=32")
    with pytest.raises(train.ConfigError, match="--data.valid_manifests: 16 clips are fewer than one validation batch"):
        Validator(small, CPU, sample_rate=8000, crop=729, micro_batch=32)


def test_knn_scores_separable_embeddings_perfectly_and_shuffled_ones_near_chance():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    x = rng.standard_normal((40, 8)) * 0.1 + np.eye(8)[y] * 3  # four tight clusters
    fit, held = np.arange(0, 40, 2), np.arange(1, 40, 2)
    near = np.argsort(-_cosine(x, fit, held), axis=1, kind="stable")[:, :3]
    probs = _knn_scores("class", 4, y[fit], near)
    assert (probs.argmax(1) == y[held]).mean() == 1.0
    tags = np.eye(4, dtype=np.float32)[y]
    assert _knn_scores("multi_hot", 4, tags[fit], near) == pytest.approx(tags[held])
    shuffled = rng.permutation(y)
    acc = (_knn_scores("class", 4, shuffled[fit], near).argmax(1) == shuffled[held]).mean()
    assert acc < 0.6


def test_online_probe_scores_the_live_encoder_within_its_bounds(data, tmp_path, capsys):
    cfg = config(data, str(tmp_path), f"--eval.probe_data={data['probe']}", "--eval.probe_k=3",
                 "--eval.probe_max_clips=48")
    _, cls = tc.model_classes(cfg.arch)
    torch.manual_seed(0)
    model = cls(cfg.model).train()
    state = {k: t.clone() for k, t in model.state_dict().items()}
    probe = OnlineProbe(cfg, CPU, sample_rate=8000)
    assert len(probe.clips) == 48 and [t.name for t in probe.tasks] == ["pitch", "tags"]
    out = probe(model)
    # four well-separated notes: a random SampleCNN's embeddings already put many neighbours right
    # (0.583 of the 24 scored clips at seed 0; chance is 0.25)
    assert out["probe/clips"] == 48 and out["probe/pitch_accuracy"] >= 0.5
    assert 0.0 <= out["probe/tags_roc_auc"] <= 1.0 and 0.0 <= out["probe/tags_pr_auc"] <= 1.0
    assert model.training and all(torch.equal(t, state[k]) for k, t in model.state_dict().items())
    again = probe(model)
    assert {k: x for k, x in again.items() if k != "probe/seconds"} == {k: x for k, x in out.items() if k != "probe/seconds"}
    # the time budget: a probe out of time scores the clips it has embedded and says so
    quick = OnlineProbe(tc.apply_overrides(cfg, ["--eval.probe_max_seconds=1e-9", "--eval.probe_batch=8"]), CPU,
                        sample_rate=8000)
    partial = quick(model)
    assert partial["probe/clips"] == 8 and "probe/pitch_accuracy" in partial
    assert "--eval.probe_max_seconds=1e-09 spent after 8 of 48 clips" in capsys.readouterr().out
    with pytest.raises(train.ConfigError, match="--eval.probe_data .*lists no class or multi_hot labels"):
        nolabels = shardgen.write_split(str(tmp_path / "nolabels"), shardgen.make_clips(4, seed=1), [4], labels={})
        OnlineProbe(tc.apply_overrides(cfg, [f"--eval.probe_data={nolabels}"]), CPU, sample_rate=8000)


def test_fp16_valid_curve_probe_and_scaler_survive_kill9_and_resume(data, tmp_path):
    common = ["--train.steps=10", "--checkpoint.every=4", "--data.num_workers=0", "--logging.every=5",
              "--train.precision=fp16", "--train.eval_every=2", "--train.eval_batches=2",
              f"--eval.probe_data={data['probe']}", "--eval.probe_every=5", "--eval.probe_max_clips=16"]
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    ref = train.train(config(data, ref_out, *common))
    reference = rows(ref_out, "valid/")
    assert [r["step"] for r in reference] == [2, 4, 6, 8, 10]
    assert len({round(r["valid/embed_std"], 8) for r in reference}) == 5  # the curve moves with the weights
    assert [r["step"] for r in rows(ref_out, "probe/")] == [5, 10]
    assert ref["nonfinite_skipped"] >= 1  # fp16's first scale overflows; counted like a non-finite step
    ref_scaler = checkpoint.load(ref["checkpoint"])["scaler"]
    assert ref_scaler["scale"] < 2.0**16  # the scale came down from torch's default

    proc = subprocess.Popen(
        [sys.executable, TRAIN_PY, "--config", "clmr_tiny", f"--data.manifests={data['train']}",
         f"--data.valid_manifests={data['valid']}", f"--train.out_dir={out}", *SMALL, *common],
        cwd=str(tmp_path), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_for_lines(os.path.join(out, "metrics.jsonl"), 9, proc)  # past step 5: 5 steps, 2 valid rows, a probe
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    ckpts = checkpoint.list_checkpoints(os.path.join(out, "checkpoints"))
    assert ckpts and ckpts[-1][0] in (4, 8)
    killed_scaler = checkpoint.load(ckpts[-1][1])["scaler"]
    assert killed_scaler["scale"] < 2.0**16 and set(killed_scaler) == set(ref_scaler)

    summary = train.train(config(data, out, *common, "--checkpoint.resume=auto"))
    assert summary["resumed_from"] == ckpts[-1][1]
    resumed = rows(out, "valid/")
    assert len(resumed) == len(reference)  # metrics.jsonl was cut back to the checkpoint's step on resume
    for a, b in zip(resumed, reference):
        assert a == pytest.approx(b, rel=1e-6)
    assert rows(out, "probe/") == rows(ref_out, "probe/")
    assert checkpoint.load(summary["checkpoint"])["scaler"] == ref_scaler  # scale and growth counter carried over
    assert summary["last_loss"] == pytest.approx(ref["last_loss"], rel=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_precision_validation_and_probe(data, tmp_path, precision):
    out = str(tmp_path / precision)
    s = train.train(config(data, out, "--train.steps=6", "--train.device=cuda", f"--train.precision={precision}",
                           "--train.eval_every=3", "--train.eval_batches=2", f"--eval.probe_data={data['probe']}",
                           "--eval.probe_every=3", "--eval.probe_max_clips=16", "--data.num_workers=0"))
    assert s["status"] == "completed" and np.isfinite(s["last_loss"])
    valid = rows(out, "valid/")
    assert [r["step"] for r in valid] == [3, 6] and all(np.isfinite(r["valid/loss"]) for r in valid)
    assert [r["step"] for r in rows(out, "probe/")] == [3, 6]
    scaler = checkpoint.load(s["checkpoint"])["scaler"]
    assert (scaler["scale"] > 0) if precision == "fp16" else scaler == {}
