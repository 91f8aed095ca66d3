"""The dataset recipes (mtat, msd, musicnet, nsynth) on tiny fixtures in each dataset's real layout.

Each test builds a fixture with good, empty, missing and corrupt files, runs the recipe and the
builder (``build_dataset``), reads the shards back and checks the exact labels of specific
samples, their audio (length, rate, and the tone that identifies the source file), the skipped
files with their reasons, and ``files_in == files_written + len(files_skipped)``.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from shard_tools import msd, mtat, musicnet, nsynth
from shard_tools.build import build_dataset
from tests.fixtures_layouts import (
    dominant_freq,
    msd_preview_path,
    nsynth_entry,
    read_shards,
    tone,
    write_audio,
    write_empty,
    write_garbage,
    write_mtat,
    write_musicnet,
    write_nsynth,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe_args(module, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv or [])


def build(recipe, out: str) -> dict:
    return build_dataset(recipe, out, workers=1, seed=0, progress=False)


def skipped_reasons(report: dict, root: str) -> dict[str, str]:
    """``{path relative to root: reason}`` of the report's skipped files."""
    return {os.path.relpath(s["path"], root) if os.path.isabs(s["path"]) else s["path"]: s["reason"]
            for s in report["files_skipped"]}


def check_invariant(report: dict) -> None:
    assert report["files_in"] == report["files_written"] + len(report["files_skipped"])
    assert "warning" not in report, report.get("warning")


# ---------------------------------------------------------------------------------------------
# MTAT

MTAT_TAGS = ["guitar", "piano", "rock", "slow", "vocal"]
MTAT_CLIPS = [
    {"clip_id": 1, "path": "0/artist_a-album-01-song-0-29.mp3", "tags": ["guitar", "rock"], "freq": 300.0},
    {"clip_id": 2, "path": "5/artist_b-album-02-song-30-59.mp3", "tags": ["piano", "slow"], "freq": 400.0},
    {"clip_id": 3, "path": "c/artist_c-album-03-song-0-29.mp3", "tags": ["guitar", "slow"], "freq": 500.0},
    {"clip_id": 4, "path": "d/artist_d-album-04-song-0-29.mp3", "tags": ["piano"], "freq": 600.0},
    {"clip_id": 5, "path": "f/artist_e-album-05-song-0-29.mp3", "tags": ["guitar"], "kind": "empty"},
    {"clip_id": 6, "path": "1/artist_f-album-06-song-0-29.mp3", "tags": ["piano", "rock"], "kind": "missing"},
    {"clip_id": 7, "path": "e/artist_g-album-07-song-0-29.mp3", "tags": [], "kind": "garbage"},
]


def test_mtat_top_tags_ties_by_name_and_quoting(tmp_path):
    write_mtat(str(tmp_path), MTAT_TAGS, MTAT_CLIPS)
    tags, rows = mtat.read_annotations(str(tmp_path / "annotations_final.csv"))
    assert tags == MTAT_TAGS
    assert rows[0] == (1, "0/artist_a-album-01-song-0-29.mp3", ["guitar", "rock"])
    # counts over all rows: guitar 3, piano 3, rock 2, slow 2, vocal 0 -> ties broken by name,
    # a tag no clip has never enters the vocabulary
    assert mtat.top_tags(tags, rows, 3) == ["guitar", "piano", "rock"]
    assert mtat.top_tags(tags, rows, 50) == ["guitar", "piano", "rock", "slow"]


def test_mtat_annotations_with_bom_and_crlf(tmp_path):
    # the file as a Windows tool may re-save it: UTF-8 byte-order mark, CRLF line ends
    write_mtat(str(tmp_path), MTAT_TAGS, MTAT_CLIPS[:2])
    path = tmp_path / "annotations_final.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    tags, rows = mtat.read_annotations(str(path))
    assert tags == MTAT_TAGS and rows[1] == (2, "5/artist_b-album-02-song-30-59.mp3", ["piano", "slow"])


@pytest.mark.parametrize("dataset", ["mtat", "msd", "musicnet", "nsynth"])
def test_cli_recipe_options_parse(dataset, capsys):
    from shard_tools.cli import main as cli_main

    with pytest.raises(SystemExit) as exc:
        cli_main(["build", dataset, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--root" in out and {"mtat": "--split-files", "msd": "--allow-pickle", "musicnet": "--valid-every",
                                "nsynth": "--pitch-range"}[dataset] in out


def test_mtat_build_default_split(tmp_path):
    root, out = str(tmp_path / "mtat"), str(tmp_path / "out")
    write_mtat(root, MTAT_TAGS, MTAT_CLIPS)
    recipe = mtat.prepare(root, recipe_args(mtat, ["--top-k", "3"]))
    assert recipe.labels == {"tags": {"kind": "multi_hot", "names": ["guitar", "piano", "rock"]}}
    report = build(recipe, out)
    check_invariant(report)
    assert report["files_in"] == 7 and report["files_written"] == 4
    reasons = skipped_reasons(report, root)
    assert reasons["f/artist_e-album-05-song-0-29.mp3"] == "empty file: 0 bytes"
    assert reasons["1/artist_f-album-06-song-0-29.mp3"].startswith("missing file")
    assert reasons["e/artist_g-album-07-song-0-29.mp3"].startswith("not decodable audio")
    assert set(report["splits"]) == {"train", "valid", "test"}

    train, valid, test = (read_shards(out, s) for s in ("train", "valid", "test"))
    assert sorted(train) == ["mtat-1", "mtat-2"] and sorted(valid) == ["mtat-3"] and sorted(test) == ["mtat-4"]
    s2 = train["mtat-2"]
    assert s2["meta"]["labels"] == {"tags": ["piano"]}  # "slow" is outside the top 3
    assert s2["meta"]["clip_id"] == 2 and s2["meta"]["id"] == "2"
    assert s2["meta"]["source"] == "5/artist_b-album-02-song-30-59.mp3"
    assert train["mtat-1"]["meta"]["labels"] == {"tags": ["guitar", "rock"]}
    assert valid["mtat-3"]["meta"]["labels"] == {"tags": ["guitar"]}
    for key, freq in (("mtat-1", 300.0), ("mtat-2", 400.0)):
        s = train[key]
        assert s["sr"] == 16000 and s["meta"]["sample_rate"] == 16000
        assert s["audio"].shape == (1, 16000) and s["meta"]["num_samples"] == 16000
        assert abs(dominant_freq(s["audio"][0], s["sr"]) - freq) < 3.0
    with open(os.path.join(out, "train.manifest.json")) as f:
        assert json.load(f)["labels"]["tags"]["names"] == ["guitar", "piano", "rock"]


def test_mtat_pons_split_files(tmp_path):
    root = str(tmp_path / "mtat")
    write_mtat(root, MTAT_TAGS, MTAT_CLIPS)
    splits = tmp_path / "splits"
    splits.mkdir()
    vec = "[" + ", ".join(["0.0"] * 50) + "]"
    (splits / "train_gt_mtt.tsv").write_text(f"2\t{vec}\n99\t{vec}\n")
    (splits / "val_gt_mtt.tsv").write_text(f"3\t{vec}\n")
    (splits / "test_gt_mtt.tsv").write_text(f"1\t{vec}\n5\t{vec}\n")
    # index_mtt.tsv paths win over the csv's mp3_path
    os.rename(os.path.join(root, MTAT_CLIPS[0]["path"]), os.path.join(root, "0/moved.mp3"))
    (splits / "index_mtt.tsv").write_text("1\t0/moved.mp3\n2\t5/artist_b-album-02-song-30-59.mp3\n")
    recipe = mtat.prepare(root, recipe_args(mtat, ["--split-files", str(splits)]))
    by_id = {it.id: it for it in recipe.items}
    assert {k: v.split for k, v in by_id.items()} == {"1": "test", "2": "train", "3": "valid"}
    assert by_id["1"].source == "0/moved.mp3" and by_id["1"].labels == {"tags": ["guitar", "rock"]}
    reasons = {os.path.basename(s.path): s.reason for s in recipe.skipped}
    assert reasons["artist_e-album-05-song-0-29.mp3"] == "empty file: 0 bytes"  # clip 5, in test
    assert reasons["<clip 99>"].startswith("no annotations: clip 99")
    # clips 4, 6, 7 are in no split file: left out of this split scheme, not files_in
    assert recipe.files_in == 5


def test_mtat_wrong_layout_names_expected_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations_final.csv"):
        mtat.prepare(str(tmp_path), recipe_args(mtat))
    write_mtat(str(tmp_path), MTAT_TAGS, [c | {"kind": "missing"} for c in MTAT_CLIPS])
    with pytest.raises(FileNotFoundError, match="folders 0/ ... f/"):
        mtat.prepare(str(tmp_path), recipe_args(mtat))


# ---------------------------------------------------------------------------------------------
# NSynth


def _nsynth_fixture(root: str) -> dict[str, dict]:
    e = {
        "bass": nsynth_entry("bass", "electronic", 3, 17, 40, 100, ["dark"]),
        "flute": nsynth_entry("flute", "acoustic", 1, 5, 72, 50, []),
        "gone": nsynth_entry("guitar", "acoustic", 2, 9, 60, 75, []),
        "keys": nsynth_entry("keyboard", "acoustic", 4, 30, 64, 127, ["bright", "percussive"]),
        "empty": nsynth_entry("organ", "electronic", 1, 31, 62, 25, []),
        "junk": nsynth_entry("string", "acoustic", 7, 40, 55, 100, []),
        "nopitch": nsynth_entry("vocal", "synthetic", 2, 41, 70, 100, []),
    }
    del e["nopitch"]["pitch"]
    write_nsynth(root, "train", [e["bass"], e["flute"], e["gone"]], kinds={e["gone"]["note_str"]: "missing"})
    write_nsynth(root, "valid", [e["keys"], e["empty"]], kinds={e["empty"]["note_str"]: "empty"})
    write_nsynth(root, "test", [e["junk"], e["nopitch"]], kinds={e["junk"]["note_str"]: "garbage"})
    return e


def test_nsynth_build(tmp_path):
    root, out = str(tmp_path / "nsynth"), str(tmp_path / "out")
    e = _nsynth_fixture(root)
    recipe = nsynth.prepare(root, recipe_args(nsynth))
    assert recipe.labels["pitch"] == {"kind": "class", "names": list(range(40, 73))}
    assert recipe.labels["instrument_family_str"]["names"] == [
        "bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string", "synth_lead", "vocal"]
    assert recipe.labels["instrument_source_str"]["names"] == ["acoustic", "electronic", "synthetic"]
    assert recipe.labels["qualities"]["names"][:3] == ["bright", "dark", "distortion"]
    assert len(recipe.labels["qualities"]["names"]) == 10
    report = build(recipe, out)
    check_invariant(report)
    assert report["files_in"] == 7 and report["files_written"] == 3
    reasons = skipped_reasons(report, root)
    assert reasons[f"nsynth-train/audio/{e['gone']['note_str']}.wav"].startswith("missing file")
    assert reasons[f"nsynth-valid/audio/{e['empty']['note_str']}.wav"] == "empty file: 0 bytes"
    assert reasons[f"nsynth-test/audio/{e['junk']['note_str']}.wav"].startswith("not decodable audio")
    assert reasons[f"nsynth-test/audio/{e['nopitch']['note_str']}.wav"].startswith("bad label entry")
    assert "'pitch'" in reasons[f"nsynth-test/audio/{e['nopitch']['note_str']}.wav"]

    train = read_shards(out, "train")
    assert sorted(train) == ["nsynth-bass_electronic_003-040-100", "nsynth-flute_acoustic_001-072-050"]
    bass = train["nsynth-bass_electronic_003-040-100"]
    assert bass["meta"]["labels"] == {
        "pitch": 40, "velocity": 100, "instrument": 17, "instrument_str": "bass_electronic_003",
        "instrument_family": 0, "instrument_family_str": "bass", "instrument_source": 1,
        "instrument_source_str": "electronic", "qualities": ["dark"]}
    assert bass["meta"]["source"] == "nsynth-train/audio/bass_electronic_003-040-100.wav"
    assert bass["sr"] == 16000 and bass["audio"].shape == (1, 8000)
    f = dominant_freq(bass["audio"][0], 16000)
    assert abs(12 * np.log2(f / 440.0) + 69 - 40) < 0.3  # the tone of MIDI 40 came through
    valid = read_shards(out, "valid")
    assert list(valid) == ["nsynth-keyboard_acoustic_004-064-127"]
    assert valid["nsynth-keyboard_acoustic_004-064-127"]["meta"]["labels"]["qualities"] == ["bright", "percussive"]
    with open(os.path.join(out, "test.manifest.json")) as f:
        assert json.load(f)["num_samples"] == 0  # every test note was bad


def test_nsynth_pitch_range_and_splits_option(tmp_path):
    root = str(tmp_path / "nsynth")
    _nsynth_fixture(root)
    recipe = nsynth.prepare(root, recipe_args(nsynth, ["--splits", "train", "--pitch-range", "41-108"]))
    assert [it.id for it in recipe.items] == ["flute_acoustic_001-072-050"]
    assert recipe.labels["pitch"]["names"] == list(range(41, 109))
    assert [s.reason.split(":")[0] for s in recipe.skipped] == ["missing file"]  # the guitar, pitch 60
    with pytest.raises(FileNotFoundError, match="nsynth-train"):
        nsynth.prepare(str(tmp_path / "elsewhere"), recipe_args(nsynth))
    with pytest.raises(ValueError, match="unknown split"):
        nsynth.prepare(root, recipe_args(nsynth, ["--splits", "dev"]))


# ---------------------------------------------------------------------------------------------
# MusicNet


def _musicnet_fixture(root: str) -> None:
    recordings = [
        {"id": "1001", "part": "train", "seconds": 4.5,
         "notes": [(0.0, 0.5, 1, 60), (1.5, 2.5, 41, 67), (3.5, 4.4, 43, 48)]},
        {"id": "1002", "part": "train", "seconds": 1.5, "notes": [(0.2, 1.0, 72, 70)]},
        {"id": "1003", "part": "train", "kind": "garbage", "notes": [(0.0, 1.0, 1, 60)]},
        {"id": "1004", "part": "train", "seconds": 1.0, "kind": "no_csv"},
        {"id": "1005", "part": "train", "kind": "no_wav", "notes": [(0.0, 1.0, 1, 60)]},
        {"id": "1006", "part": "train", "kind": "empty", "notes": [(0.0, 1.0, 1, 60)]},
        {"id": "2001", "part": "test", "seconds": 2.0, "notes": [(0.0, 2.0, 74, 81)]},
    ]
    metadata = [
        {"id": "1001", "composer": "Bach", "composition": "Cello Suite 1", "ensemble": "Solo Cello", "seconds": 4},
        {"id": "1002", "composer": "Mozart", "composition": "Quintet, K. 581", "ensemble": "Clarinet Quintet", "seconds": 1},
        {"id": "2001", "composer": "Bach", "composition": "Partita", "ensemble": "Solo Flute", "seconds": 2},
    ]
    write_musicnet(root, recordings, metadata)


def test_musicnet_segments_labels(tmp_path):
    root, out = str(tmp_path / "musicnet"), str(tmp_path / "out")
    _musicnet_fixture(root)
    args = recipe_args(musicnet, ["--segment", "2", "--hop", "1", "--valid-every", "2"])
    recipe = musicnet.prepare(root, args)
    assert recipe.labels["instruments"]["names"] == [1, 7, 41, 42, 43, 44, 61, 69, 71, 72, 74]
    assert recipe.labels["notes"]["names"] == list(range(21, 109))
    assert recipe.labels["composer"] == {"kind": "class", "names": ["Bach", "Mozart"]}
    report = build(recipe, out)
    check_invariant(report)
    # 1001, 1002, 2001 written; 1003 (garbage), 1004 (no csv), 1005 (no wav), 1006 (empty) skipped
    assert report["files_in"] == 7 and report["files_written"] == 3
    reasons = skipped_reasons(report, root)
    assert reasons["train_data/1003.wav"].startswith("not decodable audio: header unreadable")
    assert reasons["train_data/1004.wav"] == "no labels: train_labels/1004.csv not found"
    assert reasons["train_data/1005.wav"].startswith("missing file: train_labels/1005.csv has no")
    assert reasons["train_data/1006.wav"] == "empty file: 0 bytes"

    train = read_shards(out, "train")
    # 4.5 s, 2 s windows every 1 s: [0,2], [1,3], [2,4]; the last 0.5 s is not a whole window
    assert sorted(train) == ["musicnet-1001-000000000", "musicnet-1001-000001000", "musicnet-1001-000002000"]
    seg = {k: v["meta"] for k, v in train.items()}
    assert seg["musicnet-1001-000000000"]["segment"] == [0.0, 2.0]
    assert seg["musicnet-1001-000000000"]["labels"] == {
        "instruments": [1, 41], "notes": [60, 67], "composer": "Bach", "ensemble": "Solo Cello"}
    assert seg["musicnet-1001-000001000"]["labels"]["instruments"] == [41]
    assert seg["musicnet-1001-000001000"]["labels"]["notes"] == [67]
    assert seg["musicnet-1001-000002000"]["labels"]["instruments"] == [41, 43]
    assert seg["musicnet-1001-000002000"]["labels"]["notes"] == [48, 67]
    for v in train.values():
        assert v["sr"] == 44100 and v["audio"].shape == (1, 88200)
    # every 2nd train recording with labels (sorted: 1001 1002 1003 1006) goes to valid: 1002
    valid = read_shards(out, "valid")
    assert list(valid) == ["musicnet-1002-000000000"]
    v = valid["musicnet-1002-000000000"]
    assert v["meta"]["segment"] == [0.0, 1.5] and v["audio"].shape == (1, 66150)
    assert v["meta"]["labels"] == {"instruments": [72], "notes": [70], "composer": "Mozart",
                                   "ensemble": "Clarinet Quintet"}
    test = read_shards(out, "test")
    assert test["musicnet-2001-000000000"]["meta"]["labels"]["instruments"] == [74]


def test_musicnet_segment_windows_and_layout_error(tmp_path):
    assert musicnet.segment_starts(45.0, 20.0, 10.0) == [(0.0, 20.0), (10.0, 30.0), (20.0, 40.0)]
    assert musicnet.segment_starts(40.0, 20.0, 10.0) == [(0.0, 20.0), (10.0, 30.0), (20.0, 40.0)]
    assert musicnet.segment_starts(12.0, 20.0, 10.0) == [(0.0, 12.0)]
    with pytest.raises(FileNotFoundError, match="train_data"):
        musicnet.prepare(str(tmp_path), recipe_args(musicnet))
    (tmp_path / "train_data").mkdir()
    with pytest.raises(FileNotFoundError, match="musicnet_metadata.csv"):
        musicnet.prepare(str(tmp_path), recipe_args(musicnet))


# ---------------------------------------------------------------------------------------------
# MSD


def _msd_fixture(root: str) -> None:
    write_audio(msd_preview_path(root, "123"), tone(300.0, 1.0, 22050), 22050, "mp3")
    write_audio(msd_preview_path(root, "456"), tone(500.0, 1.0, 22050), 22050, "mp3")
    write_audio(msd_preview_path(root, "789", ".clip.wav"), tone(700.0, 0.5, 22050), 22050, "wav")
    write_empty(msd_preview_path(root, "999"))


def _msd_tags(d) -> None:
    d.mkdir()
    (d / "output_labels_msd.txt").write_text("# Output labels\nMSD_LABELS = ['rock', 'pop', 'jazz']\n")
    (d / "train_gt_msd.tsv").write_text(
        "TRAAA\t[1.0, 0.0, 1.0]\nTRBBB\t[0.0, 1.0, 0.0]\nTRCCC\t[1.0, 1.0, 1.0]\nTRDDD\t[0.0, 0.0, 1.0]\nTREEE\tnot a list\n")
    (d / "val_gt_msd.tsv").write_text("TRFFF\t[0.0, 0.0, 1.0]\n")
    (d / "test_gt_msd.tsv").write_text("TRGGG\t[1.0, 0.0, 0.0]\n")


MSD_MAP = {"TRAAA": "123", "TRBBB": "456", "TRDDD": "999", "TREEE": "123", "TRFFF": "789", "TRGGG": "555"}


def test_msd_tagged_build(tmp_path):
    root, out, tags = str(tmp_path / "audio"), str(tmp_path / "out"), tmp_path / "tags"
    _msd_fixture(root)
    _msd_tags(tags)
    id_map = tmp_path / "msd_id_to_7d.tsv"
    id_map.write_text("msd_id\t7digital_id\n" + "".join(f"{k}\t{v}\n" for k, v in MSD_MAP.items()))
    recipe = msd.prepare(root, recipe_args(msd, ["--id-map", str(id_map), "--tags-dir", str(tags)]))
    assert recipe.labels == {"tags": {"kind": "multi_hot", "names": ["rock", "pop", "jazz"]}}
    report = build(recipe, out)
    check_invariant(report)
    assert report["files_written"] == 3 and report["files_in"] == 7
    reasons = {os.path.basename(s["path"]): s["reason"] for s in report["files_skipped"]}
    assert reasons["train_gt_msd.tsv:3"] == "no 7digital id: TRCCC is not in --id-map"
    assert reasons["999.clip.mp3"] == "empty file: 0 bytes"
    assert reasons["train_gt_msd.tsv:5"].startswith("bad tag row: TREEE")
    assert reasons["555.clip.mp3"].startswith("missing file")
    train = read_shards(out, "train")
    assert sorted(train) == ["msd-TRAAA", "msd-TRBBB"]
    a = train["msd-TRAAA"]
    assert a["meta"]["labels"] == {"tags": ["rock", "jazz"]}
    assert a["meta"]["msd_id"] == "TRAAA" and a["meta"]["7digital_id"] == "123"
    assert a["meta"]["source"] == "1/2/123.clip.mp3" and a["sr"] == 22050
    assert abs(dominant_freq(a["audio"][0], 22050) - 300.0) < 3.0
    valid = read_shards(out, "valid")
    assert valid["msd-TRFFF"]["meta"]["labels"] == {"tags": ["jazz"]}
    assert valid["msd-TRFFF"]["meta"]["source"] == "7/8/789.clip.wav"
    assert valid["msd-TRFFF"]["audio"].shape == (1, 11025)


def test_msd_unlabelled_and_id_map_formats(tmp_path):
    root, out = str(tmp_path / "audio"), str(tmp_path / "out")
    _msd_fixture(root)
    write_garbage(msd_preview_path(root, "321"))
    js = tmp_path / "map.json"
    js.write_text(json.dumps({"TRAAA": 123, "TRBBB": "456"}))
    recipe = msd.prepare(root, recipe_args(msd, ["--id-map", str(js)]))
    assert recipe.labels == {}
    report = build(recipe, out)
    check_invariant(report)
    assert report["files_in"] == 5 and report["files_written"] == 3
    assert sorted(os.path.basename(s["path"]) for s in report["files_skipped"]) == ["321.clip.mp3", "999.clip.mp3"]
    train = read_shards(out, "train")
    assert sorted(train) == ["msd-123", "msd-456", "msd-789"]
    assert train["msd-123"]["meta"]["labels"] == {} and train["msd-123"]["meta"]["msd_id"] == "TRAAA"
    assert train["msd-789"]["meta"]["msd_id"] is None and train["msd-789"]["meta"]["id"] == "789"

    pkl = tmp_path / "msd_id_to_7d.pickle"
    with open(pkl, "wb") as f:
        pickle.dump({"TRAAA": 123}, f)
    with pytest.raises(ValueError, match="--allow-pickle"):
        msd.prepare(root, recipe_args(msd, ["--id-map", str(pkl)]))
    r = msd.prepare(root, recipe_args(msd, ["--id-map", str(pkl), "--allow-pickle"]))
    assert {it.id for it in r.items} == {"TRAAA", "456", "789", "321"}  # 321 fails later, in decoding
    csv_map = tmp_path / "map.csv"
    csv_map.write_text("TRAAA,123\nTRBBB,456\n")
    assert msd.load_id_map(str(csv_map), allow_pickle=False) == {"TRAAA": "123", "TRBBB": "456"}
    with pytest.raises(ValueError, match="--id-map"):
        msd.prepare(root, recipe_args(msd, ["--train-tags", str(csv_map), "--tag-names", str(csv_map)]))


# ---------------------------------------------------------------------------------------------
# through the CLI


def test_cli_build_mtat(tmp_path):
    root, out = str(tmp_path / "mtat"), str(tmp_path / "out")
    write_mtat(root, MTAT_TAGS, MTAT_CLIPS)
    proc = subprocess.run(
        [sys.executable, "-m", "shard_tools", "build", "mtat", "--root", root, "--out", out, "--workers", "1",
         "--top-k", "2", "--codec", "wav", "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with open(os.path.join(out, "build-report.json")) as f:
        report = json.load(f)
    check_invariant(report)
    assert report["files_written"] == 4 and len(report["files_skipped"]) == 3
    s = read_shards(out, "test")["mtat-4"]
    assert s["meta"]["labels"] == {"tags": ["piano"]} and s["ext"] == "wav" and s["audio"].shape == (1, 16000)
    assert abs(dominant_freq(s["audio"][0], 16000) - 600.0) < 3.0
    proc = subprocess.run([sys.executable, "-m", "shard_tools", "build", "mtat", "--root", str(tmp_path / "nope"),
                           "--out", out], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--root" in proc.stderr
