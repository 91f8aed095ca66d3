"""The epoch plan: which sample identities each (rank, worker) slot gets, in which order; no I/O.

Every function here is a pure function of its arguments (seed, epoch, rank, worker, sizes), which
is what makes the stream deterministic and an exact resume cheap: the order can be recomputed on
sample *identities* ``(manifest, shard, member)`` without reading a byte. The design is in
``pipeline/loader.py``'s docstring, steps 1-3; the shuffle buffer (step 4) is here too because
its draws, like the plan's, never depend on the data.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import numpy as np

from pipeline.manifest import Manifest

T = TypeVar("T")
Ident = tuple[int, int, int]  # (manifest, shard, member)

# RNG stream tags: each random decision has its own SeedSequence branch, so adding one never shifts another
MIX, SHARDS, BUFFER, SUBST, CROP, TRANSFORM = 1, 2, 3, 4, 5, 6


def seeded_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def count_below(n: int, w: int, W: int) -> int:
    """How many g in [0, n) have g % W == w."""
    return max(0, (n - w + W - 1) // W)


class EpochPlan:
    """Epoch size, per-worker batch counts and each slot's sample identities (steps 1-3)."""

    def __init__(self, manifests: list[Manifest], weights: list[float] | None, *, batch_size: int, world_size: int,
                 workers: int, seed: int, shuffle_capacity: int = 1):
        self.urls = [[s.url for s in m.shards] for m in manifests]
        # what the reader checks each shard against
        self.shard_bytes = [[s.bytes for s in m.shards] for m in manifests]
        self.shard_sha256 = [[s.sha256 for s in m.shards] for m in manifests]
        self.shard_sizes = [np.array([s.num_samples for s in m.shards], dtype=np.int64) for m in manifests]
        self.per_epoch = _per_manifest([m.num_samples for m in manifests], weights)
        self.total = sum(self.per_epoch)
        self.batch_size, self.world_size, self.workers, self.seed = batch_size, world_size, workers, seed
        self.shuffle_capacity = shuffle_capacity  # samples each worker's shuffle buffer holds (step 4)
        self.steps_per_epoch = self.total // (world_size * batch_size)
        if self.steps_per_epoch == 0:
            where = ", ".join(m.url for m in manifests)
            raise ValueError(
                f"{where}: {self.total} samples per epoch is less than one global batch "
                f"(world_size {world_size} x batch_size {batch_size}); lower the per-rank batch_size "
                "(train.py: --train.global_batch_size) or add data"
            )

    def batches(self, w: int, epoch: int) -> int:
        """Batches logical worker ``w`` yields in ``epoch`` (same for every rank)."""
        s, W = self.steps_per_epoch, self.workers
        return count_below((epoch + 1) * s, w, W) - count_below(epoch * s, w, W)

    def position(self, step: int) -> tuple[int, int, int]:
        """Where rank step ``step`` is served: ``(worker, epoch, batches that worker already gave
        this epoch)``. Rank steps go to workers round-robin (step g from worker g % W)."""
        S, W = self.steps_per_epoch, self.workers
        w, epoch = step % W, step // S
        return w, epoch, count_below(step, w, W) - count_below(epoch * S, w, W)

    def slot_items(self, epoch: int, rank: int, w: int) -> list[Ident]:
        """Sample identities ``(manifest, shard, member)`` of slot (rank, w) in tar-reading order."""
        B = self.batch_size
        q = self.batches(w, epoch) * B
        start = rank * self.steps_per_epoch * B + sum(self.batches(v, epoch) for v in range(w)) * B
        M = len(self.per_epoch)
        if M == 1:
            mids = np.zeros(q, dtype=np.int64)
            before = np.array([start], dtype=np.int64)
        else:
            order = seeded_rng(self.seed, epoch, MIX).permutation(np.repeat(np.arange(M), self.per_epoch))
            before = np.bincount(order[:start], minlength=M)
            mids = order[start : start + q]
        per_manifest = {}
        for m in range(M):
            n = int((mids == m).sum())
            if n:
                per_manifest[m] = iter(self._positions(m, epoch, int(before[m]), n))
        return [next(per_manifest[int(m)]) for m in mids]

    def _positions(self, m: int, epoch: int, lo: int, n: int) -> list[Ident]:
        """Identities at positions [lo, lo + n) of manifest m's epoch sequence (shuffled shards, repeated
        with a fresh shard order when the weights ask for more than the manifest holds)."""
        sizes = self.shard_sizes[m]
        count = int(sizes.sum())
        pos = np.arange(lo, lo + n)
        out: list[Ident] = []
        for cycle in np.unique(pos // count):
            within = pos[pos // count == cycle] % count
            perm = seeded_rng(self.seed, epoch, SHARDS, m, int(cycle)).permutation(len(sizes))
            ends = np.cumsum(sizes[perm])
            k = np.searchsorted(ends, within, side="right")
            member = within - (ends[k] - sizes[perm][k])
            out += [(m, int(s), int(i)) for s, i in zip(perm[k], member)]
        return out


def sample_bytes(manifests: list[Manifest]) -> int:
    """The largest mean size of a raw sample (its tar members) over all shards: what one sample in
    a shuffle buffer is taken to cost. Known from the manifests alone, so the buffer's capacity,
    and with it the sample order, never depends on what was read."""
    return max(-(-s.bytes // s.num_samples) for m in manifests for s in m.shards if s.num_samples)


def shuffle_capacity(manifests: list[Manifest], budget_mb: float, cap: int | None) -> int:
    """Samples a worker's shuffle buffer holds: as many as ``budget_mb`` MiB of raw samples take
    (at :func:`sample_bytes` each), at most ``cap``, at least 1."""
    n = int(budget_mb * 2**20) // sample_bytes(manifests)
    return max(1, min(n, cap) if cap is not None else n)


def _per_manifest(counts: list[int], weights: list[float] | None) -> list[int]:
    """Samples each manifest contributes to an epoch: its count, or the total split by weight."""
    if weights is None:
        return list(counts)
    total, wsum = sum(counts), float(sum(weights))
    exact = [total * w / wsum for w in weights]
    per = [int(x) for x in exact]
    # largest remainders get the leftover samples, so the epoch size stays the total count
    for i in sorted(range(len(per)), key=lambda i: per[i] - exact[i])[: total - sum(per)]:
        per[i] += 1
    return per


def shuffle_buffer(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """A bounded shuffle buffer of ``size`` items. The draws do not depend on the items, so the
    same ``rng`` state run over placeholders replays the same order (see :func:`emitted_first`).

    An item is pulled from ``items`` when it enters the buffer: pulling is what reads a sample's
    bytes, so the buffer holds at most ``size`` raw samples."""
    buf: list[T] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        out, buf[j] = buf[j], item
        yield out
    for j in rng.permutation(len(buf)):
        yield buf[j]


def emitted_first(n: int, k: int, size: int, rng: np.random.Generator) -> set[int]:
    """Indices of the first ``k`` of ``n`` items a :func:`shuffle_buffer` of ``size`` emits (the
    resume replay: no bytes read, nothing decoded)."""
    order = shuffle_buffer(range(n), size, rng)
    return {next(order) for _ in range(k)}
