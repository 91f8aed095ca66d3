"""The ``folder`` recipe: any audio below a folder, labels from a CSV, hash or CSV splits."""

from __future__ import annotations

import json
import os

import numpy as np

from shard_tools.cli import main as cli_main
from shard_tools.folder import file_key, hash_split
from tests.conftest import write_tone
from tests.fixtures_layouts import shard_samples


def read_split(out: str, split: str) -> dict[str, tuple[dict, np.ndarray, int]]:
    return shard_samples(out, split, by="source")


def peak_hz(audio: np.ndarray, sr: int) -> float:
    x = audio[0] * np.hanning(audio.shape[1])
    spec = np.abs(np.fft.rfft(x, 8 * len(x)))
    return float(np.argmax(spec) * sr / (8 * len(x)))


def test_labels_csv_splits_and_skips(tmp_path, capsys):
    root = tmp_path / "music"
    write_tone(str(root / "jazz" / "a.wav"), freq=330, sample_rate=22050, channels=2)
    write_tone(str(root / "jazz" / "b.flac"), freq=440)
    write_tone(str(root / "rock" / "c.mp3"), freq=550, seconds=1.0, sample_rate=44100)
    write_tone(str(root / "rock" / "d.ogg"), freq=660)
    write_tone(str(root / "unlisted.wav"), freq=770)
    (root / "rock" / "e.wav").write_bytes(b"")  # listed, but empty
    (root / "cover.jpg").write_bytes(b"\xff\xd8 not audio, not scanned")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(
        "path,split,genre,tags\n"
        "jazz/a.wav,train,jazz,sax;piano\n"
        "jazz/b.flac,valid,jazz,piano\n"
        "rock/c.mp3,train,rock,guitar;drums\n"
        f"{root}/rock/d.ogg,test,rock,\n"
        "rock/e.wav,train,rock,guitar\n"
        "rock/missing.wav,train,rock,guitar\n")
    out = str(tmp_path / "out")
    code = cli_main(["build", "folder", "--root", str(root), "--out", out, "--labels", str(csv_path),
                     "--multi-hot", "tags", "--workers", "1", "--shard-size", "1MB"])
    assert code == 0
    summary = capsys.readouterr().out
    assert "files in" in summary and "samples written" in summary and "audio-hours per hour" in summary
    report = json.load(open(os.path.join(out, "build-report.json")))
    reasons = {os.path.basename(s["path"]): s["reason"] for s in report["files_skipped"]}
    assert set(reasons) == {"unlisted.wav", "e.wav", "missing.wav"}
    assert reasons["unlisted.wav"].startswith("not listed in --labels")
    assert reasons["e.wav"].startswith("empty file")
    assert reasons["missing.wav"].startswith("label row without a file")
    assert report["files_in"] == 7 == report["files_written"] + len(report["files_skipped"])
    train, valid, test = (read_split(out, s) for s in ("train", "valid", "test"))
    assert set(train) == {"jazz/a.wav", "rock/c.mp3"} and set(valid) == {"jazz/b.flac"} and set(test) == {"rock/d.ogg"}
    meta, audio, sr = train["jazz/a.wav"]
    assert meta["labels"] == {"genre": "jazz", "tags": ["sax", "piano"]}
    # no --mono / --sample-rate: channels and rate are kept; the second channel is at half level
    assert (sr, audio.shape[0]) == (22050, 2) and abs(peak_hz(audio, sr) - 330) < 3
    assert np.allclose(audio[1], audio[0] / 2, atol=2e-4)
    meta, audio, sr = train["rock/c.mp3"]
    assert sr == 44100 and abs(audio.shape[1] - 44100) < 1200 and abs(peak_hz(audio, sr) - 550) < 3
    assert test["rock/d.ogg"][0]["labels"] == {"genre": "rock", "tags": []}
    m = json.load(open(os.path.join(out, "train.manifest.json")))
    assert m["labels"] == {"genre": {"kind": "class", "names": ["jazz", "rock"]},
                           "tags": {"kind": "multi_hot", "names": ["drums", "guitar", "piano", "sax"]}}
    assert m["sample_rate"] is None and m["channels"] is None  # samples differ (22.05 k stereo, 44.1 k mono)
    # info shows splits and the vocabularies on one screen
    assert cli_main(["info", out]) == 0
    info = capsys.readouterr().out
    assert "train" in info and "multi_hot" in info and "drums, guitar, piano, sax" in info
    assert len(info.splitlines()) < 25


def test_keep_unlisted_and_hash_split(tmp_path):
    root = tmp_path / "r"
    write_tone(str(root / "x" / "one.wav"), freq=300)
    write_tone(str(root / "x_one.wav"), freq=400)  # a key clash if keys were only the tar-safe path
    (tmp_path / "l.csv").write_text("file\tmood\nx/one.wav\tcalm\n")
    out = str(tmp_path / "o")
    assert cli_main(["build", "folder", "--root", str(root), "--out", out, "--labels", str(tmp_path / "l.csv"),
                     "--path-column", "file", "--keep-unlisted", "--valid-fraction", "0", "--test-fraction", "0",
                     "--workers", "1", "--quiet"]) == 0
    got = read_split(out, "train")
    assert got["x/one.wav"][0]["labels"] == {"mood": "calm"}
    assert got["x_one.wav"][0]["labels"] == {}
    assert got["x/one.wav"][0]["key"] != got["x_one.wav"][0]["key"]
    assert abs(peak_hz(got["x_one.wav"][1], 16000) - 400) < 3
    assert file_key("x/one.wav") == got["x/one.wav"][0]["key"]
    # the hash split is stable and close to the fractions asked for
    paths = [f"artist{i // 10}/song{i}.mp3" for i in range(4000)]
    splits = [hash_split(p, 0.1, 0.2) for p in paths]
    assert splits == [hash_split(p, 0.1, 0.2) for p in paths]
    counts = {s: splits.count(s) for s in ("train", "valid", "test")}
    assert abs(counts["valid"] - 400) < 80 and abs(counts["test"] - 800) < 110 and counts["train"] > 2600
