"""The process's place in a job: rank, world size and device from torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), and stop requests (SIGTERM, Ctrl-C) read at step ends."""

from __future__ import annotations

import datetime
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from training.errors import ConfigError


@dataclass(frozen=True)
class Dist:
    """One process of the job. ``owns_group``: this process initialised the process group (and
    destroys it in :meth:`close`); an in-process caller may have done so itself."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @property
    def master(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (a no-op in one process)."""
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str = "auto", *, timeout_s: float = 1800.0) -> Dist:
    """Join the torchrun job (NCCL on CUDA, gloo on CPU) and pick this rank's device.

    ``device``: ``auto`` = ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; ``cuda``
    means ``cuda:LOCAL_RANK``; ``cpu`` or ``cuda:N`` as given. ``timeout_s``
    (``--train.dist_timeout_s``): how long a collective waits for the other ranks before the job
    fails, e.g. while rank 0 uploads a checkpoint to a bucket.
    """
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--train.device=cuda but CUDA is not available; use --train.device=cpu or auto")
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None,
                                timeout=datetime.timedelta(seconds=timeout_s))
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return Dist(rank=rank, world=world, device=dev, owns_group=owns)


class StopFlag:
    """SIGTERM (preemption) or a first Ctrl-C sets :attr:`reason`; a second Ctrl-C interrupts at once.

    The trainer reads the flag at the end of each step (all ranks agree on it in the step's
    all-reduce), checkpoints and exits 0.
    """

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.reason is not None:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        print(f"[train] {self.reason} received: checkpointing at the end of this step, then exiting", flush=True)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (in-process callers)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
