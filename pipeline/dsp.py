"""Signal-processing kernels the batched transforms of ``pipeline.augment`` apply: FFT sizes, the
high/low-pass filters (julius' windowed sinc, essentia's first-order IIR, Butterworth magnitudes)
sox's reverb (freeverb) rendered as impulse responses, the pitch shifters (WSOLA-aligned granular
and phase vocoder), generated noise impulse responses and the Schroeder RT60 estimate. Everything is batched over a leading
example dimension and runs on the device of its tensor arguments, except ``freeverb_filter``, sox's
reverb run as its recursion on CPU tensors (the compiled kernel is ``pipeline.dsp_cpu``).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FREEVERB_ALLPASSES", "FREEVERB_COMBS", "FREEVERB_STEREO_SPREAD", "butterworth_mag", "causal_filter",
    "fast_fft_len", "fir_filter", "fir_half_sizes", "fir_lowpass_kernels", "first_order_kernels",
    "freeverb_apply", "freeverb_coefficients", "freeverb_delays", "freeverb_filter", "freeverb_irs",
    "estimate_rt60", "generate_irs", "pitch_shift_granular", "pitch_shift_vocoder",
]


@lru_cache(maxsize=256)
def fast_fft_len(n: int) -> int:
    """Smallest 2,3,5-smooth integer >= n (fast for every FFT backend)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def butterworth_mag(f: Tensor, cutoff: Tensor, highpass: Tensor, order: int) -> Tensor:
    """|H(f)| of a Butterworth high- or low-pass, per example: f (F,), cutoff/highpass (n,) -> (n, 1, F)."""
    ratio = f.view(1, 1, -1) / cutoff.view(-1, 1, 1)
    ratio = torch.where(highpass.view(-1, 1, 1), 1.0 / ratio.clamp_min(1e-6), ratio)
    return torch.rsqrt(1.0 + ratio.pow(2 * order))


def fir_half_sizes(cutoff_hz: Tensor, sample_rate: int, zeros: float) -> Tensor:
    """Half lengths of julius' windowed-sinc filters, ``int(zeros / (f / sr) / 2)``: ``(n,) -> (n,)`` long."""
    return torch.floor(zeros / (cutoff_hz.double() / sample_rate) / 2).long()


def fir_lowpass_kernels(cutoff_hz: Tensor, sample_rate: int, zeros: float = 8.0) -> Tensor:
    """julius' low-pass FIR for each cutoff, centred and zero-padded to the longest: ``(n,) -> (n, 2H + 1)``.

    The filter julius builds (``julius/lowpass.py`` ``LowPassFilters``, julius 0.2.x):
    ``2c * hann(2h + 1) * sinc(2 pi c t)`` for ``t = -h..h``, ``c = f / sr``, ``h = int(zeros / c / 2)``,
    normalised to unit sum (so DC passes exactly). Built in float64 on ``cutoff_hz``'s device.
    """
    half = fir_half_sizes(cutoff_hz, sample_rate, zeros).clamp_min(1)
    big = int(half.max())
    t = torch.arange(-big, big + 1, device=cutoff_hz.device, dtype=torch.float64).view(1, -1)
    c = (cutoff_hz.double() / sample_rate).view(-1, 1)
    h = half.to(torch.float64).view(-1, 1)
    window = (0.5 + 0.5 * torch.cos(math.pi * t / h)) * (t.abs() <= h)  # symmetric Hann of 2h + 1 taps
    arg = 2 * math.pi * c * t
    sinc = torch.where(t == 0, torch.ones_like(arg), torch.sin(arg) / torch.where(t == 0, 1.0, arg))
    kernel = 2 * c * window * sinc
    return kernel / kernel.sum(dim=1, keepdim=True)


def first_order_kernels(cutoff_hz: Tensor, highpass: Tensor, sample_rate: int, tol: float = 1e-10) -> Tensor:
    """Impulse responses of essentia's first-order IIR high/low-pass, ``(n,) -> (n, K)`` float64, causal.

    essentia's ``LowPass``/``HighPass`` (MTG/essentia ``src/algorithms/filters/{lowpass,highpass}.cpp``
    at 0f77e30; Zölzer, DAFX p. 40): ``c = (tan(pi fc/fs) - 1) / (tan(pi fc/fs) + 1)``,
    ``H(z) = (b0 + b1 z^-1) / (1 + c z^-1)`` with ``b = ((1+c)/2, (1+c)/2)`` (low) or
    ``((1-c)/2, (c-1)/2)`` (high), so ``h[0] = b0`` and ``h[k] = (b1 - c b0) (-c)^(k-1)``. Cut where
    ``|c|^k`` falls below ``tol``: exact to that tolerance, the pole is inside the unit circle.
    """
    t = torch.tan(math.pi * cutoff_hz.double() / sample_rate)
    c = (t - 1) / (t + 1)
    b0 = torch.where(highpass, (1 - c) / 2, (1 + c) / 2)
    b1 = torch.where(highpass, (c - 1) / 2, (1 + c) / 2)
    length = int(math.ceil(math.log(tol) / math.log(max(float(c.abs().max()), 1e-3)))) + 2
    k = torch.arange(1, length, device=cutoff_hz.device, dtype=torch.float64).view(1, -1)
    tail = (b1 - c * b0).view(-1, 1) * (-c).view(-1, 1).pow(k - 1)
    return torch.cat([b0.view(-1, 1), tail], dim=1)


def causal_filter(x: Tensor, kernels: Tensor) -> Tensor:
    """Causal convolution of ``x`` ``(n, C, T)`` with per-example kernels ``(n, K)``, zero initial state."""
    t = x.shape[-1]
    n_fft = fast_fft_len(t + kernels.shape[-1] - 1)
    k = kernels.to(device=x.device, dtype=x.dtype).unsqueeze(1)
    return torch.fft.irfft(torch.fft.rfft(x, n=n_fft) * torch.fft.rfft(k, n=n_fft), n=n_fft)[..., :t]


def fir_filter(x: Tensor, kernels: Tensor, highpass: Tensor) -> Tensor:
    """Apply per-example centred FIR kernels ``(n, K)`` to ``x`` ``(n, C, T)`` as julius does: edges
    replicate-padded, same length out; where ``highpass`` ``(n,)`` is set, return ``x - lowpass(x)``."""
    n, c, t = x.shape
    half = (kernels.shape[-1] - 1) // 2
    # Replicate padding by the longest half length is exact for every kernel: a shorter kernel's
    # taps (zero beyond its own half length) never reach the extra padding.
    xp = torch.nn.functional.pad(x, (half, half), mode="replicate")
    n_fft = fast_fft_len(t + 4 * half)
    k = kernels.to(device=x.device, dtype=x.dtype).unsqueeze(1)  # (n, 1, K)
    low = torch.fft.irfft(torch.fft.rfft(xp, n=n_fft) * torch.fft.rfft(k, n=n_fft), n=n_fft)[..., 2 * half: 2 * half + t]
    return torch.where(highpass.to(x.device).view(-1, 1, 1), x - low, low)


# sox's reverb (sox 14.4.2 ``src/reverb.c``, read at chirlu/sox 42b3557; "filter design based on
# freeverb by Jezar at Dreampoint"): per channel, 8 parallel low-pass-feedback comb filters, then
# 4 series all-pass filters, delay lengths given at 44.1 kHz; a second, decorrelated filter array
# (lengths +-12 samples, alternating) makes the stereo image.
FREEVERB_COMBS = (1116, 1188, 1277, 1356, 1422, 1491, 1557, 1617)
FREEVERB_ALLPASSES = (225, 341, 441, 556)
FREEVERB_STEREO_SPREAD = 12


def freeverb_coefficients(reverberance: Tensor, damping: Tensor, room_scale: Tensor,
                          wet_gain_db: float = 0.0) -> dict[str, Tensor]:
    """sox's mapping of its 0-100 % controls to filter coefficients (``reverb_create``), float64 ``(n,)``.

    feedback = 1 - exp((r - b) / (a b)) spans 0.3 (r = 0) .. 0.98 (r = 100); the comb's feedback
    low-pass coefficient is 0.2 + 0.3 damping/100; comb lengths scale by 0.1 + 0.9 room/100; the wet
    path's gain is 0.015 * 10**(wet_gain_db / 20).
    """
    a = -1.0 / math.log(1 - 0.3)
    b = 100.0 / (math.log(1 - 0.98) * a + 1)
    return {
        "feedback": 1 - torch.exp((reverberance.double() - b) / (a * b)),
        "hf_damping": damping.double() / 100 * 0.3 + 0.2,
        "scale": room_scale.double() / 100 * 0.9 + 0.1,
        "gain": torch.full_like(reverberance, 0.015 * 10 ** (wet_gain_db / 20), dtype=torch.float64),
    }


def freeverb_delays(scale: Tensor, sample_rate: int, array: int) -> tuple[Tensor, tuple[int, ...]]:
    """Comb lengths ``(n, 8)`` (long) for room scales ``(n,)`` and the 4 all-pass lengths of filter
    ``array`` 0 or 1, as sox's ``filter_array_create`` (offset 0, or +-1 alternating for array 1)."""
    r = sample_rate / 44100.0
    comb_off = torch.tensor([array * (-1) ** i for i in range(len(FREEVERB_COMBS))], dtype=torch.float64)
    lengths = torch.tensor(FREEVERB_COMBS, dtype=torch.float64) + FREEVERB_STEREO_SPREAD * comb_off
    combs = torch.floor(scale.double().view(-1, 1).cpu() * r * lengths.view(1, -1) + 0.5).long()
    allpasses = tuple(int(r * (n + FREEVERB_STEREO_SPREAD * array * (-1) ** j) + 0.5)
                      for j, n in enumerate(FREEVERB_ALLPASSES))
    return combs.to(scale.device), allpasses


@lru_cache(maxsize=8)
def _unit_circle(m: int, device: str) -> Tensor:
    """``exp(-2 pi i k / m)`` for k = 0..m-1 (complex128): z^-N on an m-point grid is one gather."""
    k = torch.arange(m, dtype=torch.float64, device=device)
    return torch.polar(torch.ones_like(k), -2 * math.pi * k / m)


@lru_cache(maxsize=16)
def _allpass_response(sizes: tuple[int, ...], m: int, device: str) -> Tensor:
    """The 4 all-passes' product ``prod_j (1.5 z^-M_j - 1) / (1 - 0.5 z^-M_j)`` on ``freeverb_irs``'
    grid ``|z| = rho``, ``(m // 2 + 1,)`` complex128: it depends on no drawn control, so it is
    computed once per grid, sample rate and device."""
    log_rho = math.log(1e6) / m
    k = torch.arange(m // 2 + 1, device=device)
    circle = _unit_circle(m, device)
    out = torch.ones(k.shape[0], dtype=torch.complex128, device=device)
    for size in sizes:
        zm = math.exp(-log_rho * size) * circle[(size * k) % m]
        out *= (1.5 * zm - 1) / (1 - 0.5 * zm)
    return out


def freeverb_irs(reverberance: Tensor, damping: Tensor, room_scale: Tensor, *, sample_rate: int, length: int,
                 wet_gain_db: float = 0.0, arrays: int = 2, device: torch.device | str = "cpu") -> Tensor:
    """The wet impulse responses of sox's reverb, ``(n,)`` controls -> ``(n, arrays, length)`` float32.

    Array 0 is the left (mono) filter array, array 1 the decorrelated right one. Each is
    ``gain * prod_j A_j(z) * sum_i C_i(z)`` with sox's comb ``C(z) = z^-N (1 - d z^-1) / (1 - d z^-1
    - f (1 - d) z^-N)`` (output = delay line; the line stores input + f * one-pole-low-passed output)
    and its "all-pass" ``A(z) = (1.5 z^-M - 1) / (1 - 0.5 z^-M)`` (freeverb's, not a true all-pass).

    Rendered exactly in the frequency domain: the transfer functions are evaluated on the circle
    ``|z| = rho`` slightly outside the unit circle, so the inverse DFT gives ``h[n] rho^-n`` with the
    time aliasing of the (infinitely long) responses damped by ``rho^-M = 1e-6``; multiplying back by
    ``rho^n`` gives ``h[n]`` for ``n < length`` to about 1e-9 of its peak (float64). Only the first
    ``length`` samples matter: sox's reverb has no drain, its output is as long as its input.
    """
    device = torch.device(device)
    coef = {k: v.to(device) for k, v in freeverb_coefficients(reverberance, damping, room_scale, wet_gain_db).items()}
    n = reverberance.shape[0]
    # The grid is at least 4x the longest delay line, so rho^N <= 1e6^(1/4) for every z^N below.
    longest = math.ceil(sample_rate / 44100 * (max(FREEVERB_COMBS) + FREEVERB_STEREO_SPREAD)) + 1
    m = fast_fft_len(max(length, 4 * longest))
    n_bins = m // 2 + 1
    log_rho = math.log(1e6) / m
    k = torch.arange(n_bins, device=device)
    circle = _unit_circle(m, str(device))
    z1 = math.exp(-log_rho) * circle[k]  # z^-1 on |z| = rho, (F,)

    def z_pow(delay: Tensor) -> Tensor:  # delay (n,) or () long -> z^-delay, (n, F) or (F,)
        idx = (delay.unsqueeze(-1) * k) % m
        return torch.exp(-log_rho * delay.double()).unsqueeze(-1) * circle[idx]

    q = (coef["feedback"] * (1 - coef["hf_damping"])).view(-1, 1)
    lowpass_num = 1 - coef["hf_damping"].view(-1, 1) * z1  # (n, F)
    out = []
    for w in range(arrays):
        combs, allpasses = freeverb_delays(coef["scale"], sample_rate, w)
        # sum_i C_i = L * sum_i 1 / (L z^N_i - q), L = 1 - d z^-1: one reciprocal per comb.
        recip = torch.zeros((n, n_bins), dtype=torch.complex128, device=device)
        for i in range(combs.shape[1]):
            z_inv = z_pow(-combs[:, i])  # z^+N
            recip += torch.reciprocal(z_inv.mul_(lowpass_num).sub_(q))
        total = recip.mul_(lowpass_num).mul_(_allpass_response(allpasses, m, str(device)))
        h = torch.fft.irfft(total * coef["gain"].view(-1, 1), n=m)[:, :length]
        out.append(h * torch.exp(log_rho * torch.arange(length, device=device, dtype=torch.float64)))
    return torch.stack(out, dim=1).float()


def freeverb_apply(x: Tensor, wet_irs: Tensor) -> Tensor:
    """sox's reverb output from the wet IRs of ``freeverb_irs``: dry at unity plus the wet path.

    ``x`` (n, C, T), ``wet_irs`` (n, 2, >= T) (one array suffices for C > 2). Mono, as sox with its
    default stereo depth followed by CLMR's ``channels 1`` (an average): ``x + (h0 + h1)/2 * x``.
    Stereo: ``y_w = x_w + h_w * (x_0 + x_1) / 2``. More channels: sox turns the stereo depth off and
    reverberates each channel alone, ``x_c + h0 * x_c``. Not clipped (sox clips at full scale).
    """
    n, c, t = x.shape
    h = wet_irs[..., :t].to(x.device, x.dtype)
    if c == 1:
        src, h = x, 0.5 * (h[:, :1] + h[:, 1:2])
    elif c == 2:
        src, h = 0.5 * x.sum(dim=1, keepdim=True), h[:, :2]
    else:
        src, h = x, h[:, :1]
    n_fft = fast_fft_len(2 * t - 1)
    wet = torch.fft.irfft(torch.fft.rfft(src, n=n_fft) * torch.fft.rfft(h, n=n_fft), n=n_fft)[..., :t]
    return x + wet


def freeverb_filter(x: Tensor, reverberance: Tensor, damping: Tensor, room_scale: Tensor, *, sample_rate: int,
                    wet_gain_db: float = 0.0, threads: int | None = None) -> Tensor:
    """sox's reverb of a CPU batch ``x`` (n, C, T) with per-example controls ``(n,)``, run as the
    recursion itself (``pipeline.dsp_cpu.wet_add``, compiled), examples spread over ``threads``
    threads (default: torch's). Same mixing as ``freeverb_irs`` + ``freeverb_apply`` (mono: dry +
    the mean of both arrays; stereo: each channel's array on the channels' mean; more channels:
    array 0 per channel) and the same output to float32 rounding (tests/test_augment_reverb.py).

    Why not the FFT rendering on a CPU: its 16 comb responses on a ``T``-point grid in complex128
    cost ~40-60 ms per 59049-sample example on this project's 2-core CPU, the recursion ~1.4 ms
    (benchmarks/README.md, 2026-12-02); on an accelerator the FFT rendering is the batched one (a
    recursion over time does not parallelise).
    """
    from pipeline.dsp_cpu import wet_add  # numba: imported (and compiled) on first use

    if x.device.type != "cpu":
        raise ValueError(f"freeverb_filter runs on CPU tensors; got one on {x.device} "
                         "(use freeverb_irs + freeverb_apply)")
    n, c, t = x.shape
    coef = freeverb_coefficients(reverberance, damping, room_scale, wet_gain_db)
    arrays = [freeverb_delays(coef["scale"], sample_rate, w) for w in ((0, 1) if c <= 2 else (0,))]
    combs = [a[0].cpu().numpy().astype(np.int64) for a in arrays]
    allpasses = [np.asarray(a[1], dtype=np.int64) for a in arrays]
    feedback, hf_damping, gain = (coef[k].cpu().numpy() for k in ("feedback", "hf_damping", "gain"))
    src = x.detach().to(torch.float64).contiguous().numpy()  # float64 throughout: one compiled signature
    out = src.copy()  # the dry path at unity; each wet path is added to it

    def one(i: int) -> None:
        f, d, g = float(feedback[i]), float(hf_damping[i]), float(gain[i])
        if c == 1:  # stereo out (depth 100 %), then CLMR's `channels 1`: the mean of both arrays
            for w in (0, 1):
                wet_add(src[i, 0], out[i, 0], combs[w][i], allpasses[w], f, d, 0.5 * g)
        elif c == 2:  # both arrays read the channels' mean
            mid = 0.5 * (src[i, 0] + src[i, 1])
            for w in (0, 1):
                wet_add(mid, out[i, w], combs[w][i], allpasses[w], f, d, g)
        else:  # sox turns the stereo depth off: each channel through array 0 alone
            for ch in range(c):
                wet_add(src[i, ch], out[i, ch], combs[0][i], allpasses[0], f, d, g)

    workers = min(n, threads if threads is not None else torch.get_num_threads())
    if workers <= 1:
        for i in range(n):
            one(i)
    else:  # the kernel releases the GIL; a pool per call is fork-safe (loader workers fork)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(one, range(n)))
    return torch.from_numpy(out).to(x.dtype)


# Pitch shifting, generated impulse responses, RT60 (moved from pipeline/augment.py)


def _rms(x: Tensor) -> Tensor:
    """Per-example RMS over channels and time: ``(n, C, T) -> (n, 1, 1)``."""
    return x.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()


def estimate_rt60(ir: np.ndarray, sample_rate: int) -> float:
    """RT60 of an impulse response by Schroeder backward integration (fit -5..-25 dB, times 3)."""
    e = np.asarray(ir, dtype=np.float64).reshape(-1) ** 2
    edc = np.cumsum(e[::-1])[::-1]
    if edc[0] <= 0:
        return 0.0
    db = 10 * np.log10(np.maximum(edc / edc[0], 1e-30))
    sel = np.nonzero((db <= -5) & (db >= -25))[0]
    if sel.size < 2:
        sel = np.nonzero((db <= -1) & (db >= -15))[0]
    if sel.size < 2:
        return 0.0
    slope = np.polyfit(sel / sample_rate, db[sel], 1)[0]
    return float(-60.0 / slope) if slope < 0 else 0.0


def _mirror_pad(x: Tensor, left: int, right: int) -> Tensor:
    """Pad rows ``(m, T)`` by reflection, so reads past either end run back into the signal (no
    clamped, DC-like samples); beyond one reflection (clips shorter than the pad) with zeros."""
    t = x.shape[-1]
    rl, rr = min(left, t - 1), min(right, t - 1)
    xp = torch.nn.functional.pad(x.unsqueeze(1), (rl, rr), mode="reflect").squeeze(1) if rl or rr else x
    return torch.nn.functional.pad(xp, (left - rl, right - rr)) if left > rl or right > rr else xp


def pitch_shift_granular(x: Tensor, factor: Tensor, *, grain: int = 2048) -> Tensor:
    """Pitch-shift each row of ``x`` (m, T) by its frequency ``factor`` (m,): aligned two-grain OLA.

    Time is cut into blocks of ``hop = grain / 2``; grain j is centred at ``c_j = j * hop`` and
    reads ``x(c_j + d_j + f * (t - c_j))``: f times faster around its own centre, so the pitch is
    scaled and the timing kept. In block j grain j fades out while grain j+1 fades in
    (``sin^2`` crossfade). Plain granular shifting joins grains with arbitrary phase, which puts a
    comb of grain-rate lines on every partial; here each grain's small offset ``d_j`` (at most
    ``hop / 4``) is chosen, as in WSOLA, to maximise the normalised cross-correlation between the
    two grains over the crossfade, so they join in phase. The correlations of every block come from
    one batched FFT; only the choice of offsets, which chains from block to block, is a loop over
    blocks of (m,)-sized ops.
    """
    m, t = x.shape
    fmax = max(1.0, float(factor.max()))
    hop = grain // 2
    while hop > 16 and math.ceil(fmax * hop) + hop // 2 + 2 >= t:  # short clips: shrink the grains
        hop //= 2
    hop -= hop % 2  # even, for the half-rate correlation
    search = hop // 4  # max |d_j|: covers periods up to 2 * search + 1 samples
    region = hop // 2  # samples correlated per crossfade
    pad = 2 * math.ceil((fmax * hop + 2 * search + 2) / 2)  # even: the half-rate frames line up
    n_blocks = -(-t // hop)
    win = 2 * pad + hop
    right = (n_blocks - 1) * hop + win - pad - t + 1
    xp = _mirror_pad(x, pad, right)
    frames = xp.unfold(-1, win, hop)[:, :n_blocks]  # (m, J, win) view: block j's neighbourhood, local 0 = c_j - pad
    frames_next = xp[:, 1:].unfold(-1, win, hop)[:, :n_blocks]  # the same, one sample later (interpolation's right tap)
    f = factor.to(device=x.device, dtype=torch.float32).view(-1, 1)

    # Offset between the two grains' reads in block j: hop * (1 - f) + d_{j+1} - d_j. Correlate
    # the fading-out grain's region with every candidate start of the fading-in one. This runs at
    # half rate (pairs of samples averaged): half the FFT work, offsets in steps of 2 samples.
    half = xp.shape[-1] // 2
    xd = 0.5 * (xp[:, 0: 2 * half: 2] + xp[:, 1: 2 * half: 2])
    frames_d = xd.unfold(-1, win // 2, hop // 2)[:, :n_blocks]  # local 0 = (c_j - pad) / 2
    pd, sd, rd = pad // 2, search // 2, region // 2
    lag0 = torch.round(hop * (1 - f) / 2).long()  # (m, 1)
    n_lags = 4 * sd + 1
    a = frames_d[..., pd: pd + rd]  # (m, J, rd)
    b_idx = (pd + lag0 - 2 * sd + torch.arange(rd + n_lags - 1, device=x.device)).unsqueeze(1)
    b = frames_d.gather(-1, b_idx.expand(m, n_blocks, -1))  # (m, J, rd + n_lags - 1)
    n_fft = fast_fft_len(rd + n_lags - 1)
    corr = torch.fft.irfft(torch.fft.rfft(a, n=n_fft).conj() * torch.fft.rfft(b, n=n_fft), n=n_fft)[..., :n_lags]
    energy = torch.nn.functional.pad(b.pow(2).cumsum(-1), (1, 0))
    energy = energy[..., rd: rd + n_lags] - energy[..., :n_lags]
    score = corr * torch.rsqrt(energy.clamp_min(1e-12))  # (m, J, n_lags), lag l <-> (d_{j+1} - d_j) / 2 + 2 * sd
    delta = 2 * _chain_offsets(score, sd)  # (m, J + 1), in samples

    k = torch.arange(hop, device=x.device, dtype=torch.float32)
    w1 = torch.sin(0.5 * math.pi * k / hop).pow(2)

    def read(off: Tensor, shift: Tensor) -> Tensor:  # off (m, hop) from the block start, shift (m, J)
        base = off.floor()
        frac = (off - base).unsqueeze(1)  # (m, 1, hop)
        idx = (base.long() + pad).unsqueeze(1) + shift.unsqueeze(-1)  # (m, J, hop)
        return torch.lerp(frames.gather(-1, idx), frames_next.gather(-1, idx), frac)

    y0 = read(f * k, delta[:, :-1])  # grain j, fading out
    y1 = read(hop - f * (hop - k), delta[:, 1:])  # grain j + 1, fading in
    return torch.lerp(y0, y1, w1).reshape(m, -1)[:, :t]


def _chain_offsets(score: Tensor, search: int) -> Tensor:
    """Grain offsets d_0 = 0, d_{j+1} = argmax over [-search, search] of score[:, j, search - d_j + .] - search.

    The choice chains from block to block, so it is a loop over blocks of (m,)-sized steps: on the
    CPU in NumPy (many tiny torch ops would each pay thread-pool overhead), on an accelerator in
    torch (no host round trip).
    """
    m, n_blocks, _ = score.shape
    width = 2 * search + 1
    if score.device.type == "cpu":
        sc = score.detach().numpy()
        rows, window = np.arange(m)[:, None], np.arange(width)[None, :]
        d = np.zeros(m, dtype=np.int64)
        out = np.zeros((m, n_blocks + 1), dtype=np.int64)
        for j in range(n_blocks):
            d = sc[rows, j, (search - d)[:, None] + window].argmax(-1) - search
            out[:, j + 1] = d
        return torch.from_numpy(out)
    window = torch.arange(width, device=score.device).view(1, -1)
    d = torch.zeros(m, dtype=torch.long, device=score.device)
    offsets = [d]
    for j in range(n_blocks):
        d = score[:, j].gather(-1, (search - d).view(-1, 1) + window).argmax(-1) - search
        offsets.append(d)
    return torch.stack(offsets, dim=1)


def pitch_shift_vocoder(x: Tensor, factor: Tensor, *, n_fft: int, hop: int, window: Tensor) -> Tensor:
    """Pitch-shift each row of ``x`` (m, T) by its frequency ``factor`` (m,) with a phase vocoder."""
    m, t = x.shape
    spec = torch.stft(x, n_fft, hop, window=window, center=True, return_complex=True)  # (m, F, M)
    n_bins = spec.shape[1]
    re, im = torch.view_as_real(spec).unbind(-1)
    mag, phase = torch.sqrt(re * re + im * im), torch.atan2(im, re)
    two_pi = 2 * math.pi
    expected = (two_pi * hop / n_fft) * torch.arange(n_bins, device=x.device, dtype=x.dtype).view(1, -1, 1)
    dphi = phase[..., 1:] - phase[..., :-1] - expected
    dphi = dphi - two_pi * torch.round(dphi / two_pi)
    advance = expected + dphi  # true phase advance per hop, (m, F, M-1)

    src = torch.arange(n_bins, device=x.device, dtype=x.dtype).view(1, -1) / factor.view(-1, 1)  # (m, F)
    valid = (src <= n_bins - 1).to(x.dtype).unsqueeze(-1)
    i0 = src.floor().long().clamp_max(n_bins - 1)
    i1 = (i0 + 1).clamp_max(n_bins - 1)
    frac = (src - i0).unsqueeze(-1)
    ir = src.round().long().clamp_max(n_bins - 1)

    def take(a: Tensor, idx: Tensor) -> Tensor:
        return a.gather(1, idx.unsqueeze(-1).expand(-1, -1, a.shape[-1]))

    mag_out = (take(mag, i0) * (1 - frac) + take(mag, i1) * frac) * valid
    adv_out = take(advance, ir) * factor.view(-1, 1, 1)
    # Wrap each increment before the cumulative sum so float32 phase stays small and exact enough.
    adv_out = adv_out - two_pi * torch.round(adv_out / two_pi)
    phase_out = torch.cat([take(phase[..., :1], ir), adv_out], dim=-1).cumsum(dim=-1)
    out = torch.complex(mag_out * torch.cos(phase_out), mag_out * torch.sin(phase_out))
    return torch.istft(out, n_fft, hop, window=window, center=True, length=t)


def generate_irs(rt60_s: Tensor, channels: int, length: int, sample_rate: int, generator: torch.Generator,
                 device: torch.device) -> Tensor:
    """Exponentially decaying Gaussian noise IRs with the given RT60s: ``(n,) -> (n, C, L)``, unit energy.

    Amplitude falls 60 dB at RT60: ``exp(-ln(1000) * t / rt60)``.
    """
    t = torch.arange(length, device=device, dtype=torch.float32) / sample_rate
    env = torch.exp(-math.log(1000.0) * t.view(1, 1, -1) / rt60_s.to(device).float().view(-1, 1, 1))
    ir = torch.randn((rt60_s.shape[0], channels, length), generator=generator, device=device) * env
    return ir * torch.rsqrt(ir.pow(2).sum(-1, keepdim=True))
