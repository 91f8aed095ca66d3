"""Tagging metrics: eval_tools.metrics (numpy) vs scikit-learn, same inputs, same process.

    .venv/bin/python benchmarks/eval_metrics.py            # MTAT-sized: 5,329 test clips x 50 tags
    .venv/bin/python benchmarks/eval_metrics.py --quick    # tiny sizes (the test runs this)

Times macro ROC-AUC + macro PR-AUC (what a probe's valid loop computes every epoch) and checks that
both agree to 1e-9. The last line printed is one JSON object; ``ratios`` > 1 means ours is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

# run as a script from a checkout: the repository root holds eval_tools
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: 300 clips x 10 tags, best of 2 (overrides the sizes below)")
    p.add_argument("--clips", type=int, default=5329, help="rows (default 5329: MTAT's test split)")
    p.add_argument("--tags", type=int, default=50, help="tag columns (default 50, the MTAT top-50)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each; the best counts (default 5)")
    a = p.parse_args()
    n, k, repeats = (300, 10, 2) if a.quick else (a.clips, a.tags, a.repeats)
    from sklearn.metrics import average_precision_score, roc_auc_score

    from eval_tools import metrics

    rng = np.random.default_rng(0)
    y = (rng.random((n, k)) < rng.uniform(0.02, 0.3, k)).astype(np.float32)
    y[0] = 1  # every tag has a positive
    y[1] = 0  # and a negative
    s = np.round(y * 0.5 + rng.random((n, k)), 3)  # rounded: ties, as sigmoid outputs have

    def ours():
        return metrics.macro_roc_auc(y, s), metrics.macro_pr_auc(y, s)

    def sk():
        return roc_auc_score(y, s, average="macro"), average_precision_score(y, s, average="macro")

    a_ours, a_sk = ours(), sk()
    assert abs(a_ours[0] - a_sk[0]) < 1e-9 and abs(a_ours[1] - a_sk[1]) < 1e-9, (a_ours, a_sk)
    t_ours, t_sk = _best_of(ours, repeats), _best_of(sk, repeats)
    print(f"{n} clips x {k} tags, best of {repeats}: ours {1e3 * t_ours:.1f} ms, scikit-learn {1e3 * t_sk:.1f} ms "
          f"(ROC-AUC {a_ours[0]:.4f}, PR-AUC {a_ours[1]:.4f}, equal to 1e-9)")
    print(json.dumps({"clips": n, "tags": k, "ours_ms": round(1e3 * t_ours, 2), "sklearn_ms": round(1e3 * t_sk, 2),
                      "ratios": {"numpy_metrics_vs_sklearn": round(t_sk / t_ours, 3)}}))


if __name__ == "__main__":
    main()
