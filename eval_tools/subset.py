"""``--label-fraction``: a stable, class-balanced subset of the training labels.

Stable: every sample gets a rank from a hash of (seed, key), so the subset depends only on the keys,
their labels and the seed, never on shard order or on which machine runs it. For single-label
(``class``) tasks each class keeps ``ceil(fraction * n_class)`` samples (at least one) taken in
rank order, so a smaller fraction's subset is contained in a larger one's (1 % within 10 % within
100 %), as a label-efficiency curve needs. For multi-label (``multi_hot``) tasks tags are served
rarest first: each tag gets samples carrying it, in rank order, until the subset holds
``ceil(fraction * n_tag)`` of its positives; the subset is then topped up in rank order to
``ceil(fraction * N)`` samples.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


def stable_rank(keys: list[str], seed: int = 0) -> np.ndarray:
    """A per-key pseudo-random float in [0, 1) that depends only on (seed, key)."""
    out = np.empty(len(keys), dtype=np.float64)
    for i, k in enumerate(keys):
        h = hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "big") / 2.0**64
    return out


def label_fraction_subset(keys: list[str], labels: np.ndarray, fraction: float, *, kind: str, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of the subset of ``keys`` to train on.

    ``labels``: ``(N,)`` int class indices (``-1`` = missing, never selected) for ``kind="class"``,
    or ``(N, K)`` 0/1 for ``kind="multi_hot"``.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--label-fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if len(keys) != len(labels):
        raise ValueError(f"{len(keys)} keys but {len(labels)} labels")
    if len(set(keys)) != len(keys):
        raise ValueError("keys must be unique (they seed the stable subset)")
    rank = stable_rank(keys, seed)
    if kind == "class":
        chosen: list[int] = []
        for c in np.unique(labels[labels >= 0]):
            idx = np.flatnonzero(labels == c)
            idx = idx[np.argsort(rank[idx], kind="stable")]
            chosen.extend(idx[: max(1, math.ceil(fraction * len(idx)))].tolist())
        return np.array(sorted(chosen), dtype=np.int64)
    if kind == "multi_hot":
        if labels.ndim != 2:
            raise ValueError(f"multi_hot labels must be (N, K), got shape {labels.shape}")
        pos = labels > 0.5
        n = len(keys)
        taken = np.zeros(n, dtype=bool)
        order = np.argsort(rank, kind="stable")
        counts = pos.sum(axis=0)
        for k in np.argsort(counts, kind="stable"):
            if counts[k] == 0:
                continue
            quota = max(1, math.ceil(fraction * counts[k]))
            have = int((taken & pos[:, k]).sum())
            for i in order:
                if have >= quota:
                    break
                if pos[i, k] and not taken[i]:
                    taken[i] = True
                    have += 1
        missing = max(1, math.ceil(fraction * n)) - int(taken.sum())
        for i in order:
            if missing <= 0:
                break
            if not taken[i]:
                taken[i] = True
                missing -= 1
        return np.flatnonzero(taken).astype(np.int64)
    raise ValueError(f"unknown label kind {kind!r}; expected 'class' or 'multi_hot'")
