"""How much memory a loader holds per rank, said at start, and refused when the machine lacks it.

What the loader itself holds grows with its settings, not with the data's length: each worker's
shuffle buffer (``shuffle_buffer_mb`` of raw samples), the batches in flight (shared-memory ring
slots in /dev/shm, which is RAM) and their pinned copies. Everything else a worker holds (Python,
torch, one sample being decoded) does not depend on the settings and is not counted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.errors import UserError


class LoaderMemoryError(UserError, MemoryError):
    """The loaders of this node would hold more memory than the machine (or its cgroup) has free."""


@dataclass(frozen=True)
class MemoryBudget:
    """The loader's own memory on one rank, in bytes."""

    buffers: int  # processes holding a shuffle buffer: the workers (the caller with num_workers=0)
    shuffle_samples: int  # capacity of each buffer
    sample_bytes: int  # a raw sample's size as the budget counts it (pipeline.plan.sample_bytes)
    batch_bytes: int  # one batch's float32 audio
    shm_batches: int  # ring slots in /dev/shm: workers x (prefetch_factor + 2)
    pinned_batches: int  # pinned copies in flight (pin_memory on CUDA): the batch in use and the next

    @property
    def shuffle_bytes(self) -> int:
        return self.buffers * self.shuffle_samples * self.sample_bytes

    @property
    def batches_bytes(self) -> int:
        return (self.shm_batches + self.pinned_batches) * self.batch_bytes

    @property
    def total(self) -> int:
        return self.shuffle_bytes + self.batches_bytes

    def describe(self) -> str:
        pinned = f" + {self.pinned_batches} pinned" if self.pinned_batches else ""
        return (f"{self.buffers} shuffle buffer(s) x {self.shuffle_samples} samples x {_mb(self.sample_bytes)} = "
                f"{_mb(self.shuffle_bytes)}, + {self.shm_batches} shared-memory{pinned} batches x "
                f"{_mb(self.batch_bytes)} = {_mb(self.batches_bytes)}; {_mb(self.total)} per rank")


def _mb(n: float) -> str:
    if n < 2**20:
        return f"{n / 2**10:.0f} KiB"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def available_bytes() -> int | None:
    """Memory this process may still use: /proc/meminfo's MemAvailable, lowered to what its cgroup
    (v2 or v1) leaves below its limit. None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as f:
                lim = f.read().strip()
            with open(usage) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if lim.isdigit() and int(lim) < 1 << 60:  # "max", or v1's "no limit" of about 2**63
            found.append(max(0, int(lim) - used))
        break
    return min(found) if found else None


def check(budget: MemoryBudget, *, local_ranks: int, available: int | None) -> str:
    """The one line the loader prints at start; raises :class:`LoaderMemoryError` with advice when
    ``local_ranks`` loaders like this one need more than ``available``."""
    need = local_ranks * budget.total
    node = f" x {local_ranks} ranks on this node = {_mb(need)}" if local_ranks > 1 else ""
    free = f" ({_mb(available)} available)" if available is not None else ""
    line = f"[musicssl] loader memory: {budget.describe()}{node}{free}"
    if available is not None and need > available:
        raise LoaderMemoryError(
            f"{line}: more than this machine has. Lower data.shuffle_buffer_mb (each worker holds that much "
            "raw audio), data.num_workers, data.prefetch_factor or the batch size"
        )
    return line


def local_ranks() -> int:
    """Loaders on this node (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
