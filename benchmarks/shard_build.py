"""Shard-building throughput: audio-hours per hour of ``build_dataset`` next to a tight loop.

    .venv/bin/python benchmarks/shard_build.py                  # the demo set, 2 workers
    .venv/bin/python benchmarks/shard_build.py --source clips   # 48 x 30 s 44.1 kHz stereo clips
    .venv/bin/python benchmarks/shard_build.py --quick          # tiny, for the test
    .venv/bin/python benchmarks/shard_build.py --root DIR       # any folder of audio instead

Sources: the ``shard-tools demo`` set (real instrument notes in NSynth's layout, 16 kHz WAV, and
multi-instrument clips in MTAT's layout, 16 kHz MP3), sharded through the ``nsynth`` and ``mtat``
recipes; or ``--source clips``: rendered phrases tiled into 44.1 kHz stereo files, half MP3 and half
WAV, like MSD previews and MusicNet recordings; or ``--root``: the audio below a folder. The work
per file is the same in both runs: decode, mono, resample to ``--sample-rate``, FLAC encode.

- ours: ``shard_tools.build.build_dataset`` with ``--workers N`` (pool start-up, ordered writing,
  tar, sha256, progress file and manifests included);
- limit: the same per-file work (``shard_tools.build.process_item``) in a pool of the same size,
  started and warmed before the clock starts, results discarded, no ordering, no tar.

The last line printed is one JSON object; ``ratios.shard_build_vs_tight_loop`` = ours / limit
(under 1 is expected: it says how close the builder gets to the bare decode/resample/encode cost).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shard_tools import folder  # noqa: E402
from shard_tools.build import build_dataset  # noqa: E402
from shard_tools.convert import Convert as _Convert, process_item  # noqa: E402
from shard_tools.workers import pool_context  # noqa: E402


def render_phrases(n: int, seconds: float, seed: int) -> list[np.ndarray]:
    """``n`` phrases of real instrument notes, float32 ``(2, frames)`` at 44.1 kHz."""
    import midirenderer
    import pretty_midi

    from pipeline.audio import decode_bytes, resample

    sf2 = open(pretty_midi.__path__[0] + "/TimGM6mb.sf2", "rb").read()
    rng = np.random.default_rng(seed)
    programs = [0, 24, 32, 40, 56, 73, 11, 48]  # piano, guitar, bass, violin, trumpet, flute, vibraphone, strings
    out = []
    for i in range(n):
        pm = pretty_midi.PrettyMIDI()
        for program in (programs[i % len(programs)], programs[(i + 3) % len(programs)]):
            inst = pretty_midi.Instrument(program=program)
            t = 0.0
            while t < seconds - 0.25:
                d = float(rng.choice([0.25, 0.5, 1.0]))
                inst.notes.append(pretty_midi.Note(velocity=int(rng.integers(60, 120)), pitch=int(rng.integers(45, 80)),
                                                   start=t, end=min(seconds, t + d)))
                t += d
            pm.instruments.append(inst)
        buf = io.BytesIO()
        pm.write(buf)
        audio, sr = decode_bytes(midirenderer.render_wave_from(sf2, buf.getvalue()), name=f"phrase {i}")
        audio = resample(audio, sr, 44100) if sr != 44100 else audio
        if audio.shape[0] == 1:
            audio = np.concatenate([audio, audio])
        out.append((audio[:2] / (np.abs(audio).max() + 1e-8) * 0.7).astype(np.float32))
    return out


def synth_phrases(n: int, seconds: float, seed: int) -> list[np.ndarray]:
    """Harmonic tones with decaying envelopes, float32 ``(2, frames)`` at 44.1 kHz (no rendering)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 44100)) / 44100
    out = []
    for _ in range(n):
        f = float(rng.uniform(100, 800))
        x = sum(np.sin(2 * np.pi * f * k * t) / k for k in range(1, 8)) * np.exp(-3 * (t % 0.5))
        x = x + 0.01 * rng.standard_normal(t.size)
        out.append((0.5 * np.stack([x, 0.8 * x]) / np.abs(x).max()).astype(np.float32))
    return out


def make_sources(root: str, files: int, seconds: float, seed: int, phrases: int, synthetic: bool = False) -> None:
    rng = np.random.default_rng(seed)
    make = synth_phrases if synthetic else render_phrases
    phrases = make(min(files, phrases), min(seconds, 8.0), seed)
    n = int(seconds * 44100)
    for i in range(files):
        # tile phrases with random gains so every file differs (FLAC cost depends on the signal)
        parts, total = [], 0
        while total < n:
            p = phrases[int(rng.integers(len(phrases)))] * float(rng.uniform(0.5, 1.0))
            parts.append(p)
            total += p.shape[1]
        audio = np.concatenate(parts, axis=1)[:, :n]
        ext = "mp3" if i % 2 else "wav"
        sf.write(os.path.join(root, f"clip{i:04d}.{ext}"), audio.T, 44100)


def tight_loop(items, conv: _Convert, workers: int) -> float:
    """Wall seconds of decode + resample + encode of every item in a warmed pool of ``workers``."""
    if workers <= 1:
        process_item(items[0], conv)  # warm: imports, resampler design
        t = time.perf_counter()
        for it in items:
            process_item(it, conv)
        return time.perf_counter() - t
    with ProcessPoolExecutor(workers, mp_context=pool_context()) as ex:
        list(ex.map(process_item, items[:workers], [conv] * workers))  # warm every worker
        t = time.perf_counter()
        for _ in ex.map(process_item, items, [conv] * len(items), chunksize=max(1, len(items) // (4 * workers))):
            pass
        return time.perf_counter() - t


def demo_recipes(root: str, quick: bool, workers: int, seed: int) -> list:
    """Render the ``shard-tools demo`` layouts (NSynth notes, MTAT clips) under ``root``; their recipes."""
    from shard_tools import demo, mtat, nsynth

    cfg = (demo.DemoConfig(notes_per_instrument=1, programs_per_family=1, clips=4, clip_seconds=2.0, seed=seed)
           if quick else demo.DemoConfig(seed=seed))
    demo.render_layouts(root, cfg, workers=workers, progress=False)
    return [nsynth.prepare(os.path.join(root, "nsynth"), argparse.Namespace(splits=None, pitch_range=None)),
            mtat.prepare(os.path.join(root, "mtat"), argparse.Namespace(top_k=50, split_files=None, audio_dir=None))]


def has_demo() -> bool:
    try:
        import shard_tools.demo  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="builder worker processes (default 2)")
    ap.add_argument("--source", choices=("demo", "clips"), default="demo" if has_demo() else "clips",
                    help="demo: the `shard-tools demo` set (NSynth + MTAT layouts, default when shard_tools.demo "
                         "exists); clips: long mixed-instrument clips, half MP3")
    ap.add_argument("--files", type=int, default=48, help="clips (--source clips)")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each clip (--source clips)")
    ap.add_argument("--sample-rate", type=int, default=22050, help="target rate (CLMR's 22.05 kHz: every file is resampled)")
    ap.add_argument("--root", default=None, help="benchmark the audio below this folder instead (folder recipe)")
    ap.add_argument("--phrases", type=int, default=6, help="distinct rendered phrases the clips are tiled from")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a few notes and 2 s clips), for the test")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated or rendered audio and of the build (default 0)")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, alternating; the best of each counts")
    args = ap.parse_args()
    if args.quick:
        args.files, args.seconds, args.phrases, args.repeat = 4, 2.0, 1, 1
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        t = time.perf_counter()
        if args.root is not None:
            source = f"folder {args.root}"
            recipes = [folder.prepare(args.root, argparse.Namespace(
                labels=None, path_column="path", split_column="split", multi_hot=[], label_sep=";",
                keep_unlisted=False, valid_fraction=0.0, test_fraction=0.0))]
        elif args.source == "demo":
            source = "demo set (NSynth-layout notes + MTAT-layout clips)"
            recipes = demo_recipes(os.path.join(tmp, "demo"), args.quick, args.workers, args.seed)
        else:
            source = f"{args.files} clips of {args.seconds:.0f} s"
            root = os.path.join(tmp, "src")
            os.makedirs(root)
            make_sources(root, args.files, args.seconds, args.seed, args.phrases, synthetic=args.quick)
            recipes = [folder.prepare(root, argparse.Namespace(
                labels=None, path_column="path", split_column="split", multi_hot=[], label_sep=";",
                keep_unlisted=False, valid_fraction=0.0, test_fraction=0.0))]
        print(f"sources: {source}, ready in {time.perf_counter() - t:.1f} s")
        items = [it for r in recipes for it in r.items]
        conv = _Convert("bench", "flac", args.sample_rate, True)

        # alternate the two and keep the best of each: the machine may be shared
        # (the first build also starts the worker pool's forkserver; later ones reuse it)
        limit_runs, ours_runs = [], []
        for r in range(args.repeat):
            limit_runs.append(tight_loop(items, conv, args.workers))
            t = time.perf_counter()
            reports = [build_dataset(rec, os.path.join(tmp, f"out{r}", rec.dataset), sample_rate=args.sample_rate,
                                     mono=True, workers=args.workers, seed=args.seed, progress=False)
                       for rec in recipes]
            ours_runs.append(time.perf_counter() - t)
        limit_s, ours_s = min(limit_runs), min(ours_runs)
    hours = sum(rep["seconds"] for rep in reports) / 3600
    written = sum(rep["samples_written"] for rep in reports)
    ours = hours / (ours_s / 3600)
    limit = hours / (limit_s / 3600)
    print(f"{len(items)} files, {hours:.3f} h of audio -> {args.sample_rate} Hz mono FLAC, {args.workers} workers, "
          f"{os.cpu_count()} cores")
    print(f"  shard builder : {ours_s:7.2f} s  {ours:9.0f} audio-hours/hour (incl. pool start-up, tar, sha256)")
    print(f"  tight loop    : {limit_s:7.2f} s  {limit:9.0f} audio-hours/hour (warmed pool, no tar, no ordering)")
    print(json.dumps({
        "benchmark": "shard_build", "source": source, "workers": args.workers, "repeat": args.repeat,
        "files": len(items), "audio_hours": round(hours, 4), "samples_written": written, "sample_rate": args.sample_rate,
        "shard_build_s": round(ours_s, 3), "tight_loop_s": round(limit_s, 3),
        "shard_build_runs_s": [round(x, 3) for x in ours_runs], "tight_loop_runs_s": [round(x, 3) for x in limit_runs],
        "shard_build_audio_hours_per_hour": round(ours, 1), "tight_loop_audio_hours_per_hour": round(limit, 1),
        "ratios": {"shard_build_vs_tight_loop": round(ours / limit, 3)},
    }))


if __name__ == "__main__":
    main()
