"""Evaluation end to end on tiny generated shards: probe (checkpoint + random + supervised + log-mel),
the results files, the embedding cache, fine-tuning and the ``embed`` command."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import soundfile as sf
import torch

import evaluate
from tests import evaldata

SR = evaldata.SR


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    return evaldata.write_toy(str(tmp_path_factory.mktemp("evaldata") / "toy"))


def _fake_checkpoint(path: str, preset: str = "clmr_tiny", seed: int = 5) -> None:
    """A checkpoint in train.py's format (docs/architecture.md §5) around a seeded model."""
    import train_config

    cfg = train_config.preset(preset)
    _, model_cls = train_config.model_classes(cfg.arch)
    torch.manual_seed(seed)
    model = model_cls(cfg.model)
    torch.save({"format": "musicssl-ckpt/1", "step": 7, "epoch": 0, "model_name": cfg.arch, "model": model.state_dict(),
                "config": train_config.to_dict(cfg), "wandb_run_id": None}, path)


def test_probe_end_to_end(tiny_data: str, tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt-00000007.pt")
    _fake_checkpoint(ckpt)
    out = str(tmp_path / "eval")
    opts = evaluate.EvalOptions(data=[tiny_data], out=out, checkpoint=ckpt, baselines=["random", "supervised", "logmel"],
                                supervised_steps=10, supervised_batch_size=16, max_epochs=60, patience=10,
                                calib_crops=64, progress=False)
    res = evaluate.run_evaluation(opts)
    rows = {(r["encoder"], r["task"]): r for r in res["rows"]}
    assert set(rows) == {(e, t) for e in ("pretrained", "random init", "supervised", "log-mel") for t in ("toy/pitch", "toy/tags")}
    # log-mel statistics separate four notes an octave-and-more apart and bright/noisy timbres
    assert rows[("log-mel", "toy/pitch")]["test"]["accuracy"] >= 0.9
    assert rows[("log-mel", "toy/tags")]["test"]["roc_auc"] >= 0.9
    # every encoder beats chance on pitch (4 classes)
    for e in ("pretrained", "random init", "supervised"):
        assert rows[(e, "toy/pitch")]["test"]["accuracy"] > 0.4, rows[(e, "toy/pitch")]
        assert rows[(e, "toy/pitch")]["test"]["n"] == 24
    # the confusion matrix is over the test split and agrees with the accuracy
    cm = np.array(rows[("log-mel", "toy/pitch")]["confusion"])
    assert cm.sum() == 24 and np.trace(cm) / 24 == pytest.approx(rows[("log-mel", "toy/pitch")]["test"]["accuracy"])
    assert res["encoders"]["supervised"]["supervised_steps"] == 10
    # files: JSON, Markdown, plots
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["rows"] == json.loads(json.dumps(res["rows"]))
    md = open(os.path.join(out, "results.md")).read()
    for e in ("pretrained", "random init", "supervised", "log-mel"):
        assert f"| {e} |" in md
    assert "toy pitch acc %" in md and "toy tags ROC-AUC" in md
    pngs = sorted(os.listdir(os.path.join(out, "plots")))
    assert "per_tag_auc-toy__tags.png" in pngs and "confusion-toy__pitch-log-mel.png" in pngs
    with open(os.path.join(out, "plots", pngs[0]), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the cache: a second run with the same weights reuses the stored embeddings (same values)
    cached = sorted(os.listdir(os.path.join(out, "cache")))
    assert len(cached) == 4  # pretrained, random, supervised, log-mel
    opts2 = evaluate.EvalOptions(data=[tiny_data], out=out, checkpoint=ckpt, baselines=["logmel"], max_epochs=60, patience=10,
                                 calib_crops=64, progress=False)
    res2 = evaluate.run_evaluation(opts2)
    r2 = {(r["encoder"], r["task"]): r for r in res2["rows"]}
    assert r2[("pretrained", "toy/pitch")]["test"] == rows[("pretrained", "toy/pitch")]["test"]
    assert sorted(os.listdir(os.path.join(out, "cache"))) == cached


def test_label_fraction_probe_uses_subset(tiny_data: str, tmp_path) -> None:
    opts = evaluate.EvalOptions(data=[tiny_data], out=str(tmp_path / "e"), preset="clmr_tiny", baselines=["logmel"],
                                fractions=[0.25, 1.0], tasks=["pitch"], max_epochs=40, patience=10, progress=False)
    res = evaluate.run_evaluation(opts)
    n = {r["fraction"]: r["n_train"] for r in res["rows"]}
    assert n == {0.25: 12, 1.0: 48}  # 3 of each of the 4 pitches, then all 48
    assert any(p.endswith("sweep-toy__pitch.png") for p in res["plots"])


def test_finetune_cli(tiny_data: str, tmp_path, capsys) -> None:
    out = str(tmp_path / "ft")
    rc = evaluate.main(["finetune", "--data", tiny_data, "--preset", "clmr_tiny", "--tasks", "pitch", "--steps", "20",
                        "--eval-every", "10", "--batch-size", "16", "--encoder-lr", "1e-3", "--workers", "0", "--out", out, "--no-progress"])
    assert rc == 0
    res = json.load(open(os.path.join(out, "results.json")))
    ft = res["finetune"]["pitch"]
    assert ft["steps"] == 20 and [h["step"] for h in ft["history"]] == [10, 20]
    # early stopping kept the evaluation with the best valid accuracy, and the heads reproduce it
    best = max(ft["history"], key=lambda h: h["valid"])
    assert ft["best_step"] == best["step"]
    assert res["rows"][0]["valid"]["accuracy"] == pytest.approx(best["valid"])
    assert res["rows"][0]["test"]["n"] == 24
    assert "from scratch" in capsys.readouterr().out


def test_finetune_updates_encoder_only_with_encoder_lr(tiny_data: str, tmp_path) -> None:
    from eval_tools.data import Dataset
    from eval_tools.encoders import preset_config, random_encoder
    from eval_tools.finetune import FinetuneConfig, finetune
    from eval_tools.runner import make_tasks

    ds = Dataset.from_dir(tiny_data)
    tasks = make_tasks(ds, ["pitch"])
    for lr, changes in ((0.0, False), (1e-3, True)):
        enc = random_encoder(preset_config("clmr_tiny"), sample_rate=SR, seed=0)
        # BatchNorm statistics too: a frozen encoder stays in eval mode while the heads train
        before = {k: v.clone() for k, v in enc.model.state_dict().items()}
        out = finetune(enc, ds, tasks, FinetuneConfig(steps=4, eval_every=4, batch_size=8, encoder_lr=lr, num_workers=0),
                       run_dir=str(tmp_path / f"lr{lr}"), progress=False)
        after = enc.model.state_dict()
        changed = any(not torch.equal(before[k], after[k]) for k in before)
        assert changed == changes
        assert out["labels_seen"] == {"pitch": 32} and out["labelled_rows"] is None  # 4 steps x 8 crops, all labelled


def test_embed_command(tmp_path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "audio"
    (folder / "sub").mkdir(parents=True)
    t = np.arange(SR) / SR
    a = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(SR)  # noise: no all-silent mel band
    b = 0.3 * np.sin(2 * np.pi * 1760 * t) + 0.01 * rng.standard_normal(SR)
    sf.write(folder / "a.wav", a, SR)
    sf.write(folder / "sub" / "a_again.flac", a, SR)
    sf.write(folder / "b.wav", np.stack([b, b], axis=1), 44100 // 2)  # stereo at another rate: resampled
    (folder / "broken.wav").write_bytes(b"RIFF....not audio")
    out = tmp_path / "emb"
    assert evaluate.main(["embed", "--logmel", "--out", str(out), str(folder)]) == 0
    x = np.load(out / "embeddings.npy")
    keys = (out / "keys.txt").read_text().split()
    assert [os.path.basename(k) for k in keys] == ["a.wav", "b.wav", "a_again.flac"]
    assert x.shape == (3, 256)
    assert np.abs(x[0] - x[2]).max() < 0.05  # same audio, FLAC vs WAV (both 16-bit)
    assert not np.allclose(x[0], x[1], atol=0.5)
    # a random-init CLMR on the same files: deterministic per seed
    assert evaluate.main(["embed", "--preset", "clmr_tiny", "--out", str(tmp_path / "e1"), str(folder / "a.wav")]) == 0
    assert evaluate.main(["embed", "--preset", "clmr_tiny", "--out", str(tmp_path / "e2"), str(folder / "a.wav")]) == 0
    e1, e2 = np.load(tmp_path / "e1" / "embeddings.npy"), np.load(tmp_path / "e2" / "embeddings.npy")
    assert e1.shape == (1, 64) and np.array_equal(e1, e2)
    # wav2vec2 with --layer all: one mean-pooled vector per layer (input + 2 transformer layers)
    assert evaluate.main(["embed", "--preset", "wav2vec2_tiny", "--layer", "all", "--out", str(tmp_path / "w"), str(folder / "a.wav")]) == 0
    w = np.load(tmp_path / "w" / "embeddings.npy")
    assert w.shape == (1, 3, 64) and not np.allclose(w[0, 0], w[0, 2])


def test_batchnorm_recalibration_matches_clean_statistics() -> None:
    """After recalibration the first BatchNorm's running mean/var are the exact batch statistics
    of its input over the clean crops (cumulative average, not an EMA of stale values)."""
    from eval_tools.encoders import preset_config, random_encoder, recalibrate_batchnorm

    enc = random_encoder(preset_config("clmr_tiny"), sample_rate=SR, seed=0)
    bn = enc.model.encoder.blocks[0][1]
    bn.running_mean.fill_(5.0)  # stale statistics, as after augmented training
    rng = np.random.default_rng(3)
    crops = [0.3 * rng.standard_normal(enc.crop_samples).astype(np.float32) for _ in range(64)]
    assert recalibrate_batchnorm(enc, crops, batch_size=32) == 64
    with torch.no_grad():
        h = enc.model.encoder.blocks[0][0](torch.from_numpy(np.stack(crops))[:, None])  # first conv: (B, C, T)
    mean = h.mean(dim=(0, 2))
    assert torch.allclose(bn.running_mean, mean, atol=1e-5)
    # two batches of equal size: the cumulative average of the per-batch unbiased variances
    var = torch.stack([h[i : i + 32].var(dim=(0, 2), unbiased=True) for i in (0, 32)]).mean(0)
    assert torch.allclose(bn.running_var, var, rtol=1e-4)
    assert bn.momentum == 0.1 and not bn.training  # the module's own settings are restored


def test_cpc_checkpoint_probe_end_to_end(tiny_data: str, tmp_path) -> None:
    """Issue 8: a CPC checkpoint goes through the same probe as CLMR (context features, mean-pooled)."""
    ckpt = str(tmp_path / "ckpt-00000007.pt")
    _fake_checkpoint(ckpt, preset="cpc_tiny")
    opts = evaluate.EvalOptions(data=[tiny_data], out=str(tmp_path / "eval"), checkpoint=ckpt, baselines=["random"],
                                max_epochs=60, patience=10, calib_crops=64, progress=False)
    res = evaluate.run_evaluation(opts)
    rows = {(r["encoder"], r["task"]): r for r in res["rows"]}
    assert set(rows) == {(e, t) for e in ("pretrained", "random init") for t in ("toy/pitch", "toy/tags")}
    # four notes an octave and more apart: CPC's context features separate them far above chance (0.25)
    assert rows[("pretrained", "toy/pitch")]["test"]["accuracy"] > 0.4, rows[("pretrained", "toy/pitch")]
    assert rows[("pretrained", "toy/pitch")]["test"]["n"] == 24
    assert 0.0 <= rows[("pretrained", "toy/tags")]["test"]["roc_auc"] <= 1.0


def test_probe_logs_table_scalars_and_plots_to_wandb_offline(tiny_data: str, tmp_path, monkeypatch) -> None:
    """The results reach W&B: an offline run holds the scalar per (task, encoder) and the plots."""
    import glob

    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    os.makedirs(tmp_path / "wb")
    opts = evaluate.EvalOptions(data=[tiny_data], out=str(tmp_path / "eval"), baselines=["logmel"], max_epochs=30,
                                patience=5, progress=False, wandb_mode="offline")
    res = evaluate.run_evaluation(opts)
    acc = {(r["encoder"], r["task"]): r for r in res["rows"]}[("log-mel", "toy/pitch")]["test"]["accuracy"]
    assert acc >= 0.9
    runs = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, runs
    # wandb-core writes the offline file from its own process and may still be flushing when
    # finish() returns (seen on a loaded 2-core box): wait for the records, up to a minute.
    blob = b""
    for _ in range(600):
        blob = open(runs[0], "rb").read()
        if b"confusion-toy__pitch-log-mel.png" in blob:
            break
        time.sleep(0.1)
    assert b"toy/pitch/log-mel/frac1/accuracy" in blob
    assert b"confusion-toy__pitch-log-mel.png" in blob
    assert glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "files" / "media" / "images" / "confusion-toy__pitch*.png"))
