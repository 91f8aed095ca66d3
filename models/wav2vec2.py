"""wav2vec 2.0 pre-training (Baevski et al. 2020) with fairseq BASE semantics, for music.

One file: the config, the feature encoder, the transformer context network, the Gumbel quantizer,
span masking, negative sampling and the masked contrastive loss (architecture.md §4).

What follows fairseq's ``wav2vec2.py`` / ``wav2vec_criterion.py`` (BASE recipe):

- feature encoder ``[(512,10,5)] + [(512,3,2)]*4 + [(512,2,2)]*2``, no conv bias, GELU, per-channel
  group norm after the first conv ("group_norm" mode) or a layer norm after every conv
  ("layer_norm" mode); gradient into the encoder scaled by ``feature_grad_mult`` (0.1); feature
  penalty ``mean(features**2)`` (taken after the gradient scaling, as fairseq does);
- ``LayerNorm(512)`` -> ``Linear(512, 768)`` -> dropout; the layer-normed features (with their own
  dropout) feed the quantizer;
- span masking: per clip ``int(mask_prob * T / mask_length + U[0,1))`` span starts, at least
  ``mask_min_spans`` (2) starts, spans of ``mask_length`` frames that may overlap, then every clip
  trimmed at random to the smallest masked count in the batch ("require_same_masks"); padded frames
  are never masked; masked frames are replaced by a learned embedding;
- convolutional positional embedding (kernel 128, 16 groups, weight norm over the kernel axis, the
  last frame trimmed for an even kernel, GELU), post-LN transformer (``layer_norm_first`` for pre-LN)
  with layerdrop; attention through ``F.scaled_dot_product_attention``;
- Gumbel quantizer on the *masked* frames only (2 groups x 320 entries, code dim 256, hard
  straight-through), temperature ``max(2 * 0.999995**step, 0.5)``;
- logits = cosine(prediction, candidate) / 0.1 over the positive and 100 negatives drawn uniformly,
  with replacement, from the other masked frames of the same clip; a negative whose code equals the
  positive's gets ``-inf``.

Loss normalisation: fairseq sums the cross-entropy over masked frames, adds
``0.1 * N * (GV - prob_perplexity) / GV`` and ``10 * N * features_pen`` (N = masked frames in the
batch) and then divides the gradient by N. ``forward`` returns exactly that quotient: the mean
cross-entropy per masked frame + 0.1 * diversity + 10 * feature penalty. HF's
``Wav2Vec2ForPreTraining`` returns the un-normalised sum (and no feature penalty); multiply our
``loss_contrastive`` by ``num_masked`` to compare.

Where this departs from a literal port, for speed (same values up to float rounding, see
tests/test_wav2vec2_parity.py):

- the quantizer is a per-group matmul ``(N,G,V) x (G,V,d)`` instead of materialising ``(N, G*V, d)``;
- logits for the negatives are gathered from the ``(B, M, M)`` cosine matrix of each clip's masked
  predictions against its masked targets, instead of gathering ``(B, M, K, D)`` negative vectors;
- "negative equal to the positive" is decided on the code indices (equal codes give equal vectors),
  which is immune to the rounding of the straight-through estimator;
- mask and negative sampling are vectorised torch ops on the model's device (one host sync per step
  for the masked count).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Wav2Vec2Config",
    "Wav2Vec2Pretrain",
    "compute_mask_spans",
    "sample_negatives",
    "frame_lengths",
    "gumbel_temperature",
    "hf_config_mismatches",
    "state_dict_from_hf",
    "to_hf",
]

_BASE_CONV = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


@dataclass(kw_only=True)
class Wav2Vec2Config:
    """wav2vec 2.0 hyper-parameters; defaults are fairseq's BASE pre-training recipe."""

    # feature encoder: (channels, kernel, stride) per conv layer
    conv_layers: tuple[tuple[int, int, int], ...] = _BASE_CONV
    extractor_mode: str = "group_norm"  # "group_norm" (BASE) | "layer_norm" (LARGE-style)
    conv_bias: bool = False
    feature_grad_mult: float = 0.1
    # context network
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    layer_norm_first: bool = False  # False = post-LN (BASE), True = pre-LN
    conv_pos: int = 128
    conv_pos_groups: int = 16
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.1
    dropout_features: float = 0.1
    layerdrop: float = 0.05
    layer_norm_eps: float = 1e-5
    # masking
    mask_prob: float = 0.65
    mask_length: int = 10
    mask_min_spans: int = 2
    require_same_masks: bool = True
    # quantizer and loss
    latent_vars: int = 320
    latent_groups: int = 2
    latent_dim: int = 256  # quantized vector size (fairseq: latent_dim or, when 0, final_dim)
    final_dim: int = 256
    latent_temp: tuple[float, float, float] = (2.0, 0.5, 0.999995)  # (max, min, decay)
    num_negatives: int = 100  # per masked frame, from the other masked frames of its clip
    # per masked frame, from every masked frame of the batch (fairseq's cross_sample_negatives; BASE: 0)
    cross_sample_negatives: int = 0
    logit_temp: float = 0.1
    diversity_weight: float = 0.1
    feature_pen_weight: float = 10.0

    def __post_init__(self) -> None:
        # accept lists from JSON / checkpoints
        self.conv_layers = tuple(tuple(int(v) for v in layer) for layer in self.conv_layers)
        self.latent_temp = tuple(float(v) for v in self.latent_temp)
        if not self.conv_layers or any(len(l) != 3 or min(l) < 1 for l in self.conv_layers):
            raise ValueError(
                f"--model.conv_layers must be a non-empty list of (channels, kernel, stride) "
                f"positive triples, got {self.conv_layers}"
            )
        if self.extractor_mode not in ("group_norm", "layer_norm"):
            raise ValueError(
                f"--model.extractor_mode must be 'group_norm' or 'layer_norm', got {self.extractor_mode!r}"
            )
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"--model.embed_dim ({self.embed_dim}) must be divisible by --model.num_heads ({self.num_heads})"
            )
        if self.embed_dim % self.conv_pos_groups:
            raise ValueError(
                f"--model.embed_dim ({self.embed_dim}) must be divisible by "
                f"--model.conv_pos_groups ({self.conv_pos_groups})"
            )
        if self.latent_dim % self.latent_groups:
            raise ValueError(
                f"--model.latent_dim ({self.latent_dim}) must be divisible by "
                f"--model.latent_groups ({self.latent_groups})"
            )
        for name in ("dropout", "attention_dropout", "activation_dropout", "dropout_input",
                     "dropout_features", "layerdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--model.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"--model.mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.mask_length < 1 or self.mask_min_spans < 0:
            raise ValueError(
                f"--model.mask_length must be >= 1 and --model.mask_min_spans >= 0, "
                f"got {self.mask_length} and {self.mask_min_spans}"
            )
        tmax, tmin, decay = self.latent_temp
        if not (0.0 < tmin <= tmax and 0.0 < decay <= 1.0):
            raise ValueError(
                f"--model.latent_temp must be (max, min, decay) with 0 < min <= max and 0 < decay <= 1, "
                f"got {self.latent_temp}"
            )
        positive = ("embed_dim", "num_layers", "num_heads", "ffn_dim", "conv_pos", "conv_pos_groups",
                    "latent_vars", "latent_groups", "latent_dim", "final_dim")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--model.{name} must be >= 1, got {getattr(self, name)}")
        if self.cross_sample_negatives < 0 or self.num_negatives < 0 or self.num_negatives + self.cross_sample_negatives < 1:
            raise ValueError(
                f"--model.num_negatives and --model.cross_sample_negatives must be >= 0 with at least one "
                f"negative in all, got {self.num_negatives} and {self.cross_sample_negatives}"
            )
        if self.logit_temp <= 0:
            raise ValueError(f"--model.logit_temp must be > 0, got {self.logit_temp}")
        if self.feature_grad_mult < 0:
            raise ValueError(f"--model.feature_grad_mult must be >= 0, got {self.feature_grad_mult}")

    @property
    def frame_stride(self) -> int:
        """Input samples per output frame (320 for the default encoder: 20 ms at 16 kHz)."""
        return math.prod(s for _, _, s in self.conv_layers)

    @property
    def receptive_field(self) -> int:
        """Input samples seen by one output frame (400 for the default encoder)."""
        rf = 1
        for _, k, s in reversed(self.conv_layers):
            rf = (rf - 1) * s + k
        return rf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def base(cls) -> Wav2Vec2Config:
        """fairseq BASE: 12 x 768 post-LN transformer, ~95M parameters."""
        return cls()

    @classmethod
    def small(cls) -> Wav2Vec2Config:
        """A 6 x 384 transformer over a 256-channel encoder (same 320-sample stride), ~13M parameters."""
        return cls(
            conv_layers=((256, 10, 5),) + ((256, 3, 2),) * 4 + ((256, 2, 2),) * 2,
            embed_dim=384, num_layers=6, num_heads=6, ffn_dim=1536, conv_pos=64, conv_pos_groups=16,
        )

    @classmethod
    def tiny(cls) -> Wav2Vec2Config:
        """For CPU tests: 32-channel encoder (stride 320), 2 x 64 transformer, 2 x 16 codes."""
        return cls(
            conv_layers=((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2,
            embed_dim=64, num_layers=2, num_heads=4, ffn_dim=128, conv_pos=16, conv_pos_groups=4,
            latent_vars=16, latent_dim=32, final_dim=32, num_negatives=20, layerdrop=0.0,
        )


def gumbel_temperature(config: Wav2Vec2Config, step: int) -> float:
    """fairseq's schedule: ``max(max_temp * decay**step, min_temp)``."""
    tmax, tmin, decay = config.latent_temp
    return max(tmax * decay**step, tmin)


def frame_lengths(config: Wav2Vec2Config, lengths: Tensor) -> Tensor:
    """Valid output frames for ``lengths`` valid input samples (the conv length formula, per layer)."""
    out = lengths
    for _, k, s in config.conv_layers:
        out = torch.div(out - k, s, rounding_mode="floor") + 1
    return out.clamp_min(0)


# ---------------------------------------------------------------------------------------------
# masking and negatives


def _rank_select(keys: Tensor, counts: Tensor) -> Tensor:
    """Per row, True at the ``counts[b]`` positions holding the smallest keys (inf = not eligible)."""
    order = keys.argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(keys.shape[1], device=keys.device).expand_as(order))
    return (ranks < counts[:, None]) & torch.isfinite(keys)


def compute_mask_spans(
    shape: tuple[int, int],
    *,
    mask_prob: float,
    mask_length: int,
    min_spans: int = 2,
    valid_frames: Tensor | None = None,
    require_same_masks: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """fairseq's static span mask, vectorised: bool ``(B, T)``, True = masked.

    Per clip with ``sz`` valid frames: ``num = max(min_spans, int(mask_prob * sz / mask_length + u))``
    with ``u ~ U[0, 1)`` drawn per clip; ``num`` distinct span starts drawn uniformly from
    ``[0, sz - mask_length)`` (``[0, num]`` when that range is too short, as fairseq does); spans of
    ``mask_length`` frames, overlaps allowed, cut at ``sz``. With ``require_same_masks`` every clip
    keeps a uniformly random subset of its masked frames of the batch's smallest masked count.
    Random draws come from ``generator`` (on its device) and the result is moved to ``device``.
    """
    bsz, tsz = shape
    gdev = generator.device if generator is not None else torch.device(device or "cpu")
    sz = (torch.full((bsz,), tsz, dtype=torch.long, device=gdev) if valid_frames is None
          else valid_frames.to(gdev, torch.long).clamp(0, tsz))
    u = torch.rand(bsz, generator=generator, device=gdev)
    num = torch.floor(mask_prob * sz.double() / mask_length + u.double()).long().clamp_min(min_spans)
    span = torch.full_like(sz, mask_length)
    short = sz - span <= num
    span = torch.where(short, sz - num - 1, span)
    start_range = sz - span  # starts are drawn from [0, start_range)
    # starts lie below start_range <= max(tsz, num + 1); bound num on the host to avoid a device sync
    width = max(tsz, max(min_spans, int(mask_prob * tsz / mask_length) + 1) + 1)
    pos = torch.arange(width, device=gdev)
    keys = torch.rand(bsz, width, generator=generator, device=gdev)
    keys = keys.masked_fill(pos[None, :] >= start_range[:, None], float("inf"))
    starts = _rank_select(keys, num).long()
    # frame t is masked when a start lies in (t - mask_length, t]: a windowed count via cumsum
    csum = F.pad(starts.cumsum(1), (1, 0))
    hi = torch.arange(1, width + 1, device=gdev)
    covered = (csum[:, hi] - csum[:, (hi - mask_length).clamp_min(0)]) > 0
    mask = covered[:, :tsz] & (torch.arange(tsz, device=gdev)[None, :] < sz[:, None])
    if require_same_masks and bsz > 1:
        counts = mask.sum(1)
        keep = counts.min().expand(bsz)
        keys = torch.rand(bsz, tsz, generator=generator, device=gdev).masked_fill(~mask, float("inf"))
        mask = _rank_select(keys, keep)
    return mask.to(device) if device is not None else mask


def sample_negatives(
    num_masked: int,
    num_negatives: int,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Negative indices ``(B, M, K)`` into each clip's ``M`` masked frames, never the frame itself.

    fairseq's sampler: uniform with replacement over the other ``M - 1`` masked frames of the same
    clip (draw from ``[0, M-1)`` and shift indices ``>= m`` up by one).
    """
    if num_masked < 2:
        raise ValueError(f"need at least 2 masked frames per clip to draw negatives, got {num_masked}")
    gdev = generator.device if generator is not None else torch.device(device or "cpu")
    idx = torch.randint(0, num_masked - 1, (batch_size, num_masked, num_negatives),
                        generator=generator, device=gdev)
    self_idx = torch.arange(num_masked, device=gdev)[None, :, None]
    idx = idx + (idx >= self_idx).long()
    return idx.to(device) if device is not None else idx


def sample_cross_negatives(
    num_masked: int,
    num_negatives: int,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Negative indices ``(B, M, K)`` into the batch's ``B * M`` masked frames, flattened clip by
    clip (frame ``m`` of clip ``b`` is ``b * M + m``), never the frame itself.

    fairseq's ``cross_sample_negatives`` (``Wav2Vec2Model.sample_negatives``, fairseq commit
    fd7ca78): uniform with replacement over the batch's masked targets. Departure: fairseq's
    exclusion compares the flat index with the frame's index within its clip, so for every clip but
    the first it may draw the frame itself (its ``neg_is_pos`` then masks that logit); here the
    frame itself is excluded for every clip (draw from ``[0, B*M-1)``, shift indices ``>=`` the
    frame's own up by one).
    """
    n = batch_size * num_masked
    if n < 2:
        raise ValueError(f"need at least 2 masked frames in the batch to draw negatives, got {n}")
    gdev = generator.device if generator is not None else torch.device(device or "cpu")
    idx = torch.randint(0, n - 1, (batch_size, num_masked, num_negatives), generator=generator, device=gdev)
    self_idx = torch.arange(n, device=gdev).view(batch_size, num_masked, 1)
    idx = idx + (idx >= self_idx).long()
    return idx.to(device) if device is not None else idx


# ---------------------------------------------------------------------------------------------
# modules


class _GradMultiply(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:  # noqa: D102
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad * ctx.scale, None


class FeatureEncoder(nn.Module):
    """Strided conv stack over the waveform: ``(B, T) -> (B, C, T')``."""

    def __init__(self, config: Wav2Vec2Config) -> None:
        super().__init__()
        self.mode = config.extractor_mode
        self.conv_layers = config.conv_layers
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        in_ch = 1
        for i, (ch, k, s) in enumerate(config.conv_layers):
            self.convs.append(nn.Conv1d(in_ch, ch, k, stride=s, bias=config.conv_bias))
            if self.mode == "layer_norm":
                self.norms.append(nn.LayerNorm(ch))
            elif i == 0:
                self.norms.append(nn.GroupNorm(ch, ch))  # per-channel normalisation over time
            in_ch = ch
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        """``x`` (B, T) -> (B, C, T'). With ``lengths`` (valid samples per clip) the first layer's
        group norm takes its statistics over each clip's valid frames only, so a zero-padded clip
        gets exactly the features of the clip alone (see ``Wav2Vec2Pretrain.embed``); without it
        the statistics span the whole padded row, as fairseq's (pre-training keeps that)."""
        x = x[:, None]  # (B, 1, T)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.mode == "layer_norm":
                # norms in float32 under autocast, as fairseq's Fp32LayerNorm
                norm = self.norms[i]
                x = F.layer_norm(x.transpose(1, 2).float(), norm.normalized_shape, norm.weight,
                                 norm.bias, norm.eps).transpose(1, 2).type_as(x)
            elif i == 0:
                norm = self.norms[0]
                if lengths is None:
                    x = F.group_norm(x.float(), norm.num_groups, norm.weight, norm.bias, norm.eps).type_as(x)
                else:
                    _, k, s = self.conv_layers[0]
                    valid = torch.div(lengths.to(x.device) - k, s, rounding_mode="floor") + 1
                    x = _masked_instance_norm(x, valid, norm).type_as(x)
            x = F.gelu(x)
        return x  # (B, C, T')


def _masked_instance_norm(x: Tensor, valid: Tensor, norm: nn.GroupNorm) -> Tensor:
    """Per-channel normalisation over the first ``valid[b]`` frames of each row (float32):
    ``GroupNorm(C, C)`` of each clip alone, applied to its padded row.

    Rows that are all valid (fixed crops: fine-tuning, probes of equal-length clips) take the
    fused group norm. Otherwise the statistics are masked sums over time as two batched
    matrix-vector products: linear in the batch forward and backward (per-row slices instead
    cost a full-size zero gradient per row in backward, quadratic in the batch: 2.5x the step
    of the whole tiny model at batch 64)."""
    xf = x.float()  # (B, C, T)
    t = xf.shape[-1]
    if int(valid.min()) >= t:
        return F.group_norm(xf, norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
    n = valid.to(xf.device).clamp(1, t)
    mask = (torch.arange(t, device=xf.device)[None, :] < n[:, None]).to(xf.dtype)[..., None]  # (B, T, 1)
    count = n.to(xf.dtype)[:, None]  # (B, 1)
    mean = torch.bmm(xf, mask)[..., 0] / count  # (B, C)
    centred = xf - mean[..., None]
    var = torch.bmm(centred.square(), mask)[..., 0] / count
    scale = torch.rsqrt(var + norm.eps) * norm.weight.float()
    return torch.addcmul(norm.bias.float()[..., None], centred, scale[..., None])


class PositionalConv(nn.Module):
    """Grouped conv over time with weight norm on the kernel axis: ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, config: Wav2Vec2Config) -> None:
        super().__init__()
        d, k = config.embed_dim, config.conv_pos
        conv = nn.Conv1d(d, d, k, padding=k // 2, groups=config.conv_pos_groups)
        nn.init.normal_(conv.weight, mean=0.0, std=math.sqrt(4.0 * (1.0 - config.dropout) / (k * d)))
        nn.init.zeros_(conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.trim = 1 if k % 2 == 0 else 0  # an even kernel with k//2 padding yields one extra frame

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x.transpose(1, 2))
        if self.trim:
            y = y[:, :, : -self.trim]
        return F.gelu(y).transpose(1, 2)


class TransformerLayer(nn.Module):
    """Self-attention + FFN block, post-LN (fairseq BASE) or pre-LN."""

    def __init__(self, config: Wav2Vec2Config) -> None:
        super().__init__()
        d = config.embed_dim
        self.num_heads = config.num_heads
        self.pre_ln = config.layer_norm_first
        self.qkv = nn.Linear(d, 3 * d)  # fused q, k, v: one GEMM instead of three
        self.out_proj = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(d, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, d)
        self.final_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = config.dropout
        self.attention_dropout = config.attention_dropout
        self.activation_dropout = config.activation_dropout
        for lin in (self.qkv, self.out_proj, self.fc1, self.fc2):  # fairseq's init_bert_params
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def _attention(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
        )  # (B, H, T, Dh)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))

    def _ffn(self, x: Tensor) -> Tensor:
        h = F.dropout(F.gelu(self.fc1(x)), self.activation_dropout, self.training)
        return F.dropout(self.fc2(h), self.dropout, self.training)

    def forward(self, x: Tensor, attn_mask: Tensor | None) -> Tensor:
        if self.pre_ln:
            x = x + F.dropout(self._attention(self.attn_norm(x), attn_mask), self.dropout, self.training)
            return x + self._ffn(self.final_norm(x))
        x = self.attn_norm(x + F.dropout(self._attention(x, attn_mask), self.dropout, self.training))
        return self.final_norm(x + self._ffn(x))


class ContextNetwork(nn.Module):
    """Positional conv + transformer stack: ``(B, T, D) -> (B, T, D)`` and per-layer outputs."""

    def __init__(self, config: Wav2Vec2Config) -> None:
        super().__init__()
        self.pos_conv = PositionalConv(config)
        self.layer_norm = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.pre_ln = config.layer_norm_first
        self.dropout = config.dropout
        self.layerdrop = config.layerdrop

    def forward(self, x: Tensor, padding: Tensor | None, *, keep_layers: bool = False
                ) -> tuple[Tensor, list[Tensor]]:
        attn_mask = None
        if padding is not None:
            x = x.masked_fill(padding[..., None], 0.0)  # padded frames must not leak via the conv
            attn_mask = ~padding[:, None, None, :]  # (B, 1, 1, T): True = may attend
        x = x + self.pos_conv(x)
        if not self.pre_ln:
            x = self.layer_norm(x)
        x = F.dropout(x, self.dropout, self.training)
        layers = [x] if keep_layers else []
        # layerdrop decisions drawn on the CPU generator: no device sync
        drop = (torch.rand(len(self.layers)) < self.layerdrop).tolist() if (
            self.training and self.layerdrop > 0) else [False] * len(self.layers)
        for layer, skip in zip(self.layers, drop):
            if not skip:
                x = layer(x, attn_mask)
            if keep_layers:
                layers.append(x)
        if self.pre_ln:
            x = self.layer_norm(x)
        return x, layers


class GumbelQuantizer(nn.Module):
    """Product quantizer with Gumbel-softmax selection: ``(N, C) -> (N, latent_dim)`` + codes."""

    def __init__(self, config: Wav2Vec2Config, in_dim: int) -> None:
        super().__init__()
        self.groups, self.num_vars = config.latent_groups, config.latent_vars
        self.weight_proj = nn.Linear(in_dim, self.groups * self.num_vars)
        self.codevectors = nn.Parameter(
            torch.empty(self.groups, self.num_vars, config.latent_dim // self.groups).uniform_()
        )
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.weight_proj.bias)

    def forward(self, x: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return (quantized (N, latent_dim), codes (N, G), code_perplexity, prob_perplexity)."""
        n = x.shape[0]
        logits = self.weight_proj(x).float().view(n, self.groups, self.num_vars)  # (N, G, V)
        codes = logits.argmax(-1)  # (N, G)
        hard = F.one_hot(codes, self.num_vars).to(logits.dtype)
        with torch.no_grad():
            code_ppl = _perplexity(hard.mean(0))
        prob_ppl = _perplexity(logits.softmax(-1).mean(0))
        if self.training:
            gumbels = -torch.empty_like(logits).exponential_().log()
            soft = ((logits + gumbels) / temperature).softmax(-1)
            codes = soft.argmax(-1)
            hard = F.one_hot(codes, self.num_vars).to(soft.dtype)
            onehot = hard - soft.detach() + soft  # straight-through
        else:
            onehot = hard
        # (G, N, V) @ (G, V, d) -> (G, N, d): never materialise (N, G*V, d); float32 under autocast
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = torch.bmm(onehot.transpose(0, 1), self.codevectors.float())
        return q.transpose(0, 1).reshape(n, -1), codes, code_ppl, prob_ppl


def _perplexity(avg_probs: Tensor) -> Tensor:
    """Sum over groups of exp(entropy) of the (G, V) average distribution."""
    return torch.exp(-torch.xlogy(avg_probs, avg_probs).sum(-1)).sum()


class Wav2Vec2Pretrain(nn.Module):
    """wav2vec 2.0 with the quantizer and masked contrastive loss; see the module docstring."""

    def __init__(self, config: Wav2Vec2Config) -> None:
        super().__init__()
        self.config = config
        c = config
        feat_dim = c.conv_layers[-1][0]
        self.feature_extractor = FeatureEncoder(c)
        self.layer_norm = nn.LayerNorm(feat_dim)
        self.post_extract_proj = nn.Linear(feat_dim, c.embed_dim)
        self.mask_emb = nn.Parameter(torch.empty(c.embed_dim).uniform_())
        self.encoder = ContextNetwork(c)
        self.quantizer = GumbelQuantizer(c, feat_dim)
        self.project_q = nn.Linear(c.latent_dim, c.final_dim)
        self.final_proj = nn.Linear(c.embed_dim, c.final_dim)
        self.temperature = c.latent_temp[0]

    # -- schedule ---------------------------------------------------------------------------
    def set_step(self, step: int) -> None:
        """Set the Gumbel temperature for optimizer step ``step``."""
        self.temperature = gumbel_temperature(self.config, step)

    # -- shared front end ------------------------------------------------------------------
    def _features(self, audio: Tensor, lengths: Tensor | None, *, exact_padding: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
        """Return (projected (B,T',D), layer-normed features (B,T',C), penalty, padding, frames).

        ``exact_padding``: the group norm ignores padded samples (``embed``); pre-training keeps
        fairseq's statistics over the whole row."""
        c = self.config
        feats = self.feature_extractor(audio, lengths if exact_padding else None)  # (B, C, T')
        if c.feature_grad_mult != 1.0 and feats.requires_grad:  # in any mode, as fairseq
            feats = _GradMultiply.apply(feats, c.feature_grad_mult)
        pen = feats.float().pow(2).mean()
        feats = self.layer_norm(feats.transpose(1, 2))  # (B, T', C)
        b, t = feats.shape[:2]
        if lengths is None:
            frames = torch.full((b,), t, dtype=torch.long, device=feats.device)
        else:
            frames = frame_lengths(c, lengths.to(feats.device)).clamp_max(t)
        padding = torch.arange(t, device=feats.device)[None, :] >= frames[:, None]
        # SDPA takes its fast path without a mask: drop it when nothing is padded. Checked on the
        # host lengths when they are CPU tensors (the loader's), else one small device sync.
        if lengths is None:
            padding_or_none = None
        else:
            shortest = int(frame_lengths(c, lengths.min().cpu()))
            padding_or_none = padding if shortest < t else None
        x = F.dropout(self.post_extract_proj(feats), c.dropout_input, self.training)
        return x, feats, pen, padding_or_none, frames

    @staticmethod
    def _audio_from_batch(batch: dict) -> tuple[Tensor, Tensor | None]:
        audio = batch["audio"]
        if audio.dim() == 4:
            if audio.shape[1] != 1 or audio.shape[2] != 1:
                raise ValueError(
                    f"wav2vec2 takes one mono view: batch['audio'] must be (B, 1, 1, T), got "
                    f"{tuple(audio.shape)}; set the loader to single-crop mono mode"
                )
            audio = audio[:, 0, 0]
        elif audio.dim() != 2:
            raise ValueError(f"batch['audio'] must be (B, 1, 1, T) or (B, T), got {tuple(audio.shape)}")
        return audio, batch.get("lengths")

    # -- pre-training ------------------------------------------------------------------------
    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """Masked contrastive loss on ``batch["audio"]`` (B, 1, 1, T) with ``batch["lengths"]`` (B,)."""
        audio, lengths = self._audio_from_batch(batch)
        out = self.forward_with(audio, lengths)
        return out["loss"], out["metrics"]

    def forward_with(
        self,
        audio: Tensor,
        lengths: Tensor | None = None,
        mask_indices: Tensor | None = None,
        negative_indices: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, Any]:
        """The pre-training pass with optional given mask ``(B, T')`` and negatives ``(B, M, K)``.

        ``negative_indices`` index each clip's masked frames in time order (0..M-1). Returns a dict
        with ``loss``, ``metrics`` (detached), ``logits`` (B, M, 1+K+K'; column 0 the positive, then
        the clip's K negatives, then the K' cross-sample ones), ``mask`` (B, T'), ``negatives``
        (B, M, K), ``cross_negatives`` (B, M, K' indices into the batch's masked frames flattened
        clip by clip; None when ``cross_sample_negatives`` is 0, always drawn here), ``predictions``
        and ``targets`` (B, M, final_dim), ``codes`` (B, M, G), and the undetached loss terms.
        """
        c = self.config
        x, feats, pen, padding, frames = self._features(audio, lengths)
        b, t, _ = x.shape
        if mask_indices is None:
            mask = compute_mask_spans(
                (b, t), mask_prob=c.mask_prob, mask_length=c.mask_length, min_spans=c.mask_min_spans,
                valid_frames=frames, require_same_masks=c.require_same_masks, generator=generator,
                device=x.device,
            )
        else:
            mask = mask_indices.to(x.device, torch.bool)
            if padding is not None and bool((mask & padding).any()):
                raise ValueError("mask_indices mark padded frames; padded frames cannot be masked")
        counts = mask.sum(1)
        m, m_max = torch.stack([counts.min(), counts.max()]).tolist()  # the step's one host sync
        if m != m_max:
            raise ValueError(f"every clip needs the same number of masked frames, got {counts.tolist()}")
        if m < 2:
            raise ValueError(
                f"only {m} masked frame(s) per clip: clips are too short ({audio.shape[-1]} samples, "
                f"shortest valid {int(frames.min())} frames); use longer crops (>= "
                f"{c.receptive_field + 2 * c.frame_stride} samples)"
            )
        x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
        x, _ = self.encoder(x, padding)
        # masked frame positions in time order, (B, M): a stable sort, where x[mask] would sync
        where = torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices[:, :m]

        # targets: quantize only the masked frames (fairseq), (B*M, C)
        y = feats.gather(1, where[..., None].expand(-1, -1, feats.shape[-1])).flatten(0, 1)
        y = F.dropout(y, c.dropout_features, self.training)
        q, codes, code_ppl, prob_ppl = self.quantizer(y, self.temperature)
        targets = self.project_q(q.to(y.dtype)).view(b, m, -1)  # (B, M, F)
        codes = codes.view(b, m, -1)
        preds = self.final_proj(x.gather(1, where[..., None].expand(-1, -1, x.shape[-1])))  # (B, M, F)

        if negative_indices is None:
            negative_indices = sample_negatives(m, c.num_negatives, b, generator=generator, device=x.device)
        neg = negative_indices.to(x.device, torch.long)
        # cosine of every masked prediction with every masked target of its clip: (B, M, M), in
        # float32 even under autocast (a bf16 bmm would round logits of magnitude 10 to ~0.05)
        pn = F.normalize(preds.float(), dim=-1, eps=1e-8)
        tn = F.normalize(targets.float(), dim=-1, eps=1e-8)
        with torch.autocast(device_type=x.device.type, enabled=False):
            sim = torch.bmm(pn, tn.transpose(1, 2)) / c.logit_temp
        pos = sim.diagonal(dim1=1, dim2=2)  # (B, M)
        neg_logits = sim.gather(2, neg)  # (B, M, K)
        same_code = (codes[:, :, None, :] == codes[:, None, :, :]).all(-1)  # (B, M, M)
        neg_logits = neg_logits.masked_fill(same_code.gather(2, neg), float("-inf"))
        cross = None
        if c.cross_sample_negatives:
            cross = sample_cross_negatives(m, c.cross_sample_negatives, b, generator=generator, device=x.device)
            with torch.autocast(device_type=x.device.type, enabled=False):  # (B, M, K'): cosine with other clips' targets
                cross_logits = torch.einsum("bmf,bmkf->bmk", pn, tn.flatten(0, 1)[cross]) / c.logit_temp
            same = (codes.flatten(0, 1)[cross] == codes[:, :, None, :]).all(-1)
            neg_logits = torch.cat([neg_logits, cross_logits.masked_fill(same, float("-inf"))], dim=-1)
        logits = torch.cat([pos[..., None], neg_logits], dim=-1)  # (B, M, 1+K+K')
        n = b * m
        ce_sum = (torch.logsumexp(logits, -1) - pos).sum()
        gv = c.latent_groups * c.latent_vars
        diversity = (gv - prob_ppl) / gv
        loss_contrastive = ce_sum / n
        loss = loss_contrastive + c.diversity_weight * diversity + c.feature_pen_weight * pen

        with torch.no_grad():
            is_max = logits.argmax(-1) == 0
            is_min = logits.argmin(-1) == 0  # all logits equal: not counted as correct (fairseq)
            acc = (is_max & ~is_min).float().mean()
            metrics = {
                "loss_contrastive": loss_contrastive.detach(),
                "loss_diversity": diversity.detach(),
                "loss_features": pen.detach(),
                "contrastive_acc": acc,
                "code_perplexity": code_ppl.detach(),
                "prob_perplexity": prob_ppl.detach(),
                "temperature": torch.tensor(self.temperature, device=loss.device),
                "num_masked": torch.tensor(float(n), device=loss.device),
                "mask_fraction": (counts.sum() / frames.sum().clamp_min(1)).float(),
            }
        return {
            "loss": loss, "metrics": metrics, "logits": logits, "mask": mask, "negatives": neg, "cross_negatives": cross,
            "predictions": preds, "targets": targets, "codes": codes,
            "loss_contrastive_sum": ce_sum, "diversity": diversity, "features_pen": pen,
            "code_perplexity": code_ppl, "prob_perplexity": prob_ppl,
        }

    # -- representations -----------------------------------------------------------------------
    def embed(self, audio: Tensor, lengths: Tensor | None = None) -> dict[str, Any]:
        """Unmasked context features of ``audio`` (B, T), zero-padded after ``lengths`` (B,) valid samples.

        Returns ``frames`` (B, T', D) (the context network's output), ``pooled`` (B, D) (mean over
        valid frames), ``layers`` (list of (B, T', D): the transformer input after the positional
        conv, then each layer's output), ``features`` (B, T', C) (the layer-normed conv features)
        and ``frame_lengths`` (B,) (valid frames; pool ``layers`` over these). Dropout follows the
        module's mode: call ``eval()`` for probes.

        With ``lengths`` a padded clip's valid frames equal those of the clip alone (up to float
        rounding): the conv frames counted by ``frame_lengths`` read no padded sample, the first
        group norm takes statistics over valid frames only, padded frames are zeroed before the
        positional conv and masked out of every attention's keys, and pooling skips them.
        fairseq and HF instead let the group norm see the padding (HF advises not to pad
        group-norm models at all); pre-training (``forward``) keeps that behaviour.
        """
        if audio.dim() != 2:
            raise ValueError(f"embed takes mono audio (B, T), got {tuple(audio.shape)}")
        x, feats, _, padding, frames = self._features(audio, lengths, exact_padding=True)
        x, layers = self.encoder(x, padding, keep_layers=True)
        valid = (torch.arange(x.shape[1], device=x.device)[None, :] < frames[:, None]).to(x.dtype)
        pooled = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
        return {"pooled": pooled, "frames": x, "layers": layers, "features": feats,
                "frame_lengths": frames}


# ---------------------------------------------------------------------------------------------
# interop with HF transformers (a test / benchmark dependency)


def to_hf(model: Wav2Vec2Pretrain, *, attn_implementation: str = "sdpa") -> nn.Module:
    """A ``transformers.Wav2Vec2ForPreTraining`` with the same config and a copy of our weights.

    Masking/negative settings that HF samples itself are set to ours but HF needs them passed in
    (``mask_time_indices``, ``sampled_negative_indices``) for identical draws. HF draws negatives
    within each clip only: with ``cross_sample_negatives`` set, the weights and embeddings match but
    HF's pre-training loss is not ours.
    """
    try:
        import transformers
    except ImportError as exc:  # optional: only tests and benchmarks convert
        raise ImportError("to_hf needs transformers: pip install 'musicssl[test]'") from exc
    c = model.config
    hf_cfg = transformers.Wav2Vec2Config(
        conv_dim=[ch for ch, _, _ in c.conv_layers], conv_kernel=[k for _, k, _ in c.conv_layers],
        conv_stride=[s for _, _, s in c.conv_layers], conv_bias=c.conv_bias,
        num_feat_extract_layers=len(c.conv_layers),
        feat_extract_norm="group" if c.extractor_mode == "group_norm" else "layer",
        hidden_size=c.embed_dim, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        intermediate_size=c.ffn_dim, do_stable_layer_norm=c.layer_norm_first,
        num_conv_pos_embeddings=c.conv_pos, num_conv_pos_embedding_groups=c.conv_pos_groups,
        hidden_dropout=c.dropout, attention_dropout=c.attention_dropout,
        activation_dropout=c.activation_dropout, feat_proj_dropout=c.dropout_input,
        feat_quantizer_dropout=c.dropout_features, layerdrop=c.layerdrop,
        layer_norm_eps=c.layer_norm_eps, mask_time_prob=c.mask_prob, mask_time_length=c.mask_length,
        mask_time_min_masks=c.mask_min_spans, num_codevectors_per_group=c.latent_vars,
        num_codevector_groups=c.latent_groups, codevector_dim=c.latent_dim,
        proj_codevector_dim=c.final_dim, num_negatives=c.num_negatives,
        contrastive_logits_temperature=c.logit_temp, diversity_loss_weight=c.diversity_weight,
    )
    hf_cfg._attn_implementation = attn_implementation
    hf = transformers.Wav2Vec2ForPreTraining(hf_cfg)
    hf.load_state_dict(hf_state_dict(model), strict=True)
    hf.set_gumbel_temperature(model.temperature)
    return hf


def hf_state_dict(model: Wav2Vec2Pretrain) -> dict[str, Tensor]:
    """Our weights under HF ``Wav2Vec2ForPreTraining`` parameter names."""
    c = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    fe = "wav2vec2.feature_extractor.conv_layers"
    for i in range(len(c.conv_layers)):
        out[f"{fe}.{i}.conv.weight"] = sd[f"feature_extractor.convs.{i}.weight"]
        if c.conv_bias:
            out[f"{fe}.{i}.conv.bias"] = sd[f"feature_extractor.convs.{i}.bias"]
        if c.extractor_mode == "layer_norm" or i == 0:
            for p in ("weight", "bias"):
                out[f"{fe}.{i}.layer_norm.{p}"] = sd[f"feature_extractor.norms.{i}.{p}"]
    for p in ("weight", "bias"):
        out[f"wav2vec2.feature_projection.layer_norm.{p}"] = sd[f"layer_norm.{p}"]
        out[f"wav2vec2.feature_projection.projection.{p}"] = sd[f"post_extract_proj.{p}"]
        out[f"wav2vec2.encoder.layer_norm.{p}"] = sd[f"encoder.layer_norm.{p}"]
        out[f"quantizer.weight_proj.{p}"] = sd[f"quantizer.weight_proj.{p}"]
        out[f"project_q.{p}"] = sd[f"project_q.{p}"]
        out[f"project_hid.{p}"] = sd[f"final_proj.{p}"]
    out["wav2vec2.masked_spec_embed"] = sd["mask_emb"]
    pc = "encoder.pos_conv.conv"
    out["wav2vec2.encoder.pos_conv_embed.conv.bias"] = sd[f"{pc}.bias"]
    for j in ("original0", "original1"):
        out[f"wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.{j}"] = \
            sd[f"{pc}.parametrizations.weight.{j}"]
    d = c.embed_dim
    for i in range(c.num_layers):
        src, dst = f"encoder.layers.{i}", f"wav2vec2.encoder.layers.{i}"
        w, bias = sd[f"{src}.qkv.weight"], sd[f"{src}.qkv.bias"]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}.attention.{name}.weight"] = w[j * d:(j + 1) * d].clone()
            out[f"{dst}.attention.{name}.bias"] = bias[j * d:(j + 1) * d].clone()
        pairs = (("out_proj", "attention.out_proj"), ("attn_norm", "layer_norm"),
                 ("fc1", "feed_forward.intermediate_dense"), ("fc2", "feed_forward.output_dense"),
                 ("final_norm", "final_layer_norm"))
        for ours, theirs in pairs:
            for p in ("weight", "bias"):
                out[f"{dst}.{theirs}.{p}"] = sd[f"{src}.{ours}.{p}"]
    out["quantizer.codevectors"] = sd["quantizer.codevectors"].reshape(1, c.latent_groups * c.latent_vars, -1)
    return out


def hf_negative_indices(mask: Tensor, negatives: Tensor) -> Tensor:
    """Our (B, M, K) masked-frame negatives as HF's ``sampled_negative_indices`` (B, T', K)."""
    b, t = mask.shape
    pos = torch.arange(t, device=mask.device).expand(b, t)[mask].view(b, -1)  # (B, M) frame of each masked
    flat = pos.gather(1, negatives.flatten(1)).view_as(negatives) + torch.arange(b, device=mask.device)[:, None, None] * t
    out = torch.zeros(b, t, negatives.shape[-1], dtype=torch.long, device=mask.device)
    out[mask] = flat.reshape(-1, negatives.shape[-1])
    return out


def state_dict_from_hf(config: Wav2Vec2Config, hf: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """The inverse of :func:`hf_state_dict` for the encoder: a ``Wav2Vec2Model`` state dict (keys
    with or without ``wav2vec2.``, as ``Wav2Vec2ForPreTraining`` saves them) under our names.

    Returns ``(ours, unused)``: the tensors our encoder takes, and the HF keys nothing here reads
    (heads such as ``lm_head``, the quantizer, ``masked_spec_embed`` ...). A key our encoder needs and
    ``hf`` lacks is simply absent from ``ours``; the caller names it."""
    c = config
    src = {(k[len("wav2vec2."):] if k.startswith("wav2vec2.") else k): v for k, v in hf.items()}
    used: set[str] = set()
    out: dict[str, Tensor] = {}

    def take(theirs: str, ours: str) -> None:
        if theirs in src:
            out[ours] = src[theirs]
            used.add(theirs)

    fe = "feature_extractor.conv_layers"
    for i in range(len(c.conv_layers)):
        take(f"{fe}.{i}.conv.weight", f"feature_extractor.convs.{i}.weight")
        take(f"{fe}.{i}.conv.bias", f"feature_extractor.convs.{i}.bias")
        for p in ("weight", "bias"):
            take(f"{fe}.{i}.layer_norm.{p}", f"feature_extractor.norms.{i}.{p}")
    for p in ("weight", "bias"):
        take(f"feature_projection.layer_norm.{p}", f"layer_norm.{p}")
        take(f"feature_projection.projection.{p}", f"post_extract_proj.{p}")
        take(f"encoder.layer_norm.{p}", f"encoder.layer_norm.{p}")
    take("encoder.pos_conv_embed.conv.bias", "encoder.pos_conv.conv.bias")
    for j in ("original0", "original1"):
        take(f"encoder.pos_conv_embed.conv.parametrizations.weight.{j}", f"encoder.pos_conv.conv.parametrizations.weight.{j}")
    # older transformers saved the weight norm as weight_g / weight_v (the same two tensors)
    take("encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv.conv.parametrizations.weight.original0")
    take("encoder.pos_conv_embed.conv.weight_v", "encoder.pos_conv.conv.parametrizations.weight.original1")
    for i in range(c.num_layers):
        s, d = f"encoder.layers.{i}", f"encoder.layers.{i}"
        names = [f"{s}.attention.{n}_proj" for n in ("q", "k", "v")]
        if all(f"{n}.weight" in src and f"{n}.bias" in src for n in names):
            out[f"{d}.qkv.weight"] = torch.cat([src[f"{n}.weight"] for n in names])
            out[f"{d}.qkv.bias"] = torch.cat([src[f"{n}.bias"] for n in names])
            used.update(f"{n}.{p}" for n in names for p in ("weight", "bias"))
        pairs = (("out_proj", "attention.out_proj"), ("attn_norm", "layer_norm"),
                 ("fc1", "feed_forward.intermediate_dense"), ("fc2", "feed_forward.output_dense"),
                 ("final_norm", "final_layer_norm"))
        for ours, theirs in pairs:
            for p in ("weight", "bias"):
                take(f"{s}.{theirs}.{p}", f"{d}.{ours}.{p}")
    unused = sorted(k for k in hf if (k[len("wav2vec2."):] if k.startswith("wav2vec2.") else k) not in used)
    return out, unused


def hf_config_mismatches(config: Wav2Vec2Config, hf: dict[str, Any]) -> list[str]:
    """Where an HF ``Wav2Vec2Config`` (its config.json as a dict) builds another network than
    ``config``: ``"<hf field> <theirs> vs <ours>"`` for each. Shapes alone miss some (pre- vs
    post-LN, the activation, the epsilon), so a warm start checks these first."""
    c = config
    ours = {
        "hidden_size": c.embed_dim, "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "intermediate_size": c.ffn_dim, "do_stable_layer_norm": c.layer_norm_first,
        "feat_extract_norm": "group" if c.extractor_mode == "group_norm" else "layer", "conv_bias": c.conv_bias,
        "conv_dim": [ch for ch, _, _ in c.conv_layers], "conv_kernel": [k for _, k, _ in c.conv_layers],
        "conv_stride": [s for _, _, s in c.conv_layers], "num_conv_pos_embeddings": c.conv_pos,
        "num_conv_pos_embedding_groups": c.conv_pos_groups, "hidden_act": "gelu", "feat_extract_activation": "gelu",
        "layer_norm_eps": c.layer_norm_eps,
    }
    out = []
    for k, v in ours.items():
        theirs = hf.get(k)
        if k in ("conv_dim", "conv_kernel", "conv_stride") and theirs is not None:
            theirs = list(theirs)
        if theirs is not None and theirs != v and not (isinstance(v, float) and abs(float(theirs) - v) < 1e-12):
            out.append(f"{k} {theirs} vs {v}")
    return out
