"""``--probe logreg``: L2-penalised logistic regression fitted by full-batch L-BFGS, the penalty
chosen on valid (eval_tools/probe.py ``_fit_logreg``). Checked against scikit-learn's
LogisticRegression (the ``bench`` extra) at the same penalty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eval_tools import protocols
from eval_tools.probe import L2_GRID, ProbeConfig, Task, score, train_probe
from pipeline.errors import UserError

sklearn_linear = pytest.importorskip("sklearn.linear_model")


def _blobs(rng: np.random.Generator, n: int, centers: np.ndarray, noise: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, len(centers), n)
    return (centers[y] + rng.normal(0, noise, (n, centers.shape[1]))).astype(np.float32), y


def _standardised(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (x - ref.mean(axis=0)) / (ref.std(axis=0) + 1e-6)  # what the probe applies before its linear layer


def test_logreg_is_sklearns_multinomial_logistic_regression_at_the_same_penalty() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (5, 12))
    (xtr, ytr), (xva, yva) = _blobs(rng, 240, centers), _blobs(rng, 80, centers)
    task = Task(name="c", kind="class", names=list("abcde"))
    l2 = 0.02
    fit = train_probe(task, xtr, ytr, xva, yva, ProbeConfig(probe="logreg", l2_grid=(l2,), max_iter=2000, tol=1e-9))
    ref = sklearn_linear.LogisticRegression(C=1.0 / (l2 * len(xtr)), tol=1e-10, max_iter=10000)
    ref.fit(_standardised(xtr, xtr).astype(np.float64), ytr)
    ours = fit.probe.predict(xva, task.kind)
    theirs = ref.predict_proba(_standardised(xva, xtr).astype(np.float64))
    assert np.abs(ours - theirs).max() < 2e-3
    # sklearn's multinomial weights are defined up to a per-feature shift shared by the classes
    w = fit.probe.net.weight.detach().numpy()
    assert np.abs((w - w.mean(0)) - (ref.coef_ - ref.coef_.mean(0))).max() < 5e-3
    assert fit.l2 == l2 and [c["l2"] for c in fit.l2_candidates] == [l2]


def test_multi_hot_logreg_is_one_binary_logistic_regression_per_tag() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (300, 8)).astype(np.float32)
    w = rng.normal(0, 1, (8, 3))
    y = ((x @ w + rng.normal(0, 1.0, (300, 3))) > 0.5).astype(np.float32)
    task = Task(name="tags", kind="multi_hot", names=["t0", "t1", "t2"])
    l2 = 0.05
    fit = train_probe(task, x[:200], y[:200], x[200:], y[200:], ProbeConfig(probe="logreg", l2_grid=(l2,), max_iter=2000, tol=1e-9))
    ours = fit.probe.predict(x[200:], task.kind)
    xs_tr, xs_va = _standardised(x[:200], x[:200]).astype(np.float64), _standardised(x[200:], x[:200]).astype(np.float64)
    for j in range(3):
        ref = sklearn_linear.LogisticRegression(C=1.0 / (l2 * 200), tol=1e-10, max_iter=10000).fit(xs_tr, y[:200, j])
        assert np.abs(ours[:, j] - ref.predict_proba(xs_va)[:, 1]).max() < 2e-3


def test_logreg_keeps_the_penalty_best_on_valid() -> None:
    rng = np.random.default_rng(2)
    centers = np.concatenate([rng.normal(0, 1.2, (3, 6)), np.zeros((3, 200))], axis=1)
    (xtr, ytr), (xva, yva), (xte, yte) = (_blobs(rng, n, centers, noise=1.0) for n in (60, 300, 600))
    task = Task(name="c", kind="class", names=list("abc"))
    fit = train_probe(task, xtr, ytr, xva, yva, ProbeConfig(probe="logreg"))
    assert [c["l2"] for c in fit.l2_candidates] == sorted(L2_GRID, reverse=True)
    best = max(fit.l2_candidates, key=lambda c: (c["valid"]["accuracy"], -c["valid"]["loss"]))
    assert fit.l2 == best["l2"] and fit.valid == best["valid"]
    assert score(task, yte, fit.probe.predict(xte, task.kind))["accuracy"] > 0.45  # chance 1/3
    # a penalty that dominates the loss leaves the bias alone: the train split's class frequencies
    flat = train_probe(task, xtr, ytr, xva, yva, ProbeConfig(probe="logreg", l2_grid=(1e4,)))
    prior = np.bincount(ytr, minlength=3) / len(ytr)
    assert np.abs(flat.probe.predict(xte, task.kind) - prior).max() < 0.01


def test_logreg_does_not_depend_on_the_seed() -> None:
    rng = np.random.default_rng(3)
    centers = rng.normal(0, 1, (4, 10))
    (xtr, ytr), (xva, yva) = _blobs(rng, 120, centers), _blobs(rng, 60, centers)
    task = Task(name="c", kind="class", names=list("abcd"))
    a = train_probe(task, xtr, ytr, xva, yva, ProbeConfig(probe="logreg", seed=0))
    b = train_probe(task, xtr, ytr, xva, yva, ProbeConfig(probe="logreg", seed=7))
    assert a.l2 == b.l2
    assert torch.equal(a.probe.net.weight, b.probe.net.weight) and torch.equal(a.probe.net.bias, b.probe.net.bias)


def test_logreg_refuses_a_learned_layer_mix() -> None:
    with pytest.raises(UserError, match="--probe logreg"):
        protocols.configure(protocols.get("marble"), probe="logreg")
    with pytest.raises(ValueError, match="l2_grid"):
        ProbeConfig(probe="logreg", l2_grid=(0.0,))


def test_probe_cli_with_logreg_reports_the_penalty_and_saves_a_head_predict_reuses(tmp_path, capsys) -> None:
    import json
    import os

    import evaluate
    from eval_tools.data import Dataset
    from eval_tools.extract import extract
    from eval_tools.heads import load_model
    from tests import evaldata

    toy = evaldata.write_toy(str(tmp_path / "toy"))
    out = str(tmp_path / "e")
    assert evaluate.main(["probe", "--data", toy, "--baselines", "logmel", "--probe", "logreg", "--save-models", "--out", out,
                          "--no-progress", "--wandb-mode", "disabled"]) == 0
    rows = {r["task"]: r for r in json.load(open(os.path.join(out, "results.json")))["rows"]}
    for task in ("toy/pitch", "toy/tags"):
        assert rows[task]["l2"] in L2_GRID and len(rows[task]["l2_candidates"]) == len(L2_GRID)
    assert rows["toy/pitch"]["test"]["accuracy"] >= 0.9  # log-mel statistics separate the four notes
    assert rows["toy/tags"]["test"]["roc_auc"] >= 0.9
    model = load_model(os.path.join(out, "models", "toy-log-mel"))
    emb = extract(model.encoder, Dataset.from_dir(toy), "test", progress=False)
    head = {h.task.name: h for h in model.heads}["pitch"]
    assert float((head.probe.predict(emb.x, "class").argmax(1) == emb.labels["pitch"]).mean()) == pytest.approx(
        rows["toy/pitch"]["test"]["accuracy"])
    assert evaluate.main(["probe", "--data", toy, "--baselines", "logmel", "--probe", "logreg", "--protocol", "marble",
                          "--out", out, "--no-progress", "--wandb-mode", "disabled"]) == 2
    assert "--probe logreg" in capsys.readouterr().err


def test_probe_benchmark_quick_runs() -> None:
    import json
    import subprocess
    import sys

    root = __file__.rsplit("/tests/", 1)[0]
    out = subprocess.run([sys.executable, "benchmarks/probe.py", "--quick"], cwd=root, capture_output=True, text=True, check=True)
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["rows"] == 300 and last["ratios"]["logreg_vs_sklearn"] > 0
    assert last["max_prob_diff"] < 0.01  # the same model as scikit-learn's at the penalty kept


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_logreg_fit_matches_the_cpu_fit(monkeypatch) -> None:
    import eval_tools.probe as probe_mod

    rng = np.random.default_rng(4)
    centers = rng.normal(0, 1, (10, 64))
    (xtr, ytr), (xva, yva) = _blobs(rng, 2000, centers, noise=3.0), _blobs(rng, 500, centers, noise=3.0)
    task = Task(name="c", kind="class", names=[str(i) for i in range(10)])
    cfg = ProbeConfig(probe="logreg", l2_grid=(0.01,), max_iter=1000, tol=1e-7)
    monkeypatch.setattr(probe_mod, "LOGREG_CUDA_VALUES", 0)
    gpu = train_probe(task, xtr, ytr, xva, yva, cfg)
    assert gpu.probe.net.weight.device.type == "cpu"  # handed back on the CPU, like every probe
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = train_probe(task, xtr, ytr, xva, yva, cfg)
    assert np.abs(gpu.probe.predict(xva, "class") - cpu.probe.predict(xva, "class")).max() < 1e-3
