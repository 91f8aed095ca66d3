"""The checkpoint artefact (docs/architecture.md §5): its one writer and its one reader.

A run's checkpoints are ``ckpt-<step:08d>.pt`` files in one folder (a local path or a bucket URL),
written atomically (temp file + rename, or one PUT) with the newest ``keep`` kept. Every value in
them loads with ``torch.load(weights_only=True)``; a file that needs more (pickled Python objects)
is refused in our words, never loaded.

Who uses what:

- a trainer: :func:`refuse_fresh_run` (a fresh run must not rotate an earlier run's files away),
  :func:`save_run` (every rank calls it; per-rank states are gathered to rank 0),
  :func:`resume_point` (``--resume auto`` falls back past an unreadable newest file),
  :func:`rank_state`, :func:`rng_state` / :func:`set_rng_state` / :func:`seed_or_restore_rng`,
  :func:`set_scaler_state`;
- evaluation: :func:`read` (the state and the file's sha256, for cache keys),
  :func:`model_from_state` and :func:`load_model_from_checkpoint`.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline import fsio
from training.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from torch import nn

    from train_config import Config
    from training.distributed import Dist

FORMAT = "musicssl-ckpt/1"


def checkpoint_url(folder: str, step: int) -> str:
    return fsio.join_url(folder, f"ckpt-{step:08d}.pt")


def list_checkpoints(folder: str) -> list[tuple[int, str]]:
    """``(step, url)`` of the ``ckpt-<step>.pt`` files in ``folder``, oldest first."""
    out = []
    for name in fsio.list_dir(folder):
        if name.startswith("ckpt-") and name.endswith(".pt") and name[5:-3].isdigit():
            out.append((int(name[5:-3]), fsio.join_url(folder, name)))
    return sorted(out)


def save(folder: str, state: dict[str, Any], keep: int) -> str:
    """Write ``ckpt-<state["step"]>.pt`` atomically, then delete all but the newest ``keep``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    url = checkpoint_url(folder, state["step"])
    fsio.makedirs(folder)
    fsio.write_bytes_atomic(url, buf.getvalue())
    for _, old in list_checkpoints(folder)[:-keep]:
        fsio.remove(old)
    return url


def read(url: str, *, flag: str = "--resume") -> tuple[dict[str, Any], str]:
    """``(state, sha256 of the file)``; every failure is a :class:`CheckpointError` naming ``flag`` and the file."""
    try:
        data = fsio.read_bytes(url)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{flag} {url}: no such file; pass a ckpt-<step>.pt written by train.py") from exc
    if not data:
        raise CheckpointError(f"{flag} {url}: the file is empty (a checkpoint cut off while it was written?)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - hostile pickle, truncated zip, bad magic number, EOF, ...
        # torch's own text suggests weights_only=False, which would run whatever the file holds:
        # never repeat it. A refused GLOBAL means the file asks to build Python objects.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if isinstance(exc, pickle.UnpicklingError) and found:
            raise CheckpointError(
                f"{flag} {url}: the file holds non-tensor Python objects ({found.group(1)}); a musicssl checkpoint "
                "holds only tensors and plain values, so this file will not be loaded"
            ) from None
        why = re.search(r"WeightsUnpickler error: (.*)", str(exc))
        first = (why.group(1) if why else str(exc).split(". ")[0]).strip() or type(exc).__name__
        raise CheckpointError(f"{flag} {url}: truncated or not a checkpoint ({len(data)} bytes; {first}); "
                              "pass a ckpt-<step>.pt written by train.py") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{flag} {url} is not a {FORMAT} checkpoint (see docs/architecture.md §5)")
    return state, hashlib.sha256(data).hexdigest()


def load(url: str, *, flag: str = "--resume") -> dict[str, Any]:
    """The checkpoint's state (see :func:`read`)."""
    return read(url, flag=flag)[0]


def find_resume(resume: str, folder: str) -> str | None:
    """The checkpoint ``resume`` names: ``none`` -> None, ``auto`` -> the newest in ``folder`` (or None)."""
    if resume == "none":
        return None
    if resume != "auto":
        return resume
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def resume_point(resume: str, folder: str, *, say: Callable[[str], None] = print) -> tuple[str | None, dict[str, Any] | None]:
    """``(url, state)`` to resume from, or ``(None, None)`` for a fresh start.

    ``auto`` takes the newest readable checkpoint in ``folder``: an unreadable one (empty, cut off,
    holding non-tensor objects) is named through ``say`` and the previous one is tried. An explicit
    URL that cannot be read is an error.
    """
    if resume != "auto":
        return (None, None) if resume == "none" else (resume, load(resume))
    found = list_checkpoints(folder)
    for i, (_, url) in enumerate(reversed(found)):
        try:
            state = load(url)
        except CheckpointError as exc:
            older = found[-2 - i][1] if i + 1 < len(found) else None
            say(f"[train] warning: {exc}; " + (f"falling back to {older}" if older else "no older checkpoint to fall back to"))
            continue
        return url, state
    if found:
        raise CheckpointError(f"--resume auto: none of the {len(found)} checkpoints in {folder} is readable (see the "
                              "warnings above); pass --resume URL, or start afresh in another run folder")
    return None, None


def refuse_fresh_run(folder: str, resume: str, *, flag: str, elsewhere: str) -> None:
    """A fresh run (``resume == "none"``) in a ``folder`` that holds checkpoints is a :class:`ConfigError`:
    it would rotate them away. ``flag`` names the folder's flag, ``elsewhere`` how to start afresh."""
    if resume != "none":
        return
    found = list_checkpoints(folder)
    if found:
        raise ConfigError(
            f"{flag} {folder} already holds checkpoints of an earlier run (newest {found[-1][1]}); continue it with "
            f"--resume auto, or start afresh {elsewhere} (a new run there would rotate the old checkpoints away)"
        )


def save_run(folder: str, keep: int, env: Dist, *, step: int, mine: dict[str, Any],
             shared: Callable[[], dict[str, Any]]) -> str | None:
    """Write one checkpoint of a (possibly distributed) run; every rank calls this.

    ``mine`` is this rank's own state (data position, augmentation generator, RNG): it is gathered
    into ``"ranks"`` and rank 0's copy also stands at the top level. ``shared()`` (the model,
    optimizer, ... the same on every rank) is called on rank 0 only. Returns the URL on rank 0.
    """
    ranks = env.gather_objects(mine)
    url = None
    if env.master:
        url = save(folder, {"format": FORMAT, "step": step, **shared(), **mine, "ranks": ranks}, keep)
    env.barrier()
    return url


def rank_state(state: dict[str, Any], rank: int, world: int) -> tuple[dict[str, Any], bool]:
    """This rank's own ``{"loader", "augment", "rng", ...}`` and whether it is its own (same world
    size); with another world size every rank gets rank 0's (the top-level copy)."""
    ranks = state.get("ranks") or []
    if len(ranks) == world:
        return ranks[rank], True
    return ({k: state[k] for k in ranks[0]} if ranks else state), False


def rng_state(device: torch.device) -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python generator states as tensors and lists (weights_only-safe)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        # numpy/python states as tensors/lists: weights_only loading refuses numpy arrays
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": _to_lists(random.getstate()),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_to_tuples(state["python"]))


def set_scaler_state(scaler: torch.amp.GradScaler, state: dict[str, Any] | None, *,
                     say: Callable[[str], None] = print) -> None:
    """Restore a checkpoint's ``"scaler"`` (``--train.precision=fp16``'s loss scale and growth
    counter) into ``scaler``. A checkpoint without one (written under bf16/fp32, or before the key
    existed) leaves a fresh scaler, said through ``say``; a disabled scaler ignores it."""
    if not scaler.is_enabled():
        return
    if not state:
        say("[train] note: the checkpoint holds no fp16 gradient-scaler state; the loss scale starts afresh")
        return
    scaler.load_state_dict(state)


def seed_or_restore_rng(rng: dict[str, Any] | None, *, seed: int, rank: int, device: torch.device) -> None:
    """Restore a checkpoint's RNG states, or seed torch, numpy and Python with ``seed + rank`` (fresh run)."""
    if rng is not None:
        set_rng_state(rng, device)
    else:
        torch.manual_seed(seed + rank)
        np.random.seed((seed + rank) % 2**32)
        random.seed(seed + rank)


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (list, tuple)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def load_model_from_checkpoint(url: str, *, map_location: str | torch.device = "cpu",
                               flag: str = "--checkpoint") -> tuple[nn.Module, Config]:
    """Rebuild the model a checkpoint was trained with (its resolved config) and load its weights."""
    model, cfg = model_from_state(load(url, flag=flag))
    return model.to(map_location), cfg


def refuse_finetune_state(state: dict[str, Any], *, flag: str = "--checkpoint", url: str = "") -> None:
    """A fine-tuning run's checkpoint (eval_tools/finetune.py) where a train.py one is needed: a CheckpointError."""
    if state.get("model_name") == "supervised":
        where = f"{flag} {url}" if url else flag
        raise CheckpointError(f"{where}: a fine-tuning run's checkpoint (encoder + heads), not a train.py one; use "
                              "the model folder the run saved (evaluate.py predict --model OUT/models/<run>), or the "
                              "train.py checkpoint it started from")


def model_from_state(state: dict[str, Any]) -> tuple[nn.Module, Config]:
    """The model of a loaded checkpoint, rebuilt from its resolved config, with its weights (CPU)."""
    import train_config as tc

    refuse_finetune_state(state)
    cfg = tc.from_dict(state["config"])
    _, model_cls = tc.model_classes(cfg.arch)
    model = model_cls(cfg.model)
    model.load_state_dict(state["model"])
    return model, cfg
