"""The streaming loader: shards (docs/architecture.md §1) -> batches of raw crops (§2).

Single process::

    cfg = LoaderConfig(manifests=["shards/train.manifest.json"], batch_size=48, crop_samples=59049)
    loader = StreamingLoader(cfg)
    for step, batch in zip(range(1000), loader):   # infinite stream
        batch["audio"]                            # (48, 2, 1, 59049) float32

Under torchrun every rank builds its own loader with ``rank=RANK, world_size=WORLD_SIZE``.

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
   raw samples through a shuffle buffer of ``shuffle_buffer`` samples (bounded memory: the buffer
   holds compressed bytes), decodes only the crop it needs (soundfile seeks inside the FLAC),
   applies ``transform`` and builds whole batches.
5. **Bad samples.** A corrupt, unreadable or (``short_policy="skip"``) too short sample is counted
   and replaced by a substitute: another sample of the same slot's range, picked by a seeded draw
   from (seed, epoch, rank, worker, position). So every position of the stream is filled, batch
   counts never change, and the stream after position ``p`` does not depend on what was bad before
   it. ``on_error="raise"`` raises instead.

Resume: the loader's position is just the rank step ``g`` (plus counters). On restore each worker
recomputes how many of its samples were emitted, replays the shuffle buffer on sample *identities*
(no bytes, no decoding) and skips reading those samples; the batches that follow equal an
uninterrupted run's. Exact resume needs the same seed, manifests, batch size, world size and worker
count; ``load_state_dict(state, strict=False)`` accepts a different world size or worker count and
continues at the start of the next epoch. The state holds no rank-specific position, so rank 0's
checkpoint restores every rank.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import io
import json
import os
import signal
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch

from pipeline import audio as audio_io
from pipeline.shards import (
    LabelEncoder,
    Manifest,
    RawSample,
    ShardReadError,
    TarCursor,
    load_manifest,
    merge_label_specs,
)

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]
STATE_FORMAT = "musicssl-loader/1"
STAT_KEYS = ("examples", "skipped_corrupt", "skipped_short", "skipped_truncated", "truncated_shards", "substituted", "padded")

# RNG stream tags: each random decision has its own SeedSequence branch, so adding one never shifts another
_MIX, _SHARDS, _BUFFER, _SUBST, _CROP, _TRANSFORM = 1, 2, 3, 4, 5, 6


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
    shuffle_buffer: int = 1000  # samples (compressed bytes) held per worker
    num_workers: int = 2
    prefetch_factor: int = 2  # batches each worker keeps ready
    seed: int = 0
    pin_memory: bool = False
    on_error: str = "skip"  # "skip" (warn + count + substitute) or "raise"

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
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1 (1 = no shuffling), got {self.shuffle_buffer}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"data.on_error must be 'skip' or 'raise', got {self.on_error!r}")

    @property
    def views(self) -> int:
        return 2 if self.mode == "pairs" else 1


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


class _KeyedDraws:
    """Uniform integers drawn from a hash of ``(key, counter)``: the per-example random source for
    crop offsets. Building a seeded numpy Generator (SeedSequence hashing, PCG64 set-up) and drawing
    two offsets took 39 us, a few percent of a clip's whole cost; this takes 6 us (timeit). Each
    draw is ``low + (h * (high - low)) >> 64`` for a 64-bit BLAKE2b value ``h``: its bias is below
    ``(high - low) / 2**64``."""

    __slots__ = ("_key", "_n")

    def __init__(self, *key: int):
        self._key = ",".join(str(int(k)) for k in key).encode()
        self._n = 0

    def integers(self, low: int, high: int) -> int:
        if high <= low:
            raise ValueError(f"integers: empty range [{low}, {high})")
        h = hashlib.blake2b(self._key, digest_size=8, salt=self._n.to_bytes(16, "little")).digest()
        self._n += 1
        return low + ((int.from_bytes(h, "little") * (high - low)) >> 64)


def _count_below(n: int, w: int, W: int) -> int:
    """How many g in [0, n) have g % W == w."""
    return max(0, (n - w + W - 1) // W)


# ------------------------------------------------------------------------------------------------
# The epoch plan: which sample identities each (rank, worker) slot gets, with no I/O


class _Plan:
    def __init__(self, manifests: list[Manifest], weights: list[float] | None, *, batch_size: int, world_size: int, workers: int, seed: int):
        self.urls = [[s.url for s in m.shards] for m in manifests]
        self.shard_sizes = [np.array([s.num_samples for s in m.shards], dtype=np.int64) for m in manifests]
        counts = [m.num_samples for m in manifests]
        if weights is None:
            self.per_epoch = counts
        else:
            total, wsum = sum(counts), float(sum(weights))
            exact = [total * w / wsum for w in weights]
            per = [int(x) for x in exact]
            # largest remainders get the leftover samples, so the epoch size stays the total count
            for i in sorted(range(len(per)), key=lambda i: per[i] - exact[i])[: total - sum(per)]:
                per[i] += 1
            self.per_epoch = per
        self.total = sum(self.per_epoch)
        self.batch_size, self.world_size, self.workers, self.seed = batch_size, world_size, workers, seed
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
        return _count_below((epoch + 1) * s, w, W) - _count_below(epoch * s, w, W)

    def slot_items(self, epoch: int, rank: int, w: int) -> list[tuple[int, int, int]]:
        """Sample identities ``(manifest, shard, member)`` of slot (rank, w) in tar-reading order."""
        B = self.batch_size
        q = self.batches(w, epoch) * B
        start = rank * self.steps_per_epoch * B + sum(self.batches(v, epoch) for v in range(w)) * B
        M = len(self.per_epoch)
        if M == 1:
            mids = np.zeros(q, dtype=np.int64)
            before = np.array([start], dtype=np.int64)
        else:
            order = _rng(self.seed, epoch, _MIX).permutation(np.repeat(np.arange(M), self.per_epoch))
            before = np.bincount(order[:start], minlength=M)
            mids = order[start : start + q]
        per_manifest = {}
        for m in range(M):
            n = int((mids == m).sum())
            if n:
                per_manifest[m] = iter(self._positions(m, epoch, int(before[m]), n))
        return [next(per_manifest[int(m)]) for m in mids]

    def _positions(self, m: int, epoch: int, lo: int, n: int) -> list[tuple[int, int, int]]:
        """Identities at positions [lo, lo + n) of manifest m's epoch sequence (shuffled shards, repeated
        with a fresh shard order when the weights ask for more than the manifest holds)."""
        sizes = self.shard_sizes[m]
        count = int(sizes.sum())
        pos = np.arange(lo, lo + n)
        out: list[tuple[int, int, int]] = []
        for cycle in np.unique(pos // count):
            within = pos[pos // count == cycle] % count
            perm = _rng(self.seed, epoch, _SHARDS, m, int(cycle)).permutation(len(sizes))
            ends = np.cumsum(sizes[perm])
            k = np.searchsorted(ends, within, side="right")
            member = within - (ends[k] - sizes[perm][k])
            out += [(m, int(s), int(i)) for s, i in zip(perm[k], member)]
        return out


def _shuffled(n: int, size: int, rng: np.random.Generator, fetch: Callable[[int], object] | None) -> Iterator[tuple[int, object]]:
    """Bounded shuffle buffer over items ``0..n-1`` read in order; yields ``(index, payload)``.

    ``fetch(i)`` is called when item i enters the buffer (tar order). The random draws do not
    depend on the payloads, so running it with ``fetch=None`` replays the same order for free.
    """
    buf: list[tuple[int, object]] = []
    size = max(1, min(size, n))
    for i in range(n):
        item = (i, fetch(i) if fetch is not None else None)
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        out, buf[j] = buf[j], item
        yield out
    for j in rng.permutation(len(buf)):
        yield buf[j]


# ------------------------------------------------------------------------------------------------
# Decoding and cropping


class _BadSample(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # "corrupt" | "short" | "truncated"


def _readf(f: sf.SoundFile, out: np.ndarray) -> int:
    """Decode ``len(out)`` frames at the current position into the C-contiguous float32
    ``(n, channels)`` array ``out``; returns the frames decoded.

    ``SoundFile.read`` wraps every read in a ``tell()`` and a ``seek()`` back to where the read
    ended; on FLAC that seek re-synchronises the decoder (measured ~0.1 ms a clip on the demo
    shards, ~5 % of a clip's cost), and nothing here needs it: the next read continues in place.
    So this calls libsndfile's ``sf_readf_float`` directly when soundfile exposes it."""
    if out.dtype != np.float32 or not out.flags.c_contiguous or out.shape[1:] != (f.channels,):
        raise ValueError(f"_readf needs a C-contiguous float32 (n, {f.channels}) array, got {out.dtype} {out.shape}")
    if _SF_READF is None:
        return f.read(len(out), out=out).shape[0]
    f._check_if_closed()
    n = _SF_READF(f._file, sf._ffi.cast("float *", out.ctypes.data), len(out))
    sf._error_check(f._errorcode)
    return int(n)


# soundfile's own binding of libsndfile (module internals, present in every soundfile since 0.10);
# None: fall back to the public SoundFile.read
_SF_READF = getattr(getattr(sf, "_snd", None), "sf_readf_float", None) if hasattr(sf, "_ffi") and hasattr(sf, "_error_check") else None


def _read_spans(f: sf.SoundFile, spans: list[tuple[int, int]], name: str, dest: list[np.ndarray] | None = None,
                pos: int = 0) -> list[np.ndarray]:
    """Decode only the frame spans ``[(offset, length)]`` of an open file (FLAC seeks are exact);
    returns ``(channels, length)`` views. ``dest[i]``: a contiguous ``(length, channels)`` array to
    decode span i into (the batch itself, saving a copy). ``pos``: the file's current frame (0 when
    freshly opened); a span starting there is read without a seek."""
    out = []
    check_finite = f.subtype in ("FLOAT", "DOUBLE")  # integer PCM cannot hold NaN or inf
    for i, (off, n) in enumerate(spans):
        if off != pos:
            f.seek(off)
        x = dest[i] if dest is not None else np.empty((n, f.channels), dtype=np.float32)
        got = _readf(f, x)
        if got != n:
            raise _BadSample("corrupt", f"{name}: {got} of {n} frames decodable at offset {off}")
        if check_finite and not np.isfinite(x).all():
            raise _BadSample("corrupt", f"{name}: non-finite samples")
        pos = off + n
        out.append(x.T)
    return out


@dataclass
class _Example:
    key: str
    views: list[np.ndarray] | None  # V arrays (C, L) float32; None: decoded into the batch already
    length: int
    labels: dict
    padded: bool


class _Cropper:
    """Decode the needed frames of one raw sample and cut the views (one stage, one job)."""

    def __init__(self, cfg: LoaderConfig, labels: LabelEncoder, transform: Transform | None):
        self.cfg, self.labels, self.transform = cfg, labels, transform

    def _crop(self, f: sf.SoundFile, name: str, rng: _KeyedDraws, dest: np.ndarray | None) -> tuple[list[np.ndarray] | None, int, bool, int]:
        """Pick the view offsets and decode just those frames: (pieces at the source rate, L, padded, sr).

        With ``dest`` (the example's ``(V, 1, T)`` slot of the batch) a mono file at the target rate is
        decoded straight into the batch and the pieces are None.
        """
        cfg = self.cfg
        frames, sr = int(f.frames), int(f.samplerate)
        if frames <= 0:
            raise _BadSample("corrupt", f"{name}: no audio frames")
        target = cfg.sample_rate or sr
        avail = frames if target == sr else (frames * target) // sr  # frames at the target rate
        T = cfg.crop_samples
        if cfg.variable_length:
            L, padded = min(avail, T), False
        elif avail >= T:
            L, padded = T, False
        elif cfg.short_policy == "skip":
            raise _BadSample("short", f"{name}: {avail} frames < crop_samples {T}")
        else:
            L, padded = avail, True
        offsets = [int(rng.integers(0, avail - L + 1)) for _ in range(cfg.views)]
        if target == sr:
            spans = [(o, L) for o in offsets]
        else:
            # a few extra source frames so the resampler's edge does not fall inside the crop
            n_src = min(frames, -(-L * sr // target) + 8)
            spans = [(min(o * sr // target, frames - n_src), n_src) for o in offsets]
        direct = dest is not None and target == sr and f.channels == 1
        if len(spans) == 2 and abs(spans[0][0] - spans[1][0]) < spans[0][1]:
            # overlapping views: every frame of their union is decoded once
            if direct:
                # the earlier view straight into its batch row; the later one copies the overlap
                # from it and decodes only its tail, continuing where the first read stopped (no seek)
                a, b = (0, 1) if spans[0][0] <= spans[1][0] else (1, 0)
                shift = spans[b][0] - spans[a][0]
                _read_spans(f, [(spans[a][0], L)], name, [dest[a, 0, :L].reshape(L, 1)])
                dest[b, 0, : L - shift] = dest[a, 0, shift:L]
                if shift:
                    _read_spans(f, [(spans[a][0] + L, shift)], name, [dest[b, 0, L - shift : L].reshape(shift, 1)], pos=spans[a][0] + L)
                return None, L, padded, sr
            lo = min(spans[0][0], spans[1][0])
            (union,) = _read_spans(f, [(lo, max(spans[0][0], spans[1][0]) + spans[0][1] - lo)], name)
            return [union[:, s - lo : s - lo + n] for s, n in spans], L, padded, sr
        if direct:
            _read_spans(f, spans, name, [dest[v, 0, :L].reshape(L, 1) for v in range(len(spans))])
            return None, L, padded, sr
        return _read_spans(f, spans, name), L, padded, sr

    def __call__(self, raw: RawSample, url: str, crop_rng: _KeyedDraws, tf_rng: Callable[[], np.random.Generator],
                 dest: np.ndarray | None = None) -> _Example:
        cfg = self.cfg
        name = f"{url}:{raw.key}"
        if raw.audio is None or raw.meta is None:
            raise _BadSample("corrupt", f"{name}: missing {'audio' if raw.audio is None else 'json'} member")
        try:
            meta = json.loads(raw.meta)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _BadSample("corrupt", f"{name}.json: invalid JSON ({exc})") from exc
        try:
            with sf.SoundFile(io.BytesIO(raw.audio)) as f:
                pieces, L, padded, sr = self._crop(f, name, crop_rng, dest)
        except _BadSample:
            raise
        except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
            raise _BadSample("corrupt", f"{name}: not decodable audio ({exc})") from exc
        if pieces is None:  # already in the batch
            return _Example(key=raw.key, views=None, length=L, labels=self.labels.encode(meta), padded=padded)
        target = cfg.sample_rate or sr
        views = []
        for x in pieces:
            if target != sr:
                x = audio_io.resample(x, sr, target)[:, :L]
                if x.shape[1] < L:
                    x = np.pad(x, ((0, 0), (0, L - x.shape[1])))
            views.append(audio_io.to_mono(x) if cfg.mono else x)
        if self.transform is not None:
            v = np.stack(views)  # (V, C, L)
            out = self.transform(v, tf_rng())
            if out.shape != v.shape:
                raise ValueError(f"loader transform {self.transform!r} returned shape {out.shape} for input {v.shape}; it must keep the shape")
            views = list(np.asarray(out, dtype=np.float32))
        return _Example(key=raw.key, views=views, length=L, labels=self.labels.encode(meta), padded=padded)


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 batch; in a DataLoader worker it lives in shared memory from the
    start, since the DataLoader would otherwise copy it there to send it (a measured ~20 ms for a
    7.5 MB CLMR batch, more than a third of the worker's time on 6 s clips)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    n = int(np.prod(shape))
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:  # older torch: share after allocating (one extra copy)
        return torch.empty(shape, dtype=torch.float32).share_memory_()
    return torch.empty(0, dtype=torch.float32).set_(new_shared(4 * n), 0, shape)


def _collate(examples: list[_Example], cfg: LoaderConfig, spec: dict[str, dict], audio_t: torch.Tensor | None = None,
             alloc: Callable[[tuple[int, ...]], torch.Tensor] = _batch_tensor) -> tuple[dict, int]:
    """Stack examples into a batch: §2's layout, but ``lengths`` and ``labels`` as numpy arrays
    (small arrays pickle inline; as tensors each would cost a shared-memory file and a file
    descriptor handed over a socket); :func:`_finish` makes them tensors in the main process.
    ``audio_t`` is the preallocated ``(B, V, 1, T)`` batch that examples with ``views=None`` were
    decoded into; otherwise ``alloc(shape)`` gives the batch."""
    chans = {v.shape[0] for e in examples for v in (e.views or [])} | ({1} if audio_t is not None else set())
    if len(chans) > 1:
        raise ValueError(f"samples with {sorted(chans)} channels in one batch; set data.mono=True or shard with one channel count")
    C = chans.pop()
    lengths = [e.length for e in examples]
    if not cfg.variable_length:
        T = cfg.crop_samples
    else:
        T = min(lengths) if cfg.pad_to == "shortest" else max(lengths)
    if audio_t is None:
        audio_t = alloc((len(examples), cfg.views, C, T))
    audio = audio_t.numpy()
    out_len = np.empty(len(examples), dtype=np.int64)
    padded = 0
    for i, e in enumerate(examples):
        n = min(e.length, T)
        for v, x in enumerate(e.views or []):
            audio[i, v, :, :n] = x[:, :n]
        audio[i, :, :, n:] = 0.0
        out_len[i] = n
        padded += n < T
    labels = {}
    for name, s in spec.items():
        vals = [e.labels[name] for e in examples]
        labels[name] = np.stack(vals) if s["kind"] == "multi_hot" else np.array(vals, dtype=np.int64)
    batch = {"audio": audio_t, "lengths": out_len, "labels": labels, "keys": [e.key for e in examples]}
    return batch, padded


def _finish(batch: dict) -> dict:
    """Main process: the worker's numpy ``lengths`` / ``labels`` become the §2 tensors."""
    batch["lengths"] = torch.from_numpy(batch["lengths"])
    batch["labels"] = {k: torch.from_numpy(np.asarray(v)) for k, v in batch["labels"].items()}
    return batch


def _as_is(batch: dict) -> dict:
    # the DataLoader's default_convert would turn the numpy arrays into shared-memory tensors
    return batch


class _Ring:
    """Recycled shared-memory audio buffers: ``slots`` per logical worker, one semaphore each.

    Sending a fresh shared-memory batch from a worker costs a new shared file, a page fault per
    4 KiB page as the worker writes it, a file descriptor passed over a socket and an unmap in the
    main process: measured ~10 ms of CPU per 7.5 MB CLMR batch, as much as decoding a third of it.
    So each worker reuses a few buffers (at most ``prefetch_factor + 2``, created as needed; /dev/shm
    must hold that many batches per worker); each is pickled (file descriptor and all) only the
    first time, later batches just name the slot. A slot is the worker's again once its semaphore
    is released by the main process: at once after copying it into pinned memory (CUDA), or, when
    the caller gets the shared buffer itself (CPU), when the last tensor viewing that batch is
    freed. Callers may keep batches as long as they like: a worker that finds none of its slots
    free writes a fresh buffer instead of waiting.
    """

    def __init__(self, workers: int, slots: int, ctx) -> None:
        self.slots = slots
        self.free = [[ctx.Semaphore(1) for _ in range(slots)] for _ in range(workers)]


def _shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, where worker batches live (None where there is no such mount)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _fit_prefetch(prefetch: int, workers: int, batch_bytes: int, free: int | None, local_ranks: int) -> int:
    """The prefetch factor whose batches fit in /dev/shm: ``local_ranks`` loaders on this node each
    hold up to ``workers * (prefetch + 2)`` batches there (queued, being built, held by the caller).
    Lowers ``prefetch`` with a warning when the configured one does not fit; raises when not even
    ``prefetch = 1`` fits. Without the check a worker dies of SIGBUS mid-run ("DataLoader worker
    killed by signal: Bus error"), Docker's 64 MB default being the usual cause."""
    if free is None or workers == 0:
        return prefetch
    need = lambda p: local_ranks * workers * (p + 2) * batch_bytes  # noqa: E731
    if need(prefetch) <= free:
        return prefetch
    mb = lambda n: f"{n / 2**20:.0f} MB"  # noqa: E731
    what = (f"{local_ranks} loader(s) x {workers} workers x (prefetch_factor + 2) batches of {mb(batch_bytes)}"
            f" in /dev/shm, which has {mb(free)} free")
    if need(1) > free:
        raise RuntimeError(
            f"/dev/shm is too small for the loader: {what}; even prefetch_factor=1 needs {mb(need(1))}. "
            "Give the container more shared memory (docker run --shm-size=8g, or a Kubernetes emptyDir "
            "with medium: Memory on /dev/shm), or lower data.num_workers or the batch size"
        )
    fit = max(p for p in range(1, prefetch) if need(p) <= free)
    warnings.warn(f"[musicssl] {what}: prefetch_factor {prefetch} needs {mb(need(prefetch))}; using {fit}. "
                  "Raise the container's --shm-size to keep the configured prefetch", stacklevel=3)
    return fit


# ------------------------------------------------------------------------------------------------
# The per-worker stream


class _WorkerStream(torch.utils.data.IterableDataset):
    """What runs in each DataLoader worker (or in-process with num_workers=0): whole batches."""

    def __init__(self, cfg: LoaderConfig, plan: _Plan, spec: dict, *, rank: int, start_step: int, transform: Transform | None,
                 ring: _Ring | None = None):
        super().__init__()
        self.cfg, self.plan, self.spec, self.rank, self.start_step = cfg, plan, spec, rank, start_step
        self.transform, self.ring = transform, ring

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        W = self.plan.workers
        # DataLoader asks its workers round-robin from worker 0; the rank step start_step must come
        # from logical worker start_step % W, so DataLoader worker i plays logical worker (i + start) % W
        w = ((info.id if info is not None else 0) + self.start_step) % W
        g = self.start_step + (w - self.start_step) % W  # the first rank step this worker serves
        S = self.plan.steps_per_epoch
        epoch = g // S
        done = _count_below(g, w, W) - _count_below(epoch * S, w, W)  # its batches already given this epoch
        self._cropper = _Cropper(self.cfg, LabelEncoder(self.spec), self.transform)
        self._direct = self.cfg.mono and not self.cfg.variable_length and self.transform is None
        self._w = w
        self._bufs: list[torch.Tensor] = []  # this worker's ring slots, created on first use
        self._sent: set[int] = set()  # slots the main process has already received once
        self._stats: Counter = Counter()
        self._truncated: dict[str, int] = {}  # shard url -> samples readable before the break
        while True:
            if self.plan.batches(w, epoch) > done:
                yield from self._epoch(epoch, w, done)
            epoch, done = epoch + 1, 0

    # --- batch buffers ---------------------------------------------------------------------------

    def _alloc(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The next free ring slot (see :class:`_Ring`) or, without one, a fresh batch."""
        ring = self.ring
        if ring is None or self.cfg.variable_length or (self._bufs and tuple(self._bufs[0].shape) != shape):
            return _batch_tensor(shape)
        # the lowest free slot: slots come back in any order (the caller frees batches as it likes),
        # and a slot is only created when all before it are in use, so the shared memory held is
        # what is really in flight
        for i in range(ring.slots):
            if ring.free[self._w][i].acquire(block=False):
                if i == len(self._bufs):
                    self._bufs.append(_batch_tensor(shape))
                return self._bufs[i]
        return _batch_tensor(shape)

    def _ship(self, batch: dict) -> None:
        """A batch in a ring slot travels as the slot number (plus the buffer itself the first time)."""
        for i, buf in enumerate(self._bufs):
            if batch["audio"] is buf:
                batch["audio"] = None
                batch["_slot"] = (i, None if i in self._sent else buf)
                self._sent.add(i)
                return

    # --- reading -----------------------------------------------------------------------------

    def _fetch(self, cursors: dict, ident: tuple[int, int, int]) -> RawSample | _BadSample:
        m, shard, member = ident
        url = self.plan.urls[m][shard]
        if member >= self._truncated.get(url, 1 << 62):
            return _BadSample("truncated", f"{url}: sample {member} lies past the truncation point")
        cur = cursors.get(m)
        if cur is None or cur[0] != shard or cur[2] > member:
            if cur is not None:
                cur[1].close()
            cur = cursors[m] = [shard, TarCursor(url), 0]
        cur[2] = member + 1
        try:
            return cur[1].get(member)
        except ShardReadError as exc:
            self._truncated[url] = min(member, self._truncated.get(url, 1 << 62))
            self._stats["truncated_shards"] += 1
            cur[1].close()
            cursors.pop(m)
            return _BadSample("truncated", str(exc))

    def _read_one(self, ident: tuple[int, int, int]) -> RawSample | _BadSample:
        cursors: dict = {}
        try:
            return self._fetch(cursors, ident)
        finally:
            for c in cursors.values():
                c[1].close()

    # --- one epoch of one slot -------------------------------------------------------------------

    def _epoch(self, epoch: int, w: int, done: int) -> Iterator[dict]:
        cfg, B = self.cfg, self.cfg.batch_size
        items = self.plan.slot_items(epoch, self.rank, w)
        n_batches = self.plan.batches(w, epoch)
        key = (cfg.seed, epoch, self.rank, w)
        skip_n = done * B
        emitted: set[int] = set()
        if skip_n:
            # resume: replay the buffer on identities to learn which samples were already emitted
            replay = _shuffled(len(items), cfg.shuffle_buffer, _rng(*key, _BUFFER), None)
            emitted = {next(replay)[0] for _ in range(skip_n)}
        cursors: dict = {}
        fetch = lambda i: None if i in emitted else self._fetch(cursors, items[i])  # noqa: E731
        stream = _shuffled(len(items), cfg.shuffle_buffer, _rng(*key, _BUFFER), fetch)
        try:
            for _ in range(skip_n):
                next(stream)
            for b in range(done, n_batches):
                examples = []
                # fixed-length mono crops without a CPU transform decode straight into the batch
                audio_t = self._alloc((B, cfg.views, 1, cfg.crop_samples)) if self._direct else None
                dest = audio_t.numpy() if audio_t is not None else None
                for j, p in enumerate(range(b * B, (b + 1) * B)):
                    idx, payload = next(stream)
                    examples.append(self._example(epoch, w, p, items, idx, payload, None if dest is None else dest[j]))
                batch, padded = _collate(examples, cfg, self.spec, audio_t, self._alloc)
                self._ship(batch)
                self._stats["examples"] += B
                self._stats["padded"] += padded
                batch["_pos"] = [w, epoch, b]
                batch["_stats"] = dict(self._stats)
                yield batch
        finally:
            for c in cursors.values():
                c[1].close()

    def _example(self, epoch: int, w: int, p: int, items: list, idx: int, payload: object, dest: np.ndarray | None) -> _Example:
        """The example at stream position p: the emitted sample, or a substitute if it is bad."""
        cfg = self.cfg
        key = (cfg.seed, epoch, self.rank, w, p)
        sub_rng = None
        for attempt in range(4 * len(items) + 16):
            ident = items[idx]
            try:
                if isinstance(payload, _BadSample):
                    raise payload
                assert isinstance(payload, RawSample)
                ex = self._cropper(payload, self.plan.urls[ident[0]][ident[1]], _KeyedDraws(*key, attempt, _CROP),
                                   lambda: _rng(*key, attempt, _TRANSFORM), dest)  # noqa: B023 - called at once
                if attempt:
                    self._stats["substituted"] += 1
                return ex
            except _BadSample as bad:
                self._stats[f"skipped_{bad.kind}"] += 1
                if cfg.on_error == "raise" and bad.kind != "short":
                    raise RuntimeError(f"{bad} (data.on_error='raise'; set it to 'skip' to skip and count bad samples)") from bad
                if bad.kind != "short":
                    warnings.warn(f"[musicssl] skipping bad sample: {bad}", stacklevel=2)
            sub_rng = sub_rng or _rng(*key, _SUBST)
            idx = int(sub_rng.integers(len(items)))
            payload = self._read_one(items[idx])
        urls = sorted({self.plan.urls[m][s] for m, s, _ in items})
        raise RuntimeError(f"no usable sample found in {len(items)} samples of shards {urls[:5]}...; check them with `shard-tools verify`")


# ------------------------------------------------------------------------------------------------
# The public loader


class StreamingLoader:
    """An infinite, rank- and worker-correct, resumable stream of batches (docs/architecture.md §2)."""

    def __init__(self, config: LoaderConfig, *, rank: int = 0, world_size: int = 1, transform: Transform | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size (torchrun's RANK, WORLD_SIZE)")
        self.config, self.rank, self.world_size, self.transform = config, rank, world_size, transform
        self.manifests = [load_manifest(u) for u in config.manifests]
        self.label_specs = merge_label_specs(self.manifests)
        self._plan = _Plan(self.manifests, config.weights, batch_size=config.batch_size, world_size=world_size,
                           workers=max(1, config.num_workers), seed=config.seed)
        self.steps_per_epoch: int = self._plan.steps_per_epoch
        self._step = 0
        self._base_stats: Counter = Counter()
        self._live_stats: dict[int, dict] = {}

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
        # ring slots still handed out to the caller when the stream stops are never released: their
        # worker is gone with the DataLoader
        ring = None
        if cfg.num_workers == 0:
            batches: Iterable[dict] = _WorkerStream(cfg, self._plan, self.label_specs, rank=self.rank, start_step=self._step,
                                                   transform=self.transform)
        else:
            ctx = torch.multiprocessing.get_context()
            channels = 1 if cfg.mono else max((m.channels or 2) for m in self.manifests)
            batch_bytes = 4 * cfg.batch_size * cfg.views * channels * cfg.crop_samples  # float32 audio
            prefetch = _fit_prefetch(cfg.prefetch_factor, cfg.num_workers, batch_bytes, _shm_free_bytes(),
                                     int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            # a worker has at most prefetch batches queued plus the one it is building
            ring = _Ring(W, prefetch + 2, ctx)
            ds = _WorkerStream(cfg, self._plan, self.label_specs, rank=self.rank, start_step=self._step, transform=self.transform,
                               ring=ring)
            with _stop_signals_blocked():  # the workers start here
                batches = iter(torch.utils.data.DataLoader(
                    ds, batch_size=None, collate_fn=_as_is, num_workers=cfg.num_workers, prefetch_factor=prefetch,
                    worker_init_fn=_worker_init, multiprocessing_context=ctx,
                ))
            _track_workers(batches)
        slots: dict[tuple[int, int], torch.Tensor] = {}  # (worker, slot) -> the shared buffer, mapped once
        for batch in batches:
            w, epoch, b = batch.pop("_pos")
            if w != self._step % W:
                raise RuntimeError(f"loader worker {w} delivered rank step {self._step}; expected worker {self._step % W}")
            self._live_stats[int(w)] = batch.pop("_stats")
            slot = batch.pop("_slot", None)
            if slot is not None:
                i, buf = slot
                if buf is not None:
                    slots[(w, i)] = buf
                src, free = slots[(w, i)], ring.free[w][i]
                if pin:
                    batch["audio"] = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
                    # numpy's single-threaded memcpy: torch's copy_ wakes its OpenMP pool and measured ~4x the CPU
                    np.copyto(batch["audio"].numpy(), src.numpy())
                    free.release()
                else:
                    # the caller's tensor owns a fresh numpy view of the slot, not the slot tensor we
                    # keep: when the last tensor or view of this batch is freed, so is that array,
                    # and the slot goes back to its worker
                    view = src.numpy()[...]
                    weakref.finalize(view, free.release)
                    batch["audio"] = torch.from_numpy(view)
            self._step += 1
            batch = _finish(batch)
            if pin:
                batch = _pin(batch)
            yield batch

    def _live_totals(self) -> Counter:
        c: Counter = Counter()
        for s in self._live_stats.values():
            c.update(s)
        return c

    def stats(self) -> dict[str, int]:
        """This rank's counters since the stream began (restored with the state): examples,
        skipped_corrupt, skipped_short, skipped_truncated, truncated_shards, substituted, padded."""
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
        for k, flag in (("seed", "data.seed"), ("batch_size", "batch size (train.py: --train.global_batch_size)"), ("manifests", "data.manifests"), ("weights", "data.weights")):
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


def _worker_init(_worker_id: int) -> None:
    # A preemption SIGTERM, or a Ctrl-C, goes to the whole process group. Workers that died of it
    # would make torch's SIGCHLD handler raise in the trainer while it finishes its step and writes
    # its last checkpoint (train.py's StopFlag). They still exit when the DataLoader shuts down, at
    # interpreter exit (_track_workers) or when their parent dies (torch's worker watchdog).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked since the fork (_stop_signals_blocked); a pending one is dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    _keep_freed_memory()


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Start workers with SIGTERM and SIGINT blocked: between a worker's start and its
    ``_worker_init`` (which ignores them) torch's own handler would let either kill it. The
    caller's blocked signals are delivered when the block ends, so its own handlers still see them."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed memory for the worker's per-sample buffers.

    A worker allocates and frees each sample's compressed bytes (hundreds of KB to a few MB). By
    default glibc serves such sizes with a fresh mmap, or trims the heap after the free, so every
    sample's read page-faults once per 4 KiB: measured 179 minor faults and 0.60 ms of tar reading
    a 29 s clip in a worker, against 0.07 faults and 0.18 ms with these thresholds raised (a main
    process whose heap had grown already read it in 0.18-0.30 ms). Called in loader workers only (never in the caller's process); a
    no-op where the C library has no ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 16 << 20)  # heap, not mmap, for anything below 16 MiB
    mallopt(m_trim_threshold, 256 << 20)  # keep up to 256 MiB of freed heap instead of returning it


_LIVE_WORKERS: weakref.WeakSet = weakref.WeakSet()  # DataLoader iterators whose workers may be running
_EXIT_HOOK = False


def _track_workers(it: object) -> None:
    """Stop ``it``'s workers at interpreter exit if nothing else has.

    multiprocessing's own exit handler stops leftover child processes with SIGTERM, which ours
    ignore, and then joins them: a script that ends (or dies of an exception) with a stream still
    open would hang there forever. This handler is registered after multiprocessing's and torch's,
    so it runs before them (atexit is last in, first out)."""
    global _EXIT_HOOK
    if not _EXIT_HOOK:
        atexit.register(_stop_live_workers)
        _EXIT_HOOK = True
    _LIVE_WORKERS.add(it)


def _stop_live_workers() -> None:
    for it in list(_LIVE_WORKERS):
        shutdown = getattr(it, "_shutdown_workers", None)  # what the iterator's __del__ calls
        if shutdown is not None:
            shutdown()
        for proc in getattr(it, "_workers", []):
            if proc.is_alive():
                proc.kill()


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


# ------------------------------------------------------------------------------------------------
# One ordered pass for evaluation


def iter_samples(
    manifests: list[str],
    *,
    sample_rate: int | None = None,
    mono: bool = True,
    rank: int = 0,
    world_size: int = 1,
    on_error: str = "skip",
) -> Iterator[dict]:
    """Every sample once, in manifest / shard / tar order (finite; for embedding and evaluation).

    Rank ``r`` gets the contiguous range ``[r * N // world_size, (r + 1) * N // world_size)`` of the
    ``N`` samples. Yields ``{"key", "audio" (C, T) float32 whole clip, "sample_rate", "labels"
    (per the merged spec: multi_hot float32 arrays, class ints), "meta" (the sample JSON)}``. Bad
    samples are warned about and skipped (``on_error="raise"`` raises).
    """
    if on_error not in ("skip", "raise"):
        raise ValueError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if isinstance(manifests, str):
        manifests = [manifests]
    ms = [load_manifest(u) for u in manifests]
    enc = LabelEncoder(merge_label_specs(ms))
    shards = [s for m in ms for s in m.shards]
    N = sum(s.num_samples for s in shards)
    lo, hi = rank * N // world_size, (rank + 1) * N // world_size
    base = 0
    for s in shards:
        a, b = max(lo, base) - base, min(hi, base + s.num_samples) - base
        base += s.num_samples
        if a >= b:
            continue
        cur = TarCursor(s.url)
        try:
            for i in range(a, b):
                try:
                    raw = cur.get(i)
                    name = f"{s.url}:{raw.key}"
                    if raw.audio is None or raw.meta is None:
                        raise audio_io.AudioDecodeError(f"{name}: missing audio or json member")
                    meta = json.loads(raw.meta)
                    audio, sr = audio_io.decode_bytes(raw.audio, name=name)
                except (ShardReadError, audio_io.AudioDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                    if on_error == "raise":
                        raise
                    warnings.warn(f"[musicssl] skipping: {exc}", stacklevel=2)
                    if isinstance(exc, ShardReadError):
                        break  # nothing after a truncation point is readable
                    continue
                if sample_rate is not None and sr != sample_rate:
                    audio, sr = audio_io.resample(audio, sr, sample_rate), sample_rate
                if mono:
                    audio = audio_io.to_mono(audio)
                yield {"key": raw.key, "audio": audio, "sample_rate": sr, "labels": enc.encode(meta), "meta": meta}
        finally:
            cur.close()


__all__ = ["LoaderConfig", "StreamingLoader", "DevicePrefetcher", "iter_samples", "STAT_KEYS"]
