"""The streaming loader: shards (docs/architecture.md §1) -> batches of raw crops (§2).

Single process::

    cfg = LoaderConfig(manifests=["shards/train.manifest.json"], batch_size=48, crop_samples=59049)
    loader = StreamingLoader(cfg)
    for step, batch in zip(range(1000), loader):   # infinite stream
        batch["audio"]                            # (48, 2, 1, 59049) float32

Under torchrun every rank builds its own loader with ``rank=RANK, world_size=WORLD_SIZE``.

The loader's parts, one job a module: ``plan.py`` (steps 1-3 below, and the shuffle buffer),
``stream.py`` (what a worker runs: the chain of stages of step 4, and step 5), ``decode.py``
(decode -> crop one sample), ``batch.py`` (examples -> a batch), ``workers.py`` (the worker
processes and their shared-memory batches), ``samples.py`` (the finite ordered pass for
evaluation, :func:`iter_samples`) and this file (the configuration and the public stream).

How an epoch is cut (the design, in order; every step is a pure function of its arguments):

1. **Epoch size.** Each manifest contributes its sample count (or, with ``weights``, the total
   count split by weight; a manifest asked for more than it holds repeats itself in a new shard
   order). ``steps_per_epoch = total // (world_size * batch_size)``, the same on every rank.
2. **Global sequence.** Per epoch the shard order of each manifest is shuffled (seed, epoch) and
   the manifests are interleaved at random in proportion to their counts: one sequence of sample
   identities ``(manifest, shard, member)``; no data is read to build it.
3. **Slots.** Rank ``r`` has ``W = max(1, num_workers)`` logical workers. Rank steps go to workers
   round-robin (step ``g`` comes from worker ``g % W``), so worker ``w`` owes ``k_w(e)`` batches in
   epoch ``e``. Slot ``(r, w)`` takes the next ``k_w(e) * batch_size`` samples of the global
   sequence, a contiguous range, so the split is at the *sample* level: any number of workers and
   ranks works, even more than there are shards, and a shard is read by at most a few slots. The
   ``total - steps_per_epoch * world_size * batch_size`` samples at the end (fewer than one global
   batch) sit out this epoch; the shard shuffle makes that a different set each epoch.
4. **Worker stream.** A worker reads its range in tar order (bytes only, no decoding), pushes the
   raw samples through a shuffle buffer sized in bytes (``shuffle_buffer_mb`` of compressed
   samples, at the largest per-shard mean sample size of the manifests, so its capacity is known
   without reading; ``shuffle_buffer`` caps it in samples), decodes only the crop it needs
   (soundfile seeks inside the FLAC), applies ``transform`` and builds whole batches.
5. **Bad samples.** A corrupt, unreadable or (``short_policy="skip"``) too short sample is counted
   and replaced by a substitute: another sample of the same slot's range, picked by a seeded draw
   from (seed, epoch, rank, worker, position). So every position of the stream is filled, batch
   counts never change, and the stream after position ``p`` does not depend on what was bad before
   it. ``on_error="raise"`` raises instead.

Shards are compared with their manifest entries (at start, and their size whenever one is opened);
a shard that cannot be read at all raises :class:`ShardUnavailableError` at the step that needed
it. Memory: what the loader holds per rank is printed at start and refused beyond what the machine
has (``pipeline/memory.py``); remote shards may be cached on a local disk (``cache_dir``,
``pipeline/cache.py``).

Resume: the loader's position is just the rank step ``g`` (plus counters). On restore each worker
recomputes how many of its samples were emitted, replays the shuffle buffer on sample *identities*
(no bytes, no decoding) and skips reading those samples; the batches that follow equal an
uninterrupted run's. Exact resume needs the same seed, manifests, batch size, shuffle capacity,
world size and worker count; ``load_state_dict(state, strict=False)`` accepts a different world size or worker count and
continues at the start of the next epoch. The state holds no rank-specific position, so rank 0's
checkpoint restores every rank.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from pipeline import fsio, memory, workers
from pipeline.batch import finish
from pipeline.decode import Transform
from pipeline.manifest import load_manifest
from pipeline.plan import EpochPlan, sample_bytes, shuffle_capacity
from pipeline.samples import iter_samples
from pipeline.shards import BadDataError, ShardUnavailableError, check_shards, merge_label_specs
from pipeline.stream import WorkerStream

STATE_FORMAT = "musicssl-loader/1"
_ERRORS = {e.__name__: e for e in (ShardUnavailableError, BadDataError)}  # what a worker may send instead of a batch
STAT_KEYS = ("examples", "skipped_corrupt", "skipped_short", "skipped_truncated", "skipped_mismatched", "truncated_shards",
             "mismatched_shards", "substituted", "padded", "cache_fetched", "cache_corrupt")


@dataclass(kw_only=True)
class LoaderConfig:
    """Configuration of :class:`StreamingLoader` (see the module docstring for the semantics)."""

    manifests: list[str]  # manifest URLs (local, file://, s3://, gs://)
    weights: list[float] | None = None  # mixing weights per manifest; None = each contributes its count
    batch_size: int  # per rank
    mode: str = "pairs"  # "pairs": 2 independent crops (CLMR); "single": 1 crop (wav2vec2, CPC)
    crop_samples: int  # crop length; in single mode with variable_length=True the maximum length
    variable_length: bool = False  # single mode: clips shorter than crop_samples are taken whole
    pad_to: str = "shortest"  # variable_length batches: "shortest" (crop all to the shortest) | "longest" (pad, lengths)
    short_policy: str = "pad"  # clips shorter than a crop: "pad" (zeros, lengths<T) or "skip" (counted, substituted)
    sample_rate: int | None = None  # resample on the fly if a sample differs; None = take as is
    mono: bool = True
    shuffle_buffer_mb: float = 128.0  # MiB of raw (compressed) samples each worker's shuffle buffer holds
    shuffle_buffer: int | None = None  # at most this many samples too (None: the MiB budget alone)
    num_workers: int = 2
    prefetch_factor: int = 2  # batches each worker keeps ready
    seed: int = 0
    pin_memory: bool = False
    on_error: str = "skip"  # "skip" (warn + count + substitute) or "raise"
    check_shards: bool = True  # at start: every shard exists with its manifest size (one LIST per bucket folder)
    io_timeout_s: float = 60.0  # the longest one remote open/read may take before it is retried
    io_retries: int = 3  # reopen attempts per shard read after a transient error or a timeout
    cache_dir: str | None = None  # a node-local folder: remote shards are fetched there once, verified (pipeline/cache.py)
    cache_limit_gb: float = 100.0  # the most the cache holds; least recently used shards are evicted

    def __post_init__(self) -> None:
        if isinstance(self.manifests, str):
            self.manifests = [self.manifests]
        if not self.manifests:
            raise ValueError("data.manifests is empty: give at least one <split>.manifest.json URL")
        if self.weights is not None:
            if len(self.weights) != len(self.manifests):
                raise ValueError(f"data.weights has {len(self.weights)} entries for {len(self.manifests)} manifests; give one per manifest")
            if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise ValueError(f"data.weights must be >= 0 with a positive sum, got {self.weights}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.mode not in ("pairs", "single"):
            raise ValueError(f"data.mode must be 'pairs' or 'single', got {self.mode!r}")
        if self.crop_samples < 1:
            raise ValueError(f"data.crop_samples must be >= 1, got {self.crop_samples}")
        if self.variable_length and self.mode != "single":
            raise ValueError("data.variable_length=True needs data.mode='single' (CLMR pairs use fixed crops)")
        if self.pad_to not in ("shortest", "longest"):
            raise ValueError(f"data.pad_to must be 'shortest' or 'longest', got {self.pad_to!r}")
        if self.short_policy not in ("pad", "skip"):
            raise ValueError(f"data.short_policy must be 'pad' or 'skip', got {self.short_policy!r}")
        if self.sample_rate is not None and self.sample_rate < 1:
            raise ValueError(f"data.sample_rate must be a positive rate or None, got {self.sample_rate}")
        if not self.shuffle_buffer_mb > 0:
            raise ValueError(f"data.shuffle_buffer_mb must be > 0, got {self.shuffle_buffer_mb}")
        if self.shuffle_buffer is not None and self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1 (1 = no shuffling) or None, got {self.shuffle_buffer}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"data.on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if not self.io_timeout_s > 0:
            raise ValueError(f"data.io_timeout_s must be > 0 seconds, got {self.io_timeout_s}")
        if self.io_retries < 0:
            raise ValueError(f"data.io_retries must be >= 0, got {self.io_retries}")
        if not self.cache_limit_gb > 0:
            raise ValueError(f"data.cache_limit_gb must be > 0, got {self.cache_limit_gb}")
        if self.cache_dir is not None and not fsio.is_local(self.cache_dir):
            raise ValueError(f"data.cache_dir must be a local folder (node-local disk), got {self.cache_dir!r}")

    @property
    def views(self) -> int:
        return 2 if self.mode == "pairs" else 1


# ------------------------------------------------------------------------------------------------
# The public loader


class StreamingLoader:
    """An infinite, rank- and worker-correct, resumable stream of batches (docs/architecture.md §2)."""

    def __init__(self, config: LoaderConfig, *, rank: int = 0, world_size: int = 1, transform: Transform | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size (torchrun's RANK, WORLD_SIZE)")
        self.config, self.rank, self.world_size, self.transform = config, rank, world_size, transform
        self.manifests = [load_manifest(u) for u in config.manifests]
        if config.check_shards:
            self._check_shards()
        self.label_specs = merge_label_specs(self.manifests)
        self._plan = EpochPlan(self.manifests, config.weights, batch_size=config.batch_size, world_size=world_size,
                               workers=max(1, config.num_workers), seed=config.seed,
                               shuffle_capacity=shuffle_capacity(self.manifests, config.shuffle_buffer_mb, config.shuffle_buffer))
        self.steps_per_epoch: int = self._plan.steps_per_epoch
        self._step = 0
        self._base_stats: Counter = Counter()
        self._live_stats: dict[int, dict] = {}
        self._stated = False  # the memory line is printed once

    def _check_shards(self) -> None:
        """Every shard listed exists with its manifest size, before a worker starts: a missing one
        is an error (it would stop the run later); a mismatched one too with on_error='raise', else
        a warning (its samples are then skipped and counted as they come)."""
        missing, mismatched = check_shards(self.manifests, timeout_s=self.config.io_timeout_s)
        if missing or (mismatched and self.config.on_error == "raise"):
            bad = missing or mismatched
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ShardUnavailableError(f"{bad[0]}{more}; restore it, or rebuild the split and its manifest; "
                                        f"`shard-tools verify {self.manifests[0].url}` checks every shard")
        for line in mismatched[:5]:
            warnings.warn(f"[musicssl] {line}; its samples will be skipped and counted (data.on_error='skip')", stacklevel=3)

    @property
    def samples_per_epoch(self) -> int:
        """Samples per epoch over all manifests (before the < 1 global batch that sits out)."""
        return self._plan.total

    @property
    def epoch(self) -> int:
        return self._step // self.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        cfg = self.config
        self._base_stats.update(self._live_totals())
        self._live_stats = {}
        W = self._plan.workers
        # pinning happens here, not in the DataLoader: a ring slot is copied once, straight into pinned memory
        pin = cfg.pin_memory and torch.cuda.is_available()
        ring = None
        prefetch = 0
        if cfg.num_workers:
            prefetch = workers.fit_prefetch(cfg.prefetch_factor, cfg.num_workers, self._batch_bytes(), workers.shm_free_bytes(),
                                            memory.local_ranks())
        line = memory.check(self.memory_budget(prefetch), local_ranks=memory.local_ranks(), available=memory.available_bytes())
        if self.rank == 0 and not self._stated:
            print(line, flush=True)
            self._stated = True
        if cfg.num_workers == 0:
            batches: Iterable[dict] = self._stream(None)
        else:
            ctx = torch.multiprocessing.get_context()
            # a worker has at most prefetch batches queued plus the one it is building
            ring = workers.Ring(W, prefetch + 2, ctx)
            batches = workers.start(self._stream(ring), num_workers=cfg.num_workers, prefetch=prefetch, ctx=ctx)
        for batch in batches:
            w, _epoch, _b = batch.pop("_pos")
            if w != self._step % W:
                raise RuntimeError(f"loader worker {w} delivered rank step {self._step}; expected worker {self._step % W}")
            if "_error" in batch:  # a shard that cannot be read, or bad data under on_error='raise': stop here
                workers.stop(batches)  # now, not whenever the caller lets go of the exception
                raise _ERRORS[batch["_error_type"]](batch["_error"])
            self._live_stats[int(w)] = batch.pop("_stats")
            slot = batch.pop("_slot", None)
            if slot is not None:
                batch["audio"] = ring.unpack(w, slot, pin)
            self._step += 1
            batch = finish(batch)
            yield _pin(batch) if pin else batch

    def _stream(self, ring: workers.Ring | None) -> WorkerStream:
        return WorkerStream(self.config, self._plan, self.label_specs, rank=self.rank, start_step=self._step,
                            transform=self.transform, ring=ring)

    def memory_budget(self, prefetch: int | None = None) -> memory.MemoryBudget:
        """The memory this rank's loader holds (docs in ``pipeline/memory.py``); ``prefetch``: the
        prefetch factor in use (default: the configured one)."""
        cfg = self.config
        prefetch = cfg.prefetch_factor if prefetch is None else prefetch
        return memory.MemoryBudget(
            buffers=max(1, cfg.num_workers), shuffle_samples=self._plan.shuffle_capacity,
            sample_bytes=sample_bytes(self.manifests), batch_bytes=self._batch_bytes(),
            shm_batches=cfg.num_workers * (prefetch + 2), pinned_batches=2 if cfg.pin_memory and torch.cuda.is_available() else 0,
        )

    def _batch_bytes(self) -> int:
        """Bytes of one batch's float32 audio."""
        cfg = self.config
        channels = 1 if cfg.mono else max((m.channels or 2) for m in self.manifests)
        return 4 * cfg.batch_size * cfg.views * channels * cfg.crop_samples

    def _live_totals(self) -> Counter:
        c: Counter = Counter()
        for s in self._live_stats.values():
            c.update(s)
        return c

    def stats(self) -> dict[str, int]:
        """This rank's counters since the stream began (restored with the state): ``STAT_KEYS``."""
        c = self._base_stats + self._live_totals()
        return {k: int(c.get(k, 0)) for k in STAT_KEYS}

    def state_dict(self, *, held: int = 0) -> dict:
        """The stream's position. ``held``: batches already yielded that the caller has not used (a
        prefetcher's look-ahead, the micro-batches of an unfinished optimizer step); the state is
        taken before them, so a loader restored from it yields them again."""
        step = self._step - held
        return {
            "format": STATE_FORMAT,
            "step": step,
            "epoch": step // self.steps_per_epoch,
            "seed": self.config.seed,
            "batch_size": self.config.batch_size,
            "world_size": self.world_size,
            "num_workers": self._plan.workers,
            "manifests": list(self.config.manifests),
            "weights": None if self.config.weights is None else [float(x) for x in self.config.weights],
            "shuffle_capacity": self._plan.shuffle_capacity,
            "stats": self.stats(),
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Restore the position; the next ``iter(loader)`` continues exactly where ``state`` was taken.

        With ``strict=False`` a state from a different world size or worker count is accepted and the
        stream continues at the start of the next epoch (an exact mid-epoch resume is impossible:
        the samples of an epoch are cut differently).
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"loader state has format {state.get('format')!r}, expected {STATE_FORMAT!r}")
        mine = self.state_dict()
        checks = (("seed", "data.seed"), ("batch_size", "batch size (train.py: --train.global_batch_size)"),
                  ("manifests", "data.manifests"), ("weights", "data.weights"),
                  ("shuffle_capacity", "data.shuffle_buffer_mb and data.shuffle_buffer"))
        for k, flag in checks:
            if k == "shuffle_capacity" and k not in state:  # a state written before the key existed
                continue
            if state.get(k) != mine[k]:
                raise ValueError(f"loader state has {k}={state.get(k)!r} but this loader {mine[k]!r}; resume with the same {flag}")
        self._base_stats = Counter({k: int(v) for k, v in (state.get("stats") or {}).items()})
        self._live_stats = {}
        layout_same = state["world_size"] == self.world_size and state["num_workers"] == self._plan.workers
        if layout_same:
            self._step = int(state["step"])
            return
        if strict:
            raise ValueError(
                f"loader state was saved with world_size={state['world_size']}, num_workers={state['num_workers']} "
                f"but this loader has world_size={self.world_size}, num_workers={self._plan.workers}; an exact "
                "resume needs the same layout; call load_state_dict(state, strict=False) to continue at the next epoch"
            )
        self._step = (int(state["epoch"]) + 1) * self.steps_per_epoch
        warnings.warn(f"[musicssl] loader layout changed; continuing at the start of epoch {state['epoch'] + 1}", stacklevel=2)


def _pin(batch: dict) -> dict:
    out = {k: (v if not isinstance(v, torch.Tensor) or v.is_pinned() else v.pin_memory()) for k, v in batch.items()}
    out["labels"] = {k: v.pin_memory() for k, v in batch["labels"].items()}
    return out


def _to_device(batch: dict, device: torch.device, non_blocking: bool) -> dict:
    out = {k: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if "labels" in batch:
        out["labels"] = {k: v.to(device, non_blocking=non_blocking) for k, v in batch["labels"].items()}
    return out


class DevicePrefetcher:
    """Moves batches to ``device`` one step ahead.

    On CUDA the next batch is copied non-blocking on a side stream while the current one is in use;
    the compute stream waits for the copy and the tensors are marked as used by it, so the caching
    allocator does not hand their memory out early. Non-CUDA devices get a plain ``.to(device)``
    (a pass-through on CPU).
    """

    def __init__(self, batches: Iterable[dict], device: torch.device | str):
        self.batches = batches
        self.device = torch.device(device)
        self._held = 0  # batches taken from ``batches`` and not yet yielded

    def state_dict(self, *, held: int = 0) -> dict:
        """The wrapped loader's state as of the batches this prefetcher has yielded."""
        return self.batches.state_dict(held=held + self._held)

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        self.batches.load_state_dict(state, strict=strict)

    def __iter__(self) -> Iterator[dict]:
        it = iter(self.batches)
        if self.device.type != "cuda":
            for b in it:
                yield b if self.device.type == "cpu" else _to_device(b, self.device, False)
            return
        side = torch.cuda.Stream(device=self.device)

        def load() -> dict | None:
            try:
                b = next(it)
            except StopIteration:
                return None
            self._held += 1
            with torch.cuda.stream(side):
                return _to_device(b, self.device, True)

        nxt = load()
        while nxt is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(side)
            cur = nxt
            for v in [*(t for t in cur.values() if isinstance(t, torch.Tensor)), *cur.get("labels", {}).values()]:
                v.record_stream(main)
            nxt = load()
            self._held -= 1
            yield cur


__all__ = ["LoaderConfig", "StreamingLoader", "DevicePrefetcher", "BadDataError", "ShardUnavailableError", "iter_samples",
           "STAT_KEYS"]
