"""Metrics agree with scikit-learn; the label-fraction subset is stable and class-balanced; the
probe learns a separable task and early-stops on valid."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from eval_tools import metrics
from eval_tools.probe import ProbeConfig, Task, score, train_probe
from eval_tools.subset import label_fraction_subset


def _tagging_data(seed: int, n: int = 200, k: int = 7, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < rng.uniform(0.05, 0.5, k)).astype(np.float32)
    s = y * rng.uniform(0.0, 1.0, k) + rng.normal(0.0, 0.6, (n, k))
    if ties:
        s = np.round(s, 1)  # many tied scores exercise the tie rules
    return y, s


@pytest.mark.parametrize("ties", [False, True])
def test_macro_auc_and_ap_match_sklearn(ties: bool) -> None:
    y, s = _tagging_data(0, ties=ties)
    assert metrics.macro_roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s, average="macro"), abs=1e-12)
    assert metrics.macro_pr_auc(y, s) == pytest.approx(skm.average_precision_score(y, s, average="macro"), abs=1e-12)
    aucs, aps = metrics.per_tag_scores(y, s)
    for k in range(y.shape[1]):
        assert aucs[k] == pytest.approx(skm.roc_auc_score(y[:, k], s[:, k]), abs=1e-12)
        assert aps[k] == pytest.approx(skm.average_precision_score(y[:, k], s[:, k]), abs=1e-12)


def test_known_values_and_degenerate_tags() -> None:
    # perfect ranking, reversed ranking, and a tag with no positive (left out of the macro mean)
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=float)
    s = np.array([[0.9, 0.9, 0.1], [0.8, 0.1, 0.2], [0.1, 0.2, 0.3], [0.0, 0.95, 0.4]])
    aucs, aps = metrics.per_tag_scores(y, s)
    assert aucs[0] == 1.0 and aps[0] == 1.0
    assert aucs[1] == pytest.approx(skm.roc_auc_score(y[:, 1], s[:, 1]))
    assert np.isnan(aucs[2]) and np.isnan(aps[2])
    assert metrics.macro_roc_auc(y, s) == pytest.approx((1.0 + aucs[1]) / 2)


def test_accuracy_and_confusion_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    t = rng.integers(0, 5, 300)
    p = np.where(rng.random(300) < 0.6, t, rng.integers(0, 5, 300))
    assert metrics.accuracy(t, p) == pytest.approx(skm.accuracy_score(t, p))
    np.testing.assert_array_equal(metrics.confusion_matrix(t, p, 5), skm.confusion_matrix(t, p, labels=range(5)))


def test_class_subset_is_stable_balanced_and_nested() -> None:
    rng = np.random.default_rng(2)
    counts = [500, 200, 50, 7, 1]
    labels = np.concatenate([np.full(c, i) for i, c in enumerate(counts)] + [np.full(13, -1)])
    keys = [f"clip-{i:05d}" for i in range(len(labels))]
    perm = rng.permutation(len(labels))
    sub10 = label_fraction_subset(keys, labels, 0.1, kind="class", seed=3)
    # balanced: ceil(10 %) of every class, at least one, never a missing label
    got = np.bincount(labels[sub10], minlength=5)
    assert got.tolist() == [50, 20, 5, 1, 1]
    # stable: shuffling the rows selects the same keys
    sub10_shuf = label_fraction_subset([keys[i] for i in perm], labels[perm], 0.1, kind="class", seed=3)
    assert sorted(keys[perm[i]] for i in sub10_shuf) == sorted(keys[i] for i in sub10)
    # nested: 1 % within 10 % within 100 %; a different seed picks different rows
    sub1 = label_fraction_subset(keys, labels, 0.01, kind="class", seed=3)
    sub100 = label_fraction_subset(keys, labels, 1.0, kind="class", seed=3)
    assert set(sub1) <= set(sub10) <= set(sub100)
    assert len(sub100) == sum(counts)
    assert set(label_fraction_subset(keys, labels, 0.1, kind="class", seed=4)) != set(sub10)


def test_multi_hot_subset_covers_every_tag() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random((400, 6)) < np.array([0.5, 0.3, 0.1, 0.05, 0.01, 0.0])).astype(np.float32)
    keys = [f"k{i}" for i in range(400)]
    sub = label_fraction_subset(keys, y, 0.05, kind="multi_hot")
    assert len(sub) == 20
    pos = y[sub].sum(axis=0)
    present = y.sum(axis=0) > 0
    assert (pos[present] >= np.ceil(0.05 * y.sum(axis=0)[present])).all()
    assert (pos[present] >= 1).all()
    assert np.array_equal(sub, label_fraction_subset(keys, y, 0.05, kind="multi_hot"))
    with pytest.raises(ValueError, match="label-fraction"):
        label_fraction_subset(keys, y, 0.0, kind="multi_hot")


@pytest.mark.parametrize("probe", ["linear", "mlp"])
def test_probe_learns_and_early_stops(probe: str) -> None:
    rng = np.random.default_rng(6)
    centers = rng.normal(0, 3, (4, 16))
    def make(n):
        y = rng.integers(0, 4, n)
        return centers[y] + rng.normal(0, 1, (n, 16)), y
    (xtr, ytr), (xva, yva), (xte, yte) = make(300), make(100), make(200)
    task = Task(name="c", kind="class", names=list("abcd"))
    fit = train_probe(task, xtr, ytr, xva, yva, ProbeConfig(probe=probe, max_epochs=60, patience=5))
    res = score(task, yte, fit.probe.predict(xte, task.kind))
    assert res["accuracy"] > 0.95
    assert fit.epochs_run < 60  # stopped early on a saturated valid score
    assert fit.history[fit.best_epoch - 1] == max(fit.history)


def test_multi_hot_probe_beats_chance() -> None:
    rng = np.random.default_rng(7)
    w = rng.normal(0, 1, (12, 5))
    x = rng.normal(0, 1, (500, 12))
    y = ((x @ w + rng.normal(0, 0.5, (500, 5))) > 0.8).astype(np.float32)
    task = Task(name="tags", kind="multi_hot", names=[f"t{i}" for i in range(5)])
    fit = train_probe(task, x[:300], y[:300], x[300:400], y[300:400], ProbeConfig(max_epochs=300, patience=20))
    res = score(task, y[400:], fit.probe.predict(x[400:], task.kind))
    assert res["roc_auc"] > 0.9 and res["pr_auc"] > 0.6


def test_metrics_benchmark_quick_runs() -> None:
    import json
    import subprocess
    import sys

    root = __file__.rsplit("/tests/", 1)[0]
    out = subprocess.run([sys.executable, "benchmarks/eval_metrics.py", "--quick"], cwd=root, capture_output=True, text=True, check=True)
    last = json.loads(out.stdout.strip().splitlines()[-1])
    assert last["clips"] == 300 and last["ratios"]["numpy_metrics_vs_sklearn"] > 0
