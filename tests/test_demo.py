"""``shard-tools demo``: rendered real-instrument notes (NSynth layout) and clips (MTAT layout),
sharded through the nsynth and mtat recipes. A tiny size builds here; every note's pitch is
measured (YIN f0) and compared with its label, and the family/instrument labels and the held-out
instruments are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from shard_tools import demo
from shard_tools.cli import main as cli_main
from tests.fixtures_layouts import read_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def estimate_midi(audio: np.ndarray, sr: int, *, fmin: float = 30.0, fmax: float = 2500.0,
                  threshold: float = 0.15) -> float | None:
    """Median YIN f0 (as a fractional MIDI number) over 2048-sample frames of 0.1-0.9 s of a note;
    None when no frame is voiced."""
    x = np.asarray(audio, dtype=np.float64)
    w, tau_max, tau_min = 2048, int(sr / fmin), max(2, int(sr / fmax))
    estimates = []
    for start in range(int(0.1 * sr), int(0.9 * sr) - w - tau_max, w // 2):
        frame = x[start: start + w + tau_max]
        if np.abs(frame).max() < 1e-4:
            continue
        # difference function d(tau) = sum_j (x_j - x_{j+tau})^2, j < w, via an FFT correlation
        n = 1 << (len(frame) * 2 - 1).bit_length()
        corr = np.fft.irfft(np.fft.rfft(frame[:w], n).conj() * np.fft.rfft(frame, n), n)[: tau_max + 1]
        sq = np.concatenate([[0.0], np.cumsum(frame**2)])
        energy_head = sq[w]
        energy_lag = sq[np.arange(tau_max + 1) + w] - sq[np.arange(tau_max + 1)]
        d = energy_head + energy_lag - 2 * corr
        cmnd = np.ones_like(d)
        cmnd[1:] = d[1:] * np.arange(1, tau_max + 1) / np.maximum(np.cumsum(d[1:]), 1e-12)
        below = np.nonzero(cmnd[tau_min:] < threshold)[0]
        if len(below) == 0:
            continue
        tau = tau_min + below[0]
        while tau + 1 <= tau_max and cmnd[tau + 1] < cmnd[tau]:
            tau += 1
        if 1 <= tau < tau_max:
            a, b, c = cmnd[tau - 1], cmnd[tau], cmnd[tau + 1]
            den = a - 2 * b + c
            tau = tau + (0.5 * (a - c) / den if den else 0.0)
        estimates.append(69 + 12 * np.log2(sr / tau / 440.0))
    return float(np.median(estimates)) if estimates else None


def test_estimate_midi_on_tones():
    sr = 16000
    t = np.arange(sr) / sr
    for midi in (33, 60, 93):
        f = 440 * 2 ** ((midi - 69) / 12)
        harmonic = np.sin(2 * np.pi * f * t) + 0.5 * np.sin(4 * np.pi * f * t)  # not fooled by the octave
        assert abs(estimate_midi(harmonic, sr) - midi) < 0.2  # lag resolution at 1.8 kHz: ~9 samples
    assert estimate_midi(np.zeros(sr), sr) is None


def test_decimate3_keeps_passband_rejects_alias():
    sr = 48000
    t = np.arange(sr) / sr
    low = demo.decimate3(np.sin(2 * np.pi * 1000 * t).astype(np.float32))
    assert len(low) == sr // 3
    # amplitude kept and the tone is still 1 kHz at 16 kHz
    assert abs(np.abs(low[200:-200]).max() - 1.0) < 0.01
    assert abs(estimate_midi(low, 16000) - (69 + 12 * np.log2(1000 / 440))) < 0.05
    # 12 kHz would alias to 4 kHz at 16 kHz: it must be filtered away
    high = demo.decimate3(np.sin(2 * np.pi * 12000 * t).astype(np.float32))
    assert np.abs(high[200:-200]).max() < 1e-3


def test_program_table_is_consistent():
    programs = [p.program for ps in demo.PROGRAMS.values() for p in ps]
    assert len(programs) == len(set(programs)), "a GM program in two families"
    assert list(demo.PROGRAMS) == demo.FAMILIES
    names = demo.instrument_names()
    assert names[0] == "keyboard_acoustic_000" and names[4] == "keyboard_electronic_000"
    for family in demo.FAMILIES:
        assert len(demo.PROGRAMS[family]) >= 5  # >= 3 train programs, 1 valid, 1 test
        split = demo.split_programs(family)
        assert {p.program for p in split["train"]}.isdisjoint({p.program for p in split["valid"] + split["test"]})
        assert all(p.source in demo.SOURCES and set(p.qualities) <= set(demo.QUALITIES) for p in demo.PROGRAMS[family])


def test_clip_instruments_are_train_programs_only():
    """The MTAT-layout clips are pretraining audio: no valid/test instrument may play in them."""
    held_out = {p.program for f in demo.FAMILIES for s in ("valid", "test") for p in demo.split_programs(f)[s]}
    in_clips = {prog for progs in demo.CLIP_INSTRUMENTS.values() for prog in progs}
    assert {1, 27, 49, 53} <= held_out  # the four the clips used to play
    assert in_clips.isdisjoint(held_out), sorted(in_clips & held_out)


def test_plan_is_deterministic_and_spread():
    cfg = demo.DemoConfig(notes_per_instrument=8, seed=3)
    ex1, tasks1 = demo.plan_notes(cfg, "/r")
    ex2, tasks2 = demo.plan_notes(cfg, "/r")
    assert ex1 == ex2 and tasks1 == tasks2
    assert demo.plan_notes(demo.DemoConfig(notes_per_instrument=8, seed=4), "/r")[0] != ex1
    # one pitch per equal band of the family's range: 8 distinct pitches per instrument, spread
    by_inst: dict[str, list[int]] = {}
    for e in ex1["train"].values():
        by_inst.setdefault(e["instrument_str"], []).append(e["pitch"])
    lo, hi = demo.PITCH_RANGE["keyboard"]
    keys = sorted(by_inst["keyboard_acoustic_000"])
    assert len(set(keys)) == 8 and keys[0] < lo + (hi - lo) / 8 + 1 and keys[-1] > hi - (hi - lo) / 8 - 1
    # organ programs that sound an octave low are played an octave up
    organ = {t[1]: t[2] - e for t in tasks1 for e in [int(os.path.basename(t[0])[:-4].split("-")[1])] if t[1] in (16, 20)}
    assert organ == {16: 12, 20: 0}
    assert demo.nsynth_note(73, 72, 100).tobytes() == demo.nsynth_note(73, 72, 100).tobytes()


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    cfg = demo.DemoConfig(notes_per_instrument=1, programs_per_family=3, clips=16, clip_seconds=2.0, seed=0)
    summary = demo.build_demo(str(base / "out"), root=str(base / "src"), cfg=cfg, workers=1, progress=False)
    return base, cfg, summary


def test_demo_nsynth_pitch_family_and_held_out_instruments(tiny_demo):
    base, cfg, summary = tiny_demo
    rep = summary["reports"]["nsynth"]
    assert rep["files_in"] == rep["samples_written"] == 33 and rep["files_skipped"] == []
    family_of = {p.program: f for f, ps in demo.PROGRAMS.items() for p in ps}
    instruments: dict[str, set[int]] = {}
    bad_pitch = []
    for split in ("train", "valid", "test"):
        samples = read_shards(str(base / "out" / "nsynth"), split)
        assert len(samples) == 11  # one program per family per split at this size
        fams = set()
        for key, s in samples.items():
            lab = s["meta"]["labels"]
            assert s["sr"] == 16000 and s["audio"].shape == (1, 64000)
            assert lab["instrument_family_str"] == family_of[lab["instrument"]]
            assert demo.FAMILIES[lab["instrument_family"]] == lab["instrument_family_str"]
            assert lab["velocity"] in demo.VELOCITIES
            lo, hi = demo.PITCH_RANGE[lab["instrument_family_str"]]
            assert lo <= lab["pitch"] <= hi
            assert key == f"nsynth-{lab['instrument_str']}-{lab['pitch']:03d}-{lab['velocity']:03d}"
            fams.add(lab["instrument_family_str"])
            instruments.setdefault(split, set()).add(lab["instrument"])
            midi = estimate_midi(s["audio"][0], 16000)
            if midi is None or abs(midi - lab["pitch"]) > 1.0:
                bad_pitch.append((key, midi))
        assert fams == set(demo.FAMILIES)
    assert bad_pitch == []
    assert instruments["train"].isdisjoint(instruments["valid"] | instruments["test"])
    assert instruments["valid"].isdisjoint(instruments["test"])
    with open(base / "out" / "nsynth" / "train.manifest.json") as f:
        labels = json.load(f)["labels"]
    assert labels["instrument_family_str"]["names"] == demo.FAMILIES
    # the layout on disk is NSynth's own: examples.json keyed by note_str, wav per note
    with open(base / "src" / "nsynth" / "nsynth-valid" / "examples.json") as f:
        ex = json.load(f)
    note_str, entry = sorted(ex.items())[0]
    assert entry["note_str"] == note_str and entry["sample_rate"] == 16000
    assert os.path.isfile(base / "src" / "nsynth" / "nsynth-valid" / "audio" / f"{note_str}.wav")


def test_demo_mtat_clips_and_tags(tiny_demo):
    base, cfg, summary = tiny_demo
    rep = summary["reports"]["mtat"]
    assert rep["files_in"] == rep["samples_written"] == 16 and rep["files_skipped"] == []
    assert {s: v["samples"] for s, v in rep["splits"].items()} == {"train": 12, "valid": 1, "test": 3}
    from shard_tools.mtat import read_annotations

    tags, rows = read_annotations(str(base / "src" / "mtat" / "annotations_final.csv"))
    assert tags == demo.CLIP_TAGS
    by_id = {cid: (path, t) for cid, path, t in rows}
    with open(base / "out" / "mtat" / "train.manifest.json") as f:
        vocab = json.load(f)["labels"]["tags"]["names"]
    for split in ("train", "valid", "test"):
        for key, s in read_shards(str(base / "out" / "mtat"), split).items():
            meta = s["meta"]
            path, clip_tags = by_id[meta["clip_id"]]
            assert meta["source"] == path and path[0] in "0123456789abcdef"
            assert meta["labels"]["tags"] == [t for t in vocab if t in clip_tags]
            assert sum(t in clip_tags for t in demo.TEMPO_TAGS) == 1
            n_inst = sum(t in clip_tags for t in demo.CLIP_INSTRUMENTS)
            assert 1 <= n_inst <= 3 and ("solo" in clip_tags) == (n_inst == 1)
            assert s["sr"] == 16000 and abs(s["audio"].shape[1] - 32000) <= 1152  # mp3 frame padding
            assert np.abs(s["audio"]).max() > 0.1  # music, not silence


def test_demo_same_seed_same_bytes(tiny_demo, tmp_path):
    base, cfg, summary = tiny_demo
    again = demo.build_demo(str(tmp_path / "out"), root=None, cfg=cfg, workers=2, progress=False)
    for name in ("nsynth", "mtat"):
        for split in ("train", "valid", "test"):
            with open(base / "out" / name / f"{split}.manifest.json") as f1, \
                    open(tmp_path / "out" / name / f"{split}.manifest.json") as f2:
                assert [s["sha256"] for s in json.load(f1)["shards"]] == [s["sha256"] for s in json.load(f2)["shards"]]
    assert again["root"] is None  # rendered in a temporary folder, removed afterwards


def test_demo_rerun_reuses_render_and_shards(tiny_demo, capsys):
    base, cfg, _ = tiny_demo
    again = demo.build_demo(str(base / "out"), root=str(base / "src"), cfg=cfg, workers=1, progress=False)
    assert again["counts"]["reused"] is True
    assert all(r.get("up_to_date") for r in again["reports"].values())


def test_demo_refuses_a_root_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mtat").mkdir()
    (tmp_path / "mtat" / "annotations_final.csv").write_text("precious")
    code = cli_main(["demo", "--out", str(tmp_path / "out"), "--root", str(tmp_path), "--clips", "16",
                     "--notes-per-instrument", "1", "--programs-per-family", "3", "--workers", "1", "--quiet"])
    assert code == 2 and "files the demo did not write" in capsys.readouterr().err
    assert (tmp_path / "mtat" / "annotations_final.csv").read_text() == "precious"


def test_demo_cli_help_and_bad_flags(capsys):
    assert cli_main(["demo", "--out", "x", "--clips", "3"]) == 2
    assert "--clips must be >= 16" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "shard_tools", "demo", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--notes-per-instrument" in proc.stdout


def _negated_soundfont(src: str, dst: str) -> None:
    """A copy of the SoundFont ``src`` whose 16-bit sample data are negated: every note it renders
    is the original's upside down (synthesis is linear in the samples), so it is audibly another
    soundfont with the same programs, ranges and envelopes."""
    data = bytearray(open(src, "rb").read())
    at = data.index(b"smpl")
    size = int.from_bytes(data[at + 4 : at + 8], "little")
    samples = np.frombuffer(bytes(data[at + 8 : at + 8 + size]), dtype="<i2").astype(np.int32)
    data[at + 8 : at + 8 + size] = np.clip(-samples, -32768, 32767).astype("<i2").tobytes()
    open(dst, "wb").write(bytes(data))


def test_soundfont_flag_renders_with_the_given_file_and_names_a_bad_one(tmp_path, capsys):
    other = str(tmp_path / "negated.sf2")
    _negated_soundfont(demo.soundfont_path(), other)
    default = demo.nsynth_note(73, 69, 100)
    negated = demo.nsynth_note(73, 69, 100, demo.soundfont_path(other))
    assert np.abs(default).max() > 0.05
    np.testing.assert_allclose(negated, -default, atol=2e-3)  # int16 rounding of the file's samples
    assert np.array_equal(demo.nsynth_note(73, 69, 100), default)  # the default is back: no stale soundfont

    flags = ["--clips", "16", "--clip-seconds", "1", "--notes-per-instrument", "1", "--programs-per-family", "3",
             "--workers", "1", "--quiet"]
    assert cli_main(["demo", "--out", str(tmp_path / "o"), "--root", str(tmp_path / "src"), "--soundfont", other,
                     *flags]) == 0
    src = tmp_path / "src" / "nsynth" / "nsynth-test"
    note = sorted((src / "audio").iterdir())[0]
    meta = json.load(open(src / "examples.json"))[note.stem]
    import soundfile as sf

    written, _ = sf.read(str(note), dtype="float32")
    expected = demo.nsynth_note(meta["instrument"], meta["pitch"], meta["velocity"])
    assert np.abs(written + expected).max() < 3e-3 < np.abs(written - expected).max()
    assert json.load(open(tmp_path / "src" / "demo_config.json"))["soundfont"] == other

    (tmp_path / "notes.txt").write_text("not a soundfont")
    for path, message in ((str(tmp_path / "missing.sf2"), "no such file"),
                          (str(tmp_path / "notes.txt"), "not a SoundFont 2 file")):
        assert cli_main(["demo", "--out", str(tmp_path / "x"), "--soundfont", path, *flags]) == 2
        err = capsys.readouterr().err
        assert f"--soundfont {path}: {message}" in err and len(err.strip().splitlines()) == 1
