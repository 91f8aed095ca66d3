"""CPC: Contrastive Predictive Coding on raw waveforms (van den Oord et al., 2018), CLMR's configuration.

Encoder: strided Conv1d + ReLU layers (CLMR's CPC for 22.05 kHz: strides 5,3,2,2,2,2,2, kernels
10,6,4,4,4,2,2, padding 2,2,2,2,1,1,1, 512 channels; one frame per 480 samples, ~46 frames/s),
then a one-layer GRU (256 units) as the autoregressive context network.

Loss: InfoNCE over future steps. From the context ``c_t`` a linear map per step ``W_k`` predicts the
encoded frame ``z_{t+k}``, k = 1..K (K = 20); the score of a candidate ``z`` is ``W_k c_t · z``. Each
anchor ``t`` draws M negatives (15) uniformly from all valid frames of the batch (other positions and
other clips), shared across the K steps, and a negative that *is* the step's positive frame is masked
out of that step's softmax. Step k's loss is the mean cross-entropy over the anchors whose target
exists (``t + k`` inside the clip's valid frames); the total is the mean over steps. ``window``
restricts the anchors to a random contiguous window (CLMR's ``subsample``) to bound the cost;
negatives still come from every frame.

Source: CLMR's CPC (Spijkervet/CLMR 4f984b2 "Added CPC model": ``model.py`` ``cpc_model``,
``modules/cpc/{encoder,autoregressor,infonce}.py``; hyper-parameters of the v1 branch's
``config/config_cpc.yaml`` at c6f4490: K = 20, 15 negatives, ``subsample`` on with an 81-frame
window, Adam 3e-4, batch 48). Departures: CLMR draws the negatives once per batch (M random
permutations of all frames) and gives step k a shifted slice of that draw, keeping a negative that
happens to be the positive (its comment: under 0.1 %); we draw per anchor with replacement, reuse
the draw for every step and mask such negatives. Conv init: ``init="kaiming_uniform"`` (``default()``)
is CLMR's (``model.apply(model.initialize)`` in its ``main.py``: ``kaiming_uniform_(fan_in, relu)``
on conv weights, biases at PyTorch's default); ``"kaiming"`` (He-normal, zero biases; the dataclass
and ``tiny()`` default) and ``"pytorch"`` are the alternatives.

Input normalisation: CLMR's CPC trains and probes on ``(audio - mean) / std`` with the training set's
statistics (4f984b2 ``data/magnatagatune.py`` ``get_dataset_stats``: the mean over files of each
file's mean and std). ``input_norm="dataset"`` (the cpc_mtat preset) averages the same statistics
over the crops of the first ``norm_batches`` training batches and then freezes them (buffers, so
they travel with the checkpoint); CLMR's per-file peak normalisation at load time is not done.

Usage::

    model = CPC(CPCConfig.default())
    loss, metrics = model({"audio": audio, "lengths": lengths})   # audio (B, 1, 1, T)
    out = model.embed(audio[:, 0, 0])  # pooled (B, 256), frames (B, T', 256), encoder_frames (B, T', 512)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["CPC", "CPCConfig", "CPCEncoder", "cpc_infonce", "sample_negatives"]


@dataclass(kw_only=True)
class CPCConfig:
    """CPC encoder, GRU context network and InfoNCE settings. Presets: ``default()``, ``tiny()``."""

    strides: tuple[int, ...] = (5, 3, 2, 2, 2, 2, 2)
    kernels: tuple[int, ...] = (10, 6, 4, 4, 4, 2, 2)
    padding: tuple[int, ...] = (2, 2, 2, 2, 1, 1, 1)
    channels: int = 512  # encoder width = the dimension of the predicted frames z
    context_dim: int = 256  # GRU hidden units
    prediction_steps: int = 20  # K: predict z_{t+1} .. z_{t+K}
    negatives: int = 15  # M per anchor, shared across the K steps
    window: int | None = None  # anchors per clip (random contiguous window); None = all positions
    input_samples: int = 59049  # crop length the loader should give (same 2.68 s crops as CLMR)
    # Conv weight init. "kaiming_uniform" (CLMR's CPC, the default() preset): kaiming_uniform_(fan_in,
    # relu) on every conv weight, biases left at PyTorch's default (Spijkervet/CLMR 4f984b2 "Added CPC
    # model": main.py runs model.apply(model.initialize), modules/model.py). "kaiming" (ours, the
    # dataclass and tiny() default): He-normal weights, zero biases; the same weight variance, and
    # untrained features that already separate notes (tests/test_eval_e2e.py probes one). "pytorch":
    # PyTorch's default, which shrinks the ReLU stack's scale ~2.4x per layer, so untrained frames
    # barely differ and InfoNCE sits at chance for many steps (tests/test_cpc.py measures all three).
    init: Literal["kaiming_uniform", "kaiming", "pytorch"] = "kaiming"
    # Input z-normalisation. CLMR's CPC trains (and probes) on (audio - mean) / std with one mean and
    # std for the whole training set: the mean over training files of each file's mean and of each
    # file's std (Spijkervet/CLMR 4f984b2 "Added CPC model": data/magnatagatune.py get_dataset_stats,
    # normalise_audio, applied to the CPC crops in __getitem__). "dataset" (the cpc_mtat preset):
    # the same statistics, averaged over the crops of the first `norm_batches` training batches, then
    # frozen; they are buffers, so checkpoints and evaluation carry them. "none": raw audio.
    input_norm: Literal["none", "dataset"] = "none"
    norm_batches: int = 100  # input_norm="dataset": training batches the statistics are averaged over

    def __post_init__(self) -> None:
        self.strides, self.kernels, self.padding = (tuple(int(v) for v in t) for t in (self.strides, self.kernels, self.padding))
        if not (len(self.strides) == len(self.kernels) == len(self.padding) >= 1):
            raise ValueError(
                f"model.strides, model.kernels and model.padding must have the same (non-zero) length, got "
                f"{len(self.strides)}, {len(self.kernels)}, {len(self.padding)}"
            )
        for name, value in (
            ("model.strides", min(self.strides)),
            ("model.kernels", min(self.kernels)),
            ("model.channels", self.channels),
            ("model.context_dim", self.context_dim),
            ("model.prediction_steps", self.prediction_steps),
            ("model.negatives", self.negatives),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if min(self.padding) < 0:
            raise ValueError(f"model.padding must be >= 0, got {self.padding}")
        if self.init not in ("kaiming_uniform", "kaiming", "pytorch"):
            raise ValueError(f"model.init must be 'kaiming_uniform', 'kaiming' or 'pytorch', got {self.init!r}")
        if self.input_norm not in ("none", "dataset"):
            raise ValueError(f"model.input_norm must be 'none' or 'dataset', got {self.input_norm!r}")
        if self.norm_batches < 1:
            raise ValueError(f"model.norm_batches must be >= 1, got {self.norm_batches}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"model.window must be positive or None (all positions), got {self.window}")
        frames = self.num_frames(self.input_samples)
        if frames <= self.prediction_steps:
            raise ValueError(
                f"model.input_samples={self.input_samples} gives {frames} encoder frames, not more than "
                f"model.prediction_steps={self.prediction_steps}: use longer crops or fewer prediction steps"
            )

    @property
    def hop(self) -> int:
        """Samples per encoder frame (the product of the strides): 480 for the default."""
        out = 1
        for s in self.strides:
            out *= s
        return out

    def num_frames(self, samples: int) -> int:
        """Encoder frames for ``samples`` input samples (the convolutions' output-length formula)."""
        n = samples
        for s, k, p in zip(self.strides, self.kernels, self.padding):
            n = (n + 2 * p - k) // s + 1
        return max(n, 0)

    @classmethod
    def default(cls) -> CPCConfig:
        """CLMR's CPC for 22.05 kHz: 7 conv layers of 512, GRU 256, K = 20, 15 negatives, 59049-sample
        crops, CLMR's kaiming-uniform conv init."""
        return cls(init="kaiming_uniform")

    @classmethod
    def tiny(cls) -> CPCConfig:
        """4 narrow conv layers (hop 60), GRU 32, K = 4, 8 negatives, 2400-sample crops (41 frames): CPU tests."""
        return cls(
            strides=(5, 3, 2, 2),
            kernels=(10, 6, 4, 4),
            padding=(2, 2, 2, 2),
            channels=32,
            context_dim=32,
            prediction_steps=4,
            negatives=8,
            input_samples=2400,
        )


class CPCEncoder(nn.Module):
    """Strided Conv1d + ReLU stack: ``(B, 1, T) -> (B, C, T')``."""

    def __init__(self, config: CPCConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for s, k, p in zip(config.strides, config.kernels, config.padding):
            conv = nn.Conv1d(c_in, config.channels, kernel_size=k, stride=s, padding=p)
            if config.init == "kaiming_uniform":
                nn.init.kaiming_uniform_(conv.weight, mode="fan_in", nonlinearity="relu")
            elif config.init == "kaiming":
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
            c_in = config.channels
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def sample_negatives(
    frame_valid: Tensor | None,
    anchors: int,
    negatives: int,
    *,
    shape: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Indices into the flattened ``(B * L)`` frames, ``(B, anchors, negatives)``, uniform over valid frames.

    ``frame_valid`` (B, L) bool marks the frames that may be drawn; ``None`` means all of a
    ``shape=(B, L)`` batch on ``device`` (no host sync, the common case of unpadded crops).
    """
    if frame_valid is None:
        if shape is None:
            raise ValueError("sample_negatives: give frame_valid or shape=(B, L)")
        b, length = shape
        return torch.randint(b * length, (b, anchors, negatives), device=device)
    b, length = frame_valid.shape
    device = frame_valid.device
    valid_flat = frame_valid.reshape(-1).nonzero().squeeze(1)  # (V,)
    if valid_flat.numel() == 0:
        raise ValueError("CPC: no valid encoder frame in the batch (all lengths too short); check batch['lengths']")
    pick = torch.randint(valid_flat.numel(), (b, anchors, negatives), device=device)
    return valid_flat[pick]


def cpc_infonce(
    predictions: Tensor,
    z: Tensor,
    negatives: Tensor,
    *,
    start: int = 0,
    num_valid: Tensor | None = None,
) -> dict[str, Tensor]:
    """InfoNCE over K future steps.

    Args:
        predictions: ``(B, A, K, C)``: ``W_k c_t`` for anchors ``t = start + a``, a = 0..A-1.
        z: ``(B, L, C)`` encoded frames (the targets and the pool of negatives).
        negatives: ``(B, A, M)`` indices into ``z.reshape(B * L, C)``, shared across steps; one equal
            to a step's positive index is left out of that step's softmax.
        start: position of the first anchor.
        num_valid: ``(B,)`` valid frames per clip (targets beyond are ignored); ``None`` = all ``L``.

    Returns ``loss`` (mean over steps of the mean cross-entropy over that step's anchors),
    ``step_loss`` and ``step_acc`` ``(K,)`` (accuracy: the positive scores above every negative),
    and ``step_count`` ``(K,)`` anchors per step. Computed in float32.
    """
    b, a, k_steps, c = predictions.shape
    length = z.shape[1]
    device = z.device
    if z.shape[0] != b or z.shape[2] != c or negatives.shape[:2] != (b, a):
        raise ValueError(
            f"cpc_infonce: shapes disagree: predictions {tuple(predictions.shape)}, z {tuple(z.shape)}, "
            f"negatives {tuple(negatives.shape)}"
        )
    with torch.autocast(device_type=device.type, enabled=False):
        preds = predictions.float()
        z_flat = z.float().reshape(b * length, c)
        t = start + torch.arange(a, device=device)  # (A,) anchor positions
        steps = torch.arange(1, k_steps + 1, device=device)  # (K,)
        target_t = t[:, None] + steps[None, :]  # (A, K)
        limit = torch.full((b,), length, device=device) if num_valid is None else num_valid.to(device).clamp(max=length)
        valid = target_t[None] < limit[:, None, None]  # (B, A, K)
        pos_idx = torch.arange(b, device=device)[:, None, None] * length + target_t.clamp(max=length - 1)[None]  # (B, A, K)
        pos = (preds * z_flat[pos_idx]).sum(-1)  # (B, A, K)
        neg = torch.einsum("bakc,bamc->bakm", preds, z_flat[negatives])  # (B, A, K, M)
        neg = neg.masked_fill(negatives[:, :, None, :] == pos_idx[..., None], float("-inf"))
        logits = torch.cat([pos[..., None], neg], dim=-1)  # (B, A, K, 1 + M); the positive is class 0
        ce = torch.logsumexp(logits, dim=-1) - pos  # (B, A, K)
        weight = valid.float()
        count = weight.sum(dim=(0, 1))  # (K,)
        step_loss = (ce * weight).sum(dim=(0, 1)) / count.clamp(min=1)
        has_anchor = (count > 0).float()  # a step can lose all its anchors to short clips or a late window
        loss = (step_loss * has_anchor).sum() / has_anchor.sum().clamp(min=1)
        with torch.no_grad():
            correct = (pos[..., None] > neg).all(dim=-1).float()
            step_acc = (correct * weight).sum(dim=(0, 1)) / count.clamp(min=1)
    return {"loss": loss, "step_loss": step_loss.detach(), "step_acc": step_acc, "step_count": count}


class CPC(nn.Module):
    """CPC encoder + GRU context + per-step linear predictors, trained with ``cpc_infonce``."""

    def __init__(self, config: CPCConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = CPCEncoder(config)
        self.context = nn.GRU(config.channels, config.context_dim, batch_first=True)
        # All K maps W_k in one matrix: (H) -> (K * C), column block k-1 is W_k.
        self.predictor = nn.Linear(config.context_dim, config.prediction_steps * config.channels, bias=False)
        if config.input_norm == "dataset":
            # Sums of the per-crop means and stds and the number of crops and batches they came from;
            # only registered when used, so checkpoints of "none" models keep their keys.
            self.register_buffer("norm_sums", torch.zeros(2, dtype=torch.float64))
            self.register_buffer("norm_counts", torch.zeros(2, dtype=torch.long))  # (crops, batches)
        # The frozen (mean, std) as floats, so steps after the estimate pay no device-to-host read;
        # dropped when a state dict is loaded.
        self._frozen_stats: tuple[float, float] | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_frozen_stats", None))

    def input_stats(self) -> tuple[float, float]:
        """``(mean, std)`` the input is normalised with: ``(0, 1)`` for ``input_norm="none"`` and
        before the first training batch."""
        if self.config.input_norm == "none":
            return 0.0, 1.0
        if self._frozen_stats is not None:
            return self._frozen_stats
        if int(self.norm_counts[0]) == 0:
            return 0.0, 1.0
        mean, std = (self.norm_sums / self.norm_counts[0]).tolist()
        return mean, std

    @torch.no_grad()
    def _update_input_stats(self, audio: Tensor, lengths: Tensor | None) -> None:
        """Add a training batch's per-crop means and stds (valid samples only), until ``norm_batches``."""
        x = audio.double()  # (B, T)
        if lengths is None:
            means, stds = x.mean(dim=1), x.std(dim=1)
        else:
            n = lengths.to(x.device).clamp(min=2, max=x.shape[1]).double()
            valid = (torch.arange(x.shape[1], device=x.device)[None] < n[:, None]).double()
            means = (x * valid).sum(1) / n
            stds = ((((x - means[:, None]) * valid) ** 2).sum(1) / (n - 1)).sqrt()  # torch.std's n - 1, as CLMR's
        self.norm_sums += torch.stack([means.sum(), stds.sum()])
        self.norm_counts += torch.tensor([x.shape[0], 1], device=self.norm_counts.device)

    def normalise(self, audio: Tensor) -> Tensor:
        """``(audio - mean) / std`` with :meth:`input_stats` (the identity for ``input_norm="none"``)."""
        if self.config.input_norm == "none":
            return audio
        mean, std = self.input_stats()
        return (audio - mean) / max(std, 1e-8)

    def encode(self, audio: Tensor) -> tuple[Tensor, Tensor]:
        """``audio`` (B, T), raw -> encoder frames z (B, L, C) and causal context c (B, L, H); the
        input is normalised first (:meth:`normalise`)."""
        z = self.encoder(self.normalise(audio).unsqueeze(1)).transpose(1, 2)  # (B, L, C)
        # The GRU runs in float32: CPU autocast has no bf16 GRU, and its cost is the sequential
        # recurrence over L steps, not the arithmetic.
        with torch.autocast(device_type=z.device.type, enabled=False):
            c, _ = self.context(z.float())  # (B, L, H)
        return z, c

    def frame_lengths(self, lengths: Tensor, total_samples: int) -> Tensor:
        """Valid encoder frames per clip: those that see no end padding, given valid samples per clip.

        A frame counts when its receptive field, through every layer, ends inside the clip's valid
        samples, so it equals the frame of the unpadded clip. A full-length clip keeps all
        ``num_frames(total_samples)`` frames (its right edge is the crop's own edge).
        """
        n = lengths.long()
        for s, k, p in zip(self.config.strides, self.config.kernels, self.config.padding):
            # Output i reads inputs i*s - p .. i*s - p + k - 1; only the left side may be padding.
            n = torch.div(n + p - k, s, rounding_mode="floor") + 1
        full = self.config.num_frames(total_samples)
        return torch.where(lengths >= total_samples, torch.full_like(n, full), n.clamp(min=0, max=full))

    def forward(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """``batch["audio"]`` (B, 1, 1, T), optional ``batch["lengths"]`` (B,) -> (loss, metrics)."""
        audio = batch["audio"]
        if audio.dim() != 4 or audio.shape[1] != 1 or audio.shape[2] != 1:
            raise ValueError(
                f"CPC expects batch['audio'] of shape (B, 1 view, 1 channel, T), got {tuple(audio.shape)}: "
                "run the loader in single-crop mode with mono audio"
            )
        cfg = self.config
        lengths = batch.get("lengths")
        if cfg.input_norm == "dataset" and self._frozen_stats is None:
            # Frozen only from values present when a forward starts: under DDP those are rank 0's
            # (its buffers are broadcast before each forward), so every rank freezes the same ones.
            if int(self.norm_counts[1]) >= cfg.norm_batches:
                self._frozen_stats = self.input_stats()
            elif self.training:
                self._update_input_stats(audio[:, 0, 0], lengths)
        z, c = self.encode(audio[:, 0, 0])
        b, length, _ = z.shape
        if length <= 1:
            raise ValueError(f"CPC: a {audio.shape[-1]}-sample crop gives {length} encoder frame(s); raise the crop length")
        num_valid = None if lengths is None else self.frame_lengths(lengths.to(z.device), audio.shape[-1]).clamp(max=length)
        frame_valid = None if num_valid is None else torch.arange(length, device=z.device)[None] < num_valid[:, None]

        start, anchors = 0, length - 1  # the last frame has nothing to predict
        if cfg.window is not None and cfg.window < anchors:
            # CLMR's subsample: one random window of anchors, ending early enough for K steps when possible.
            start = int(torch.randint(max(length - cfg.prediction_steps - cfg.window, 0) + 1, ()).item())
            anchors = min(cfg.window, length - 1 - start)
        ctx = c[:, start : start + anchors]  # (B, A, H)
        preds = self.predictor(ctx).reshape(b, anchors, cfg.prediction_steps, cfg.channels)  # (B, A, K, C)
        negatives = sample_negatives(frame_valid, anchors, cfg.negatives, shape=(b, length), device=z.device)
        out = cpc_infonce(preds, z, negatives, start=start, num_valid=num_valid)

        acc, has = out["step_acc"], (out["step_count"] > 0).float()
        metrics = {
            "contrastive_acc": (acc * has).sum() / has.sum().clamp(min=1),
            "loss_step1": out["step_loss"][0],
            f"loss_step{cfg.prediction_steps}": out["step_loss"][-1],
        }
        for k in sorted({1, max(1, cfg.prediction_steps // 2), cfg.prediction_steps}):
            metrics[f"acc_step{k}"] = acc[k - 1]
        return out["loss"], {k: v.detach() for k, v in metrics.items()}

    def embed(self, audio: Tensor, lengths: Tensor | None = None) -> dict[str, Tensor]:
        """Context (the probe features, as in CPC) and encoder features of ``audio`` (B, T).

        Returns ``pooled`` (B, H) and ``frames`` (B, T', H) from the GRU context,
        ``encoder_pooled`` (B, C) and ``encoder_frames`` (B, T', C) from the convolutions, and
        ``frame_lengths`` (B,). With ``lengths`` (valid samples per clip, zero padding after) each
        conv layer's output is zeroed beyond the clip's own output length, which is exactly the
        zero padding the clip alone would meet, and the GRU is causal: a padded clip's valid
        frames and means equal the clip's alone (up to float rounding).
        """
        if audio.dim() != 2:
            raise ValueError(f"CPC.embed expects mono audio (B, T), got shape {tuple(audio.shape)}")
        if lengths is None:
            z, c = self.encode(audio)
            n = torch.full((audio.shape[0],), z.shape[1], dtype=torch.long, device=z.device)
        else:
            n = lengths.to(audio.device).long()
            x = audio.unsqueeze(1)
            convs = [m for m in self.encoder.layers if isinstance(m, nn.Conv1d)]
            for conv in convs:
                x = torch.relu(conv(x))
                (k,), (s,), (p,) = conv.kernel_size, conv.stride, conv.padding
                n = (torch.div(n + 2 * p - k, s, rounding_mode="floor") + 1).clamp_min(0)
                x = x * (torch.arange(x.shape[-1], device=x.device)[None, :] < n[:, None]).to(x.dtype)[:, None, :]
            z = x.transpose(1, 2)  # (B, L, C)
            with torch.autocast(device_type=z.device.type, enabled=False):
                c, _ = self.context(z.float())
        valid = (torch.arange(z.shape[1], device=z.device)[None, :] < n[:, None])[..., None]
        count = valid.sum(1).clamp_min(1)
        return {"pooled": (c * valid).sum(1) / count, "frames": c, "encoder_pooled": (z * valid).sum(1) / count,
                "encoder_frames": z, "frame_lengths": n}
