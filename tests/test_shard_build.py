"""The generic shard builder: determinism, resume after SIGKILL, verify, slices + merge, CLI errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import soundfile as sf

from shard_tools.build import build_dataset
from shard_tools.convert import Convert
from shard_tools.workers import Processor
from shard_tools.recipe import Item
from shard_tools.cli import main as cli_main
from shard_tools.verify import verify
from tests.conftest import crash_on_marker, write_tone
from tests.fixtures_layouts import folder_recipe, shard_samples, tars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tree(root: str, n: int, *, seconds: float = 0.5, bad: bool = True) -> dict[str, float]:
    """``n`` tones of distinct pitch in mixed formats / rates / channel counts, plus bad files.
    Returns {relative path: frequency} of the good files."""
    freqs = {}
    fmts = ["wav", "flac", "ogg"]
    rates = [16000, 22050, 44100]
    for i in range(n):
        rel = f"{'abc'[i % 3]}/tone{i:03d}.{fmts[i % 3]}"
        freq = 200.0 + 37.0 * i
        write_tone(os.path.join(root, rel), freq=freq, seconds=seconds, sample_rate=rates[(i // 3) % 3],
                   channels=1 + i % 2)
        freqs[rel] = freq
    if bad:
        open(os.path.join(root, "a", "empty.wav"), "wb").close()
        with open(os.path.join(root, "b", "notes.mp3"), "w") as f:
            f.write("this is not audio\n" * 20)
        with open(os.path.join(root, "a", "tone000.wav"), "rb") as f:
            whole = f.read()
        with open(os.path.join(root, "c", "cut.wav"), "wb") as f:
            f.write(whole[: len(whole) // 2])
        with open(os.path.join(root, "c", "cut.flac"), "wb") as f:
            f.write(open(os.path.join(root, "b", "tone001.flac"), "rb").read()[:600])
    return freqs


def manifests(out: str) -> dict[str, dict]:
    res = {}
    for n in sorted(os.listdir(out)):
        if ".manifest" in n:
            m = json.load(open(os.path.join(out, n)))
            m["build"].pop("created")
            m["build"].pop("command")  # the reference builds run in-process, without a command line
            m["build"]["options"].pop("recipe")  # ... and without the CLI's recipe options
            res[n] = m
    return res


def samples(out: str) -> dict[str, tuple[dict, np.ndarray, int]]:
    return shard_samples(out)


def f0(audio: np.ndarray, sr: int) -> float:
    x = audio.mean(0) * np.hanning(audio.shape[1])
    spec = np.abs(np.fft.rfft(x, 8 * len(x)))
    return float(np.argmax(spec) * sr / (8 * len(x)))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("src"))
    return root, make_tree(root, 18)


@pytest.fixture(scope="module")
def reference(tree, tmp_path_factory):
    """An uninterrupted single-worker build of ``tree`` (16 kHz mono FLAC, tiny shards)."""
    root, _ = tree
    out = str(tmp_path_factory.mktemp("ref"))
    report = build_dataset(folder_recipe(root), out, shard_size=12_000, sample_rate=16000, mono=True,
                           workers=1, seed=3, progress=False)
    return out, report


def test_build_values_and_report(tree, reference):
    root, freqs = tree
    out, report = reference
    # every file is accounted for: written or reported with a reason
    assert report["files_in"] == 18 + 4 == report["files_written"] + len(report["files_skipped"])
    assert report["samples_written"] == 18
    reasons = {os.path.relpath(s["path"], root): s["reason"] for s in report["files_skipped"]}
    assert set(reasons) == {"a/empty.wav", "b/notes.mp3", "c/cut.wav", "c/cut.flac"}
    assert reasons["a/empty.wav"].startswith("empty file")
    assert reasons["b/notes.mp3"].startswith("not decodable audio")
    assert reasons["c/cut.wav"].startswith("truncated")
    assert reasons["c/cut.flac"].startswith(("not decodable audio", "truncated"))
    on_disk = json.load(open(os.path.join(out, "build-report.json")))
    assert on_disk["files_skipped"] == report["files_skipped"]
    # the audio is the source tone, converted: 16 kHz mono, same pitch, same duration
    got = samples(out)
    assert len(got) == 18
    by_source = {meta["source"]: (meta, audio, sr) for meta, audio, sr in got.values()}
    assert set(by_source) == set(freqs)
    for rel, freq in freqs.items():
        meta, audio, sr = by_source[rel]
        assert sr == meta["sample_rate"] == 16000 and audio.shape[0] == meta["channels"] == 1
        assert meta["num_samples"] == audio.shape[1] == 8000
        assert abs(f0(audio, sr) - freq) < 3.0, rel
        assert meta["dataset"] == "folder" and meta["id"] == rel and meta["labels"] == {}
    # manifests: counts, seconds and sha256 match the files; shards are cut near --shard-size
    total = 0
    for name, m in manifests(out).items():
        assert m["sample_rate"] == 16000 and m["channels"] == 1 and m["codec"] == "flac"
        for s in m["shards"]:
            data = open(os.path.join(out, s["url"]), "rb").read()
            assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
            assert abs(s["seconds"] - 0.5 * s["num_samples"]) < 1e-6
        assert m["num_samples"] == sum(s["num_samples"] for s in m["shards"])
        with tarfile.open(os.path.join(out, m["shards"][0]["url"])) as tar:
            metas = [json.loads(tar.extractfile(x).read()) for x in tar.getmembers() if x.name.endswith(".json")]
        assert {meta["split"] for meta in metas} == {m["split"]}
        total += m["num_samples"]
    assert total == 18
    assert report["shards"] > 3  # 12 kB shards hold a few 0.5 s FLAC samples each
    # tar headers are fixed: no clock, owner or mode leaks in
    with tarfile.open(os.path.join(out, "train-000000.tar")) as tar:
        for mem in tar.getmembers():
            assert (mem.mtime, mem.uid, mem.gid, mem.uname, mem.gname, mem.mode) == (0, 0, 0, "", "", 0o644)


def test_rebuild_is_byte_identical_with_two_workers(tree, reference, tmp_path):
    root, _ = tree
    ref_out, ref_report = reference
    out = str(tmp_path / "w2")
    report = build_dataset(folder_recipe(root), out, shard_size=12_000, sample_rate=16000, mono=True,
                           workers=2, seed=3, progress=False)
    assert tars(out) == tars(ref_out)
    assert manifests(out) == manifests(ref_out)
    assert report["files_skipped"] == ref_report["files_skipped"]
    # another seed, built over a copy of the reference: a fresh build (the old manifests must not
    # survive to describe overwritten shards) that mixes the sources differently
    out3 = str(tmp_path / "seed4")
    shutil.copytree(ref_out, out3)
    build_dataset(folder_recipe(root), out3, shard_size=12_000, sample_rate=16000, mono=True, workers=1,
                  seed=4, progress=False)
    assert manifests(out3) != manifests(ref_out)
    assert verify(out3, progress=False)[0] == []
    assert set(samples(out3)) == set(samples(ref_out))
    # a finished build re-run with the same arguments is recognised, nothing is rewritten
    again = build_dataset(folder_recipe(root), out3, shard_size=12_000, sample_rate=16000, mono=True,
                          workers=1, seed=4, progress=False)
    assert again.get("up_to_date") is True


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    root = str(tmp_path / "src")
    make_tree(root, 40, seconds=0.5, bad=False)
    ref = str(tmp_path / "ref")
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "shard_tools", "build", "folder", "--root", root, "--out", out, "--workers", "1",
           "--shard-size", "30kB", "--mono", "--seed", "1", "--quiet"]
    build_dataset(folder_recipe(root, valid_fraction=0.1, test_fraction=0.1), ref, shard_size=30_000,
                  mono=True, workers=1, seed=1, progress=False)
    n_ref = len(tars(ref))
    assert n_ref >= 10
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(out) and len([n for n in os.listdir(out) if n.endswith(".tar")]) >= 2:
            break
        time.sleep(0.002)
    assert proc.poll() is None, f"build finished before it could be killed: {proc.stderr.read()!r}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # killed mid-build: no report, the progress file is there, and every visible shard is complete
    names = os.listdir(out)
    assert "build-report.json" not in names and ".build-progress.json" in names
    visible = tars(out)
    assert 2 <= len(visible) < n_ref
    reference_tars = tars(ref)
    for name, data in visible.items():
        assert data == reference_tars[name], f"{name} is visible but differs from the uninterrupted build"
    # the same command again finishes the job, keeping the shards already done
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert tars(out) == reference_tars
    assert manifests(out) == manifests(ref)
    report = json.load(open(os.path.join(out, "build-report.json")))
    assert report["shards_kept_from_earlier_run"] >= 1
    assert report["files_in"] == report["files_written"] == 40
    assert not [n for n in os.listdir(out) if n.startswith(".")], "temp or progress files left behind"


def test_verify_catches_a_flipped_byte(reference, tmp_path, capsys):
    ref_out, _ = reference
    out = str(tmp_path / "copy")
    shutil.copytree(ref_out, out)
    assert cli_main(["verify", out, "--quiet"]) == 0
    problems, stats = verify(out, progress=False)
    assert problems == [] and stats["samples"] == 18
    # a folder of dataset folders (as `shard-tools demo` writes) is searched one level down
    assert verify(str(tmp_path), progress=False)[1]["samples"] == 18
    victim = sorted(n for n in os.listdir(out) if n.startswith("train-"))[1]
    path = os.path.join(out, victim)
    data = bytearray(open(path, "rb").read())
    data[2000] ^= 0x40  # inside the first sample's FLAC stream
    open(path, "wb").write(bytes(data))
    capsys.readouterr()
    assert cli_main(["verify", out, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert victim in err and "sha256" in err
    # a truncated shard is caught too (size, and the members that are gone)
    open(path, "wb").write(bytes(data[:4096]))
    problems, _ = verify(out, progress=False)
    assert any(victim in p and "bytes" in p for p in problems)


def test_slices_and_merge_equal_the_whole(tree, reference, tmp_path, capsys):
    root, _ = tree
    ref_out, ref_report = reference
    out = str(tmp_path / "sliced")
    recipe = folder_recipe(root)
    reports = [build_dataset(recipe, out, shard_size=12_000, sample_rate=16000, mono=True, workers=1, seed=3,
                             slice_index=i, num_slices=3, progress=False) for i in range(3)]
    assert sum(r["samples_written"] for r in reports) == 18
    assert sum(r["files_in"] for r in reports) == ref_report["files_in"]
    assert all(n.startswith(("train-s", "valid-s", "test-s")) for n in tars(out))
    assert not [n for n in os.listdir(out) if n.endswith(".manifest.json")], "a slice must not write a whole manifest"
    # merge refuses while a slice is missing, naming its manifest
    os.rename(os.path.join(out, "train.manifest.slice-1-of-3.json"), os.path.join(out, "hidden"))
    assert cli_main(["merge", out]) == 2
    assert "train.manifest.slice-1-of-3.json" in capsys.readouterr().err
    os.rename(os.path.join(out, "hidden"), os.path.join(out, "train.manifest.slice-1-of-3.json"))
    assert cli_main(["merge", out]) == 0
    merged, whole = manifests(out), manifests(ref_out)
    for split in ("train", "valid", "test"):
        a, b = merged[f"{split}.manifest.json"], whole[f"{split}.manifest.json"]
        assert (a["num_samples"], round(a["seconds"], 3)) == (b["num_samples"], round(b["seconds"], 3))
    assert set(samples(out)) == set(samples(ref_out))
    rep = json.load(open(os.path.join(out, "build-report.json")))
    assert rep["files_in"] == ref_report["files_in"] and rep["samples_written"] == 18
    # one report schema: the merged report has every field of a whole build's (but its fingerprint)
    assert set(ref_report) - set(rep) == {"fingerprint"} and rep["merged_slices"] == 3
    assert (rep["codec"], rep["sample_rate"], rep["mono"], rep["seed"]) == ("flac", 16000, True, 3)
    assert sorted(s["path"] for s in rep["files_skipped"]) == sorted(s["path"] for s in ref_report["files_skipped"])
    problems, stats = verify(out, progress=False)
    assert problems == [] and stats["samples"] == 18
    # partial manifests named one by one, merged elsewhere: the shard URLs become absolute
    elsewhere = str(tmp_path / "merged")
    partials = [os.path.join(out, f"valid.manifest.slice-{i}-of-3.json") for i in range(3)]
    assert cli_main(["merge", *partials, "--out", elsewhere]) == 0
    m = json.load(open(os.path.join(elsewhere, "valid.manifest.json")))
    assert all(s["url"].startswith(out) for s in m["shards"])
    assert m["num_samples"] == merged["valid.manifest.json"]["num_samples"]
    assert verify(elsewhere, progress=False)[0] == []


def test_cli_errors_name_the_problem(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exc:
        cli_main(["build", "folder", "--root", missing, "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert missing in capsys.readouterr().err
    os.makedirs(tmp_path / "txt")
    (tmp_path / "txt" / "readme.txt").write_text("no audio here")
    assert cli_main(["build", "folder", "--root", str(tmp_path / "txt"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "no audio files" in capsys.readouterr().err
    write_tone(str(tmp_path / "one" / "x.wav"))
    csv_path = str(tmp_path / "labels.csv")
    assert cli_main(["build", "folder", "--root", str(tmp_path / "one"), "--out", str(tmp_path / "o"),
                     "--labels", csv_path, "--quiet"]) == 2
    assert csv_path in capsys.readouterr().err
    assert cli_main(["build", "nosuchset", "--root", ".", "--out", "x"]) == 2
    assert "nosuchset" in capsys.readouterr().err
    assert cli_main(["verify", str(tmp_path / "one")]) == 2
    assert "manifest" in capsys.readouterr().err
    # every file undecodable: nothing written is an error, with the count
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.wav").write_bytes(b"RIFF....garbage")
    assert cli_main(["build", "folder", "--root", str(tmp_path / "bad"), "--out", str(tmp_path / "ob"),
                     "--quiet", "--workers", "1"]) == 1
    assert "all 1 input files were skipped" in capsys.readouterr().err


def test_benchmark_quick_prints_ratio_json():
    res = subprocess.run([sys.executable, "benchmarks/shard_build.py", "--quick", "--workers", "1"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["samples_written"] == last["files"]
    if last["source"].startswith("demo"):  # 4 s NSynth notes + four 2 s MTAT-layout clips
        assert abs(last["audio_hours"] * 3600 - (4.0 * (last["files"] - 4) + 2.0 * 4)) < 1.0
    else:  # four 2 s clips
        assert last["files"] == 4 and abs(last["audio_hours"] * 3600 - 8.0) < 0.5
    assert 0 < last["ratios"]["shard_build_vs_tight_loop"] < 10


def test_a_crashing_worker_costs_one_item_not_the_build():
    items = [Item(path=f"/src/{i}" + ("POISON" if i == 5 else ""), source=str(i), split="train", id=str(i),
                  key=f"k{i}") for i in range(12)]
    proc = Processor(crash_on_marker, Convert("t", "flac", None, False), 2)
    try:
        res = list(proc.run(items))
    finally:
        proc.close()
    assert [r[1] if r[0] == "ok" else "skipped" for r in res] == [f"k{i}" if i != 5 else "skipped" for i in range(12)]
    assert res[5][1].startswith("decoder crashed")


def test_segments_read_their_span(tmp_path):
    """Segment items (MusicNet-style) hold exactly their span of the source, at the right pitch."""
    from shard_tools.recipe import Recipe

    sr = 8000
    t = np.arange(sr) / sr
    audio = np.concatenate([0.5 * np.sin(2 * np.pi * f * t) for f in (300.0, 500.0, 700.0)]).astype(np.float32)
    path = str(tmp_path / "piece.flac")
    sf.write(path, audio, sr)
    spans = [(0.0, 1.0), (1.0, 2.0), (2.0, 4.0), (3.5, 5.0)]  # the third runs past the end, the fourth starts past it
    items = [Item(path=path, source="piece.flac", split="train", id=f"piece-{i}", key=f"piece-{i}", segment=span)
             for i, span in enumerate(spans)]
    out = str(tmp_path / "out")
    report = build_dataset(Recipe(dataset="musicnet", items=items, skipped=[], files_in=1), out, codec="wav",
                           progress=False)
    assert (report["files_in"], report["files_written"], report["samples_written"]) == (1, 1, 3)
    assert report["files_skipped"] == []
    assert [s["key"] for s in report["segments_skipped"]] == ["piece-3"]
    assert report["segments_skipped"][0]["reason"].startswith("segment beyond end of file")
    got = samples(out)
    for key, freq, frames in (("piece-0", 300, sr), ("piece-1", 500, sr), ("piece-2", 700, sr)):
        meta, a, rate = got[key]
        assert rate == sr and a.shape[1] == meta["num_samples"] == frames
        assert abs(f0(a, rate) - freq) < 2
        assert meta["segment"] == list(spans[int(key[-1])])
    assert abs(report["seconds"] - 3.0) < 1e-6
