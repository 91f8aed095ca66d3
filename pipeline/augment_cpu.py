"""The CPU augmentation path: the same chain as ``pipeline.augment``, per example, via audiomentations.

For users without accelerator headroom: the loader's workers call ``CpuAugment(views, rng)`` on each
sample's views, so augmentation runs in parallel with training on the CPU cores. Selected with
``AugmentConfig(backend="cpu")`` (the batched ``build_augment`` then returns an identity chain).

Parameters are drawn from the caller's ``np.random.Generator`` with the same distributions as the
batched chain, then handed to audiomentations' transforms (``transform.parameters`` + ``apply``),
so the output is a function of the generator alone. audiomentations draws its noise from the
global NumPy RNG, so noise is generated under a temporarily re-seeded global state (restored after).
Transforms audiomentations lacks or implements differently from CLMR (CLMR's std-ratio noise,
the julius FIR filters, delay, speed, reverb) are written here in NumPy/SciPy, or call the batched
chain's own functions for one example (the FIR kernels, sox's reverb via ``freeverb_filter``), so both
paths follow the same originals (see each transform's docstring in ``pipeline.augment``).
Differences from the batched chain: Butterworth filters are causal (same magnitude, not
zero-phase); pitch uses audiomentations' signalsmith-stretch backend.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

from pipeline.augment import NOISE_COLORS, AugmentConfig, estimate_rt60, load_ir_bank
from pipeline.dsp import fir_lowpass_kernels, freeverb_filter

# audiomentations' AddColorNoise takes a decay in dB/octave of the *power* spectrum; our colour
# exponents are amplitude slopes (|N| ~ f**e), i.e. 20*log10(2)*e dB/octave.
_DB_PER_OCTAVE = 20.0 * math.log10(2.0)


@contextmanager
def _numpy_global_seed(rng: np.random.Generator):
    """Seed NumPy's global RNG from ``rng`` for the block, then restore the previous global state."""
    saved = np.random.get_state()
    np.random.seed(int(rng.integers(2**32)))
    try:
        yield
    finally:
        np.random.set_state(saved)


class CpuAugment:
    """Per-example augmentation of ``(V, C, T)`` float32 views; picklable (no torch state inside).

    ``__call__(views, rng)`` is deterministic given ``rng``; each view gets its own draws.
    ``last_params`` holds, per view, the transforms applied and their parameters.
    """

    def __init__(self, config: AugmentConfig, *, sample_rate: int) -> None:
        import audiomentations as am

        self.config, self.sample_rate = config, sample_rate
        c = config
        rolloff = 6 * c.filter_order
        self._polarity = am.PolarityInversion(p=1.0)
        self._gain = am.Gain(p=1.0)
        self._white = am.AddGaussianSNR(p=1.0)
        self._color = am.AddColorNoise(p=1.0)
        self._highpass = am.HighPassFilter(min_rolloff=rolloff, max_rolloff=rolloff, zero_phase=False, p=1.0)
        self._lowpass = am.LowPassFilter(min_rolloff=rolloff, max_rolloff=rolloff, zero_phase=False, p=1.0)
        self._pitch = am.PitchShift(p=1.0)
        self._delay_choices = np.arange(c.delay_ms[0], c.delay_ms[1] + 1e-6, c.delay_step_ms)
        self.ir_bank = self.ir_rt60 = None
        if c.reverb_ir_dir is not None:
            self.ir_bank, _ = load_ir_bank(c.reverb_ir_dir, sample_rate, c.reverb_ir_seconds)
            self.ir_rt60 = np.array([estimate_rt60(b, sample_rate) for b in self.ir_bank])
        self.last_params: list[dict[str, dict]] = []

    def __call__(self, views: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if views.ndim != 3:
            raise ValueError(f"CpuAugment expects (views, channels, time), got shape {views.shape}")
        if not self.config.enabled:
            return views
        out = np.empty_like(views, dtype=np.float32)
        self.last_params = []
        for v in range(views.shape[0]):
            out[v], params = self.one(views[v].astype(np.float32, copy=False), rng)
            self.last_params.append(params)
        return out

    def one(self, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, dict]]:
        """Augment one ``(C, T)`` example; returns it and the parameters of the transforms applied."""
        applied: dict[str, dict] = {}
        for name in self.config.order:
            if not rng.random() < getattr(self.config, f"{name}_p"):
                continue
            x, params = getattr(self, f"_do_{name}")(x, rng)
            applied[name] = params
        return x.astype(np.float32, copy=False), applied

    # Each _do_<name> draws its parameters from rng and applies them to a (C, T) float32 array.

    def _run(self, transform, x: np.ndarray, **params) -> np.ndarray:
        transform.parameters = {"should_apply": True, **params}
        y = transform.apply(x[0] if x.shape[0] == 1 else x, self.sample_rate)
        return np.asarray(y, dtype=np.float32).reshape(x.shape)

    def _do_polarity(self, x, rng):
        return self._run(self._polarity, x), {}

    def _do_gain(self, x, rng):
        db = rng.uniform(*self.config.gain_db)
        return self._run(self._gain, x, amplitude_ratio=10 ** (db / 20)), {"gain_db": db}

    def _do_noise(self, x, rng):
        c = self.config
        if c.noise_mode == "std_ratio":
            ratio = rng.uniform(*c.noise_std_ratio)
            noise_rms = ratio * float(np.std(x.astype(np.float64), ddof=1))  # torch.std, as CLMR's
            level = {"std_ratio": ratio}
        else:
            snr = rng.uniform(*c.noise_snr_db)
            noise_rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) / 10 ** (snr / 20)
            level = {"snr_db": snr}
        color = c.noise_color[rng.integers(len(c.noise_color))]
        if color == "white" and c.noise_mode == "std_ratio":
            y = x + (noise_rms * rng.standard_normal(x.shape)).astype(np.float32)
        else:
            with _numpy_global_seed(rng):
                if color == "white":
                    y = self._run(self._white, x, noise_std=noise_rms)
                else:
                    y = self._run(self._color, x, desired_noise_rms=noise_rms, apply_a_weighting=False,
                                  f_decay=_DB_PER_OCTAVE * NOISE_COLORS[color])
        return y, {**level, "color": color}

    def _do_filter(self, x, rng):
        from scipy.signal import fftconvolve

        c = self.config
        highpass = bool(rng.random() < c.highpass_prob)
        cutoff = rng.uniform(*(c.highpass_hz if highpass else c.lowpass_hz))
        params = {"highpass": highpass, "cutoff_hz": cutoff}
        if c.filter_type == "butterworth":
            y = self._run(self._highpass if highpass else self._lowpass, x, cutoff_freq=cutoff,
                          rolloff=6 * c.filter_order)
            return y, params
        if c.filter_type == "first_order":  # essentia's 1st-order IIR, see pipeline.dsp.first_order_kernels
            from scipy.signal import lfilter

            k = math.tan(math.pi * cutoff / self.sample_rate)
            a1 = (k - 1) / (k + 1)
            b = ((1 - a1) / 2, (a1 - 1) / 2) if highpass else ((1 + a1) / 2, (1 + a1) / 2)
            return lfilter(b, (1.0, a1), x.astype(np.float64), axis=-1).astype(np.float32), params
        kernel = fir_lowpass_kernels(torch.tensor([cutoff], dtype=torch.float64), self.sample_rate,
                                     c.filter_zeros)[0].numpy()
        half = (len(kernel) - 1) // 2
        low = fftconvolve(np.pad(x.astype(np.float64), ((0, 0), (half, half)), mode="edge"), kernel[None],
                          mode="valid", axes=-1)
        return (x - low if highpass else low).astype(np.float32), params

    def _do_delay(self, x, rng):
        c = self.config
        ms = float(self._delay_choices[rng.integers(len(self._delay_choices))])
        lag = int(math.floor(ms * self.sample_rate / 1000 + 1e-9))  # int() as the original
        y = x.copy()
        if lag < x.shape[-1]:
            y[:, lag:] += c.delay_volume * x[:, : x.shape[-1] - lag]
        return (0.5 * y if c.delay_halve else y), {"delay_ms": ms, "lag": lag}

    def _do_pitch(self, x, rng):
        semitones = rng.uniform(*self.config.pitch_semitones)
        y = self._run(self._pitch, x, num_semitones=semitones)
        # Same loudness convention as the batched chain: keep the input's RMS.
        rms_x, rms_y = np.sqrt(np.mean(x**2)), np.sqrt(np.mean(y**2))
        return (y * (rms_x / rms_y) if rms_y > 0 else y), {"semitones": semitones}

    def _do_speed(self, x, rng):
        from scipy.signal import butter, sosfiltfilt

        rate = rng.uniform(*self.config.speed_rate)
        t = x.shape[-1]
        src = x
        if rate > 1:  # anti-alias below the new Nyquist before reading faster
            sos = butter(8, 0.95 / rate, output="sos")
            src = sosfiltfilt(sos, x, axis=-1).astype(np.float32)
        pos = np.arange(t) * rate
        inside = pos <= t - 1
        y = np.stack([np.interp(pos, np.arange(t), ch) for ch in src]) * inside
        return y.astype(np.float32), {"rate": rate}

    def _do_reverb(self, x, rng):
        from scipy.signal import fftconvolve

        c, sr = self.config, self.sample_rate
        if c.reverb_method == "freeverb":
            controls = {name: int(rng.integers(lo, hi + 1)) for name, (lo, hi) in (
                ("reverberance", c.reverb_reverberance), ("damping", c.reverb_damping),
                ("room_scale", c.reverb_room_scale))}
            y = freeverb_filter(torch.from_numpy(np.ascontiguousarray(x))[None],
                                *(torch.tensor([v]) for v in controls.values()), sample_rate=sr,
                                wet_gain_db=c.reverb_wet_gain_db, threads=1)[0].numpy()
            return y.astype(np.float32), controls
        wet = rng.uniform(*c.reverb_wet)
        if self.ir_bank is None:
            rt60 = rng.uniform(*c.reverb_rt60_s)
            n = int(round(max(c.reverb_ir_seconds, c.reverb_rt60_s[1]) * sr))
            env = np.exp(-math.log(1000.0) * (np.arange(n) / sr) / rt60)
            ir = rng.standard_normal((x.shape[0], n)) * env
            ir /= np.sqrt(np.sum(ir**2, axis=-1, keepdims=True))
            params = {"wet": wet, "rt60_s": rt60}
        else:
            k = int(rng.integers(len(self.ir_bank)))
            ir = self.ir_bank[k][None]
            params = {"wet": wet, "ir_index": k, "rt60_s": float(self.ir_rt60[k])}
        conv = fftconvolve(x, ir, axes=-1)[:, : x.shape[-1]]
        return ((1 - wet) * x + wet * conv).astype(np.float32), params
