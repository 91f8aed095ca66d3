"""CLMR: SampleCNN on raw waveforms + NT-Xent (Spijkervet & Burgoyne, 2021).

The encoder follows CLMR's ``SampleCNN`` (Spijkervet/CLMR ``clmr/models/sample_cnn.py`` at
423414d, built by ``main.py`` with strides 3 x 9): a strided first convolution, blocks of
Conv1d(kernel 3, padding 1) + BatchNorm + ReLU + MaxPool(3), then a 512→512 convolution, so a
``3 ** (blocks + 1)``-sample input (59049 = 2.68 s at 22.05 kHz for 9 blocks) ends as one 512-d
frame. The default encoder has that model's 2,368,512 parameters without its ``fc`` head, which
SimCLR replaces by an identity (convolution weights and biases plus BatchNorm weights and biases;
the BatchNorm running statistics are buffers, not parameters). Initialisation is PyTorch's
default, as CLMR v2 trains it (its ``Model.initialize``, kaiming-uniform, is never called there;
the v1 branch, c6f4490 ``main.py``, did apply it).

The projection head is SimCLR's (Spijkervet/SimCLR ``simclr/simclr.py`` at 2738efa, the ``simclr``
package CLMR imports): Linear(512, 512, no bias)–ReLU–Linear(512, d, no bias), with d = 64 in CLMR
v2's ``config/config.yaml`` (423414d; v1 used 128).

Encoder calls and BatchNorm: SimCLR's ``forward(x_i, x_j)`` runs the encoder once per view, so each
view is its own BatchNorm batch, and CLMR trains with ``Trainer(sync_batchnorm=True)`` (``main.py``
at 423414d), so with several GPUs the statistics are over the global per-view batch.
``encoder_calls="per_view"`` (default) does the same; ``"shared"`` (ours, a departure) runs both
views in one call, one BatchNorm batch of 2B crops, which halves the kernel launches but lets each
view's normalisation see the other view. Global statistics need the trainer's
``--train.sync_batchnorm=true`` (``nn.SyncBatchNorm``, CUDA + DDP), which the paper presets set.

The loss is NT-Xent (SimCLR) at temperature 0.5. With ``gather_negatives=True`` (ours) every rank's
embeddings are all-gathered *with gradients*, so each anchor is contrasted with the 2N−2 negatives
of the global batch; CLMR contrasts only within a GPU's batch (``NT_Xent(batch_size, temperature,
world_size=1)`` in ``clmr/modules/contrastive_learning.py`` at 423414d): ``False``. On one GPU the
two are identical.

Scaling across ranks: each rank's loss is the mean over its own 2n anchors, and the all-gather's
backward sums the gradient of every rank's loss into the rank that owns an embedding. DDP then
averages parameter gradients over the W ranks, which gives exactly the gradient of the mean over
all 2N anchors, i.e. the single-process loss on the concatenated batch (tests/test_clmr.py checks
values and gradients over two gloo processes). BatchNorm statistics are per rank unless the trainer
converts the model to ``nn.SyncBatchNorm`` (CLMR's setting, see above).

Usage::

    model = CLMR(CLMRConfig.default())
    loss, metrics = model({"audio": audio})      # audio (B, 2, 1, 59049): two augmented views
    out = model.embed(audio[:, 0, 0])            # {"pooled": (B, 512), "frames": (B, 1, 512)}
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CLMR",
    "CLMRConfig",
    "SampleCNN",
    "all_gather_with_grad",
    "nt_xent",
    "nt_xent_stats",
]


@dataclass(kw_only=True)
class CLMRConfig:
    """SampleCNN + projection head + NT-Xent. Presets: ``default()`` (the paper) and ``tiny()`` (CPU tests)."""

    # Output channels of the conv+BN+ReLU+MaxPool(3) blocks; fewer blocks = shorter input.
    channels: tuple[int, ...] = (128, 128, 256, 256, 256, 256, 256, 256, 512)
    first_channels: int = 128  # the strided (kernel 3, stride 3) first convolution
    last_channels: int = 512  # the final 3-tap convolution = the embedding size
    projection_dim: int = 64  # CLMR v2 config/config.yaml (423414d); 128 in v1
    temperature: float = 0.5
    gather_negatives: bool = True  # all-gather with grads across ranks; False = per-GPU negatives (CLMR's)
    # "per_view": one encoder call (one BatchNorm batch) per view, as SimCLR/CLMR; "shared": both views
    # in one call (ours).
    encoder_calls: str = "per_view"

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) < 1:
            raise ValueError("model.channels: give at least one block width, e.g. (128, 128, 256)")
        for name, value in (
            ("model.channels", min(self.channels)),
            ("model.first_channels", self.first_channels),
            ("model.last_channels", self.last_channels),
            ("model.projection_dim", self.projection_dim),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if not self.temperature > 0:
            raise ValueError(f"model.temperature must be > 0, got {self.temperature}")
        if self.encoder_calls not in ("per_view", "shared"):
            raise ValueError(f"model.encoder_calls must be 'per_view' or 'shared', got {self.encoder_calls!r}")

    @property
    def input_samples(self) -> int:
        """Crop length that the encoder reduces to exactly one frame: ``3 ** (blocks + 1)``."""
        return 3 ** (len(self.channels) + 1)

    @classmethod
    def default(cls) -> CLMRConfig:
        """CLMR v2's model: SampleCNN (59049 samples, 2,368,512 encoder parameters), d = 64, per-view calls."""
        return cls()

    @classmethod
    def tiny(cls) -> CLMRConfig:
        """6 narrow blocks, 2187-sample input, 34,656 parameters (28,512 encoder): CPU tests in milliseconds."""
        return cls(
            channels=(16, 16, 32, 32, 32, 64),
            first_channels=16,
            last_channels=64,
            projection_dim=32,
        )


class SampleCNN(nn.Module):
    """The CLMR encoder: ``(B, 1, T) -> (B, last_channels)``.

    For ``T == config.input_samples`` the last map has one frame, which is the embedding (CLMR
    flattens it); longer inputs give several frames, averaged.
    """

    def __init__(self, config: CLMRConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv1d(1, config.first_channels, kernel_size=3, stride=3),
                nn.BatchNorm1d(config.first_channels),
                nn.ReLU(),
            )
        ]
        c_in = config.first_channels
        for c_out in config.channels:
            layers.append(
                nn.Sequential(
                    nn.Conv1d(c_in, c_out, kernel_size=3, padding=1),
                    nn.BatchNorm1d(c_out),
                    nn.ReLU(),
                    nn.MaxPool1d(3),
                )
            )
            c_in = c_out
        layers.append(
            nn.Sequential(
                nn.Conv1d(c_in, config.last_channels, kernel_size=3, padding=1),
                nn.BatchNorm1d(config.last_channels),
                nn.ReLU(),
            )
        )
        self.blocks = nn.Sequential(*layers)
        self.out_dim = config.last_channels

    def features(self, x: Tensor) -> Tensor:
        """The last convolution map ``(B, 1, T) -> (B, C, T')``, ``T' = T // input_samples`` (about)."""
        self._check(x)
        return self.blocks(x)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"SampleCNN expects mono audio (B, 1, T), got shape {tuple(x.shape)}")
        if x.shape[-1] < self.config.input_samples:
            raise ValueError(
                f"SampleCNN needs at least {self.config.input_samples} samples per crop "
                f"(3 ** (len(model.channels) + 1)), got {x.shape[-1]}: raise the loader's crop length "
                "or use fewer blocks in model.channels"
            )

    def block_features(self, x: Tensor) -> list[Tensor]:
        """Every block's output map, first convolution to last: ``[(B, C_i, T_i), ...]``; the last is :meth:`features`."""
        self._check(x)
        maps = []
        for block in self.blocks:
            x = block(x)
            maps.append(x)
        return maps

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=-1)  # (B, C); one frame at input_samples


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum over ranks of its slice's gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every rank's loss depends on every rank's embeddings: sum those gradients (all_reduce works
        # on gloo and NCCL alike; the tensors are (W*2n, d), tiny next to the model's gradients).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (n, ...) from all ranks in rank order, keeping gradients; ``x`` itself when not distributed.

    Every rank must pass the same ``n``.
    """
    if not _distributed():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    if len({int(s.item()) for s in sizes}) != 1:
        raise ValueError(
            f"all_gather_with_grad: ranks hold different batch sizes {[int(s.item()) for s in sizes]}; "
            "every rank must yield the same batch size (drop the last partial batch in the loader)"
        )
    return _AllGatherWithGrad.apply(x)


def nt_xent_stats(z1: Tensor, z2: Tensor, temperature: float, *, gather: bool) -> dict[str, Tensor]:
    """NT-Xent of two views ``z1, z2`` (n, d) with the statistics worth logging.

    Returns ``loss`` (with grad; mean over this rank's 2n anchors), ``accuracy`` (top-1 of the
    positive among the 2N-1 candidates), ``pos_sim`` and ``neg_sim`` (mean cosine similarity of
    positive and negative pairs). With ``gather`` and an initialized process group the candidates
    are the 2N embeddings of all ranks (see the module docstring for the gradient scaling).
    Computed in float32 whatever the autocast state, so bf16 training keeps an exact softmax.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent: z1 and z2 must both be (n, d), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2n, d): view 1 rows, then view 2
        if gather and _distributed():
            everyone, rank = all_gather_with_grad(local), dist.get_rank()  # (W*2n, d), rank-major
        else:
            everyone, rank = local, 0
        cos = local @ everyone.t()  # (2n, W*2n)
        rows = torch.arange(2 * n, device=local.device)
        own = rank * 2 * n + rows  # column of each anchor itself
        positive = rank * 2 * n + (rows + n) % (2 * n)  # the other view of the same clip
        logits = (cos / temperature).masked_fill(F.one_hot(own, cos.shape[1]).bool(), float("-inf"))
        loss = F.cross_entropy(logits, positive)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == positive).float().mean()
            pos_sim = cos[rows, positive].mean()
            neg_mask = torch.ones_like(cos, dtype=torch.bool)
            neg_mask[rows, own] = False
            neg_mask[rows, positive] = False
            # Masked sums, not boolean indexing: no host sync in the training step.
            neg_sim = (cos * neg_mask).sum() / neg_mask.sum().clamp(min=1)
    return {"loss": loss, "accuracy": accuracy, "pos_sim": pos_sim, "neg_sim": neg_sim}


def nt_xent(z1: Tensor, z2: Tensor, temperature: float, *, gather: bool) -> tuple[Tensor, Tensor]:
    """NT-Xent loss (mean over this rank's anchors) and top-1 contrastive accuracy; see ``nt_xent_stats``."""
    out = nt_xent_stats(z1, z2, temperature, gather=gather)
    return out["loss"], out["accuracy"]


class CLMR(nn.Module):
    """SampleCNN encoder + projection head trained with NT-Xent on two views of each clip."""

    def __init__(self, config: CLMRConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = SampleCNN(config)
        d = config.last_channels
        self.projector = nn.Sequential(
            nn.Linear(d, d, bias=False),
            nn.ReLU(),
            nn.Linear(d, config.projection_dim, bias=False),
        )

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch["audio"]`` (B, 2, 1, T) -> (loss, metrics). ``lengths`` is not needed: padding is part of a view."""
        audio = batch["audio"]
        if audio.dim() != 4 or audio.shape[1] != 2 or audio.shape[2] != 1:
            raise ValueError(
                f"CLMR expects batch['audio'] of shape (B, 2 views, 1 channel, T), got {tuple(audio.shape)}: "
                "run the loader in CLMR (two-view) mode with mono audio"
            )
        b = audio.shape[0]
        if self.config.encoder_calls == "per_view":
            # SimCLR's two calls: each view is its own BatchNorm batch of B crops.
            h = torch.cat([self.encoder(audio[:, 0]), self.encoder(audio[:, 1])])  # (2B, C)
        else:
            h = self.encoder(torch.cat([audio[:, 0], audio[:, 1]]))  # (2B, C): one BatchNorm batch of 2B
        z = self.projector(h)  # (2B, d)
        stats = nt_xent_stats(z[:b], z[b:], self.config.temperature, gather=self.config.gather_negatives)
        with torch.no_grad():
            # A collapsing encoder shows as a per-dimension std of the normalised embeddings -> 0.
            embed_std = F.normalize(h.float(), dim=1).std(dim=0).mean()
        metrics = {
            "contrastive_acc": stats["accuracy"],
            "pos_sim": stats["pos_sim"],
            "neg_sim": stats["neg_sim"],
            "embed_std": embed_std,
        }
        return stats["loss"], {k: v.detach() for k, v in metrics.items()}

    def embed(self, audio: Tensor) -> dict[str, Tensor]:
        """Encoder features without the head: ``audio`` (B, T) -> pooled (B, C), frames (B, T', C),
        ``blocks``: each block's map averaged over time, first convolution to last, ``[(B, C_i), ...]``,
        and ``blocks_std``: the same maps' (biased) standard deviations over time."""
        if audio.dim() != 2:
            raise ValueError(f"CLMR.embed expects mono audio (B, T), got shape {tuple(audio.shape)}")
        maps = self.encoder.block_features(audio.unsqueeze(1))
        frames = maps[-1].transpose(1, 2)  # (B, T', C)
        return {"pooled": frames.mean(dim=1), "frames": frames, "blocks": [m.mean(dim=-1) for m in maps],
                "blocks_std": [m.std(dim=-1, unbiased=False) for m in maps]}
