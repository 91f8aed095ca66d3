"""Batched audio augmentation on whatever device the batch lives on (docs/architecture.md §3).

Every transform is an ``nn.Module`` over float ``(batch, channels, time)``. It draws a per-example
apply/skip flag and per-example parameters from an explicit CPU ``torch.Generator`` (small tensors,
so the draws are the same on every device), then applies them with batched tensor ops on
``x.device``. Large random tensors (noise, generated impulse responses) come from a device
generator seeded by one draw of the CPU generator, so a given generator state reproduces the same
output on a given device (CPU and CUDA noise streams differ; the drawn parameters do not).

Transforms split ``forward`` into ``draw(n)`` (parameters, CPU tensors) and ``apply(x, params)``
(deterministic given the parameters), so tests and listening tools can set parameters explicitly.

Default chain: CLMR's (Spijkervet & Burgoyne 2021), as its master branch runs it (Spijkervet/CLMR
``main.py`` and ``config/config.yaml`` at 423414d, with torchaudio-augmentations 0.2.2, f152b78, the release current then):
polarity p=0.8; noise p=0.01, std uniform in 0.001-1.0 x the clip's; gain p=0.3, -20..-1 dB;
windowed-sinc FIR high-pass 200-1200 Hz or low-pass 2200-4000 Hz, p=0.8; delay p=0.3, 200-450 ms
in 50 ms steps, volume 0.5, halved; pitch p=0.6, +-7 semitones; sox/freeverb reverb p=0.6,
reverberance, damping and room scale each 0-99. Speed is off (CLMR has none). Each transform's
docstring names the original file and commit it follows and how it differs; our variants
(SNR-in-dB and coloured noise, Butterworth filters, un-halved delay, convolution reverb with a
drawn RT60 or IR files) are selected by name in ``AugmentConfig``.

The CPU path for loader workers (audiomentations, per example) lives in ``pipeline.augment_cpu``.
"""

from __future__ import annotations

import io
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.dsp import (  # noqa: F401  (estimate_rt60, generate_irs, pitch_shift_*: re-exported)
    _rms, butterworth_mag, causal_filter, estimate_rt60, fast_fft_len, fir_filter, fir_lowpass_kernels,
    first_order_kernels, freeverb_apply, freeverb_filter, freeverb_irs, generate_irs, pitch_shift_granular,
    pitch_shift_vocoder,
)

NOISE_COLORS = {"white": 0.0, "pink": -0.5, "brown": -1.0, "blue": 0.5, "violet": 1.0}
"""Noise colour -> exponent of the amplitude spectrum, |N(f)| ~ f**exponent (pink: -3 dB/octave)."""

DEFAULT_ORDER = ("polarity", "noise", "gain", "filter", "delay", "speed", "pitch", "reverb")
_AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


# ----------------------------------------------------------------------------------------------
# Config


@dataclass(kw_only=True)
class AugmentConfig:
    """Every probability and range of the augmentation chain (defaults: CLMR's).

    ``backend="gpu"`` runs the batched torch chain in the trainer on the batch's device (which may
    be the CPU); ``backend="cpu"`` runs ``pipeline.augment_cpu.CpuAugment`` per example in the
    loader's workers instead, and ``build_augment`` then returns an identity ``Compose``.
    """

    enabled: bool = True
    backend: str = "gpu"
    order: tuple[str, ...] = DEFAULT_ORDER

    polarity_p: float = 0.8

    noise_p: float = 0.01
    # "std_ratio" (CLMR): noise std drawn uniformly in [lo, hi] x the example's std, white Gaussian;
    # "snr_db" (ours): SNR drawn uniformly in dB, noise scaled to its exact RMS.
    noise_mode: str = "std_ratio"
    noise_std_ratio: tuple[float, float] = (0.001, 1.0)  # torchaudio-augmentations <= 0.2.2; 0.2.3 on: (1e-4, 1e-2)
    noise_snr_db: tuple[float, float] = (46.0, 60.0)  # noise_mode="snr_db" only
    noise_color: tuple[str, ...] = ("white",)  # one colour drawn uniformly per example

    gain_p: float = 0.3
    gain_db: tuple[float, float] = (-20.0, -1.0)

    filter_p: float = 0.8
    highpass_hz: tuple[float, float] = (200.0, 1200.0)
    lowpass_hz: tuple[float, float] = (2200.0, 4000.0)
    highpass_prob: float = 0.5  # given the filter applies, chance it is a high-pass
    # "fir" (CLMR via julius: Hann-windowed sinc, filter_zeros zero crossings, replicate padding),
    # "first_order" (CLMR's 2020 code: essentia's 1st-order IIR) or "butterworth" (ours: zero-phase,
    # filter_order poles, 6 * order dB/octave).
    filter_type: str = "fir"
    filter_zeros: float = 8.0  # fir: zero crossings kept on each side (julius' default)
    filter_order: int = 4  # butterworth

    delay_p: float = 0.3
    delay_ms: tuple[float, float] = (200.0, 450.0)
    delay_step_ms: float = 50.0
    delay_volume: float = 0.5
    delay_halve: bool = True  # CLMR: (x + volume * echo) / 2; False: x + volume * echo

    pitch_p: float = 0.6
    pitch_semitones: tuple[float, float] = (-7.0, 7.0)
    pitch_method: str = "granular"  # "granular" (fast) | "vocoder" (phase vocoder)
    pitch_grain: int = 2048  # granular: grain length in samples (50 % overlap)
    pitch_n_fft: int = 1024  # vocoder
    pitch_hop: int = 256  # vocoder

    speed_p: float = 0.0
    speed_rate: tuple[float, float] = (0.9, 1.1)

    reverb_p: float = 0.6
    # "freeverb" (CLMR: sox's reverb, dry + full-gain wet) or "ir" (ours: convolution with a
    # unit-energy IR, generated decaying noise or files from reverb_ir_dir, mixed (1-w) x + w (x*h)).
    reverb_method: str = "freeverb"
    reverb_reverberance: tuple[int, int] = (0, 99)  # freeverb: integers, inclusive (torch.randint(0, 100))
    reverb_damping: tuple[int, int] = (0, 99)  # freeverb: sox's HF-damping, %
    reverb_room_scale: tuple[int, int] = (0, 99)  # freeverb: %
    reverb_wet_gain_db: float = 0.0  # freeverb: sox's wet-gain (CLMR: the default, 0 dB)
    reverb_rt60_s: tuple[float, float] = (0.2, 1.0)  # ir
    reverb_wet: tuple[float, float] = (0.1, 0.5)  # ir
    reverb_ir_dir: str | None = None  # ir: a folder of IR audio files; None: generated IRs
    reverb_ir_seconds: float = 1.0  # ir: generated IR length (at least the longest RT60) or the cut of IR files

    def __post_init__(self) -> None:
        self.order = tuple(self.order)
        self.noise_color = tuple(self.noise_color)
        if self.backend not in ("gpu", "cpu"):
            raise ValueError(f"--augment.backend must be 'gpu' or 'cpu', got {self.backend!r}")
        unknown = [n for n in self.order if n not in DEFAULT_ORDER]
        if unknown or len(set(self.order)) != len(self.order):
            raise ValueError(
                f"--augment.order must name each of {DEFAULT_ORDER} at most once, got {self.order!r}"
            )
        for name in ("polarity_p", "noise_p", "gain_p", "filter_p", "delay_p", "pitch_p", "speed_p",
                     "reverb_p", "highpass_prob"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"--augment.{name} must be a probability in [0, 1], got {v}")
        for name in ("noise_std_ratio", "noise_snr_db", "gain_db", "highpass_hz", "lowpass_hz", "delay_ms",
                     "pitch_semitones", "speed_rate", "reverb_rt60_s", "reverb_wet"):
            v = tuple(float(a) for a in getattr(self, name))
            if len(v) != 2 or v[0] > v[1]:
                raise ValueError(f"--augment.{name} must be a (low, high) pair with low <= high, got {v!r}")
            setattr(self, name, v)
        for name in ("reverb_reverberance", "reverb_damping", "reverb_room_scale"):
            v = tuple(getattr(self, name))
            if len(v) != 2 or any(float(a) != int(a) for a in v) or not 0 <= v[0] <= v[1] <= 100:
                raise ValueError(f"--augment.{name} must be a (low, high) pair of integers with 0 <= low <= high <= 100, got {v!r}")
            setattr(self, name, tuple(int(a) for a in v))
        choices = {"noise_mode": ("std_ratio", "snr_db"), "filter_type": ("fir", "butterworth", "first_order"),
                   "reverb_method": ("freeverb", "ir")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--augment.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.noise_std_ratio[0] < 0:
            raise ValueError(f"--augment.noise_std_ratio must be non-negative, got {self.noise_std_ratio}")
        if self.filter_zeros <= 0:
            raise ValueError(f"--augment.filter_zeros must be positive, got {self.filter_zeros}")
        if not -10.0 <= self.reverb_wet_gain_db <= 10.0:
            raise ValueError(f"--augment.reverb_wet_gain_db must be in [-10, 10] dB (sox's range), got {self.reverb_wet_gain_db}")
        if self.reverb_ir_dir is not None and self.reverb_method != "ir":
            raise ValueError("--augment.reverb_ir_dir needs --augment.reverb_method=ir (freeverb renders its own IRs)")
        bad = [c for c in self.noise_color if c not in NOISE_COLORS]
        if bad or not self.noise_color:
            raise ValueError(f"--augment.noise_color must be a non-empty subset of {sorted(NOISE_COLORS)}, got {self.noise_color!r}")
        if min(self.highpass_hz + self.lowpass_hz) <= 0:
            raise ValueError("--augment.highpass_hz and --augment.lowpass_hz must be positive frequencies in Hz")
        if self.filter_order < 1:
            raise ValueError(f"--augment.filter_order must be >= 1, got {self.filter_order}")
        if self.delay_ms[0] <= 0 or self.delay_step_ms <= 0:
            raise ValueError("--augment.delay_ms and --augment.delay_step_ms must be positive")
        if not 0.0 <= self.delay_volume <= 1.0:
            raise ValueError(f"--augment.delay_volume must be in [0, 1], got {self.delay_volume}")
        if self.speed_rate[0] <= 0:
            raise ValueError(f"--augment.speed_rate must be positive, got {self.speed_rate}")
        if self.reverb_rt60_s[0] <= 0 or self.reverb_ir_seconds <= 0:
            raise ValueError("--augment.reverb_rt60_s and --augment.reverb_ir_seconds must be positive")
        if not (0.0 <= self.reverb_wet[0] and self.reverb_wet[1] <= 1.0):
            raise ValueError(f"--augment.reverb_wet must lie in [0, 1], got {self.reverb_wet}")
        if self.pitch_hop <= 0 or self.pitch_n_fft < 2 * self.pitch_hop or self.pitch_n_fft % 2:
            raise ValueError("--augment.pitch_n_fft must be even and at least 2 * --augment.pitch_hop")
        if self.pitch_method not in ("granular", "vocoder"):
            raise ValueError(f"--augment.pitch_method must be 'granular' or 'vocoder', got {self.pitch_method!r}")
        if self.pitch_grain < 32 or self.pitch_grain % 4:
            raise ValueError(f"--augment.pitch_grain must be a multiple of 4 samples, >= 32, got {self.pitch_grain}")
        if self.reverb_ir_dir is not None and not os.path.isdir(self.reverb_ir_dir):
            raise ValueError(f"--augment.reverb_ir_dir={self.reverb_ir_dir!r} is not a folder; give a folder of IR audio files or leave it unset for generated IRs")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Small helpers


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _device_generator(seed: Tensor, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """A per-example ``(n,)`` parameter as an ``(n, 1, 1)`` tensor on x's device and dtype."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Transforms


class Transform(nn.Module, ABC):
    """Base class: per-example apply draw, per-example parameters, batched apply on x.device."""

    name = "transform"

    def __init__(self, *, p: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{type(self).__name__}: p must be in [0, 1], got {p}")
        self.p = float(p)
        # A standalone transform gets its own seeded generator; Compose replaces it by its own.
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.last_params: dict[str, Tensor] = {}

    def draw(self, n: int) -> dict[str, Tensor]:
        """Per-example parameters for a batch of ``n`` (CPU tensors); ``apply`` is a bool mask."""
        apply = torch.rand(n, generator=self.generator) < self.p
        return {"apply": apply, **self.draw_params(n)}

    def draw_params(self, n: int) -> dict[str, Tensor]:
        return {}

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        _check_input(x)
        params = self.draw(x.shape[0])
        self.last_params = params
        return self.apply(x, params)

    def apply(self, x: Tensor, params: dict[str, Tensor], *, inplace: bool = False) -> Tensor:
        """Apply the given parameters (``params["apply"]`` selects examples); keeps shape/dtype/device.

        ``inplace=True`` lets the transform write into ``x`` (Compose does so for its own
        intermediates, never for the caller's batch), which saves a copy of the batch.
        """
        mask = params["apply"]
        if not bool(mask.any()):
            return x
        if bool(mask.all()):
            return self.apply_selected(x.float(), params).to(x.dtype)
        idx = torch.nonzero(mask).view(-1)
        sub = {k: (v[idx] if v.dim() == 1 else v) for k, v in params.items()}
        dev_idx = idx.to(x.device)
        ys = self.apply_selected(x.index_select(0, dev_idx).float(), sub).to(x.dtype)
        return x.index_copy_(0, dev_idx, ys) if inplace else x.index_copy(0, dev_idx, ys)

    @abstractmethod
    def apply_selected(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Transform every example of ``x`` (float32 ``(n, C, T)``); params are already selected."""


def _scale_examples(x: Tensor, scale: Tensor, mask: Tensor, inplace: bool) -> Tensor:
    """Multiply each example by its scale in one pass (skipped examples have scale 1)."""
    if not bool(mask.any()):
        return x
    s = _bcast(scale, x)
    return x.mul_(s) if inplace else x * s


def _check_input(x: Tensor) -> None:
    if x.dim() != 3 or not x.is_floating_point():
        raise ValueError(f"augmentation expects float (batch, channels, time), got {tuple(x.shape)} {x.dtype}")


class PolarityInversion(Transform):
    """Multiply selected examples by -1.

    Follows CLMR's ``PolarityInversion`` (Spijkervet/torchaudio-augmentations
    ``torchaudio_augmentations/augmentations/polarity_inversion.py`` at 0.2.2, f152b78: ``torch.neg``);
    no difference.
    """

    name = "polarity"

    def scale(self, params: dict[str, Tensor]) -> Tensor:
        return torch.where(params["apply"], -1.0, 1.0).double()

    def apply(self, x, params, *, inplace=False):
        return _scale_examples(x, self.scale(params), params["apply"], inplace)

    def apply_selected(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        return -x


class Gain(Transform):
    """Scale each selected example by a gain drawn uniformly in dB.

    Follows CLMR's ``Gain`` (Spijkervet/torchaudio-augmentations ``torchaudio_augmentations/
    augmentations/gain.py`` at 0.2.2, f152b78: ``random.uniform(-20, -1)`` dB through torchaudio's
    ``Vol``). Difference: ``Vol`` also clamps the result to [-1, 1]; we do not clip (with
    attenuating gains this only matters for inputs already beyond full scale).
    """

    name = "gain"

    def __init__(self, *, p: float, gain_db: tuple[float, float] = (-20.0, -1.0), generator=None):
        super().__init__(p=p, generator=generator)
        self.gain_db = gain_db

    def draw_params(self, n: int) -> dict[str, Tensor]:
        return {"gain_db": _uniform(n, *self.gain_db, self.generator).float()}

    def scale(self, params: dict[str, Tensor]) -> Tensor:
        return torch.where(params["apply"], torch.pow(10.0, params["gain_db"].double() / 20.0), 1.0)

    def apply(self, x, params, *, inplace=False):
        return _scale_examples(x, self.scale(params), params["apply"], inplace)

    def apply_selected(self, x, params):
        return x * _bcast(torch.pow(10.0, params["gain_db"].double() / 20.0), x)


class Noise(Transform):
    """Add Gaussian noise, white or coloured, scaled relative to each example.

    ``mode="std_ratio"`` (default) follows CLMR's ``Noise`` from torchaudio-augmentations
    (Spijkervet/torchaudio-augmentations ``torchaudio_augmentations/augmentations/noise.py`` at
    0.2.2, f152b78): noise std drawn uniformly in ``[lo * s, hi * s]`` with ``s`` the example's
    (unbiased) std, white Gaussian samples of that std added. Defaults ``(0.001, 1.0)`` are that
    version's, the one CLMR's master (Spijkervet/CLMR 423414d, 2021-11-11) installed; 0.2.3 (f27fc7b,
    2021-11-15) narrowed them to ``(0.0001, 0.01)`` (pass ``std_ratio=``). Differences: the draws
    come from our generators (per example, batched) instead of ``random``/``np.random``.

    ``mode="snr_db"`` (ours): the SNR is drawn uniformly in dB and the noise is rescaled to that
    exact RMS, so the output SNR equals the drawn value.

    In both modes ``colors`` may add coloured noise (ours; CLMR's is white): |N(f)| ~ f**e with
    white 0, pink -1/2, brown -1, blue +1/2, violet +1, rescaled to the target RMS. Silent examples
    stay silent.
    """

    name = "noise"

    def __init__(self, *, p: float, mode: str = "std_ratio", std_ratio: tuple[float, float] = (0.001, 1.0),
                 snr_db: tuple[float, float] = (46.0, 60.0), colors: Sequence[str] = ("white",), generator=None):
        super().__init__(p=p, generator=generator)
        if mode not in ("std_ratio", "snr_db"):
            raise ValueError(f"Noise: mode must be 'std_ratio' or 'snr_db', got {mode!r}")
        self.mode, self.std_ratio, self.snr_db = mode, std_ratio, snr_db
        self.colors = tuple(colors)
        bad = [c for c in self.colors if c not in NOISE_COLORS]
        if bad or not self.colors:
            raise ValueError(f"Noise: colors must be a non-empty subset of {sorted(NOISE_COLORS)}, got {colors!r}")

    def draw_params(self, n):
        level = ({"std_ratio": _uniform(n, *self.std_ratio, self.generator).float()} if self.mode == "std_ratio"
                 else {"snr_db": _uniform(n, *self.snr_db, self.generator).float()})
        return {
            **level,
            "color": torch.randint(len(self.colors), (n,), generator=self.generator),
            "seed": torch.randint(2**62, (), generator=self.generator),
        }

    def apply_selected(self, x, params):
        g = _device_generator(params["seed"], x.device)
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        exps = torch.tensor([NOISE_COLORS[c] for c in self.colors], dtype=x.dtype)[params["color"]]
        coloured = bool((exps != 0).any())
        if coloured:
            n_fft = fast_fft_len(x.shape[-1])
            spec = torch.fft.rfft(noise, n=n_fft)
            f = torch.arange(spec.shape[-1], device=x.device, dtype=x.dtype).clamp_min(1.0)
            spec = spec * f.pow(_bcast(exps, x))
            spec[..., 0] = 0  # no DC: it is not noise and would dominate red spectra
            noise = torch.fft.irfft(spec, n=n_fft)[..., : x.shape[-1]]
        if self.mode == "std_ratio":
            std = x.flatten(1).std(dim=1).view(-1, 1, 1)  # torch.std over the (C, T) example, as CLMR's
            target = std * _bcast(params["std_ratio"], x)
            if not coloured:  # white: unit-variance samples times the drawn std, exactly the original
                return x + noise * target
        else:
            target = _rms(x) * _bcast(torch.pow(10.0, -params["snr_db"].double() / 20.0), x)
        return x + noise * (target / _rms(noise).clamp_min(1e-12))


class HighLowPass(Transform):
    """A random high-pass or low-pass per example (50/50 by default), with a per-example cutoff.

    ``filter_type="fir"`` (default) follows CLMR's ``HighLowPass`` (Spijkervet/torchaudio-augmentations
    ``torchaudio_augmentations/augmentations/high_low_pass.py`` at 0.2.0-0.2.2, c6eadad, the
    version CLMR's master ran, with HighLowPass re-enabled in Spijkervet/CLMR 2e80ae2, 2021-07-22):
    julius' ``lowpass_filter`` / ``highpass_filter`` (``x - lowpass(x)``), a Hann-windowed sinc
    of ``zeros`` zero crossings each side, replicate-padded edges, cutoff ``f / sr``. Here every
    example's kernel is built on the device and all are applied in one batched FFT convolution
    (``fir_lowpass_kernels``, ``fir_filter``); the output equals julius' to float32 rounding
    (tests/test_augment.py). Differences: cutoffs are drawn uniformly in Hz (0.2.0-0.2.3 drew
    integer Hz with ``random.randint``; 0.2.4, 98f511a, uniform, like ours).

    ``filter_type="first_order"``: CLMR's 2020 code (Spijkervet/CLMR tag 2.0, 206e145,
    ``modules/transformations/audio.py`` ``HighLowBandPass``), essentia's first-order IIR
    ``HighPass``/``LowPass`` (6 dB/octave), causal from a zero state, applied as its impulse
    response (``first_order_kernels``) in one batched FFT convolution; equals ``lfilter`` with
    essentia's coefficients (tests/test_augment.py). That code drew integer cutoffs; ours are floats.

    ``filter_type="butterworth"`` (ours): a zero-phase Butterworth magnitude response of order
    ``order`` (6*order dB/octave), applied in the frequency domain to the zero-padded batch.
    """

    name = "filter"

    def __init__(self, *, sample_rate: int, p: float, highpass_hz=(200.0, 1200.0),
                 lowpass_hz=(2200.0, 4000.0), highpass_prob: float = 0.5, filter_type: str = "fir",
                 zeros: float = 8.0, order: int = 4, generator=None):
        super().__init__(p=p, generator=generator)
        if filter_type not in ("fir", "butterworth", "first_order"):
            raise ValueError(f"HighLowPass: filter_type must be 'fir', 'butterworth' or 'first_order', got {filter_type!r}")
        if max(highpass_hz[1], lowpass_hz[1]) > sample_rate / 2:
            raise ValueError(f"HighLowPass: cutoffs must stay below Nyquist ({sample_rate / 2} Hz); lower "
                             "--augment.highpass_hz / --augment.lowpass_hz")
        self.sample_rate, self.highpass_hz, self.lowpass_hz = sample_rate, highpass_hz, lowpass_hz
        self.highpass_prob, self.filter_type, self.zeros, self.order = highpass_prob, filter_type, zeros, order
        # Zero padding longer than the Butterworth's ringing (a few periods of the lowest cutoff), so
        # the circular FFT convolution does not wrap the end of a clip onto its start.
        self.pad = max(2048, math.ceil(16 * sample_rate / min(highpass_hz[0], lowpass_hz[0])))

    def draw_params(self, n):
        hp = torch.rand(n, generator=self.generator) < self.highpass_prob
        fh = _uniform(n, *self.highpass_hz, self.generator)
        fl = _uniform(n, *self.lowpass_hz, self.generator)
        return {"highpass": hp, "cutoff_hz": torch.where(hp, fh, fl).float()}

    def apply_selected(self, x, params):
        if self.filter_type == "fir":
            kernels = fir_lowpass_kernels(params["cutoff_hz"].double().to(x.device), self.sample_rate, self.zeros)
            return fir_filter(x, kernels, params["highpass"])
        if self.filter_type == "first_order":
            kernels = first_order_kernels(params["cutoff_hz"].double().to(x.device), params["highpass"].to(x.device),
                                          self.sample_rate)
            return causal_filter(x, kernels)
        t = x.shape[-1]
        n_fft = fast_fft_len(t + self.pad)
        spec = torch.fft.rfft(x, n=n_fft)
        f = torch.fft.rfftfreq(n_fft, d=1.0 / self.sample_rate, device=x.device)
        h = butterworth_mag(f, params["cutoff_hz"].to(x.device), params["highpass"].to(x.device), self.order)
        torch.view_as_real(spec).mul_(h.unsqueeze(-1))  # real gain on (re, im): cheaper than a complex multiply
        return torch.fft.irfft(spec, n=n_fft)[..., :t]


class Delay(Transform):
    """One echo with a per-example lag from a grid of ms: ``(x(t) + volume * x(t - lag)) / 2``.

    Follows CLMR's ``Delay`` (Spijkervet/torchaudio-augmentations
    ``torchaudio_augmentations/augmentations/delay.py`` at 0.2.2, f152b78): lag drawn from
    ``np.arange(200, 500, 50)`` ms (200..450, our inclusive ``delay_ms=(200, 450)``), ``int(ms * sr
    / 1000)`` samples, echo at ``volume_factor=0.5``, the sum halved. ``halve=False`` (ours) drops
    the final ``/2``: ``x + volume * echo``. CLMR's 2020 code (tag 2.0) used volume 0.2, also halved.
    """

    name = "delay"

    def __init__(self, *, sample_rate: int, p: float, delay_ms=(200.0, 450.0), step_ms: float = 50.0,
                 volume: float = 0.5, halve: bool = True, generator=None):
        super().__init__(p=p, generator=generator)
        self.sample_rate, self.volume, self.halve = sample_rate, float(volume), bool(halve)
        self.choices_ms = torch.arange(delay_ms[0], delay_ms[1] + 1e-6, step_ms, dtype=torch.float64)

    def draw_params(self, n):
        k = torch.randint(len(self.choices_ms), (n,), generator=self.generator)
        ms = self.choices_ms[k]
        # int() truncation as the original; the epsilon keeps exact products (200 ms -> 4410) exact.
        return {"delay_ms": ms.float(), "lag": torch.floor(ms * self.sample_rate / 1000 + 1e-9).long()}

    def apply_selected(self, x, params):
        n, c, t = x.shape
        lag = params["lag"].to(x.device).view(-1, 1, 1)
        pos = torch.arange(t, device=x.device).view(1, 1, -1) - lag  # (n, 1, T)
        echo = x.gather(-1, pos.clamp_min(0).expand(n, c, t)) * (pos >= 0)
        y = x + self.volume * echo
        return 0.5 * y if self.halve else y


class PitchShift(Transform):
    """Shift pitch by per-example semitones, keeping duration; all shifts in one batched pass.

    ``method="granular"`` (default, fastest): overlapping grains (``grain`` samples, 50 % overlap,
    ``sin^2`` crossfades) stay where they are in time, but each grain reads its input ``factor``
    times faster around its centre (linear interpolation; reads past either end are mirrored);
    grains are aligned WSOLA-style so crossfades join in phase (see ``pitch_shift_granular``).
    Cost is a few gathers on ``(n, T)`` plus one small batched FFT correlation, independent of
    how many distinct shifts a batch holds.

    ``method="vocoder"``: one STFT, output bin k takes the magnitude of input position k / factor
    and the true phase advance of the nearest input bin times factor, phases re-accumulated over
    frames, one inverse STFT. Smoother on sustained tones, about 10x slower on a CPU.

    The output is rescaled to the input's RMS.

    CLMR's ``PitchShift`` (Spijkervet/torchaudio-augmentations ``torchaudio_augmentations/
    augmentations/pitch_shift.py`` at 0.2.2, f152b78) runs sox's ``pitch`` effect (WSOLA time
    stretch, then resampling) through WavAugment with ``random.randint(-700, 700)`` cents. Ours
    follows the same idea (in-phase overlap-add of resampled grains) batched on the device; it is
    not sample-identical to sox. Semitones are drawn as floats (sox's cents: 0.01-semitone steps).
    """

    name = "pitch"

    def __init__(self, *, sample_rate: int, p: float, semitones=(-7.0, 7.0), method: str = "granular",
                 grain: int = 2048, n_fft: int = 1024, hop: int = 256, generator=None):
        super().__init__(p=p, generator=generator)
        if method not in ("granular", "vocoder"):
            raise ValueError(f"PitchShift: method must be 'granular' or 'vocoder', got {method!r}")
        if grain < 32 or grain % 4:
            raise ValueError(f"PitchShift: grain must be a multiple of 4 samples, >= 32, got {grain}")
        self.sample_rate, self.semitones, self.method = sample_rate, semitones, method
        self.grain, self.n_fft, self.hop = grain, n_fft, hop
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def draw_params(self, n):
        return {"semitones": _uniform(n, *self.semitones, self.generator).float()}

    def apply_selected(self, x, params):
        n, c, t = x.shape
        factor = torch.pow(2.0, params["semitones"].double() / 12.0).repeat_interleave(c).to(x.device)
        rows = x.reshape(n * c, t)
        if self.method == "granular":
            y = pitch_shift_granular(rows.float(), factor, grain=self.grain)
        else:
            y = pitch_shift_vocoder(rows, factor.float(), n_fft=self.n_fft, hop=self.hop,
                                    window=self.window.to(x.device))
        y = y.view(n, c, t)
        return y * (_rms(x) / _rms(y).clamp_min(1e-12))


class Speed(Transform):
    """Play each selected example ``rate`` times faster (pitch and tempo together), same length.

    ``y(t) = x(rate * t)`` by linear interpolation, after a frequency-domain anti-alias low-pass at
    Nyquist / rate for rates above 1; past the end of the input the output is silence.
    Ours: CLMR has no speed change (off by default, ``speed_p=0``).
    """

    name = "speed"
    pad = 2048

    def __init__(self, *, sample_rate: int, p: float, rate=(0.9, 1.1), generator=None):
        super().__init__(p=p, generator=generator)
        self.sample_rate, self.rate = sample_rate, rate

    def draw_params(self, n):
        return {"rate": _uniform(n, *self.rate, self.generator).float()}

    def apply_selected(self, x, params):
        n, c, t = x.shape
        rate = params["rate"].to(x.device)
        if bool((params["rate"] > 1).any()):
            n_fft = fast_fft_len(t + self.pad)
            spec = torch.fft.rfft(x, n=n_fft)
            f = torch.linspace(0, 1, spec.shape[-1], device=x.device).view(1, 1, -1)  # / Nyquist
            edge = (1.0 / rate.clamp_min(1.0)).view(-1, 1, 1)
            # Raised-cosine roll-off over the last 10 % below the new Nyquist: a brick wall would ring.
            z = ((f - 0.9 * edge) / (0.1 * edge)).clamp(0, 1)
            spec = spec * (0.5 + 0.5 * torch.cos(math.pi * z))
            x = torch.fft.irfft(spec, n=n_fft)[..., :t]
        pos = torch.arange(t, device=x.device, dtype=torch.float64).view(1, -1) * rate.double().view(-1, 1)
        i0 = pos.floor().long()
        frac = (pos - i0).to(x.dtype).unsqueeze(1)
        inside = (i0 <= t - 1).unsqueeze(1)
        i0c = i0.clamp_max(t - 1).unsqueeze(1).expand(n, c, t)
        i1c = (i0 + 1).clamp_max(t - 1).unsqueeze(1).expand(n, c, t)
        y = x.gather(-1, i0c) * (1 - frac) + x.gather(-1, i1c) * frac
        return y * inside


def load_ir_bank(folder: str, sample_rate: int, max_seconds: float) -> tuple[np.ndarray, list[str]]:
    """Load every audio file under ``folder`` as a mono IR at ``sample_rate``, unit energy, cut to
    ``max_seconds`` from its peak; returns ``(K, L)`` float32 (zero-padded) and the file names."""
    from pipeline.audio import read_audio, resample, to_mono

    names = sorted(f for f in os.listdir(folder) if f.lower().endswith(_AUDIO_EXTS))
    if not names:
        raise ValueError(f"--augment.reverb_ir_dir={folder!r} holds no audio files ({', '.join(_AUDIO_EXTS)})")
    irs = []
    for name in names:
        audio, sr = read_audio(os.path.join(folder, name))
        ir = resample(to_mono(audio), sr, sample_rate)[0]
        start = int(np.argmax(np.abs(ir)))  # drop the pre-delay before the direct sound
        ir = ir[start: start + int(round(max_seconds * sample_rate))].astype(np.float64)
        energy = float(np.sum(ir**2))
        if energy <= 0:
            raise ValueError(f"{os.path.join(folder, name)}: impulse response is silent; remove it from --augment.reverb_ir_dir")
        irs.append((ir / math.sqrt(energy)).astype(np.float32))
    bank = np.zeros((len(irs), max(len(i) for i in irs)), dtype=np.float32)
    for k, ir in enumerate(irs):
        bank[k, : len(ir)] = ir
    return bank, names


class Reverb(Transform):
    """Reverberation, per example, batched.

    ``method="freeverb"`` (default) follows CLMR's ``Reverb`` (Spijkervet/torchaudio-augmentations
    ``torchaudio_augmentations/augmentations/reverb.py`` at 0.2.2, f152b78: WavAugment's
    ``EffectChain().reverb(reverberance, damping, room_size).channels(1)``, i.e. sox's ``reverb``):
    reverberance, HF damping and room scale drawn as integers, ``torch.randint(0, 100)`` each (our
    inclusive ``(0, 99)``), sox's other controls at their defaults (stereo depth 100 %, no pre-delay,
    wet gain 0 dB), and sox's mixing: the dry signal at full gain plus the wet path. On a CPU the
    network runs as sox runs it, sample by sample (``freeverb_filter``: compiled, float64, examples
    on torch's threads); on an accelerator the wet impulse responses are rendered from the controls
    by ``freeverb_irs`` (the same network, exact in float64) and applied by one batched FFT
    convolution (``freeverb_apply``). Both match a sample-by-sample freeverb, each other and the
    ``sox`` program (tests/test_augment_reverb.py).
    Differences: no clipping at full scale (sox's integer samples clip), our generators instead of
    torch's global one. CLMR's 2020 code (tag 2.0) drew each control in 1..100.

    ``method="ir"`` (ours): convolution with a unit-energy impulse response mixed as
    ``(1-w) x + w (x * h)``: generated decaying noise of a drawn RT60 (in the params), or, with
    ``ir_dir``, one of a bank of IR files kept on the device (their Schroeder RT60 in the params).
    """

    name = "reverb"

    def __init__(self, *, sample_rate: int, p: float, method: str = "freeverb", reverberance=(0, 99),
                 damping=(0, 99), room_scale=(0, 99), wet_gain_db: float = 0.0, rt60_s=(0.2, 1.0),
                 wet=(0.1, 0.5), ir_dir: str | None = None, ir_seconds: float = 1.0, generator=None):
        super().__init__(p=p, generator=generator)
        if method not in ("freeverb", "ir"):
            raise ValueError(f"Reverb: method must be 'freeverb' or 'ir', got {method!r}")
        if ir_dir is not None and method != "ir":
            raise ValueError("Reverb: ir_dir needs method='ir'")
        self.sample_rate, self.method = sample_rate, method
        self.reverberance, self.damping, self.room_scale = reverberance, damping, room_scale
        self.wet_gain_db, self.rt60_s, self.wet, self.ir_dir = wet_gain_db, rt60_s, wet, ir_dir
        # A generated IR lasts at least the longest RT60, so every drawn decay reaches -60 dB.
        self.ir_len = int(round(max(ir_seconds, rt60_s[1]) * sample_rate))
        if ir_dir is not None:
            bank, self.ir_names = load_ir_bank(ir_dir, sample_rate, ir_seconds)
            self.register_buffer("ir_bank", torch.from_numpy(bank), persistent=False)
            self.register_buffer("ir_rt60", torch.tensor([estimate_rt60(b, sample_rate) for b in bank]),
                                 persistent=False)
        else:
            self.ir_bank = None

    def draw_params(self, n):
        g = self.generator
        if self.method == "freeverb":
            return {name: torch.randint(lo, hi + 1, (n,), generator=g)
                    for name, (lo, hi) in (("reverberance", self.reverberance), ("damping", self.damping),
                                           ("room_scale", self.room_scale))}
        params = {"wet": _uniform(n, *self.wet, g).float()}
        if self.ir_bank is None:
            params["rt60_s"] = _uniform(n, *self.rt60_s, g).float()
            params["seed"] = torch.randint(2**62, (), generator=g)
        else:
            k = torch.randint(self.ir_bank.shape[0], (n,), generator=g)
            params["ir_index"] = k
            params["rt60_s"] = self.ir_rt60.cpu()[k].float()
        return params

    def apply_selected(self, x, params):
        n, c, t = x.shape
        if self.method == "freeverb":
            if x.device.type == "cpu":  # the recursion itself: ~15x cheaper than rendering the IRs on a CPU
                return freeverb_filter(x, params["reverberance"], params["damping"], params["room_scale"],
                                       sample_rate=self.sample_rate, wet_gain_db=self.wet_gain_db)
            irs = freeverb_irs(params["reverberance"], params["damping"], params["room_scale"],
                               sample_rate=self.sample_rate, length=t, wet_gain_db=self.wet_gain_db,
                               arrays=1 if c > 2 else 2, device=x.device)
            return freeverb_apply(x, irs)
        if self.ir_bank is None:
            g = _device_generator(params["seed"], x.device)
            ir = generate_irs(params["rt60_s"], c, self.ir_len, self.sample_rate, g, x.device)
        else:
            ir = self.ir_bank.to(x.device)[params["ir_index"].to(x.device)].unsqueeze(1)  # (n, 1, L)
        n_fft = fast_fft_len(t + ir.shape[-1] - 1)
        wet_sig = torch.fft.irfft(torch.fft.rfft(x, n=n_fft) * torch.fft.rfft(ir, n=n_fft), n=n_fft)[..., :t]
        w = _bcast(params["wet"], x)
        return (1 - w) * x + w * wet_sig


# ----------------------------------------------------------------------------------------------
# Compose


class Compose(nn.Module):
    """A chain of transforms sharing one CPU generator, whose state is part of ``state_dict()``.

    ``forward(x)``: ``(B, C, T) -> (B, C, T)``, same dtype and device. ``last_params`` maps
    ``"<transform>.<param>"`` to the per-example tensors of the last call (``apply`` masks
    included); call-level entries (device seeds) are 0-dim.
    """

    def __init__(self, transforms: Sequence[Transform], *, seed: int = 0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.generator = generator if generator is not None else torch.Generator().manual_seed(seed)
        self.transforms = nn.ModuleList(transforms)
        for t in self.transforms:
            t.generator = self.generator
        self.last_params: dict[str, Tensor] = {}

    @torch.no_grad()  # augmentation is data preparation: no autograd graph, ever
    def forward(self, x: Tensor) -> Tensor:
        _check_input(x)
        params: dict[str, Tensor] = {}
        owned = False  # never write into the caller's tensor; our own intermediates are fair game
        for t in self.transforms:
            p = t.draw(x.shape[0])
            y = t.apply(x, p, inplace=owned)
            owned = owned or y is not x
            x = y
            t.last_params = p
            params.update({f"{t.name}.{k}": v for k, v in p.items()})
        self.last_params = params
        return x

    def get_extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def set_extra_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def build_augment(config: AugmentConfig, *, sample_rate: int, seed: int) -> Compose:
    """The batched chain from a config, in ``config.order``.

    Returns an identity ``Compose`` (no transforms) when ``config.enabled`` is false or
    ``config.backend == "cpu"`` (then ``CpuAugment`` in the loader's workers does the work).
    """
    if not config.enabled or config.backend == "cpu":
        return Compose([], seed=seed)
    c, sr = config, sample_rate
    make = {
        "polarity": lambda: PolarityInversion(p=c.polarity_p),
        "noise": lambda: Noise(p=c.noise_p, mode=c.noise_mode, std_ratio=c.noise_std_ratio, snr_db=c.noise_snr_db,
                               colors=c.noise_color),
        "gain": lambda: Gain(p=c.gain_p, gain_db=c.gain_db),
        "filter": lambda: HighLowPass(sample_rate=sr, p=c.filter_p, highpass_hz=c.highpass_hz,
                                      lowpass_hz=c.lowpass_hz, highpass_prob=c.highpass_prob,
                                      filter_type=c.filter_type, zeros=c.filter_zeros, order=c.filter_order),
        "delay": lambda: Delay(sample_rate=sr, p=c.delay_p, delay_ms=c.delay_ms, step_ms=c.delay_step_ms,
                               volume=c.delay_volume, halve=c.delay_halve),
        "speed": lambda: Speed(sample_rate=sr, p=c.speed_p, rate=c.speed_rate),
        "pitch": lambda: PitchShift(sample_rate=sr, p=c.pitch_p, semitones=c.pitch_semitones,
                                    method=c.pitch_method, grain=c.pitch_grain, n_fft=c.pitch_n_fft,
                                    hop=c.pitch_hop),
        "reverb": lambda: Reverb(sample_rate=sr, p=c.reverb_p, method=c.reverb_method,
                                 reverberance=c.reverb_reverberance, damping=c.reverb_damping,
                                 room_scale=c.reverb_room_scale, wet_gain_db=c.reverb_wet_gain_db,
                                 rt60_s=c.reverb_rt60_s, wet=c.reverb_wet, ir_dir=c.reverb_ir_dir,
                                 ir_seconds=c.reverb_ir_seconds),
    }
    return Compose([make[name]() for name in c.order], seed=seed)


# ----------------------------------------------------------------------------------------------
# Listening


def example_params(params: dict[str, Tensor], i: int) -> dict[str, dict[str, float | int | bool]]:
    """The parameters of example ``i`` from a flat ``last_params``, only for transforms it got."""
    out: dict[str, dict] = {}
    for key, v in params.items():
        tname, pname = key.split(".", 1)
        if not bool(params[f"{tname}.apply"][i]):
            continue
        entry = out.setdefault(tname, {})
        if pname != "apply" and v.dim() == 1:  # 0-dim entries are call-level (device seeds)
            entry[pname] = v[i].item()
    return out


def write_examples(audio: Tensor, params: dict[str, Tensor], out_dir: str, sample_rate: int,
                   n: int = 8) -> list[str]:
    """Write the first ``n`` examples of an augmented batch as WAVs plus ``params.json``.

    ``audio``: ``(B, C, T)`` (e.g. a ``Compose`` output), ``params``: its ``last_params``. WAVs are
    32-bit float so nothing clips; the JSON lists each file with the transforms it got and their
    parameters. ``out_dir`` is a local folder or any URL ``pipeline.fsio`` knows. Returns the URLs.
    """
    import soundfile as sf

    from pipeline.fsio import join_url, makedirs, write_bytes_atomic

    makedirs(out_dir)
    data = audio.detach().float().cpu().numpy()
    entries, urls = [], []
    for i in range(min(n, data.shape[0])):
        name = f"example-{i:03d}.wav"
        buf = io.BytesIO()
        sf.write(buf, data[i].T, sample_rate, format="WAV", subtype="FLOAT")
        url = join_url(out_dir, name)
        write_bytes_atomic(url, buf.getvalue())
        urls.append(url)
        entries.append({"file": name, "params": example_params(params, i)})
    meta_url = join_url(out_dir, "params.json")
    write_bytes_atomic(meta_url, json.dumps({"sample_rate": sample_rate, "examples": entries}, indent=2).encode())
    return urls + [meta_url]


__all__ = [
    "AugmentConfig", "Compose", "Delay", "Gain", "HighLowPass", "Noise", "PitchShift", "PolarityInversion",
    "Reverb", "Speed", "Transform", "build_augment", "estimate_rt60", "example_params", "generate_irs",
    "load_ir_bank", "pitch_shift_granular", "pitch_shift_vocoder", "write_examples",
]
