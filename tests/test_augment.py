"""Batched augmentation (pipeline.augment): each transform checked on measured values."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.augment import (
    AugmentConfig, Compose, Delay, Gain, HighLowPass, Noise, PitchShift, PolarityInversion, Reverb,
    Speed, build_augment, write_examples,
)
from tests.test_augment_helpers import (
    SR, active_seconds, f0_hz, render_note, schroeder_rt60, semitones, tone_level,
)

# the cuda case carries the `cuda` marker, so `pytest -m cuda` (benchmarks/gpu.py) runs it
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def batch_of(signal: np.ndarray, n: int, device) -> torch.Tensor:
    return torch.from_numpy(np.stack([signal] * n)).unsqueeze(1).to(device)


def forced(n: int, **params) -> dict[str, torch.Tensor]:
    return {"apply": torch.ones(n, dtype=torch.bool), **params}


@pytest.mark.parametrize("method", ["granular", "vocoder"])
def test_pitch_shift_moves_f0_of_a_rendered_note_by_k_semitones(device, method):
    note = render_note(69, 1.5)  # A4 flute, 1.5 s
    ks = torch.tensor([-7.0, -3.0, 2.5, 5.0, 7.0])
    x = batch_of(note, len(ks), device)
    y = PitchShift(sample_rate=SR, p=1.0, method=method).apply(x, forced(len(ks), semitones=ks))
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    f_in = f0_hz(note[2000:22000])
    for i, k in enumerate(ks.tolist()):
        out = y[i, 0].cpu().numpy()
        assert abs(semitones(f0_hz(out[2000:22000]), f_in) - k) < 0.3, (method, k)
        # Duration kept: the note is as long as before (10 ms frames, -30 dB floor).
        assert abs(active_seconds(out) - active_seconds(note)) < 0.05


def test_speed_scales_f0_and_content_duration(device):
    note = render_note(69, 0.6, total=2.0)
    rates = torch.tensor([0.8, 1.25])
    y = Speed(sample_rate=SR, p=1.0).apply(batch_of(note, 2, device), forced(2, rate=rates))
    f_in, d_in = f0_hz(note[1000:10000]), active_seconds(note)
    for i, r in enumerate(rates.tolist()):
        out = y[i, 0].cpu().numpy()
        assert abs(semitones(f0_hz(out[1000:int(10000 / r)]), f_in) - 12 * np.log2(r)) < 0.3
        assert abs(active_seconds(out) / d_in - 1 / r) < 0.06


def test_gain_is_exact_in_db(device):
    x = torch.randn(16, 2, 4000, generator=torch.Generator().manual_seed(0)).to(device)
    g = Gain(p=0.5, gain_db=(-20.0, -1.0))
    y = g(x)
    p = g.last_params
    assert 0 < int(p["apply"].sum()) < 16
    ratio_db = 20 * torch.log10(y.pow(2).mean((1, 2)).sqrt() / x.pow(2).mean((1, 2)).sqrt()).cpu()
    expected = torch.where(p["apply"], p["gain_db"], torch.zeros(16))
    torch.testing.assert_close(ratio_db, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("color", ["white", "pink", "brown", "blue", "violet"])
def test_noise_snr_matches_the_drawn_value(device, color):
    note = render_note(60, 1.0)
    x = batch_of(note, 6, device)
    noise = Noise(p=1.0, mode="snr_db", snr_db=(0.0, 40.0), colors=(color,),
                  generator=torch.Generator().manual_seed(1))
    y = noise(x)
    drawn = noise.last_params["snr_db"]
    assert drawn.unique().numel() == 6
    measured = 10 * torch.log10(x.pow(2).mean((1, 2)) / (y - x).pow(2).mean((1, 2))).cpu()
    assert (measured - drawn).abs().max() < 0.5
    if color != "white":  # the colour is real: pink/brown fall, blue/violet rise with frequency
        spec = torch.fft.rfft((y - x)[0, 0].cpu().double()).abs().pow(2)
        lo, hi = spec[100:1000].mean(), spec[10000:20000].mean()
        assert (lo > hi) == (color in ("pink", "brown"))


def test_noise_std_is_the_drawn_share_of_the_clips_std_as_clmr(device):
    note = render_note(60, 1.0)
    x = batch_of(note, 8, device)
    noise = Noise(p=1.0, generator=torch.Generator().manual_seed(1))  # CLMR's: std ratio U(0.001, 1.0)
    y = noise(x)
    ratio = noise.last_params["std_ratio"]
    assert float(ratio.min()) >= 0.001 and float(ratio.max()) <= 1.0 and np.ptp(ratio.numpy()) > 0.3
    measured = ((y - x).std(dim=(1, 2)) / x.std(dim=(1, 2))).cpu()
    torch.testing.assert_close(measured, ratio, rtol=0.02, atol=0)
    # White: flat spectrum (the two halves of the band carry the same power within 10 %).
    spec = torch.fft.rfft((y - x)[0, 0].cpu().double()).abs().pow(2)
    half = spec.shape[0] // 2
    assert abs(float(spec[1:half].mean() / spec[half:].mean()) - 1) < 0.1


@pytest.mark.parametrize("cutoff_hz, highpass", [(200.0, True), (1200.0, True), (2200.0, False), (4000.0, False)])
def test_fir_filter_equals_julius(device, cutoff_hz, highpass):
    julius = pytest.importorskip("julius")
    x = torch.randn(2, 1, 20000, generator=torch.Generator().manual_seed(2)).to(device)
    filt = HighLowPass(sample_rate=SR, p=1.0, filter_type="fir")
    y = filt.apply(x, forced(2, highpass=torch.tensor([highpass] * 2), cutoff_hz=torch.tensor([cutoff_hz] * 2)))
    fn = julius.highpass_filter if highpass else julius.lowpass_filter
    ref = fn(x.cpu(), cutoff=cutoff_hz / SR)
    torch.testing.assert_close(y.cpu(), ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("cutoff_hz, highpass", [(200.0, True), (1200.0, True), (2200.0, False), (4000.0, False)])
def test_first_order_filter_equals_essentias_iir(device, cutoff_hz, highpass):
    from scipy.signal import lfilter

    x = torch.randn(2, 1, 8000, generator=torch.Generator().manual_seed(2)).to(device)
    filt = HighLowPass(sample_rate=SR, p=1.0, filter_type="first_order")
    y = filt.apply(x, forced(2, highpass=torch.tensor([highpass] * 2), cutoff_hz=torch.tensor([cutoff_hz] * 2)))
    k = np.tan(np.pi * cutoff_hz / SR)  # essentia LowPass/HighPass.configure(), written out
    c = (k - 1) / (k + 1)
    b = [(1 - c) / 2, (c - 1) / 2] if highpass else [(1 + c) / 2, (1 + c) / 2]
    ref = lfilter(b, [1.0, c], x.cpu().double().numpy(), axis=-1)
    np.testing.assert_allclose(y.cpu().numpy(), ref, atol=2e-5, rtol=0)
    # 3 dB down at the cutoff, 6 dB/octave beyond it (first order).
    f = np.fft.rfftfreq(16384, 1 / SR)
    h = np.fft.rfft(filt.apply(torch.eye(1, 16384).view(1, 1, -1).to(device),
                               forced(1, highpass=torch.tensor([highpass]), cutoff_hz=torch.tensor([cutoff_hz])))[0, 0].cpu().numpy())
    at = lambda hz: 20 * np.log10(np.abs(h[np.argmin(np.abs(f - hz))]))  # noqa: E731
    assert abs(at(cutoff_hz) + 3.01) < 0.1


@pytest.mark.parametrize("filter_type", ["fir", "butterworth"])
def test_filters_attenuate_the_stop_band_by_more_than_20_db(device, filter_type):
    n, t = 12, 3 * SR
    filt = HighLowPass(sample_rate=SR, p=1.0, filter_type=filter_type, generator=torch.Generator().manual_seed(2))
    params = filt.draw(n)
    hp, fc = params["highpass"], params["cutoff_hz"]
    assert 0 < int(hp.sum()) < n
    times = np.arange(t) / SR
    # One octave into the stop band, two octaves into the pass band.
    stop = torch.where(hp, fc / 2, fc * 2)
    pas = torch.where(hp, fc * 4, fc / 4)
    for freqs, check in ((stop, lambda db: db < -20), (pas, lambda db: abs(db) < 0.5)):
        x = torch.from_numpy(np.stack([np.sin(2 * np.pi * float(f) * times) for f in freqs])).float()
        y = filt.apply(x.unsqueeze(1).to(device), params)[:, 0].cpu().numpy()
        for i, f in enumerate(freqs.tolist()):
            mid = slice(SR // 2, -SR // 2)  # away from the clip's edges
            db = 20 * np.log10(tone_level(y[i, mid], f) / tone_level(x[i, mid].numpy(), f))
            assert check(db), (bool(hp[i]), float(fc[i]), f, db)


def test_delay_is_clmrs_halved_sum():
    x = torch.randn(4, 1, SR, generator=torch.Generator().manual_seed(3))
    delay = Delay(sample_rate=SR, p=1.0)  # CLMR: (x + 0.5 * x(t - lag)) / 2
    lag = torch.tensor([4410, 5512, 7717, 9922])  # 200, 250, 350, 450 ms: int(ms * sr / 1000)
    y = delay.apply(x, forced(4, lag=lag, delay_ms=torch.tensor([200.0, 250.0, 350.0, 450.0])))
    for i, n in enumerate(lag.tolist()):
        torch.testing.assert_close(y[i, 0, :n], 0.5 * x[i, 0, :n])
        torch.testing.assert_close(y[i, 0, n:], 0.5 * x[i, 0, n:] + 0.25 * x[i, 0, :-n])
    drawn = Delay(sample_rate=SR, p=1.0).draw(64)
    assert set(drawn["lag"].tolist()) == {4410, 5512, 6615, 7717, 8820, 9922}


def test_delay_echo_sits_at_the_drawn_lag(device):
    x = torch.randn(8, 1, SR, generator=torch.Generator().manual_seed(3)).to(device)
    delay = Delay(sample_rate=SR, p=1.0, volume=0.5, halve=False)
    y = delay(x)
    lags = delay.last_params["lag"]
    ms = delay.last_params["delay_ms"]
    assert set(ms.tolist()) <= {200.0, 250.0, 300.0, 350.0, 400.0, 450.0}
    assert lags.unique().numel() > 1
    for i in range(8):
        a, e = x[i, 0].cpu().double(), (y - x)[i, 0].cpu().double()
        n = 2 * SR
        xc = torch.fft.irfft(torch.fft.rfft(e, n) * torch.fft.rfft(a, n).conj(), n)[: SR // 2]
        peak = int(xc.argmax())
        assert peak == int(lags[i]) == int(float(ms[i]) * SR / 1000)
        assert abs(float(xc[peak]) / float((a[: SR - peak] ** 2).sum()) - 0.5) < 1e-3


def test_reverb_energy_decay_matches_the_drawn_rt60(device):
    n = 6
    x = torch.zeros(n, 1, 2 * SR, device=device)
    x[:, :, 0] = 1.0  # an impulse: the output is (1 - wet) at t=0, then the wet impulse response
    rev = Reverb(sample_rate=SR, p=1.0, method="ir", rt60_s=(0.2, 1.0), ir_seconds=1.0,
                 generator=torch.Generator().manual_seed(4))
    y = rev(x)[:, 0].cpu().numpy()
    rt60 = rev.last_params["rt60_s"].numpy()
    assert np.ptp(rt60) > 0.1
    for i in range(n):
        measured = schroeder_rt60(y[i, 1:])
        assert abs(measured / rt60[i] - 1) < 0.2, (rt60[i], measured)


def test_reverb_from_a_folder_of_impulse_responses(tmp_path, device):
    rng = np.random.default_rng(5)
    t = np.arange(SR) / SR
    true = [0.3, 0.6, 0.9]
    for k, r in enumerate(true):
        ir = rng.standard_normal(SR) * np.exp(-np.log(1000) * t / r)
        sf.write(tmp_path / f"ir{k}.wav", (0.9 * ir / np.abs(ir).max()).astype(np.float32), SR, subtype="FLOAT")
    rev = Reverb(sample_rate=SR, p=1.0, method="ir", ir_dir=str(tmp_path),
                 generator=torch.Generator().manual_seed(6)).to(device)
    x = torch.zeros(8, 1, 2 * SR, device=device)
    x[:, :, 0] = 1.0
    y = rev(x)[:, 0].cpu().numpy()
    p = rev.last_params
    assert p["ir_index"].unique().numel() > 1
    for i in range(8):
        k = int(p["ir_index"][i])
        assert abs(float(p["rt60_s"][i]) / true[k] - 1) < 0.2
        assert abs(schroeder_rt60(y[i, 1:]) / true[k] - 1) < 0.2


def test_polarity_inverts_only_the_selected_examples(device):
    x = torch.randn(32, 1, 100, generator=torch.Generator().manual_seed(7)).to(device)
    pol = PolarityInversion(p=0.5)
    y = pol(x)
    sign = torch.where(pol.last_params["apply"], -1.0, 1.0).to(device).view(-1, 1, 1)
    assert torch.equal(y, x * sign)
    assert 0 < int(pol.last_params["apply"].sum()) < 32


def _full_chain(seed: int = 0, **overrides) -> Compose:
    base = dict(polarity_p=0.8, noise_p=0.5, gain_p=0.5, filter_p=0.8, delay_p=0.5, speed_p=0.5,
                pitch_p=0.6, reverb_p=0.6, reverb_ir_seconds=0.3,
                reverb_rt60_s=(0.1, 0.3))
    base.update(overrides)
    return build_augment(AugmentConfig(**base), sample_rate=SR, seed=seed)


def test_per_example_parameters_differ_across_a_batch(device):
    note = render_note(64, 1.0)
    x = batch_of(note[:16384], 16, device)
    chain = _full_chain(seed=1)
    y = chain(x)
    p = chain.last_params
    for key in ("pitch.semitones", "gain.gain_db", "noise.std_ratio", "filter.cutoff_hz", "speed.rate"):
        assert p[key].unique().numel() == 16, key
    for key in ("reverb.reverberance", "reverb.damping", "reverb.room_scale"):  # integers 0..99
        assert p[key].unique().numel() > 8, key
    assert 0 < int(p["pitch.apply"].sum()) < 16
    # Identical inputs, different draws: no two outputs are the same.
    flat = y.flatten(1).cpu()
    assert torch.cdist(flat, flat).add(torch.eye(16) * 1e9).min() > 1e-3


def test_same_generator_state_gives_the_same_output(device):
    x = torch.randn(8, 1, 8192, generator=torch.Generator().manual_seed(8)).to(device)
    chain = _full_chain(seed=3)
    state = chain.generator.get_state()
    y1 = chain(x)
    y2 = chain(x)
    chain.generator.set_state(state)
    y3 = chain(x)
    assert torch.equal(y1, y3)
    assert not torch.equal(y1, y2)
    assert torch.equal(_full_chain(seed=3)(x), y1)
    assert not torch.equal(_full_chain(seed=4)(x), y1)


def test_p_zero_is_the_identity(device):
    x = torch.randn(8, 2, 8192, generator=torch.Generator().manual_seed(9)).to(device)
    zero = {f"{n}_p": 0.0 for n in ("polarity", "noise", "gain", "filter", "delay", "speed", "pitch", "reverb")}
    chain = _full_chain(**zero)
    assert len(chain.transforms) == 8
    y = chain(x)
    assert torch.equal(y, x)
    assert not any(bool(v.any()) for k, v in chain.last_params.items() if k.endswith(".apply"))


def test_state_dict_round_trip_through_torch_load_weights_only(tmp_path, device):
    x = torch.randn(8, 1, 8192, generator=torch.Generator().manual_seed(10)).to(device)
    a = _full_chain(seed=5)
    a(x)  # advance the generator
    torch.save(a.state_dict(), tmp_path / "aug.pt")
    b = _full_chain(seed=99)
    b.load_state_dict(torch.load(tmp_path / "aug.pt", weights_only=True))
    assert torch.equal(a(x), b(x))


def test_shape_dtype_device_kept_and_input_untouched(device):
    x = torch.randn(6, 2, 8192, generator=torch.Generator().manual_seed(11)).to(device).to(torch.bfloat16)
    before = x.clone()
    y = _full_chain(seed=6, pitch_p=1.0, filter_p=1.0)(x)
    assert y.shape == x.shape and y.dtype == torch.bfloat16 and y.device == x.device
    assert torch.equal(x, before)
    assert torch.isfinite(y.float()).all()


def test_cpu_backend_and_disabled_give_the_identity_chain():
    x = torch.randn(2, 1, 1000)
    for cfg in (AugmentConfig(backend="cpu"), AugmentConfig(enabled=False)):
        chain = build_augment(cfg, sample_rate=SR, seed=0)
        assert len(chain.transforms) == 0 and torch.equal(chain(x), x)


@pytest.mark.parametrize("bad, flag", [
    (dict(pitch_p=1.5), "pitch_p"), (dict(gain_db=(0.0, -3.0)), "gain_db"), (dict(backend="tpu"), "backend"),
    (dict(order=("pitch", "pitch")), "order"), (dict(noise_color=("green",)), "noise_color"),
    (dict(reverb_ir_dir="/nonexistent/irs"), "reverb_ir_dir"),
    (dict(reverb_method="ir", reverb_ir_dir="/nonexistent/irs"), "reverb_ir_dir"),
    (dict(filter_type="chebyshev"), "filter_type"), (dict(filter_type="Butterworth"), "filter_type"), (dict(noise_mode="pink"), "noise_mode"),
    (dict(reverb_method="sox"), "reverb_method"), (dict(reverb_room_scale=(0, 101)), "reverb_room_scale"),
    (dict(reverb_reverberance=(10.5, 20)), "reverb_reverberance"),
])
def test_config_errors_name_the_flag(bad, flag):
    with pytest.raises(ValueError, match=flag):
        AugmentConfig(**bad)


def test_write_examples_writes_wavs_and_their_params(tmp_path):
    note = render_note(67, 1.0)
    chain = _full_chain(seed=7)
    y = chain(batch_of(note[:16384], 4, "cpu"))
    paths = write_examples(y, chain.last_params, str(tmp_path / "listen"), SR, n=3)
    assert [os.path.basename(p) for p in paths] == ["example-000.wav", "example-001.wav", "example-002.wav",
                                                   "params.json"]
    meta = json.loads((tmp_path / "listen" / "params.json").read_text())
    for i in range(3):
        audio, sr = sf.read(paths[i], dtype="float32", always_2d=True)
        assert sr == SR and np.array_equal(audio[:, 0], y[i, 0].numpy())
        entry = meta["examples"][i]
        applied = {k.split(".")[0] for k, v in chain.last_params.items() if k.endswith(".apply") and bool(v[i])}
        assert set(entry["params"]) == applied
        if "pitch" in applied:
            assert entry["params"]["pitch"]["semitones"] == pytest.approx(float(chain.last_params["pitch.semitones"][i]))


@pytest.mark.parametrize("length", [1, 17, 300, 5000])
def test_short_and_stereo_clips_keep_shape_and_stay_finite(device, length):
    x = torch.randn(3, 2, length, generator=torch.Generator().manual_seed(12)).to(device) * 0.1
    chain = _full_chain(seed=8, **{f"{n}_p": 1.0 for n in ("noise", "gain", "filter", "delay", "speed", "pitch",
                                                          "reverb")}, noise_color=("white", "pink"))
    y = chain(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # Every transform ran, so the clips really changed.
    assert not torch.equal(y, x)
