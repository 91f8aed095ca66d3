"""Worker processes of the shard tools: a pool whose workers die with the process that made it.

``concurrent.futures`` workers outlive a parent killed with ``kill -9``: each blocks for good on
its call-queue pipe (it holds that pipe's write end itself, so it never sees EOF), keeps the
forkserver alive (it holds the forkserver's "alive" pipe) and so the resource tracker too. Here
each worker also gets the read end of a pipe whose only write end stays in the parent; a daemon
thread in the worker waits on it and ends the worker when it reads EOF, i.e. when the parent is
gone for whatever reason. With the workers gone the forkserver and the resource tracker see EOF
on their own pipes and exit, so nothing of a killed build stays running.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool


def pool_context() -> mp.context.BaseContext:
    """Start method for worker pools: forkserver where available, else spawn; never plain fork.

    The parent may hold threads (s3fs's event loop, tqdm's monitor, the lock heartbeat) whose locks
    a forked child would inherit in a taken state. A forkserver is a fresh single-threaded process
    that imports the decoding stack once (numpy, soundfile, scipy.signal: seconds per process) and
    forks each worker from there, so N workers start about as fast as one.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["shard_tools.convert", "scipy.signal"])  # a hint; failures are ignored
        return ctx
    return mp.get_context("spawn")


def _exit_when_parent_goes(conn) -> None:
    try:
        conn.recv_bytes()  # the parent never sends: this returns only by EOF
    except (EOFError, OSError):
        pass
    os._exit(1)


# Set by the CLI's SIGTERM/SIGINT handler (cli.stop_on_signals): long loops of the shard tools stop
# at the next item, raising KeyboardInterrupt where unwinding is safe. Raising from the handler
# itself would interrupt an arbitrary bytecode, e.g. one inside libsndfile's I/O callbacks, where
# cffi prints and swallows the exception and the encoder carries on with a wrong file position.
STOP = threading.Event()


def stop_point() -> None:
    """Raise KeyboardInterrupt if a stop was requested (call between items)."""
    if STOP.is_set():
        raise KeyboardInterrupt


def _worker_init(conn, initializer: Callable | None, initargs: tuple) -> None:
    # Ctrl-C reaches the whole process group and a scheduler's SIGTERM every process of the job:
    # the parent decides when to stop; the workers end with it (the pipe below)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_when_parent_goes, args=(conn,), daemon=True, name="parent-watch").start()
    if initializer is not None:
        initializer(*initargs)


class Pool(ProcessPoolExecutor):
    """A ``ProcessPoolExecutor`` (forkserver or spawn) whose workers exit when its creator dies."""

    def __init__(self, workers: int, initializer: Callable | None = None, initargs: tuple = ()):
        ctx = pool_context()
        self._watch_r, self._watch_w = ctx.Pipe(duplex=False)
        super().__init__(workers, mp_context=ctx, initializer=_worker_init,
                         initargs=(self._watch_r, initializer, initargs))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        for conn in (self._watch_r, self._watch_w):
            conn.close()


def _ping() -> bool:
    return True


class Processor:
    """Runs ``fn(item, conf)`` over items, yielding results in input order.

    With ``workers > 1`` a pool works ahead within a bounded window (bounded memory); results are
    still consumed strictly in order, which is what makes the output independent of timing. A
    worker killed by a crashing decoder is replaced and the item that killed it is retried alone
    once, then reported as ``("skip", "decoder crashed: ...")``.
    """

    def __init__(self, fn: Callable, conf, workers: int):
        self.fn = fn  # a module-level function (spawned workers import it by name)
        self.conf = conf
        self.workers = workers
        self._pool: Pool | None = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _retry_alone(self, item) -> tuple:
        self.close()
        solo = Pool(1)
        try:
            try:
                solo.submit(_ping).result()
            except BrokenProcessPool:
                # not the file's fault: workers die before any work (e.g. a script that calls
                # build_dataset without an `if __name__ == "__main__":` guard)
                raise RuntimeError("shard builder: worker processes die on start-up; run with --workers 1 to see "
                                   "why, and guard scripts that call build_dataset with "
                                   "`if __name__ == \"__main__\":`") from None
            try:
                return solo.submit(self.fn, item, self.conf).result()
            except BrokenProcessPool:
                return ("skip", "decoder crashed: the worker process died while decoding this file")
        finally:
            solo.shutdown()

    def run(self, items: list) -> Iterator[tuple]:
        if self.workers <= 1:
            for item in items:
                yield self.fn(item, self.conf)
            return
        ahead = self.workers * 4
        nxt = 0
        window: deque = deque()
        while nxt < len(items) or window:
            if self._pool is None:
                self._pool = Pool(self.workers)
            while nxt < len(items) and len(window) < ahead:
                window.append((nxt, self._pool.submit(self.fn, items[nxt], self.conf)))
                nxt += 1
            i, fut = window.popleft()
            try:
                res = fut.result()
            except BrokenProcessPool:
                # every future in flight failed with the pool; the head item is retried alone, the
                # rest are resubmitted to a fresh pool (the culprit ends up alone at the head)
                res = self._retry_alone(items[i])
                window.clear()
                nxt = i + 1
            yield res
