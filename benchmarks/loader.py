"""Loader throughput next to its peers, in one process, on the same shards and cores.

    .venv/bin/python benchmarks/loader.py            # demo shards if `shard-tools demo` works, else generated
    .venv/bin/python benchmarks/loader.py --clip-seconds 30 10 6    # one data set per clip length
    .venv/bin/python benchmarks/loader.py --quick    # tiny sizes (CI keeps it from rotting)
    .venv/bin/python benchmarks/loader.py --manifest path/to/train.manifest.json

Each clip length is its own data set (default: 29.1 s, MagnaTagATune's clip length and the
headline, whose ratios carry the plain keys; then 6 s, the quickstart demo's). Contenders run in
interleaved rounds (loader, decode limit, webdataset, per-file, loader, ...) and each figure is the
median over the rounds, so a slow minute on a shared machine hits every contender alike.

Measured in steady state: the window opens when the first batch arrives (worker start-up is out);
clips/s and CPU ms per clip (this process and its live children, from /proc) cover the same window.
CPU ms per clip is the steadier figure on a machine shared with other jobs.

- ``loader``      pipeline.loader.StreamingLoader, CLMR pairs, ``--workers`` workers.
- ``decode_limit`` every audio member's bytes, already in memory, fully decoded in a tight loop by
                  ``--workers`` processes: what decoding alone costs on these cores. It decodes with
                  the same libsndfile call as the loader (one ``sf_readf_float``, without
                  ``soundfile.read``'s extra tell/seek) into one array reused across clips (no
                  page faults on fresh output memory), so neither the loader's cheaper read path
                  nor its allocator tuning is counted as a win over decoding; ``--sfread-limit``
                  uses ``soundfile.read``.
- ``webdataset``  a plain webdataset pipeline (shuffle, decode, two crops, batch) in a DataLoader.
                  It decodes the audio member with soundfile in a ``.map`` and runs no webdataset
                  decoder: the defaults unpickle ``.pyd``/``.pickle`` members (nothing here may
                  unpickle shard content), and their audio decoder (torchaudio.load via a temp
                  file) needs torchcodec, which this environment lacks.
- ``perfile``     the CLMR repository's pattern: one file per clip on disk, a map-style Dataset
                  that decodes the whole file and then crops, in a shuffled DataLoader.

The last line printed is one JSON object; ``ratios`` above 1 mean the loader is faster, and
``loader_vs_decode_limit`` is the loader's clips/s as a fraction of the decode limit (it can exceed
1: the loader decodes only the frames its crops need).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

# spinning OpenMP threads would steal the shared cores from the other contender processes
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.decode import readf as _readf  # noqa: E402
from pipeline.loader import LoaderConfig, StreamingLoader  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench.loader {time.perf_counter() - _T0:6.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# data


def demo_shards(cache: str, clip_seconds: float) -> str | None:
    """The MTAT-layout train split of `shard-tools demo` with clips of ``clip_seconds``, built once
    into ``cache/clip<seconds>s`` and reused; None when the demo cannot run here."""
    out = os.path.join(cache, f"clip{clip_seconds:g}s")

    def find() -> str | None:
        for dirpath, _, files in sorted(os.walk(out)):
            if "train.manifest.json" in files and os.path.basename(dirpath) == "mtat":
                return os.path.join(dirpath, "train.manifest.json")
        return None

    found = find()
    if found:
        return found
    exe = os.path.join(os.path.dirname(sys.executable), "shard-tools")
    if not os.path.exists(exe):
        return None
    log(f"building {clip_seconds:g} s demo shards into {out} (once; reused by later runs)")
    cmd = [exe, "demo", "--out", out, "--notes-per-instrument", "1", "--programs-per-family", "3",
           "--clips", "160", "--clip-seconds", f"{clip_seconds:g}", "--shard-size", "8000000", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"shard-tools demo failed ({proc.stderr.strip().splitlines()[-1:] or proc.returncode}); using generated shards")
        return None
    return find()


def generated_shards(out: str, n: int, seconds: float, sr: int) -> str:
    """Music-like clips (a few harmonic partials with vibrato plus a little noise), shard-format tars."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import shardgen

    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    clips = []
    for i in range(n):
        f0 = 110 * 2 ** (rng.integers(0, 36) / 12)
        x = sum(0.3 / k * np.sin(2 * np.pi * k * f0 * t + 3 * np.sin(2 * np.pi * 5 * t)) for k in range(1, 6))
        x = x * (0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.2, 2) * t)) + 0.02 * rng.standard_normal(len(t))
        clips.append({"key": f"gen-{i:05d}", "audio": x[None].astype(np.float32), "sample_rate": sr, "labels": {}})
    per = max(1, n // 4)
    sizes = [per] * (n // per) + ([n % per] if n % per else [])
    return shardgen.write_split(out, clips, sizes, labels={})


def audio_members(manifest: str) -> list[bytes]:
    out = []
    for s in load_manifest(manifest).shards:
        with tarfile.open(s.url) as tf:
            for ti in tf:
                if ti.isfile() and ti.name.rsplit(".", 1)[-1] in ("flac", "wav"):
                    out.append(tf.extractfile(ti).read())
    return out


def expected_pair_share(frames: int, crop: int) -> float:
    """Expected share of a clip's frames that two independent uniform crops cover together: what
    the loader must decode (it decodes the union of the two views once), against the whole clip
    the decode limit and the per-file loader decode. Offsets are uniform on ``0..M`` with
    ``M = frames - crop``; the union is ``crop + min(|o1 - o2|, crop)``."""
    if frames <= crop:
        return 1.0
    m = frames - crop
    d = np.arange(m + 1)
    p = np.where(d == 0, 1.0, 2.0 * (m + 1 - d)) / (m + 1) ** 2  # P(|o1 - o2| = d)
    return float((crop + (p * np.minimum(d, crop)).sum()) / frames)


# ------------------------------------------------------------------------------------------------
# contenders


def tree_cpu_seconds() -> float:
    """User + system CPU time of this process and its live child processes (DataLoader workers,
    pool processes) from /proc, so it can be read at the start and the end of a timed window."""
    me = os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        # after the ")" closing the command name: state, ppid, ..., utime (11), stime (12)
        if int(entry) == me or int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def time_batches(batches, n_batches: int, batch_size: int) -> tuple[float, float]:
    """(clips per second, CPU ms per clip) over the same steady-state window: it opens when the first
    batch has arrived (worker start-up is out) and closes at the last timed batch. The work the
    workers do ahead (prefetch) is about the same at both ends of the window, so it cancels."""
    it = iter(batches)
    next(it)
    c0, t0 = tree_cpu_seconds(), time.perf_counter()
    for _ in range(n_batches):
        next(it)
    dt, cpu = time.perf_counter() - t0, tree_cpu_seconds() - c0
    if hasattr(it, "close"):
        it.close()
    del it
    gc.collect()
    n = n_batches * batch_size
    return n / dt, 1000 * cpu / n


def run_loader(manifest: str, args) -> tuple[float, float]:
    cfg = LoaderConfig(manifests=[manifest], batch_size=args.batch_size, crop_samples=args.crop, mode="pairs",
                       num_workers=args.workers, shuffle_buffer=args.buffer, seed=0)
    return time_batches(StreamingLoader(cfg), args.batches, args.batch_size)


_BLOBS: list[bytes] = []
_SFREAD = False
_SCRATCH = np.empty((0, 1), dtype=np.float32)  # per decode process, reused across clips


def _decode_share(bounds: tuple[int, int]) -> int:
    global _SCRATCH
    frames = 0
    for b in _BLOBS[bounds[0] : bounds[1]]:
        if _SFREAD:
            x, _ = sf.read(io.BytesIO(b), dtype="float32", always_2d=True)
        else:
            with sf.SoundFile(io.BytesIO(b)) as f:
                if _SCRATCH.shape[0] < f.frames or _SCRATCH.shape[1] != f.channels:
                    _SCRATCH = np.empty((f.frames, f.channels), dtype=np.float32)
                x = _SCRATCH[: f.frames]
                if _readf(f, x) != len(x):
                    raise RuntimeError("decode_limit: a clip did not decode completely")
        frames += x.shape[0]
    return frames


def run_decode_limit(blobs: list[bytes], workers: int, passes: int, sfread: bool = False) -> tuple[float, float]:
    global _BLOBS, _SFREAD
    _BLOBS, _SFREAD = blobs * passes, sfread
    n = len(_BLOBS)
    shares = [(i * n // workers, (i + 1) * n // workers) for i in range(workers)]
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_decode_share, [(0, 1)] * workers)  # warm the processes
        c0, t0 = tree_cpu_seconds(), time.perf_counter()
        pool.map(_decode_share, shares)
        dt, cpu = time.perf_counter() - t0, tree_cpu_seconds() - c0
    _BLOBS = []
    return n / dt, 1000 * cpu / n


def _two_crops(x: np.ndarray, crop: int, rng: np.random.Generator) -> np.ndarray:
    if x.shape[1] < crop:
        x = np.pad(x, ((0, 0), (0, crop - x.shape[1])))
    offs = rng.integers(0, x.shape[1] - crop + 1, size=2)
    return np.stack([x[:, o : o + crop] for o in offs])


def _audio_only(sample: dict) -> dict:
    """A webdataset sample's audio member decoded with soundfile; every other member (the JSON, or
    a ``.pyd``/``.pickle`` a hostile shard may hold) is dropped undecoded. No webdataset decoder
    runs: its defaults (``basichandlers``) unpickle ``.pyd``/``.pickle``/``.pkl`` members."""
    ext = "flac" if "flac" in sample else "wav"
    x, _ = sf.read(io.BytesIO(sample[ext]), dtype="float32", always_2d=True)
    return {"audio": x.T}


def run_webdataset(manifest: str, args) -> tuple[float, float]:
    import webdataset as wds

    urls = [s.url for s in load_manifest(manifest).shards]
    rng = np.random.default_rng(0)

    def to_example(sample: dict) -> torch.Tensor:
        return torch.from_numpy(_two_crops(sample["audio"][:1], args.crop, rng))

    # (WebDataset's repeat= argument is ignored in 1.0.2; .repeat() on the pipeline does repeat)
    ds = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                         empty_check=False)
          .shuffle(args.buffer).map(_audio_only).map(to_example).batched(args.batch_size).repeat())
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers)
    return time_batches(dl, args.batches, args.batch_size)


class PerFileDataset(torch.utils.data.Dataset):
    """CLMR's data path: a list of files; each item decodes the whole file, then crops."""

    def __init__(self, files: list[str], crop: int):
        self.files, self.crop = files, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        x, _ = sf.read(self.files[i], dtype="float32", always_2d=True)
        return torch.from_numpy(_two_crops(x.T[:1], self.crop, np.random.default_rng(i)))


def run_perfile(blobs: list[bytes], folder: str, args) -> tuple[float, float]:
    files = []
    for i, b in enumerate(blobs):
        path = os.path.join(folder, f"{i:06d}.flac")
        with open(path, "wb") as f:
            f.write(b)
        files.append(path)
    sampler = torch.utils.data.RandomSampler(files, replacement=True, num_samples=10**9)
    dl = torch.utils.data.DataLoader(PerFileDataset(files, args.crop), batch_size=args.batch_size, sampler=sampler,
                                     num_workers=args.workers)
    return time_batches(dl, args.batches, args.batch_size)


# ------------------------------------------------------------------------------------------------


def measure(manifest: str, source: str, args, tmp: str) -> dict:
    """All four contenders on one set of shards, ``args.rounds`` times interleaved (loader, decode
    limit, webdataset, per-file, loader, ...): the medians per contender, and the ratios of the medians."""
    m = load_manifest(manifest)
    blobs = audio_members(manifest)
    infos = [sf.info(io.BytesIO(b)) for b in blobs]
    mean_sec = float(np.mean([i.frames / i.samplerate for i in infos]))
    rate = int(np.median([i.samplerate for i in infos]))
    log(f"{len(blobs)} clips, {len(m.shards)} shards, mean {mean_sec:.2f} s at {rate} Hz, "
        f"{sum(map(len, blobs)) / 2**20:.1f} MiB ({source})")
    need = args.batches * args.batch_size
    passes = max(1, -(-need // len(blobs)))
    files = os.path.join(tmp, f"files-{len(os.listdir(tmp))}")
    os.makedirs(files)
    contenders = {
        "loader": lambda: run_loader(manifest, args),
        "decode_limit": lambda: run_decode_limit(blobs, args.workers, passes=passes, sfread=args.sfread_limit),
        "webdataset": lambda: run_webdataset(manifest, args),
        "perfile": lambda: run_perfile(blobs, files, args),
    }
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
    for r in range(args.rounds):
        for name, fn in contenders.items():
            runs[name].append(fn())
            log(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1][0]:.1f} clips/s, {runs[name][-1][1]:.2f} CPU ms/clip")
    rates = {k: float(np.median([x[0] for x in v])) for k, v in runs.items()}
    cpu = {k: float(np.median([x[1] for x in v])) for k, v in runs.items()}
    crop_share = float(np.mean([expected_pair_share(i.frames, args.crop) for i in infos]))
    return {
        "source": source,
        "clips": len(blobs),
        "mean_clip_seconds": round(mean_sec, 3),
        "sample_rate": rate,
        "crops_share_of_clip": round(crop_share, 3),
        "clips_per_s": {k: round(v, 2) for k, v in rates.items()},
        "clips_per_s_runs": {k: [round(x[0], 1) for x in v] for k, v in runs.items()},
        "audio_seconds_per_s": {k: round(v * mean_sec, 2) for k, v in rates.items()},
        # CPU time per clip (all processes, same window as clips/s): less sensitive to a shared machine
        "cpu_ms_per_clip": {k: round(v, 3) for k, v in cpu.items()},
        "ratios": {
            **{f"loader_vs_{p}": round(rates["loader"] / rates[p], 3) for p in ("decode_limit", "webdataset", "perfile")},
            **{f"loader_vs_{p}_cpu": round(cpu[p] / cpu["loader"], 3) for p in ("decode_limit", "webdataset", "perfile")},
        },
    }


def tagged(key: str, tag: str) -> str:
    """A further data set's ratio key: ``loader_vs_perfile_cpu`` -> ``loader_6s_vs_perfile_6s_cpu``."""
    base, cpu = (key[: -len("_cpu")], "_cpu") if key.endswith("_cpu") else (key, "")
    return f"loader{tag}_vs_{base.removeprefix('loader_vs_')}{tag}{cpu}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Loader throughput vs decode limit, webdataset and a per-file loader.",
        epilog="The first data set is the headline: its ratios carry plain keys (loader_vs_perfile); "
               "each further one adds keys with its tag (loader_6s_vs_perfile_6s).")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for CI)")
    p.add_argument("--manifest", help="benchmark these shards instead of the demo / generated ones")
    p.add_argument("--clip-seconds", type=float, nargs="+", default=[29.1, 6.0], metavar="S",
                   help="demo (or generated) clip lengths, one data set each (default: 29.1, MagnaTagATune's "
                        "clip length, then 6, the quickstart demo's)")
    p.add_argument("--demo-dir", default=os.path.expanduser("~/.cache/musicssl/bench-loader-demo"),
                   help="where the demo shards are built once per clip length and reused (default: %(default)s)")
    p.add_argument("--generated", action="store_true", help="use generated shards even if the demo works")
    p.add_argument("--gen-clips", type=int, default=120, help="generated shards: clip count (default 120)")
    p.add_argument("--workers", type=int, default=2, help="loader workers / decode processes (default 2)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=None, help="timed batches per contender and round (default 150; quick 30): a window of seconds, long enough to average out a shared machine's swings")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds per data set; figures are the medians (default 3; quick 1)")
    p.add_argument("--crop", type=int, default=59049, help="crop length in samples (CLMR: 59049)")
    p.add_argument("--buffer", type=int, default=256, help="shuffle buffer (loader and webdataset)")
    p.add_argument("--sfread-limit", action="store_true",
                   help="decode limit with soundfile.read (the weaker peer used before; default: libsndfile's read call)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.crop, args.buffer = 4, 8000, 16
        args.clip_seconds = [1.0]
    # quick: enough batches that the CPU window spans several clock ticks
    args.batches = args.batches or (30 if args.quick else 150)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if args.rounds < 1 or args.batches < 1:
        p.error("--rounds and --batches must be at least 1")

    tmp = tempfile.mkdtemp(prefix="bench-loader-")
    sets: list[tuple[str, dict]] = []
    try:
        if args.manifest:
            sets.append(("", measure(args.manifest, "given", args, tmp)))
        else:
            for i, secs in enumerate(args.clip_seconds):
                tag = "" if i == 0 else f"_{secs:g}s".replace(".", "p")
                manifest = None
                if not args.quick and not args.generated:
                    manifest = demo_shards(args.demo_dir, secs)
                    source = f"shard-tools demo --clip-seconds {secs:g} (mtat train)"
                if manifest is None:
                    n = 24 if args.quick else args.gen_clips
                    log(f"generating {n} clips of {secs:g} s at 22050 Hz")
                    manifest = generated_shards(os.path.join(tmp, f"gen{i}"), n, secs, 22050)
                    source = "generated"
                sets.append((tag, measure(manifest, source, args, tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for tag, d in sets:
        print(f"\n{d['source']}: {d['clips']} clips, {d['mean_clip_seconds']} s at {d['sample_rate']} Hz, "
              f"two crops cover {100 * d['crops_share_of_clip']:.0f} % of a clip on average; medians of {args.rounds} rounds")
        print(f"{'contender':<14}{'clips/s':>10}{'audio-s/s':>12}{'CPU ms/clip':>13}   clips/s per round")
        for k, v in d["clips_per_s"].items():
            print(f"{k:<14}{v:>10.1f}{d['audio_seconds_per_s'][k]:>12.1f}{d['cpu_ms_per_clip'][k]:>13.2f}   {d['clips_per_s_runs'][k]}")
        print("ratios: " + ", ".join(f"{k} {v}" for k, v in d["ratios"].items()))
    head = sets[0][1]
    ratios = dict(head["ratios"])
    for tag, d in sets[1:]:
        ratios.update({tagged(k, tag): v for k, v in d["ratios"].items()})
    out = {
        "benchmark": "loader",
        **{k: head[k] for k in ("source", "clips", "mean_clip_seconds", "sample_rate", "clips_per_s", "audio_seconds_per_s", "cpu_ms_per_clip")},
        "workers": args.workers,
        "batch_size": args.batch_size,
        "crop_samples": args.crop,
        "timed_batches": args.batches,
        "rounds": args.rounds,
        "decode_limit_reader": "soundfile.read" if args.sfread_limit else "sf_readf_float",
        "datasets": [d for _, d in sets],
        "ratios": ratios,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
