"""Augmentation throughput next to its peers, in one run, on the same clips and the same cores.

    .venv/bin/python benchmarks/augment.py            # batch 48, 59049 samples, 22.05 kHz
    .venv/bin/python benchmarks/augment.py --quick    # tiny sizes (CI keeps it from rotting)
    .venv/bin/python benchmarks/augment.py --device cuda

Contenders, each on the CLMR chain (polarity 0.8, noise 0.01, gain 0.3, high/low-pass 0.8,
delay 0.3, pitch 0.6, reverb 0.6) and on pitch shift alone (p=1):

- ``ours``                 pipeline.augment's default chain (CLMR's transforms: std-ratio noise, julius
                           FIR filters, halved delay, sox's reverb run per example as its recursion on
                           a CPU, rendered as impulse responses on an accelerator), batched,
                           ``--threads`` torch threads (or ``--device cuda``).
- ``ours_variants``        the same chain with our faster variants by name (Butterworth filters,
                           ``reverb_method=ir`` with generated IRs): what fidelity costs.
- ``audiomentations``      the closest chain audiomentations has, one clip at a time, in ``--workers``
                           processes (one thread each), clips sent to and returned from the workers
                           as a loader's workers would: Gaussian noise at 0-60 dB SNR (CLMR's std
                           ratio 0.001-1), Butterworth filters (it has no FIR), delay as a NumPy
                           ``Lambda`` with CLMR's /2, reverb by ``ApplyImpulseResponse`` over a folder
                           of freeverb impulse responses (dry + wet, rendered from random controls).
- ``torch_audiomentations`` torch-audiomentations in ``mode="per_example"``, ``--threads`` threads. It has
                           no delay transform, and its ApplyImpulseResponse reads files with
                           ``torchaudio.info``, which torchaudio 2.11 removed, so its chain does
                           two transforms less (delay, reverb): its figure flatters it.
- ``cpu_path``             pipeline.augment_cpu.CpuAugment (our CPU path) in ``--workers`` processes.

Clips are music-like (random harmonic notes with vibrato and noise). Pitch accuracy is checked in
the same run: the measured f0 shift of a harmonic tone through our pitch shift, in semitones.
The last line printed is one JSON object; ``ratios`` above 1 mean ours is faster.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CLMR = dict(polarity=0.8, noise=0.01, gain=0.3, filter=0.8, delay=0.3, pitch=0.6, reverb=0.6)


def make_clips(n: int, samples: int, sr: int, seed: int = 0) -> np.ndarray:
    """Music-like mono clips: 2-4 harmonic notes with vibrato, decays and a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / sr
    out = np.zeros((n, samples), dtype=np.float64)
    for i in range(n):
        for _ in range(rng.integers(2, 5)):
            f0 = 55.0 * 2 ** (rng.integers(0, 48) / 12)
            phase = 2 * np.pi * f0 * t + 0.3 * np.sin(2 * np.pi * 5 * t)
            env = np.exp(-t * rng.uniform(0.5, 3.0))
            for h in range(1, 6):
                if f0 * h < sr / 2:
                    out[i] += env * np.sin(h * phase) / h
        out[i] += 0.01 * rng.standard_normal(samples)
        out[i] *= 0.5 / np.abs(out[i]).max()
    return out.astype(np.float32)


def write_irs(folder: str, sr: int, n: int = 8, seed: int = 1) -> None:
    """``n`` one-second freeverb impulse responses (dry impulse + mono wet) for the peers' reverb."""
    import soundfile as sf
    import torch

    from pipeline.dsp import freeverb_irs

    g = torch.Generator().manual_seed(seed)
    controls = [torch.randint(0, 100, (n,), generator=g) for _ in range(3)]
    wet = freeverb_irs(*controls, sample_rate=sr, length=sr).mean(dim=1).numpy()  # (n, sr): both arrays' mean
    for k in range(n):
        ir = wet[k].copy()
        ir[0] += 1.0
        sf.write(os.path.join(folder, f"ir{k}.wav"), (ir / np.abs(ir).max()).astype(np.float32), sr, subtype="FLOAT")


# ---------------------------------------------------------------- audiomentations, in workers

_W: dict = {}


def _am_delay(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    lag = int(np.random.choice(np.arange(200, 451, 50)) * sample_rate / 1000)
    y = samples.copy()
    y[lag:] += 0.5 * samples[:-lag]
    return 0.5 * y


def _am_init(kind: str, sr: int, ir_dir: str, pitch_only: bool) -> None:
    _W["sr"], _W["kind"] = sr, kind
    if kind == "audiomentations":
        import audiomentations as A

        if pitch_only:
            _W["chain"] = A.PitchShift(min_semitones=-7, max_semitones=7, p=1.0)
        else:
            _W["chain"] = A.Compose([
                A.PolarityInversion(p=CLMR["polarity"]),
                A.AddGaussianSNR(min_snr_db=0, max_snr_db=60, p=CLMR["noise"]),
                A.Gain(min_gain_db=-20, max_gain_db=-1, p=CLMR["gain"]),
                A.OneOf([A.HighPassFilter(200, 1200, 24, 24), A.LowPassFilter(2200, 4000, 24, 24)], p=CLMR["filter"]),
                A.Lambda(transform=_am_delay, p=CLMR["delay"]),
                A.PitchShift(min_semitones=-7, max_semitones=7, p=CLMR["pitch"]),
                A.ApplyImpulseResponse(ir_dir, p=CLMR["reverb"], leave_length_unchanged=True),
            ])
    else:
        from pipeline.augment import AugmentConfig
        from pipeline.augment_cpu import CpuAugment

        if pitch_only:
            cfg = AugmentConfig(**{f"{n}_p": 0.0 for n in CLMR}, pitch_p=1.0)
        else:
            cfg = AugmentConfig(**{f"{n}_p": p for n, p in CLMR.items()})
        _W["chain"] = CpuAugment(cfg, sample_rate=sr)
        _W["rng"] = np.random.default_rng(os.getpid())


def _am_work(chunk: np.ndarray) -> np.ndarray:
    out = np.empty_like(chunk)
    for i, clip in enumerate(chunk):
        if _W["kind"] == "audiomentations":
            out[i] = _W["chain"](clip, _W["sr"])
        else:
            out[i] = _W["chain"](clip[None, None], _W["rng"])[0, 0]
    return out


def run_workers(kind: str, clips: np.ndarray, batches: int, args, ir_dir: str, pitch_only: bool) -> float:
    # fork, as torch's DataLoader does on Linux; the parent has run no torch op yet (see main).
    ctx = mp.get_context("fork")
    with ctx.Pool(args.workers, initializer=_am_init, initargs=(kind, args.sr, ir_dir, pitch_only)) as pool:
        chunks = np.array_split(clips, args.workers * 4)
        pool.map(_am_work, np.array_split(clips[: args.workers * 2], args.workers * 2))  # warm up
        t0 = time.perf_counter()
        for _ in range(batches):
            out = pool.map(_am_work, chunks)
        elapsed = time.perf_counter() - t0
    assert sum(len(o) for o in out) == len(clips)
    return batches * len(clips) / elapsed


# ---------------------------------------------------------------- in-process contenders


VARIANTS = dict(filter_type="butterworth", reverb_method="ir")  # our faster variants, by name


def run_ours(clips: np.ndarray, batches: int, args, pitch_only: bool, overrides: dict | None = None) -> float:
    import torch

    from pipeline.augment import AugmentConfig, PitchShift, build_augment

    device = torch.device(args.device)
    x = torch.from_numpy(clips).unsqueeze(1).to(device)
    if pitch_only:
        chain = PitchShift(sample_rate=args.sr, p=1.0).to(device)
    else:
        cfg = AugmentConfig(**{f"{n}_p": p for n, p in CLMR.items()}, **(overrides or {}))
        chain = build_augment(cfg, sample_rate=args.sr, seed=0).to(device)  # buffers (IR bank, windows) too
    chain(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(batches):
        chain(x)
    sync()
    return batches * len(clips) / (time.perf_counter() - t0)


def run_torch_audiomentations(clips: np.ndarray, batches: int, args, pitch_only: bool) -> float:
    import warnings

    import torch
    import torch_audiomentations as TA

    warnings.filterwarnings("ignore")
    sr = args.sr
    if pitch_only:
        chain = TA.PitchShift(-7, 7, p=1.0, sample_rate=sr, mode="per_example", output_type="tensor")
    else:
        kw = dict(mode="per_example", output_type="tensor")
        chain = TA.Compose([
            TA.PolarityInversion(p=CLMR["polarity"], **kw),
            TA.AddColoredNoise(46, 60, min_f_decay=0, max_f_decay=0, p=CLMR["noise"], **kw),
            TA.Gain(-20, -1, p=CLMR["gain"], **kw),
            TA.OneOf([TA.HighPassFilter(200, 1200, p=1.0, **kw), TA.LowPassFilter(2200, 4000, p=1.0, **kw)],
                     p=CLMR["filter"], output_type="tensor"),
            TA.PitchShift(-7, 7, p=CLMR["pitch"], sample_rate=sr, **kw),
        ], output_type="tensor")
    x = torch.from_numpy(clips).unsqueeze(1)
    chain(x[:2], sample_rate=sr)
    t0 = time.perf_counter()
    for _ in range(batches):
        chain(x, sample_rate=sr)
    return batches * len(clips) / (time.perf_counter() - t0)


def pitch_accuracy(sr: int, samples: int) -> dict[str, float]:
    """Measured f0 shift error (semitones) of our pitch shift on a 220 Hz harmonic tone."""
    import torch

    from pipeline.augment import PitchShift

    t = np.arange(samples) / sr
    tone = sum(np.sin(2 * np.pi * 220 * h * t) / h for h in range(1, 6)).astype(np.float32)
    ks = torch.tensor([-7.0, -5.0, 3.0, 7.0])
    x = torch.from_numpy(np.stack([tone] * 4)).unsqueeze(1)
    y = PitchShift(sample_rate=sr, p=1.0).apply(x, {"apply": torch.ones(4, dtype=torch.bool), "semitones": ks})

    def f0(sig: np.ndarray) -> float:
        n = 1 << int(np.ceil(np.log2(len(sig) * 16)))
        mag = np.abs(np.fft.rfft(sig * np.hanning(len(sig)), n))
        freqs = np.fft.rfftfreq(n, 1 / sr)
        band = np.nonzero((freqs > 60) & (freqs < 2000))[0]
        k = band[np.argmax(mag[band])]
        a, b, c = np.log(mag[k - 1: k + 2])
        return (k + 0.5 * (a - c) / (a - 2 * b + c)) * sr / n

    errs = [abs(12 * np.log2(f0(y[i, 0].numpy()) / f0(tone)) - float(k)) for i, k in enumerate(ks)]
    return {"max_abs_error_semitones": round(max(errs), 4), "shifts": ks.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=48, help="clips per batch (default 48)")
    ap.add_argument("--samples", type=int, default=59049, help="samples per clip (default 59049, CLMR's)")
    ap.add_argument("--sr", type=int, default=22050, help="sample rate (default 22050)")
    ap.add_argument("--batches", type=int, default=6, help="timed batches for ours (default 6)")
    ap.add_argument("--peer-batches", type=int, default=2, help="timed batches for each peer (default 2)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for in-process contenders (default 2)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes for per-example contenders (default 2)")
    ap.add_argument("--device", default="cpu", help="device for ours: cpu or cuda (default cpu)")
    ap.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"],
                    help="OMP_WAIT_POLICY for torch's threads (default PASSIVE: robust on a shared CPU)")
    ap.add_argument("--skip-torch-audiomentations", action="store_true", help="leave out the slowest peer")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one batch each (CI smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.batch, args.samples, args.batches, args.peer_batches = 4, 16384, 1, 1

    # Worker-based contenders first, before this process runs any torch op, so forked workers
    # inherit no OpenMP thread pool; one thread each, as in a loader's workers.
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # Idle OpenMP threads sleep instead of spinning. On a CPU shared with other jobs a spinning
    # thread burns the time slice its partner needs, and every parallel op waits at its barrier.
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    import audiomentations  # noqa: F401 - imported once here, inherited by the forked workers

    import pipeline.augment_cpu  # noqa: F401

    clips = make_clips(args.batch, args.samples, args.sr)
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as ir_dir:
        write_irs(ir_dir, args.sr)
        for pitch_only, prefix in ((False, ""), (True, "pitch_")):
            what = "pitch shift" if pitch_only else "CLMR chain"
            print(f"[{what}] audiomentations ({args.workers} workers) ...", flush=True)
            results[prefix + "audiomentations"] = run_workers("audiomentations", clips, args.peer_batches, args,
                                                              ir_dir, pitch_only)
        print(f"[CLMR chain] our CPU path, CpuAugment ({args.workers} workers) ...", flush=True)
        results["cpu_path"] = run_workers("cpu_path", clips, args.peer_batches, args, ir_dir, False)

        import torch

        torch.set_num_threads(args.threads)
        for pitch_only, prefix in ((False, ""), (True, "pitch_")):
            what = "pitch shift" if pitch_only else "CLMR chain"
            print(f"[{what}] ours ({args.device}, {args.threads} threads) ...", flush=True)
            results[prefix + "ours"] = run_ours(clips, args.batches, args, pitch_only)
            if not pitch_only:
                print(f"[{what}] ours with our variants {VARIANTS} ...", flush=True)
                results["ours_variants"] = run_ours(clips, args.batches, args, False, VARIANTS)
            if not args.skip_torch_audiomentations:
                print(f"[{what}] torch-audiomentations per example ({args.threads} threads) ...", flush=True)
                results[prefix + "torch_audiomentations"] = run_torch_audiomentations(
                    clips, args.peer_batches, args, pitch_only)
    accuracy = pitch_accuracy(args.sr, args.samples)

    ratios = {}
    for prefix in ("", "pitch_"):
        for peer in ("audiomentations", "torch_audiomentations"):
            if prefix + peer in results:
                ratios[f"{prefix}ours_vs_{peer}"] = round(results[prefix + "ours"] / results[prefix + peer], 2)
    ratios["cpu_path_vs_audiomentations"] = round(results["cpu_path"] / results["audiomentations"], 2)
    ratios["ours_variants_vs_audiomentations"] = round(results["ours_variants"] / results["audiomentations"], 2)

    print()
    print(f"clips/s  (batch {args.batch}, {args.samples} samples, {args.sr} Hz, ours on {args.device})")
    for name, v in results.items():
        print(f"  {name:32s} {v:10.1f}")
    print("ratios (above 1: ours faster):", ", ".join(f"{k}={v}" for k, v in ratios.items()))
    print(f"pitch accuracy of ours: max |error| {accuracy['max_abs_error_semitones']} semitones over {accuracy['shifts']}")
    print(json.dumps({
        "benchmark": "augment",
        "config": {k: getattr(args, k) for k in ("batch", "samples", "sr", "batches", "peer_batches", "threads",
                                                 "workers", "device", "omp_wait_policy", "quick")},
        "clips_per_s": {k: round(v, 2) for k, v in results.items()},
        "pitch_accuracy": accuracy,
        "ratios": ratios,
    }))


if __name__ == "__main__":
    main()
