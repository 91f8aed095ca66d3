"""Loader worker processes: start them, hand batches over in shared memory, stop them.

- :func:`start` runs a :class:`~pipeline.stream.WorkerStream` in DataLoader workers, started with
  SIGTERM/SIGINT blocked and set up by :func:`worker_init` (stop signals ignored, malloc tuned).
- :class:`Ring` recycles each worker's shared-memory batch buffers; :func:`fit_prefetch` checks
  /dev/shm holds them before any worker starts.
- An exit hook stops workers of streams still open when the interpreter exits.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing.util
import os
import signal
import warnings
import weakref
from collections.abc import Iterator

import numpy as np
import torch

from pipeline.batch import batch_tensor
from pipeline.errors import UserError


class SharedMemoryError(UserError, RuntimeError):
    """/dev/shm cannot hold the workers' batches even at prefetch_factor=1."""


class Ring:
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
        self._mapped: dict[tuple[int, int], torch.Tensor] = {}  # main process: (worker, slot) -> buffer, mapped once

    def worker(self, w: int) -> WorkerSlots:
        """Worker side: logical worker ``w``'s slots."""
        return WorkerSlots(self, w)

    def unpack(self, w: int, slot: tuple[int, torch.Tensor | None], pin: bool) -> torch.Tensor:
        """Main-process side: the audio tensor of a batch that arrived as a slot number."""
        i, buf = slot
        if buf is not None:
            self._mapped[(w, i)] = buf
        src, free = self._mapped[(w, i)], self.free[w][i]
        if pin:
            out = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            # numpy's single-threaded memcpy: torch's copy_ wakes its OpenMP pool and measured ~4x the CPU
            np.copyto(out.numpy(), src.numpy())
            free.release()
            return out
        # the caller's tensor owns a fresh numpy view of the slot, not the slot tensor we keep: when
        # the last tensor or view of this batch is freed, so is that array, and the slot goes back
        # to its worker. (Slots still handed out when the stream stops are never released: their
        # worker is gone with the DataLoader.)
        view = src.numpy()[...]
        weakref.finalize(view, free.release)
        return torch.from_numpy(view)


class WorkerSlots:
    """One worker's side of the :class:`Ring`."""

    def __init__(self, ring: Ring, w: int):
        self.ring, self.w = ring, w
        self._bufs: list[torch.Tensor] = []  # this worker's slots, created on first use
        self._sent: set[int] = set()  # slots the main process has already received once

    def alloc(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The lowest free slot or, without one, a fresh batch. Slots come back in any order (the
        caller frees batches as it likes), and a slot is only created when all before it are in
        use, so the shared memory held is what is really in flight."""
        if self._bufs and tuple(self._bufs[0].shape) != shape:
            return batch_tensor(shape)
        for i in range(self.ring.slots):
            if self.ring.free[self.w][i].acquire(block=False):
                if i == len(self._bufs):
                    self._bufs.append(batch_tensor(shape))
                return self._bufs[i]
        return batch_tensor(shape)

    def ship(self, batch: dict) -> None:
        """A batch in a slot travels as the slot number (plus the buffer itself the first time)."""
        for i, buf in enumerate(self._bufs):
            if batch["audio"] is buf:
                batch["audio"] = None
                batch["_slot"] = (i, None if i in self._sent else buf)
                self._sent.add(i)
                return


def shm_free_bytes() -> int | None:
    """Free bytes in /dev/shm, where worker batches live (None where there is no such mount)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def fit_prefetch(prefetch: int, workers: int, batch_bytes: int, free: int | None, local_ranks: int) -> int:
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
        raise SharedMemoryError(
            f"/dev/shm is too small for the loader: {what}; even prefetch_factor=1 needs {mb(need(1))}. "
            "Give the container more shared memory (docker run --shm-size=8g, or a Kubernetes emptyDir "
            "with medium: Memory on /dev/shm), or lower data.num_workers or the batch size"
        )
    fit = max(p for p in range(1, prefetch) if need(p) <= free)
    warnings.warn(f"[musicssl] {what}: prefetch_factor {prefetch} needs {mb(need(prefetch))}; using {fit}. "
                  "Raise the container's --shm-size to keep the configured prefetch", stacklevel=3)
    return fit


def start(stream: torch.utils.data.IterableDataset, *, num_workers: int, prefetch: int, ctx) -> Iterator[dict]:
    """Run ``stream`` in ``num_workers`` DataLoader workers; returns the iterator over their batches
    (worker ``i``'s batches at turns ``i, i + W, ...``)."""
    with stop_signals_blocked():  # the workers start here
        it = iter(torch.utils.data.DataLoader(
            stream, batch_size=None, collate_fn=_as_is, num_workers=num_workers, prefetch_factor=prefetch,
            worker_init_fn=worker_init, multiprocessing_context=ctx,
        ))
    _track(it)
    return it


def _as_is(batch: dict) -> dict:
    # the DataLoader's default_convert would turn the numpy arrays into shared-memory tensors
    return batch


def worker_init(_worker_id: int) -> None:
    # A preemption SIGTERM, or a Ctrl-C, goes to the whole process group. Workers that died of it
    # would make torch's SIGCHLD handler raise in the trainer while it finishes its step and writes
    # its last checkpoint (train.py's StopFlag). They still exit when the DataLoader shuts down, at
    # interpreter exit (_track) or when their parent dies (torch's worker watchdog).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked since the fork (stop_signals_blocked); a pending one is dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    keep_freed_memory()


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Start workers with SIGTERM and SIGINT blocked: between a worker's start and its
    :func:`worker_init` (which ignores them) torch's own handler would let either kill it. The
    caller's blocked signals are delivered when the block ends, so its own handlers still see them."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed memory for the worker's per-sample buffers.

    A worker allocates and frees each sample's compressed bytes (hundreds of KB to a few MB). By
    default glibc serves such sizes with a fresh mmap, or trims the heap after the free, so every
    sample's read page-faults once per 4 KiB: measured 179 minor faults and 0.60 ms of tar reading
    a 29 s clip in a worker, against 0.07 faults and 0.18 ms with these thresholds raised. Called
    in loader workers only (never in the caller's process); a no-op where the C library has no
    ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 16 << 20)  # heap, not mmap, for anything below 16 MiB
    mallopt(m_trim_threshold, 256 << 20)  # keep up to 256 MiB of freed heap instead of returning it


_LIVE: weakref.WeakSet = weakref.WeakSet()  # DataLoader iterators whose workers may be running
_EXIT_HOOK = False


def _track(it: object) -> None:
    """Stop ``it``'s workers at interpreter exit if nothing else has.

    multiprocessing's own exit handler stops leftover child processes with SIGTERM, which ours
    ignore, and then joins them: a script that ends (or dies of an exception) with a stream still
    open would hang there forever. This handler is registered after multiprocessing's and torch's,
    so it runs before them (atexit is last in, first out). multiprocessing moves its handler to
    the end once more on the first ``multiprocessing.get_logger()`` (libraries call it at any
    time; moto's server did in the tests), which would put it first again: so that first call is
    made here, before ours is registered."""
    global _EXIT_HOOK
    if not _EXIT_HOOK:
        multiprocessing.util.get_logger()
        atexit.register(_stop_live_workers)
        _EXIT_HOOK = True
    _LIVE.add(it)


def stop(it: object) -> None:
    """Stop ``it``'s workers now: the DataLoader's own shutdown (what its ``__del__`` calls), then
    SIGKILL for any still alive (they ignore SIGTERM), whatever the shutdown raised."""
    try:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    finally:
        for proc in getattr(it, "_workers", []):
            if proc.is_alive():
                proc.kill()


def _stop_live_workers() -> None:
    for it in list(_LIVE):
        try:
            stop(it)
        except Exception:  # noqa: BLE001, S110 - at exit: the next stream's workers must still be stopped
            pass
