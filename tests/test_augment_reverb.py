"""CLMR's reverb (sox's freeverb: pipeline.dsp, pipeline.augment.Reverb), checked against the algorithm and the program.

The reference below is written from sox 14.4.2's published algorithm (``src/reverb.c``: 8
low-pass-feedback combs in parallel, 4 freeverb all-passes in series, delay lengths given at
44.1 kHz, a second array of lengths +-12 samples for the right channel, dry + wet mixing) as a
plain sample-by-sample loop over ring buffers: nothing shared with the FFT rendering under test.
When the ``sox`` program is installed (``apt-get install sox``) the outputs are also compared with
it, the way torchaudio-augmentations calls it (``reverb R D S`` then ``channels 1``).
"""

from __future__ import annotations

import math
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import butter, sosfilt

from pipeline.augment import AugmentConfig, Reverb, build_augment
from pipeline.dsp import freeverb_apply, freeverb_filter, freeverb_irs
from tests.test_augment_helpers import schroeder_rt60

COMBS = (1116, 1188, 1277, 1356, 1422, 1491, 1557, 1617)
ALLPASSES = (225, 341, 441, 556)


def reference_wet(x: np.ndarray, sr: int, reverberance: float, damping: float, room: float,
                  array: int) -> np.ndarray:
    """The wet output of one sox filter array (0: left/mono, 1: right), one sample at a time."""
    a = -1 / math.log(1 - 0.3)
    b = 100 / (math.log(1 - 0.98) * a + 1)
    feedback = 1 - math.exp((reverberance - b) / (a * b))
    damp = damping / 100 * 0.3 + 0.2
    scale, r = room / 100 * 0.9 + 0.1, sr / 44100
    offset, comb_len, ap_len = float(array), [], []
    for n in COMBS:
        comb_len.append(int(scale * r * (n + 12 * offset) + 0.5))
        offset = -offset
    for n in ALLPASSES:
        ap_len.append(int(r * (n + 12 * offset) + 0.5))
        offset = -offset
    combs = [[0.0] * n for n in comb_len]
    store = [0.0] * len(combs)
    allpasses = [[0.0] * n for n in ap_len]
    out = np.zeros(len(x))
    for t, sample in enumerate(x.tolist()):
        acc = 0.0
        for i, line in enumerate(combs):
            pos = t % len(line)
            delayed = line[pos]  # written len(line) samples ago
            store[i] = delayed + (store[i] - delayed) * damp
            line[pos] = sample + store[i] * feedback
            acc += delayed
        for line in allpasses:
            pos = t % len(line)
            delayed = line[pos]
            line[pos] = acc + delayed * 0.5
            acc = delayed - acc
        out[t] = acc * 0.015
    return out


def reference_mono(x: np.ndarray, sr: int, *controls: float) -> np.ndarray:
    """sox ``reverb`` on mono input (stereo out, depth 100 %) followed by ``channels 1`` (the mean)."""
    return x + 0.5 * (reference_wet(x, sr, *controls, 0) + reference_wet(x, sr, *controls, 1))


def ours(x: np.ndarray, sr: int, reverberance: int, damping: int, room: int, device="cpu",
         method="fft") -> np.ndarray:
    """``x`` (C, T) through one of our two renderings with explicit controls: ``"fft"`` (IRs rendered
    in the frequency domain, one FFT convolution: the accelerator path) or ``"recursion"`` (the
    compiled sample-by-sample network: the CPU path)."""
    controls = [torch.tensor([v]) for v in (reverberance, damping, room)]
    xt = torch.from_numpy(x).float()[None].to(device)
    if method == "recursion":
        return freeverb_filter(xt, *controls, sample_rate=sr)[0].double().numpy()
    irs = freeverb_irs(*controls, sample_rate=sr, length=x.shape[-1], device=device)
    return freeverb_apply(xt, irs)[0].cpu().double().numpy()


CONTROLS = [(50, 50, 100), (99, 0, 99), (0, 99, 0), (73, 18, 41)]
# the cuda case carries the `cuda` marker, so `pytest -m cuda` (benchmarks/gpu.py) runs it
PATHS = [("cpu", "recursion"), ("cpu", "fft")] + (
    [pytest.param("cuda", "fft", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device, method", PATHS)
@pytest.mark.parametrize("controls", CONTROLS)
def test_matches_a_sample_by_sample_freeverb(device, method, controls):
    sr = 22050
    x = 0.3 * np.random.default_rng(0).standard_normal(4000)
    ref = reference_mono(x, sr, *controls)
    y = ours(x[None], sr, *controls, device=device, method=method)[0]
    assert np.abs(ref - x).max() > 0.01  # the wet path is really there
    np.testing.assert_allclose(y, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize("method", ["fft", "recursion"])
def test_stereo_and_multichannel_mixing_follow_sox(method):
    sr = 16000
    x = 0.2 * np.random.default_rng(1).standard_normal((2, 3000))
    y = ours(x, sr, 60, 30, 70, method=method)
    # sox, stereo in with depth 100 %: channel w = dry_w + array_w applied to the mean of both inputs.
    for w in (0, 1):
        ref = x[w] + reference_wet(x.mean(axis=0), sr, 60, 30, 70, w)
        np.testing.assert_allclose(y[w], ref, atol=2e-6, rtol=0)
    x3 = np.concatenate([x, x[:1] * 0.5])  # 3 channels: sox turns stereo depth off, each channel alone
    y3 = ours(x3, sr, 60, 30, 70, method=method)
    for ch in range(3):
        np.testing.assert_allclose(y3[ch], x3[ch] + reference_wet(x3[ch], sr, 60, 30, 70, 0), atol=2e-6, rtol=0)


def test_energy_decay_and_wet_energy_follow_the_reference():
    sr, n = 8000, 12000  # 1.5 s impulse responses
    impulse = np.zeros(n)
    impulse[0] = 1.0
    rt60s = {}
    for controls in ((0, 50, 50), (50, 50, 50), (99, 50, 50), (99, 50, 5)):
        ref = reference_mono(impulse, sr, *controls)
        y = ours(impulse[None], sr, *controls)[0]
        assert y[0] == pytest.approx(1.0, abs=1e-7)  # the dry path at full gain, as sox's
        wet_ref, wet = ref[1:], y[1:]
        assert float(np.sum(wet**2)) == pytest.approx(float(np.sum(wet_ref**2)), rel=1e-4)
        rt60s[controls] = schroeder_rt60(wet, sr)
        assert rt60s[controls] == pytest.approx(schroeder_rt60(wet_ref, sr), rel=0.01)
    # sox's controls act as documented: more reverberance or room, longer decay; HF damping shortens
    # the decay above 2 kHz (measured: 0.69 s -> 0.23 s at reverberance and room 99).
    assert rt60s[(0, 50, 50)] < rt60s[(50, 50, 50)] < rt60s[(99, 50, 50)]
    assert rt60s[(99, 50, 5)] < rt60s[(99, 50, 50)]
    sos = butter(4, 2000, "highpass", fs=sr, output="sos")
    hf = {d: schroeder_rt60(sosfilt(sos, ours(impulse[None], sr, 99, d, 99)[0][1:]), sr) for d in (0, 99)}
    assert hf[99] < 0.5 * hf[0]


@pytest.mark.skipif(shutil.which("sox") is None, reason="the sox program is not installed (apt-get install sox)")
@pytest.mark.parametrize("method", ["fft", "recursion"])
@pytest.mark.parametrize("controls", CONTROLS[:2])
def test_matches_the_sox_program(tmp_path, controls, method):
    sr = 22050
    x = (0.05 * np.random.default_rng(2).standard_normal(5000)).astype(np.float32)  # no clipping in sox
    sf.write(tmp_path / "in.wav", x, sr, subtype="FLOAT")
    subprocess.run(["sox", "-V1", str(tmp_path / "in.wav"), "-e", "floating-point", "-b", "32",
                    str(tmp_path / "out.wav"), "reverb", *map(str, controls), "channels", "1"], check=True)
    out, rate = sf.read(tmp_path / "out.wav", dtype="float64")
    assert rate == sr and out.shape == x.shape  # sox's reverb has no tail: same length out
    np.testing.assert_allclose(ours(x[None], sr, *controls, method=method)[0], out, atol=2e-6, rtol=0)


def test_draws_clmrs_integer_controls_and_defaults_to_freeverb():
    rev = Reverb(sample_rate=22050, p=1.0, generator=torch.Generator().manual_seed(0))
    params = rev.draw(4000)
    for name in ("reverberance", "damping", "room_scale"):
        v = params[name]
        assert v.dtype == torch.int64 and int(v.min()) == 0 and int(v.max()) == 99  # torch.randint(0, 100)
    chain = build_augment(AugmentConfig(), sample_rate=22050, seed=0)
    assert [t for t in chain.transforms if t.name == "reverb"][0].method == "freeverb"


def test_cpu_batches_take_the_recursion_and_agree_with_the_fft_rendering():
    """A 2.68 s CLMR crop batch: the CPU path (recursion, on 1 or 2 threads) and the accelerator
    path (FFT rendering) give the same output to float32 rounding; the thread count changes nothing."""
    sr, t = 22050, 59049
    g = torch.Generator().manual_seed(3)
    x = 0.3 * torch.randn(5, 1, t, generator=g)
    rev = Reverb(sample_rate=sr, p=1.0, generator=g)
    params = rev.draw(5)
    y = rev.apply(x, params)
    irs = freeverb_irs(params["reverberance"], params["damping"], params["room_scale"], sample_rate=sr, length=t)
    y_fft = freeverb_apply(x, irs)
    assert float((y - x).abs().max()) > 0.05  # reverberated
    assert float((y - y_fft).abs().max()) < 2e-6
    one = freeverb_filter(x, params["reverberance"], params["damping"], params["room_scale"], sample_rate=sr, threads=1)
    two = freeverb_filter(x, params["reverberance"], params["damping"], params["room_scale"], sample_rate=sr, threads=2)
    assert torch.equal(one, two) and torch.equal(one, y)
    with pytest.raises(ValueError, match="CPU tensors"):
        freeverb_filter(x.to("meta"), params["reverberance"], params["damping"], params["room_scale"], sample_rate=sr)
