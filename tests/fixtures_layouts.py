"""Tiny fixtures in the real on-disk layouts of MTAT, MSD, MusicNet and NSynth, for the recipe tests.

Audio is generated (sine tones whose frequency identifies the file, so a test can tell which
source a decoded sample came from), written in the formats the real datasets use (mp3 for MTAT
and MSD, 44.1 kHz wav for MusicNet, 16 kHz wav for NSynth). Helpers to damage files and to read
samples back from built shards live here too.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import soundfile as sf


def tone(freq: float, seconds: float, sr: int, amp: float = 0.3) -> np.ndarray:
    """A float32 sine of ``freq`` Hz, mono ``(frames,)``."""
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_audio(path: str, audio: np.ndarray, sr: int, fmt: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, audio, sr, format=fmt.upper())
    return path


def write_empty(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()
    return path


def write_garbage(path: str, n: int = 3000, seed: int = 0) -> str:
    """Bytes that no audio decoder accepts (no valid header), like a broken download."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(b"NOT AUDIO" + data)
    return path


def dominant_freq(audio: np.ndarray, sr: int) -> float:
    """Frequency (Hz) of the strongest FFT bin of a mono signal, refined by parabolic interpolation."""
    x = audio * np.hanning(len(audio))
    mag = np.abs(np.fft.rfft(x))
    k = int(np.argmax(mag[1:])) + 1
    if 1 <= k < len(mag) - 1:
        a, b, c = np.log(mag[k - 1] + 1e-12), np.log(mag[k] + 1e-12), np.log(mag[k + 1] + 1e-12)
        k = k + 0.5 * (a - c) / (a - 2 * b + c)
    return k * sr / len(audio)


def _samples(tar_paths: list[str]):
    """``(meta, audio (channels, frames), sr, ext)`` of every sample in the tars, in order."""
    for path in tar_paths:
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            for a, j in zip(members[0::2], members[1::2]):
                meta = json.loads(tar.extractfile(j).read())
                audio, sr = sf.read(io.BytesIO(tar.extractfile(a).read()), dtype="float32", always_2d=True)
                yield meta, audio.T, sr, a.name.split(".", 1)[1]


def read_shards(folder: str, split: str) -> dict[str, dict]:
    """Every sample of a split as ``{key: {"meta": json, "audio": (channels, frames), "sr": int}}``,
    read through the manifest (so a shard missing from it is not read)."""
    with open(os.path.join(folder, f"{split}.manifest.json")) as f:
        manifest = json.load(f)
    return {meta["key"]: {"meta": meta, "audio": audio, "sr": sr, "ext": ext}
            for meta, audio, sr, ext in _samples([os.path.join(folder, s["url"]) for s in manifest["shards"]])}


def shard_samples(out: str, split: str | None = None, by: str = "key") -> dict[str, tuple[dict, np.ndarray, int]]:
    """``{meta[by]: (meta, audio, sr)}`` of every ``*.tar`` in ``out`` (or of one split, through its manifest)."""
    if split is None:
        paths = [os.path.join(out, n) for n in sorted(os.listdir(out)) if n.endswith(".tar")]
    else:
        paths = [os.path.join(out, s["url"]) for s in json.load(open(os.path.join(out, f"{split}.manifest.json")))["shards"]]
    return {meta[by]: (meta, audio, sr) for meta, audio, sr, _ in _samples(paths)}


def tars(out: str) -> dict[str, bytes]:
    """The bytes of every ``*.tar`` in a shard folder, by name."""
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith(".tar")}


def folder_recipe(root: str, *, valid_fraction: float = 0.2, test_fraction: float = 0.2, **kw):
    """The ``folder`` recipe of ``root`` with its command-line defaults (hash split fractions given)."""
    import argparse

    from shard_tools import folder

    ns = argparse.Namespace(labels=None, path_column="path", split_column="split", multi_hot=[], label_sep=";",
                            keep_unlisted=False, valid_fraction=valid_fraction, test_fraction=test_fraction, **kw)
    return folder.prepare(root, ns)


# ---------------------------------------------------------------------------------------------
# MagnaTagATune


def write_mtat(root: str, tags: list[str], clips: list[dict], *, sr: int = 16000, seconds: float = 1.0) -> str:
    """``annotations_final.csv`` (TAB-separated, every value quoted, as in the real file) and the
    mp3s. Each clip: ``{"clip_id", "path", "tags": [...], "freq": Hz | None, "kind": "ok" | "empty"
    | "missing" | "garbage"}``."""
    lines = ["\t".join(f'"{v}"' for v in ["clip_id", *tags, "mp3_path"])]
    for c in clips:
        flags = ["1" if t in c["tags"] else "0" for t in tags]
        lines.append("\t".join(f'"{v}"' for v in [str(c["clip_id"]), *flags, c["path"]]))
        path = os.path.join(root, c["path"])
        kind = c.get("kind", "ok")
        if kind == "ok":
            write_audio(path, tone(c["freq"], seconds, sr), sr, "mp3")
        elif kind == "empty":
            write_empty(path)
        elif kind == "garbage":
            write_garbage(path, seed=c["clip_id"])
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "annotations_final.csv"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------------------------------------
# NSynth

QUALITY_NAMES = ["bright", "dark", "distortion", "fast_decay", "long_release", "multiphonic",
                 "nonlinear_env", "percussive", "reverb", "tempo-synced"]
FAMILY_NAMES = ["bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string",
                "synth_lead", "vocal"]
SOURCE_NAMES = ["acoustic", "electronic", "synthetic"]


def nsynth_entry(family: str, source: str, number: int, instrument: int, pitch: int, velocity: int,
                 qualities: list[str]) -> dict:
    """One ``examples.json`` entry with NSynth's real field names and value conventions."""
    instrument_str = f"{family}_{source}_{number:03d}"
    note_str = f"{instrument_str}-{pitch:03d}-{velocity:03d}"
    return {
        "note": instrument * 1000 + pitch,
        "note_str": note_str,
        "instrument": instrument,
        "instrument_str": instrument_str,
        "pitch": pitch,
        "velocity": velocity,
        "sample_rate": 16000,
        "qualities": [1 if q in qualities else 0 for q in QUALITY_NAMES],
        "qualities_str": [q for q in QUALITY_NAMES if q in qualities],
        "instrument_family": FAMILY_NAMES.index(family),
        "instrument_family_str": family,
        "instrument_source": SOURCE_NAMES.index(source),
        "instrument_source_str": source,
    }


def write_nsynth(root: str, split: str, entries: list[dict], *, kinds: dict[str, str] | None = None,
                 seconds: float = 0.5) -> str:
    """``nsynth-<split>/examples.json`` + ``audio/<note_str>.wav`` (16 kHz tones at the note's
    pitch). ``kinds`` maps note_str to "empty" / "missing" / "garbage" to damage a file."""
    folder = os.path.join(root, f"nsynth-{split}")
    os.makedirs(os.path.join(folder, "audio"), exist_ok=True)
    kinds = kinds or {}
    for e in entries:
        path = os.path.join(folder, "audio", f"{e['note_str']}.wav")
        kind = kinds.get(e["note_str"], "ok")
        if kind == "ok":
            freq = 440.0 * 2 ** ((e.get("pitch", 69) - 69) / 12)
            write_audio(path, tone(freq, seconds, 16000), 16000, "wav")
        elif kind == "empty":
            write_empty(path)
        elif kind == "garbage":
            write_garbage(path)
    with open(os.path.join(folder, "examples.json"), "w") as f:
        json.dump({e["note_str"]: e for e in entries}, f, indent=1)
    return folder


# ---------------------------------------------------------------------------------------------
# MusicNet


def write_musicnet(root: str, recordings: list[dict], metadata: list[dict]) -> str:
    """``musicnet_metadata.csv``, ``{train,test}_data/<id>.wav`` (44.1 kHz) and
    ``{train,test}_labels/<id>.csv`` with times in samples at 44.1 kHz, as in the real dataset.

    Each recording: ``{"id", "part": "train" | "test", "seconds", "notes": [(start_s, end_s,
    instrument, note)], "kind": "ok" | "empty" | "garbage" | "no_wav" | "no_csv"}``.
    """
    sr = 44100
    for r in recordings:
        data = os.path.join(root, f"{r['part']}_data", f"{r['id']}.wav")
        labels = os.path.join(root, f"{r['part']}_labels", f"{r['id']}.csv")
        kind = r.get("kind", "ok")
        if kind in ("ok", "no_csv"):
            write_audio(data, tone(220.0, r["seconds"], sr, amp=0.1), sr, "wav")
        elif kind == "empty":
            write_empty(data)
        elif kind == "garbage":
            write_garbage(data, seed=int(r["id"]))
        os.makedirs(os.path.dirname(labels), exist_ok=True)
        os.makedirs(os.path.dirname(data), exist_ok=True)
        if kind != "no_csv":
            rows = ["start_time,end_time,instrument,note,start_beat,end_beat,note_value"]
            for s, e, inst, note in r.get("notes", []):
                rows.append(f"{int(round(s * sr))},{int(round(e * sr))},{inst},{note},0.0,1.0,Quarter")
            with open(labels, "w") as f:
                f.write("\n".join(rows) + "\n")
    cols = ["id", "composer", "composition", "movement", "ensemble", "source", "transcriber", "catalog_name", "seconds"]
    with open(os.path.join(root, "musicnet_metadata.csv"), "w") as f:
        f.write(",".join(cols) + "\n")
        for m in metadata:
            f.write(",".join(f'"{m.get(c, "")}"' if "," in str(m.get(c, "")) else str(m.get(c, "")) for c in cols) + "\n")
    return root


# ---------------------------------------------------------------------------------------------
# Million Song Dataset


def msd_preview_path(root: str, id7: str, suffix: str = ".clip.mp3") -> str:
    return os.path.join(root, id7[0], id7[1], id7 + suffix)
