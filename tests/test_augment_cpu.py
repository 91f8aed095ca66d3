"""The CPU augmentation path (pipeline.augment_cpu.CpuAugment): determinism and values."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from pipeline.augment import AugmentConfig
from pipeline.augment_cpu import CpuAugment
from tests.test_augment_helpers import SR, f0_hz, render_note, semitones

ALL = ("polarity", "noise", "gain", "filter", "delay", "speed", "pitch", "reverb")


def only(name: str, **kw) -> AugmentConfig:
    """A config where just ``name`` applies (p=1)."""
    ps = {f"{n}_p": 0.0 for n in ALL}
    ps[f"{name}_p"] = 1.0
    return AugmentConfig(**ps, **kw)


def views_of(signal: np.ndarray, v: int = 2) -> np.ndarray:
    return np.stack([signal[None]] * v).astype(np.float32)


def test_deterministic_given_rng_and_differs_across_seeds():
    x = views_of(render_note(62, 1.0)[:16384], 3)
    cfg = AugmentConfig(noise_p=0.5, speed_p=0.5, reverb_ir_seconds=0.3, reverb_rt60_s=(0.1, 0.3))
    aug = CpuAugment(cfg, sample_rate=SR)
    a = aug(x, np.random.default_rng(0))
    b = aug(x, np.random.default_rng(0))
    c = aug(x, np.random.default_rng(1))
    assert a.shape == x.shape and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Views are augmented independently.
    assert not np.array_equal(a[0], a[1])


def test_picklable_for_loader_workers():
    x = views_of(render_note(62, 1.0)[:8192])
    aug = CpuAugment(AugmentConfig(noise_p=1.0, reverb_ir_seconds=0.3, reverb_rt60_s=(0.1, 0.3)), sample_rate=SR)
    clone = pickle.loads(pickle.dumps(aug))
    assert np.array_equal(aug(x, np.random.default_rng(3)), clone(x, np.random.default_rng(3)))


def test_global_numpy_state_is_left_alone():
    np.random.seed(123)
    expected = np.random.random()
    np.random.seed(123)
    CpuAugment(only("noise"), sample_rate=SR)(views_of(np.ones(4096, np.float32)), np.random.default_rng(0))
    assert np.random.random() == expected


def test_all_p_zero_is_the_identity():
    x = views_of(np.random.default_rng(0).standard_normal(4096))
    cfg = AugmentConfig(**{f"{n}_p": 0.0 for n in ALL})
    assert np.array_equal(CpuAugment(cfg, sample_rate=SR)(x, np.random.default_rng(0)), x)


def test_gain_exact_and_noise_at_the_drawn_snr():
    x = views_of(render_note(60, 1.0), 4)
    gain = CpuAugment(only("gain"), sample_rate=SR)
    y = gain(x, np.random.default_rng(1))
    for v in range(4):
        db = 20 * np.log10(np.sqrt(np.mean(y[v] ** 2)) / np.sqrt(np.mean(x[v] ** 2)))
        assert abs(db - gain.last_params[v]["gain"]["gain_db"]) < 1e-3
    noise = CpuAugment(only("noise", noise_mode="snr_db", noise_snr_db=(5.0, 30.0), noise_color=("white", "pink")),
                       sample_rate=SR)
    y = noise(x, np.random.default_rng(2))
    for v in range(4):
        snr = 10 * np.log10(np.mean(x[v] ** 2) / np.mean((y[v] - x[v]) ** 2))
        assert abs(snr - noise.last_params[v]["noise"]["snr_db"]) < 0.5
    clmr = CpuAugment(only("noise"), sample_rate=SR)  # CLMR's: std ratio U(0.001, 1.0), white
    y = clmr(x, np.random.default_rng(3))
    for v in range(4):
        ratio = np.std(y[v] - x[v]) / np.std(x[v])
        assert ratio == pytest.approx(clmr.last_params[v]["noise"]["std_ratio"], rel=0.02)


def test_pitch_moves_f0_by_the_drawn_semitones():
    note = render_note(69, 1.5)
    aug = CpuAugment(only("pitch"), sample_rate=SR)
    y = aug(views_of(note, 3), np.random.default_rng(4))
    f_in = f0_hz(note[2000:22000])
    for v in range(3):
        k = aug.last_params[v]["pitch"]["semitones"]
        assert abs(semitones(f0_hz(y[v, 0, 2000:22000]), f_in) - k) < 0.3
        assert y.shape == (3, 1, len(note))


def test_delay_echo_at_the_drawn_lag():
    x = views_of(np.random.default_rng(5).standard_normal(SR), 2)
    aug = CpuAugment(only("delay"), sample_rate=SR)
    y = aug(x, np.random.default_rng(6))
    for v in range(2):
        lag = aug.last_params[v]["delay"]["lag"]
        assert lag == int(aug.last_params[v]["delay"]["delay_ms"] * SR / 1000)
        np.testing.assert_allclose(2 * y[v, 0, lag:] - x[v, 0, lag:], 0.5 * x[v, 0, :-lag], atol=1e-5)
        np.testing.assert_allclose(y[v, 0, :lag], 0.5 * x[v, 0, :lag], atol=1e-6)  # CLMR's final /2


@pytest.mark.parametrize("highpass_prob", [0.0, 1.0])
def test_filter_attenuates_the_stop_band(highpass_prob):
    t = np.arange(2 * SR) / SR
    aug = CpuAugment(only("filter", highpass_prob=highpass_prob), sample_rate=SR)
    rng = np.random.default_rng(7)
    probe = views_of(np.zeros(16, np.float32), 1)
    aug(probe, np.random.default_rng(7))  # learn the draw, then replay it on a tone in the stop band
    fc = aug.last_params[0]["filter"]["cutoff_hz"]
    stop = fc / 2 if highpass_prob == 1.0 else fc * 2
    y = aug(views_of(np.sin(2 * np.pi * stop * t).astype(np.float32), 1), rng)
    mid = slice(SR // 2, -SR // 2)
    assert 20 * np.log10(np.sqrt(2 * np.mean(y[0, 0, mid] ** 2))) < -20


@pytest.mark.parametrize("name, kw", [("filter", {}), ("filter", {"filter_type": "first_order"}), ("reverb", {})])
def test_fir_filter_and_freeverb_equal_the_batched_chain(name, kw):
    """Same originals on both paths: replay the CPU path's draws through the batched transforms."""
    import torch

    from pipeline.augment import HighLowPass, Reverb

    x = views_of((0.3 * np.random.default_rng(8).standard_normal(6000)).astype(np.float32), 3)
    aug = CpuAugment(only(name, **kw), sample_rate=SR)
    y = aug(x, np.random.default_rng(9))
    for v in range(3):
        p = aug.last_params[v][name]
        one = torch.ones(1, dtype=torch.bool)
        if name == "filter":
            t = HighLowPass(sample_rate=SR, p=1.0, **kw)
            params = {"apply": one, "highpass": torch.tensor([p["highpass"]]), "cutoff_hz": torch.tensor([p["cutoff_hz"]])}
        else:
            t = Reverb(sample_rate=SR, p=1.0)
            params = {"apply": one, **{k: torch.tensor([p[k]]) for k in ("reverberance", "damping", "room_scale")}}
        ref = t.apply(torch.from_numpy(x[v : v + 1]), params).numpy()[0]
        np.testing.assert_allclose(y[v], ref, atol=5e-6, rtol=0)
