"""The ``--probe logreg`` fit (eval_tools/probe.py: full-batch L-BFGS over a path of L2 penalties,
warm-started, the best on valid kept) against scikit-learn's LogisticRegression (lbfgs) fitting the
same penalties on the same standardised features, with ``warm_start`` along the same path.

    .venv/bin/python benchmarks/probe.py                  # 5000 x 512 features, 50 classes (NSynth-size head)
    .venv/bin/python benchmarks/probe.py --rows 20000 --dim 768 --classes 128
    .venv/bin/python benchmarks/probe.py --quick          # tiny sizes (CI keeps it from rotting)

Both run on one CPU thread (the probe pins torch to one; BLAS is pinned to one here before numpy
loads), after one untimed warm-up fit each (a process's first torch optimizer step pays seconds of
one-off imports), both stop at scikit-learn's defaults (100 iterations per penalty, tolerance 1e-4). The
features are Gaussian class clusters (``--noise`` sets the overlap). Reported: seconds for the whole
path (median of ``--rounds``), the valid accuracy each chose, and the largest difference between the
two models' valid probabilities at the penalty ours kept.

The last line printed is one JSON object; ``ratios``: ``logreg_vs_sklearn`` (sklearn seconds over
ours, above 1 = ours faster).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402


def make_data(rows: int, dim: int, classes: int, noise: float, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (classes, dim)).astype(np.float32)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, classes, n)
        return centers[y] + rng.normal(0, noise, (n, dim)).astype(np.float32), y

    return {"train": split(rows), "valid": split(max(classes, rows // 4))}


def ours(data: dict, grid: tuple[float, ...]):
    from eval_tools.probe import ProbeConfig, Task, train_probe

    (x, y), (xv, yv) = data["train"], data["valid"]
    task = Task(name="c", kind="class", names=[str(i) for i in range(int(y.max()) + 1)])
    t0 = time.perf_counter()
    fit = train_probe(task, x, y, xv, yv, ProbeConfig(probe="logreg", l2_grid=grid))
    return time.perf_counter() - t0, fit, fit.probe.predict(xv, "class")


def sklearn_path(data: dict, grid: tuple[float, ...]):
    from sklearn.linear_model import LogisticRegression

    (x, y), (xv, yv) = data["train"], data["valid"]
    mean, std = x.mean(0), x.std(0) + 1e-6
    xs, xvs = (x - mean) / std, (xv - mean) / std
    t0 = time.perf_counter()
    model = LogisticRegression(max_iter=100, tol=1e-4, warm_start=True)
    best = None
    for l2 in sorted(grid, reverse=True):  # our penalty on the mean loss is sklearn's C = 1 / (l2 * n)
        model.set_params(C=1.0 / (l2 * len(x)))
        model.fit(xs, y)
        acc = float((model.predict(xvs) == yv).mean())
        if best is None or acc > best[0]:
            best = (acc, l2)
    seconds = time.perf_counter() - t0
    return seconds, best, lambda l2: model.set_params(C=1.0 / (l2 * len(x)), warm_start=False).fit(xs, y).predict_proba(xvs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=5000, help="training rows (valid: a quarter as many)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--noise", type=float, default=8.0, help="cluster spread (class centres are N(0, 1))")
    p.add_argument("--penalties", type=int, default=9, help="the first N penalties of the probe's grid, largest first")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round")
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.dim, a.classes, a.rounds, a.penalties = 300, 32, 5, 1, 3
    from eval_tools.probe import L2_GRID

    grid = tuple(sorted(L2_GRID, reverse=True)[: a.penalties])
    data = make_data(a.rows, a.dim, a.classes, a.noise)
    warm = make_data(60, 8, 3, a.noise, seed=1)  # the first optimizer step in a process pays torch's one-off imports
    ours(warm, grid[:1])
    sklearn_path(warm, grid[:1])
    times_o, times_s = [], []
    for _ in range(a.rounds):  # interleaved rounds
        t, fit, probs = ours(data, grid)
        times_o.append(t)
        t, best_s, refit = sklearn_path(data, grid)
        times_s.append(t)
    yv = data["valid"][1]
    acc_o = float((probs.argmax(1) == yv).mean())
    diff = float(np.abs(probs - refit(fit.l2)).max())
    so, ss = statistics.median(times_o), statistics.median(times_s)
    print(f"logreg probe ({a.rows} x {a.dim}, {a.classes} classes, {len(grid)} penalties): ours {so:.2f} s "
          f"(valid acc {acc_o:.3f}, l2 {fit.l2}), sklearn {ss:.2f} s (valid acc {best_s[0]:.3f}, l2 {best_s[1]}); "
          f"max |p_ours - p_sklearn| at our l2: {diff:.4f}")
    print(json.dumps({"bench": "probe_logreg", "rows": a.rows, "dim": a.dim, "classes": a.classes, "penalties": list(grid),
                      "ours_s": round(so, 3), "sklearn_s": round(ss, 3), "ours_valid_acc": acc_o, "sklearn_valid_acc": best_s[0],
                      "ours_l2": fit.l2, "sklearn_l2": best_s[1], "max_prob_diff": diff,
                      "ratios": {"logreg_vs_sklearn": ss / so}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
