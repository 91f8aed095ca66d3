"""What runs in each loader worker: one slot's samples as whole batches, a chain of stages.

:meth:`WorkerStream._epoch` is the chain, in the order a sample flows (webdataset's
``DataPipeline(*stages)``; each stage a generator over the one before)::

    plan.slot_items    shards -> split by rank -> split by worker   (identities only, no I/O)
    read_tar           tar bytes of each sample, in tar order        (ShardReader)
    shuffle_buffer     bounded shuffle                               (pipeline.plan)
    islice             resume: past the samples already emitted
    decode_and_crop    decode -> crop; a bad sample is counted and replaced
    batches            batch (decoded straight into the batch buffer where it can be)

The stream runs in a DataLoader worker, or in the caller's process with ``num_workers=0``.
"""

from __future__ import annotations

import itertools
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import IO, TYPE_CHECKING

import numpy as np
import torch

from pipeline import fsio
from pipeline import plan as P
from pipeline.cache import ShardCache
from pipeline.batch import BatchRows, batch_tensor, collate
from pipeline.decode import BadSample, Cropper, Example, KeyedDraws, Transform
from pipeline.plan import EpochPlan, Ident
from pipeline.shards import (
    BadDataError,
    LabelEncoder,
    RawSample,
    ShardMismatchError,
    ShardReadError,
    ShardUnavailableError,
    TarCursor,
)

if TYPE_CHECKING:
    from pipeline.loader import LoaderConfig
    from pipeline.workers import Ring

Payload = RawSample | BadSample | None  # None: a sample the resume skips unread


class ShardReader:
    """Reads samples by identity, keeping one open tar per manifest (the read-tar stage's state).

    A shard that breaks (truncated or malformed tar, or a size that is not its manifest entry's)
    is remembered: its later samples are bad without another read. A shard that cannot be read at
    all raises :class:`ShardUnavailableError`: that is an outage or a lost file, not bad data, so
    it stops the stream instead of being skipped."""

    def __init__(self, plan: EpochPlan, cfg: LoaderConfig, stats: Counter, broken: dict[str, tuple[int, str, str]],
                 cache: ShardCache | None = None):
        self.plan, self.cfg, self.stats, self.broken, self.cache = plan, cfg, stats, broken, cache
        self._open: dict[int, tuple[int, TarCursor]] = {}  # manifest -> (shard, cursor)
        self._next: dict[int, int] = {}  # manifest -> the member after the last one read

    def read(self, ident: Ident) -> RawSample | BadSample:
        m, shard, member = ident
        url = self.plan.urls[m][shard]
        first_bad, kind, why = self.broken.get(url, (1 << 62, "", ""))
        if member >= first_bad:
            return BadSample(kind, why or f"{url}: sample {member} lies past the truncation point")
        cur = self._open.get(m)
        if cur is None or cur[0] != shard or self._next[m] > member:
            self._close(m)
            cursor = TarCursor(url, expected_bytes=self.plan.shard_bytes[m][shard], timeout_s=self.cfg.io_timeout_s,
                               retries=self.cfg.io_retries, opener=self._cached(m, shard))
            cur = self._open[m] = (shard, cursor)
        self._next[m] = member + 1
        try:
            return cur[1].get(member)
        except ShardMismatchError as exc:  # not the shard its manifest entry describes: nothing of it is used
            return self._broke(m, url, 0, exc.kind, str(exc))
        except ShardReadError as exc:
            return self._broke(m, url, member, "truncated", "", str(exc))
        except ShardUnavailableError:
            self._close(m)
            raise
        except Exception as exc:  # noqa: BLE001 - missing, access denied, retries used up: the stream stops
            self._close(m)
            raise ShardUnavailableError(
                f"{url} cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); restore the shard "
                "or the store's access, then resume (train.py: --resume auto); `shard-tools verify` checks every shard"
            ) from exc

    def _cached(self, m: int, shard: int) -> Callable[[], IO] | None:
        """How to open the shard from the node's cache (None: read the URL itself)."""
        url = self.plan.urls[m][shard]
        if self.cache is None or fsio.is_local(url):
            return None
        return self.cache.opener(url, self.plan.shard_sha256[m][shard], self.plan.shard_bytes[m][shard])

    def _broke(self, m: int, url: str, first: int, kind: str, why: str, message: str | None = None) -> BadSample:
        first = min(first, self.broken.get(url, (1 << 62,))[0])
        self.broken[url] = (first, kind, why)
        self.stats[f"{kind}_shards"] += 1
        self._close(m)
        return BadSample(kind, message or why)

    def read_alone(self, ident: Ident) -> RawSample | BadSample:
        """One sample through its own cursor (a substitute), leaving the stream's cursors in place."""
        other = ShardReader(self.plan, self.cfg, self.stats, self.broken, self.cache)
        try:
            return other.read(ident)
        finally:
            other.close()

    def _close(self, m: int) -> None:
        cur = self._open.pop(m, None)
        if cur is not None:
            cur[1].close()

    def close(self) -> None:
        for m in list(self._open):
            self._close(m)


def read_tar(items: list[Ident], reader: ShardReader, skip: set[int]) -> Iterator[tuple[int, Payload]]:
    """``(index, raw sample)`` for each item in tar order; the indices in ``skip`` are not read."""
    for i, ident in enumerate(items):
        yield i, None if i in skip else reader.read(ident)


class WorkerStream(torch.utils.data.IterableDataset):
    """One logical worker's batches, from rank step ``start_step`` on, forever (whole batches)."""

    def __init__(self, cfg: LoaderConfig, plan: EpochPlan, spec: dict, *, rank: int, start_step: int,
                 transform: Transform | None, ring: Ring | None = None):
        super().__init__()
        self.cfg, self.plan, self.spec, self.rank, self.start_step = cfg, plan, spec, rank, start_step
        self.transform, self.ring = transform, ring

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        W = self.plan.workers
        # DataLoader asks its workers round-robin from worker 0; the rank step start_step must come
        # from logical worker start_step % W, so DataLoader worker i plays logical worker (i + start) % W
        w = ((info.id if info is not None else 0) + self.start_step) % W
        _, epoch, done = self.plan.position(self.start_step + (w - self.start_step) % W)
        self._w = w
        self._cropper = Cropper(self.cfg, LabelEncoder(self.spec), self.transform)
        # variable-length batches change shape from batch to batch: fresh buffers, no recycled slots
        self._slots = self.ring.worker(w) if self.ring is not None and not self.cfg.variable_length else None
        self._alloc = self._slots.alloc if self._slots is not None else batch_tensor
        self._stats: Counter = Counter()
        self._broken: dict[str, tuple[int, str, str]] = {}  # shard url -> (first bad member, kind, why)
        self._cache = self._shard_cache()
        try:
            while True:
                if self.plan.batches(w, epoch) > done:
                    yield from self._epoch(epoch, done)
                epoch, done = epoch + 1, 0
        except (ShardUnavailableError, BadDataError) as exc:
            if info is None:
                raise
            # a DataLoader would re-raise it in the caller wrapped in the worker's traceback text;
            # sent as a value, the caller raises it with its one-line message at this worker's turn
            yield {"_error": str(exc), "_error_type": type(exc).__name__, "_pos": [w, -1, -1]}

    def _shard_cache(self) -> ShardCache | None:
        cfg = self.cfg
        if cfg.cache_dir is None:
            return None
        return ShardCache(fsio.local_path(cfg.cache_dir), int(cfg.cache_limit_gb * 2**30), timeout_s=cfg.io_timeout_s,
                          retries=cfg.io_retries, stats=self._stats)

    def _epoch(self, epoch: int, done: int) -> Iterator[dict]:
        """The chain of stages for this worker's slot in ``epoch``, from its batch ``done`` on."""
        cfg, B, w = self.cfg, self.cfg.batch_size, self._w
        order_rng = lambda: P.seeded_rng(cfg.seed, epoch, self.rank, w, P.BUFFER)  # noqa: E731 - same draws twice
        items = self.plan.slot_items(epoch, self.rank, w)
        size = self.plan.shuffle_capacity
        emitted = P.emitted_first(len(items), done * B, size, order_rng()) if done else set()
        reader = ShardReader(self.plan, self.cfg, self._stats, self._broken, self._cache)
        try:
            samples = read_tar(items, reader, skip=emitted)
            samples = P.shuffle_buffer(samples, size, order_rng())
            samples = itertools.islice(samples, done * B, None)
            rows = self._rows()
            examples = self._decode_and_crop(samples, items, reader, epoch, first=done * B, rows=rows)
            yield from self._batches(examples, epoch, first=done, rows=rows)
        finally:
            reader.close()

    def _rows(self) -> BatchRows | None:
        """Fixed-length mono crops without a CPU transform decode straight into the batch buffer."""
        cfg = self.cfg
        if not cfg.mono or cfg.variable_length or self.transform is not None:
            return None
        return BatchRows((cfg.batch_size, cfg.views, 1, cfg.crop_samples), self._alloc)

    def _decode_and_crop(self, samples: Iterable[tuple[int, Payload]], items: list[Ident], reader: ShardReader,
                         epoch: int, *, first: int, rows: BatchRows | None) -> Iterator[Example]:
        for p, (idx, payload) in enumerate(samples, start=first):
            dest = rows.row(p) if rows is not None else None
            yield self._example(epoch, p, items, idx, payload, reader, dest)

    def _example(self, epoch: int, p: int, items: list[Ident], idx: int, payload: Payload, reader: ShardReader,
                 dest: np.ndarray | None) -> Example:
        """The example at stream position p: the emitted sample, or a substitute if it is bad."""
        cfg = self.cfg
        key = (cfg.seed, epoch, self.rank, self._w, p)
        sub_rng = None
        for attempt in range(4 * len(items) + 16):
            ident = items[idx]
            try:
                if isinstance(payload, BadSample):
                    raise payload
                assert isinstance(payload, RawSample)
                ex = self._cropper(payload, self.plan.urls[ident[0]][ident[1]], KeyedDraws(*key, attempt, P.CROP),
                                   lambda: P.seeded_rng(*key, attempt, P.TRANSFORM), dest)  # noqa: B023 - called at once
                if attempt:
                    self._stats["substituted"] += 1
                return ex
            except BadSample as bad:
                self._count(bad)
            sub_rng = sub_rng or P.seeded_rng(*key, P.SUBST)
            idx = int(sub_rng.integers(len(items)))
            payload = reader.read_alone(items[idx])
        urls = sorted({self.plan.urls[m][s] for m, s, _ in items})
        raise BadDataError(f"no usable sample found in {len(items)} samples of shards {urls[:5]}...; "
                           "check them with `shard-tools verify`")

    def _count(self, bad: BadSample) -> None:
        """The bad-sample policy: count it; raise (data.on_error='raise') or warn and go on."""
        self._stats[f"skipped_{bad.kind}"] += 1
        if bad.kind == "short":  # too short for the crop is a property of the data, not damage
            return
        if self.cfg.on_error == "raise":
            raise BadDataError(f"{bad} (data.on_error='raise'; set it to 'skip' to skip and count bad samples)") from bad
        warnings.warn(f"[musicssl] skipping bad sample: {bad}", stacklevel=2)

    def _batches(self, examples: Iterator[Example], epoch: int, *, first: int, rows: BatchRows | None) -> Iterator[dict]:
        cfg, B = self.cfg, self.cfg.batch_size
        for b in itertools.count(first):
            group = list(itertools.islice(examples, B))
            if not group:
                return
            batch, padded = collate(group, cfg, self.spec, rows.take() if rows is not None else None, self._alloc)
            if self._slots is not None:
                self._slots.ship(batch)
            self._stats["examples"] += B
            self._stats["padded"] += padded
            batch["_pos"] = [self._w, epoch, b]
            batch["_stats"] = dict(self._stats)
            yield batch
