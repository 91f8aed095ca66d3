"""Each rule of the named protocols (eval_tools/protocols.py), checked by behaviour:

clmr (Spijkervet/CLMR linear_evaluation.py @ 423414d): one random crop per training clip, the
checkpoint's BatchNorm statistics, raw features, Adam 1e-3 wd 1e-6, batch 48, ReduceLROnPlateau and
early stopping on the valid loss, last-epoch weights, test = mean of per-crop sigmoid outputs over
the clip's crops with the last chunk dropped. marble (MARBLE-Benchmark @ d9300e3): raw features,
MLP 512 / ReLU / dropout 0.2, a softmax layer mix over layers 1.., best checkpoint on the valid
metric, the learning rate chosen on valid from its grid.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import evaluate
from eval_tools import protocols
from eval_tools.data import Embeddings
from eval_tools.extract import View
from eval_tools.probe import Probe, ProbeConfig, Task, clip_probabilities, score, train_probe
from eval_tools.runner import probe_task
from tests import evaldata

pytestmark = pytest.mark.usefixtures("one_thread")
TAGS = Task(name="tags", kind="multi_hot", names=["a", "b"])
CLASSES = Task(name="c", kind="class", names=list("abcd"))


def _blobs(rng, n, d=8, k=4, spread=1.0):
    centers = np.random.default_rng(99).normal(0, 3, (k, d))
    y = rng.integers(0, k, n)
    return (centers[y] + rng.normal(0, spread, (n, d))).astype(np.float32), y


# --- clmr --------------------------------------------------------------------------------------


def test_clmr_test_score_averages_per_crop_sigmoid_outputs_not_embeddings() -> None:
    cfg = protocols.PROTOCOLS["clmr"].probe
    probe = Probe(dim=1, n_out=1, cfg=cfg, mean=np.zeros(1), std=np.ones(1))
    with torch.no_grad():
        probe.net.weight.fill_(1.0)
        probe.net.bias.zero_()
    x = np.array([[4.0], [-1.0], [2.0]], dtype=np.float32)  # clip 0: crops 0 and 1; clip 1: crop 2
    owner = np.array([0, 0, 1])
    got = clip_probabilities(probe, x, "multi_hot", owner, 2)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    assert got[0, 0] == pytest.approx((sig(4.0) + sig(-1.0)) / 2, rel=1e-6)  # 0.625
    assert got[0, 0] != pytest.approx(sig(1.5), rel=1e-2)  # the output of the mean embedding: 0.818
    assert got[1, 0] == pytest.approx(sig(2.0), rel=1e-6)


def test_probe_task_scores_crops_per_clip() -> None:
    """With test crops (owner), probe_task's test score is that of the clip-averaged crop outputs."""
    rng = np.random.default_rng(0)
    xtr, ytr = _blobs(rng, 96)
    xva, yva = _blobs(rng, 48)
    xte_clip, yte = _blobs(rng, 20, spread=2.5)
    owner = np.repeat(np.arange(20), 3)
    xte = xte_clip[owner] + rng.normal(0, 1.5, (60, 8)).astype(np.float32)
    mk = lambda x, y, o=None: Embeddings(keys=[f"k{i}" for i in range(len(y))], x=x, labels={"c": y}, owner=o)  # noqa: E731
    cfg = dataclasses.replace(protocols.PROTOCOLS["clmr"].probe, max_epochs=30)
    row = probe_task(CLASSES, mk(xtr, ytr), mk(xva, yva), mk(xte, yte, owner), cfg)
    fit = train_probe(CLASSES, xtr, ytr, xva, yva, cfg)  # the same seeded fit
    assert row["test"] == score(CLASSES, yte, clip_probabilities(fit.probe, xte, "class", owner, 20))
    assert row["test"]["n"] == 20


def test_clmr_probe_is_adam_1e3_wd_1e6_batch_48_on_raw_features(monkeypatch) -> None:
    seen = []
    real = torch.optim.Adam

    class Spy(real):
        def __init__(self, params, **kw):
            super().__init__(params, **kw)
            seen.append({"lr": kw["lr"], "weight_decay": kw["weight_decay"], "steps": 0})

        def step(self, *a, **k):
            seen[-1]["steps"] += 1
            return super().step(*a, **k)

    monkeypatch.setattr(torch.optim, "Adam", Spy)
    rng = np.random.default_rng(1)
    xtr, ytr = _blobs(rng, 100)
    xtr = xtr * 50 + 7  # far from standardised: a standardising probe would hide it
    xva, yva = _blobs(rng, 40)
    cfg = dataclasses.replace(protocols.PROTOCOLS["clmr"].probe, max_epochs=2, patience=5)
    fit = train_probe(CLASSES, xtr, ytr, xva * 50 + 7, yva, cfg)
    assert seen == [{"lr": 1e-3, "weight_decay": 1e-6, "steps": 2 * 3}]  # ceil(100 / 48) = 3 batches an epoch
    assert torch.equal(fit.probe.mean, torch.zeros(8)) and torch.equal(fit.probe.std, torch.ones(8))
    assert isinstance(fit.probe.net, torch.nn.Linear)
    mlp = Probe(dim=8, n_out=4, cfg=dataclasses.replace(cfg, probe="mlp"), mean=np.zeros(8), std=np.ones(8))
    assert [type(m).__name__ for m in mlp.net] == ["Linear", "ReLU", "Linear"] and mlp.net[0].out_features == 8


def test_clmr_plateau_and_early_stopping_follow_the_valid_loss_and_keep_the_last_epoch() -> None:
    """Valid labels unrelated to the features: the valid loss is best early and then rises, so the
    lr drops x0.1 after 5 bad epochs, training stops 10 epochs after the best loss, and the weights
    kept are the last epoch's (CLMR tests what trainer.fit leaves)."""
    rng = np.random.default_rng(2)
    xtr, ytr = _blobs(rng, 200)
    xva, _ = _blobs(rng, 80)
    yva = rng.integers(0, 4, 80)
    cfg = dataclasses.replace(protocols.PROTOCOLS["clmr"].probe, max_epochs=200)
    fit = train_probe(CLASSES, xtr, ytr, xva, yva, cfg)
    assert fit.epochs_run == fit.best_epoch + 10 < 200
    assert fit.final_lr == pytest.approx(1e-4)  # one reduction: the 6th bad epoch; the next would be the 12th
    with torch.no_grad():
        logits = fit.probe(torch.from_numpy(xva))
    last_loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(yva)))
    assert fit.valid["loss"] == pytest.approx(last_loss, rel=1e-5)  # the last epoch's weights


def test_clmr_views_random_crop_per_training_clip_and_crops_with_last_chunk_dropped() -> None:
    n = 100
    clip = np.arange(450, dtype=np.float32)
    v = View(kind="random_crop", crop=n, seed=3)
    (seg,) = v.segments("key-a", clip)
    assert len(seg) == n and np.array_equal(seg, clip[int(seg[0]) : int(seg[0]) + n])
    assert np.array_equal(v.segments("key-a", clip)[0], seg)  # seeded by (seed, key): any rank, any run
    starts = {int(View(kind="random_crop", crop=n, seed=s).segments("key-a", clip)[0][0]) for s in range(20)}
    assert len(starts) > 10 and max(starts) <= 350  # uniform over [0, len - n]
    assert v.segments("short", clip[:99]) == []  # shorter than a crop: left out (ContrastiveDataset skips it)
    crops = View(kind="crops", crop=n)
    assert [c[0] for c in crops.segments("k", clip)] == [0, 100, 200, 300]  # 450 -> 5 chunks, the partial last dropped
    assert [c[0] for c in crops.segments("k", clip[:400])] == [0, 100, 200]  # 4 full chunks: the last dropped too
    (one,) = crops.segments("k", clip[:60])  # the original has no crop here; we keep one, zero-padded
    assert len(one) == n and one[59] == 59 and one[60:].sum() == 0


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    return evaldata.write_toy(str(tmp_path_factory.mktemp("protodata") / "toy"), sizes=(24, 12, 12))


def _checkpoint(path: str, preset: str) -> None:
    import train_config

    cfg = train_config.preset(preset)
    _, model_cls = train_config.model_classes(cfg.arch)
    torch.manual_seed(5)
    model = model_cls(cfg.model)
    for m in model.modules():  # statistics a recalibration would overwrite
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.fill_(0.05)
            m.running_var.fill_(2.0)
    torch.save({"format": "musicssl-ckpt/1", "step": 7, "epoch": 0, "model_name": cfg.arch, "model": model.state_dict(),
                "config": train_config.to_dict(cfg), "wandb_run_id": None}, path)


def test_clmr_protocol_end_to_end_keeps_checkpoint_batchnorm(toy, tmp_path) -> None:
    ckpt = str(tmp_path / "ckpt-00000007.pt")
    _checkpoint(ckpt, "clmr_tiny")
    res = evaluate.run_evaluation(evaluate.EvalOptions(
        data=[toy], out=str(tmp_path / "e"), checkpoint=ckpt, baselines=[], protocol="clmr", max_epochs=30, progress=False))
    assert res["protocol"]["name"] == "clmr" and "423414d" in res["protocol"]["source"]
    assert "bn_recalibrated_on" not in res["encoders"]["pretrained"]
    rows = {r["task"]: r for r in res["rows"]}
    assert rows["toy/pitch"]["protocol"] == "clmr" and rows["toy/pitch"]["test"]["n"] == 12
    assert rows["toy/pitch"]["n_train"] == 24  # 7200-sample clips, 2187-sample crops: none left out
    # the cached test features are the checkpoint's own (running statistics 0.05 / 2.0), crop by crop
    import glob

    from eval_tools.data import Dataset
    from eval_tools.encoders import encoder_from_checkpoint
    from eval_tools.extract import extract

    (cached,) = glob.glob(str(tmp_path / "e" / "cache" / "*" / "toy-test-*-crops2187.npz"))
    got = Embeddings.load(cached)
    want = extract(encoder_from_checkpoint(ckpt, sample_rate=16000), Dataset.from_dir(toy), "test",
                   view=View(kind="crops", crop=2187), progress=False)
    assert got.x.shape == (36, 64) and np.array_equal(got.owner, np.repeat(np.arange(12), 3))  # 7200 samples: 3 crops
    assert np.allclose(got.x, want.x, atol=1e-6)
    with pytest.raises(ValueError, match="--protocol clmr probes one feature vector"):
        evaluate.EvalOptions(data=[toy], protocol="clmr", layer="all", baselines=[])


# --- marble ------------------------------------------------------------------------------------


def test_marble_probe_is_mlp_512_relu_dropout_on_raw_features() -> None:
    cfg = protocols.PROTOCOLS["marble"].probe
    p = Probe(dim=16, n_out=4, cfg=cfg, mean=np.zeros(16), std=np.ones(16))
    assert [type(m).__name__ for m in p.net] == ["Linear", "ReLU", "Dropout", "Linear"]
    assert p.net[0].out_features == 512 and p.net[2].p == 0.2
    assert not cfg.standardize and cfg.weight_decay == 0.0 and cfg.batch_size == 64 and cfg.restore_best


def test_marble_learning_rate_is_chosen_on_valid_from_its_grid() -> None:
    rng = np.random.default_rng(4)
    xtr, ytr = _blobs(rng, 64, spread=2.0)
    xva, yva = _blobs(rng, 48, spread=2.0)
    xte, yte = _blobs(rng, 48, spread=2.0)
    mk = lambda x, y: Embeddings(keys=[f"k{i}" for i in range(len(y))], x=x, labels={"c": y})  # noqa: E731
    proto = protocols.PROTOCOLS["marble"]
    cfg, lrs = protocols.configure(proto, max_epochs=15)
    assert lrs == (1e-2, 5e-3, 1e-3, 5e-4, 1e-4)
    row = probe_task(CLASSES, mk(xtr, ytr), mk(xva, yva), mk(xte, yte), cfg, lrs=lrs, per_layer=False)
    cands = row["lr_candidates"]
    assert [c["lr"] for c in cands] == list(lrs)
    best = max(cands, key=lambda c: c["valid"]["accuracy"])  # first of equals, as the grid is listed
    assert row["lr"] == best["lr"] and row["valid"] == best["valid"]
    assert len({c["valid"]["loss"] for c in cands}) == 5  # five different fits
    # --lr fixes one
    assert protocols.configure(proto, lr=3e-4)[1] == (3e-4,)


def test_marble_layer_mix_is_a_softmax_over_layers_after_the_first() -> None:
    """--layer all under marble: one probe over a learned softmax mix of layers 1..L; layer 0 (the
    transformer input) takes no part, so scrambling it changes nothing."""
    rng = np.random.default_rng(5)
    base_tr, ytr = _blobs(rng, 64)
    base_va, yva = _blobs(rng, 32)
    base_te, yte = _blobs(rng, 32)
    layered = lambda b: np.stack([rng.normal(0, 5, b.shape), b, b + rng.normal(0, 0.5, b.shape)], 1).astype(np.float32)  # noqa: E731
    tr, va, te = layered(base_tr), layered(base_va), layered(base_te)
    mk = lambda x, y: Embeddings(keys=[f"k{i}" for i in range(len(y))], x=x, labels={"c": y})  # noqa: E731
    cfg = dataclasses.replace(protocols.PROTOCOLS["marble"].probe, max_epochs=10)
    row = probe_task(CLASSES, mk(tr, ytr), mk(va, yva), mk(te, yte), cfg, lrs=(1e-3,), per_layer=False)
    assert "layer" not in row and row["test"]["accuracy"] > 0.8
    scrambled = [x.copy() for x in (tr, va, te)]
    for x in scrambled:
        x[:, 0] = rng.normal(0, 50, x[:, 0].shape)
    row2 = probe_task(CLASSES, mk(scrambled[0], ytr), mk(scrambled[1], yva), mk(scrambled[2], yte), cfg, lrs=(1e-3,),
                      per_layer=False)
    assert row2["test"] == row["test"] and row2["valid"] == row["valid"]
    fit = train_probe(CLASSES, tr[:, 1:], ytr, va[:, 1:], yva, dataclasses.replace(cfg, layer_mix=True))
    assert tuple(fit.probe.mix.shape) == (1, 2, 1)


def test_marble_keeps_the_best_valid_epoch() -> None:
    rng = np.random.default_rng(6)
    xtr, ytr = _blobs(rng, 200)
    xva, _ = _blobs(rng, 60)
    yva = rng.integers(0, 4, 60)  # noise: the best valid epoch is not the last
    cfg = dataclasses.replace(protocols.PROTOCOLS["marble"].probe, max_epochs=60)
    fit = train_probe(CLASSES, xtr, ytr, xva, yva, cfg)
    assert fit.valid["accuracy"] == max(fit.history) and fit.epochs_run == fit.best_epoch + 10


def test_marble_protocol_end_to_end_wav2vec2_all_layers(toy, tmp_path) -> None:
    res = evaluate.run_evaluation(evaluate.EvalOptions(
        data=[toy], out=str(tmp_path / "m"), preset="wav2vec2_tiny", baselines=["random"], tasks=["pitch"],
        protocol="marble", layer="all", max_epochs=8, progress=False))
    (row,) = res["rows"]
    assert row["protocol"] == "marble" and row["lr"] in protocols.MARBLE_LRS and len(row["lr_candidates"]) == 5
    assert "layer" not in row and row["dim"] == 64 and row["test"]["n"] == 12
    assert "bn_recalibrated_on" not in res["encoders"]["random init"]
