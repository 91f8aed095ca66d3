"""The batch stage: examples -> the §2 batch (docs/architecture.md), and its buffers."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.decode import Example

if TYPE_CHECKING:
    from pipeline.loader import LoaderConfig

Alloc = Callable[[tuple[int, ...]], torch.Tensor]


def batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
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


class BatchRows:
    """Hands the decode stage the batch row of stream position ``p`` to decode into, allocating
    each batch's buffer when its first position comes; the batch stage then :meth:`take` s it."""

    def __init__(self, shape: tuple[int, ...], alloc: Alloc):
        self.shape, self.alloc = shape, alloc
        self._buf: torch.Tensor | None = None
        self._rows: np.ndarray | None = None

    def row(self, p: int) -> np.ndarray:
        if p % self.shape[0] == 0:
            self._buf = self.alloc(self.shape)
            self._rows = self._buf.numpy()
        assert self._rows is not None, "rows are handed out from a batch's first position on"
        return self._rows[p % self.shape[0]]

    def take(self) -> torch.Tensor:
        buf, self._buf, self._rows = self._buf, None, None
        assert buf is not None
        return buf


def collate(examples: list[Example], cfg: LoaderConfig, spec: dict[str, dict], audio_t: torch.Tensor | None = None,
            alloc: Alloc = batch_tensor) -> tuple[dict, int]:
    """Stack examples into a batch: §2's layout, but ``lengths`` and ``labels`` as numpy arrays
    (small arrays pickle inline; as tensors each would cost a shared-memory file and a file
    descriptor handed over a socket); :func:`finish` makes them tensors in the main process.
    ``audio_t`` is the preallocated ``(B, V, 1, T)`` batch that examples with ``views=None`` were
    decoded into; otherwise ``alloc(shape)`` gives the batch. Returns the batch and how many of its
    examples are padded."""
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


def finish(batch: dict) -> dict:
    """Main process: the worker's numpy ``lengths`` / ``labels`` become the §2 tensors."""
    batch["lengths"] = torch.from_numpy(batch["lengths"])
    batch["labels"] = {k: torch.from_numpy(np.asarray(v)) for k, v in batch["labels"].items()}
    return batch
