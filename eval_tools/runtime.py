"""Where evaluation runs: the device, the precision, and (under torchrun) the ranks.

Single process is the default. Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) every
rank embeds its contiguous share of each split on ``cuda:LOCAL_RANK`` (or the CPU with gloo) and
rank 0 gathers the rows in rank order, which is the split's own order; probes, tables and files
are rank 0's alone.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import UserError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # "fp32" | "bf16" (autocast for the encoder's forward passes)
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when present), ``cuda``, ``cuda:N`` or ``cpu``; a missing GPU is a clear error."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: use auto, cuda, cuda:N or cpu") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    elif device.type != "cpu":
        raise UserError(f"--device {name!r}: use auto, cuda, cuda:N or cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on CUDA (tests/test_eval_devices.py bounds its effect), fp32 on the CPU."""
    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in ("fp32", "bf16"):
        raise UserError(f"--precision {name!r}: use auto, fp32 or bf16")
    return name


def setup(device: str = "auto", precision: str = "auto", *, timeout_s: float = 7200.0) -> Runtime:
    """The runtime from the flags and torchrun's environment; initialises the process group once.

    ``timeout_s``: how long a rank waits for the others (rank 0 trains probes between two
    extractions while the other ranks wait at the next gather)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return Runtime(device=dev, precision=resolve_precision(precision, dev), rank=rank, world_size=world)


def gather_to_main(obj: object, rt: Runtime) -> list[object] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere); ``[obj]`` single process."""
    if not rt.distributed:
        return [obj]
    out: list[object] | None = [None] * rt.world_size if rt.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj: object, rt: Runtime) -> object:
    """Rank 0's ``obj`` on every rank (e.g. whether a cache entry exists)."""
    if not rt.distributed:
        return obj
    box = [obj if rt.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
