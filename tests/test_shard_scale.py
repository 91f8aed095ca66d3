"""The shard builder at scale (issue 16): long files in bounded memory, corpora in buckets, plans.

- Block-wise conversion gives the bytes of the whole-file path (resample_poly over the whole
  signal, then one encode), and the builder's peak RSS on a 20-minute file stays that of a short
  file (a control run with one block per file shows the measurement would see the difference).
- ``--root`` may be a bucket URL (moto): the shards equal those of the same corpus on disk.
- ``shard-tools plan`` lists the corpus once; a ``--slice`` built from the plan opens only its own
  items' audio, lists nothing under ``--root``, and writes what a slice running the recipe writes.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from pipeline import fsio
from pipeline.audio import encode_audio, resample, to_mono
from shard_tools import convert
from shard_tools.build import build_dataset, stable_hash
from shard_tools.cli import main as cli_main
from shard_tools.convert import BlockResampler, Convert, Spooled, process_item
from shard_tools.recipe import Item
from tests.conftest import make_bucket, write_tone
from tests.fixtures_layouts import folder_recipe, shard_samples, tars

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("rates", [(44100, 16000), (22050, 16000), (16000, 22050), (48000, 44100), (16000, 8000)])
def test_block_resampler_is_bit_identical_to_one_call(rates):
    from scipy.signal import resample_poly

    rng = np.random.default_rng(sum(rates))
    for frames in (37, 4410, 250_001):
        x = (0.3 * rng.standard_normal((2, frames))).astype(np.float32)
        r = BlockResampler(*rates, min_block=5000)
        out, i = [], 0
        while i < frames:  # blocks of uneven sizes, as a decoder may return them
            n = int(rng.integers(500, 40_000))
            out.append(r.push(x[:, i:i + n]))
            i += n
        out.append(r.finish())
        got = np.concatenate(out, axis=1)
        g = np.gcd(*rates)
        want = resample_poly(x, rates[1] // g, rates[0] // g, axis=-1).astype(np.float32)
        assert got.dtype == np.float32 and np.array_equal(got, want), (rates, frames)


@pytest.mark.parametrize("codec", ["flac", "wav"])
def test_block_conversion_gives_the_whole_file_bytes(tmp_path, monkeypatch, codec):
    # small blocks and spool threshold, so that a 3 s file takes many blocks and goes through a temp file
    monkeypatch.setattr(convert, "BLOCK_FRAMES", 5000)
    monkeypatch.setattr(convert, "SPOOL_BYTES", 60_000)
    write_tone(str(tmp_path / "a.wav"), freq=441.0, seconds=3.0, sample_rate=44100, channels=2)
    audio = sf.read(str(tmp_path / "a.wav"), dtype="float32", always_2d=True)[0].T  # as decoded (16-bit)
    seg = Item(path=str(tmp_path / "a.wav"), source="a.wav", split="train", id="a", key="a-1", segment=(0.7, 2.3))
    whole = Item(path=str(tmp_path / "a.wav"), source="a.wav", split="train", id="a", key="a-0")
    conv = Convert("t", codec, 16000, True, spool_dir=str(tmp_path))
    for item, span in ((whole, slice(None)), (seg, slice(round(0.7 * 44100), round(2.3 * 44100)))):
        res = process_item(item, conv)
        assert res[0] == "ok", res
        payload = res[1]
        data = open(payload.path, "rb").read() if isinstance(payload, Spooled) else payload
        assert isinstance(payload, Spooled) == (item is whole)  # 3 s of 16 kHz 16-bit: 96 kB; 1.6 s: 51 kB
        want = encode_audio(resample(to_mono(audio[:, span]), 44100, 16000), 16000, codec)
        assert data == want
        json_meta = json.loads(res[2])
        assert json_meta["num_samples"] == sf.info(io.BytesIO(data)).frames
        convert.discard_result(res)
    assert not [n for n in os.listdir(tmp_path) if "spool" in n]


_RSS_SCRIPT = """
import json, resource, sys
sys.path.insert(0, {repo!r})

def peak_mb():
    # VmHWM: the peak RSS of this address space. ru_maxrss would not do: Linux keeps it across
    # exec, so it starts at the RSS of the (large) test process that forked this one
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

from shard_tools import convert
from shard_tools.build import build_dataset
from tests.fixtures_layouts import folder_recipe
mode, jobs = sys.argv[1], sys.argv[2:]
if mode == "whole":  # control: the file in one block, the sample through the pipe (what the builder did before)
    convert.BLOCK_FRAMES, convert.SPOOL_BYTES = 1 << 31, 1 << 40
for root, out in zip(jobs[0::2], jobs[1::2]):  # one after the other: the peak after each
    rep = build_dataset(folder_recipe(root, valid_fraction=0.0, test_fraction=0.0), out, codec="wav",
                        sample_rate=8000, mono=True, workers=1, progress=False)
    print(json.dumps({{"rss_mb": peak_mb(),
                      "seconds": rep["seconds"], "samples": rep["samples_written"]}}))
"""


def _peak_rss(mode: str, *jobs: str) -> list[dict]:
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT.format(repo=REPO), mode, *jobs], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.strip().splitlines()[-len(jobs) // 2:]]


def test_peak_memory_is_flat_on_a_20_minute_file(tmp_path):
    short, long_ = tmp_path / "short", tmp_path / "long"
    write_tone(str(short / "a.wav"), freq=440.0, seconds=10.0, sample_rate=16000)
    os.makedirs(long_)
    sr, frames = 16000, 20 * 60 * 16000
    with sf.SoundFile(str(long_ / "a.wav"), "w", samplerate=sr, channels=1, subtype="PCM_16") as f:
        t = np.arange(1 << 20) / sr
        block = (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
        for start in range(0, frames, block.size):  # written in blocks: the test itself stays small
            f.write(block[:min(block.size, frames - start)])
    a, b = _peak_rss("blocks", str(short), str(tmp_path / "o1"), str(long_), str(tmp_path / "o2"))
    assert a["samples"] == b["samples"] == 1 and abs(b["seconds"] - 1200.0) < 1e-3
    # 20 min of 16 kHz audio is 77 MB as float32 in one piece; the block-wise build stays flat
    assert b["rss_mb"] - a["rss_mb"] < 20, (a, b)
    c, d = _peak_rss("whole", str(short), str(tmp_path / "o3"), str(long_), str(tmp_path / "o4"))
    assert d["rss_mb"] - c["rss_mb"] > 80, (c, d)  # the measurement sees whole-file decoding
    assert tars(str(tmp_path / "o2")) == tars(str(tmp_path / "o4"))  # and the bytes are the same
    print(f"\npeak RSS, 10 s file -> 20 min file: blocks {a['rss_mb']:.0f} -> {b['rss_mb']:.0f} MB, "
          f"whole-file control {c['rss_mb']:.0f} -> {d['rss_mb']:.0f} MB")


# ---------------------------------------------------------------------------------------------
# corpora in buckets, plans


def corpus(root: str, n: int = 18) -> None:
    for i in range(n):
        write_tone(os.path.join(root, f"g{i % 3}", f"t{i:02d}.{'wav' if i % 2 else 'flac'}"), freq=200.0 + 29 * i,
                   seconds=0.4, sample_rate=22050)
    open(os.path.join(root, "g0", "empty.wav"), "wb").close()


def folder_args(root: str, out: str, *extra: str) -> list[str]:
    return ["folder", "--root", root, "--out", out, "--valid-fraction", "0.25", "--test-fraction", "0.25", *extra]


BUILD = ["--workers", "1", "--quiet", "--sample-rate", "16000", "--mono", "--shard-size", "20kB"]


def test_root_in_a_bucket_gives_the_shards_of_the_same_corpus_on_disk(moto_s3, tmp_path):
    import s3fs

    root = str(tmp_path / "src")
    corpus(root)
    make_bucket("musicssl-corpus")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    fs.put(root + "/", "musicssl-corpus/tones/", recursive=True)
    local, remote = str(tmp_path / "local"), str(tmp_path / "remote")
    assert cli_main(["build", *folder_args(root, local), *BUILD]) == 0
    assert cli_main(["build", *folder_args("s3://musicssl-corpus/tones", remote), *BUILD]) == 0
    assert tars(remote) == tars(local) and len(tars(local)) >= 4
    rep = json.load(open(os.path.join(remote, "build-report.json")))
    assert rep["files_in"] == 19 and rep["samples_written"] == 18
    assert [s["path"] for s in rep["files_skipped"]] == ["s3://musicssl-corpus/tones/g0/empty.wav"]
    assert rep["files_skipped"][0]["reason"].startswith("empty file")

    # plan from the bucket into the bucket, two slices from the plan, merge: the same samples
    plan, out = "s3://musicssl-corpus/tones.plan.json.gz", "s3://musicssl-corpus/shards"
    assert cli_main(["plan", "folder", "--root", "s3://musicssl-corpus/tones", "--out", plan,
                     "--valid-fraction", "0.25", "--test-fraction", "0.25"]) == 0
    for i in range(2):
        assert cli_main(["build", "--plan", plan, "--out", out, "--slice", f"{i}/2", *BUILD]) == 0
    assert cli_main(["merge", out]) == 0
    for split in ("train", "valid", "test"):
        m = json.loads(fsio.read_bytes(f"{out}/{split}.manifest.json"))
        assert m["num_samples"] == json.load(open(os.path.join(local, f"{split}.manifest.json")))["num_samples"] > 0


_AUDIT_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
root = os.path.realpath(sys.argv[1])
seen = {{"sources": [], "listed": []}}

def hook(event, args):
    if event in ("os.listdir", "os.scandir") and args and isinstance(args[0], str) \\
            and os.path.realpath(args[0]).startswith(root):
        seen["listed"].append(args[0])

sys.addaudithook(hook)
from shard_tools import convert
real = convert._open_source

def recording(path):
    seen["sources"].append(path)  # every audio file the builder opens (libsndfile opens below Python)
    return real(path)

convert._open_source = recording
from shard_tools.cli import main
code = main(sys.argv[2:])
print(json.dumps({{"code": code, **seen}}))
"""


def test_a_slice_built_from_a_plan_reads_only_its_share(tmp_path):
    root = str(tmp_path / "src")
    corpus(root, 30)
    plan = str(tmp_path / "corpus.plan.json")
    assert cli_main(["plan", "folder", "--root", root, "--out", plan, "--valid-fraction", "0.25",
                     "--test-fraction", "0.25"]) == 0
    by_recipe = str(tmp_path / "by_recipe")
    for i in range(3):
        assert cli_main(["build", *folder_args(root, by_recipe, "--slice", f"{i}/3"), *BUILD]) == 0
    # slice 1 of 3 from the plan, in a process that records what it opens and lists
    out = str(tmp_path / "by_plan")
    res = subprocess.run([sys.executable, "-c", _AUDIT_SCRIPT.format(repo=REPO), root, "build", "--plan", plan,
                          "--out", out, "--slice", "1/3", *BUILD], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    mine = sorted(os.path.join(root, rel) for rel in (os.path.relpath(os.path.join(d, f), root)
                                                      for d, _, fs in os.walk(root) for f in fs)
                  if stable_hash(rel) % 3 == 1)
    assert seen["listed"] == [], "the slice listed the corpus"
    assert sorted(seen["sources"]) == [p for p in mine if not p.endswith("empty.wav")]
    assert 5 <= len(seen["sources"]) <= 16
    # ... and wrote exactly the shards the recipe-run slice wrote
    assert tars(out) == {n: d for n, d in tars(by_recipe).items() if "-s001of003-" in n}
    report = json.load(open(os.path.join(out, "build-report.slice-1-of-3.json")))
    assert report["samples_written"] == len(seen["sources"]) and report["recipe_options"]["valid_fraction"] == 0.25
    # the other slices' files can be gone: a plan-built slice never looks at them
    for p in (os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs):
        if p not in mine:
            os.remove(p)
    again = str(tmp_path / "by_plan_again")
    assert cli_main(["build", "--plan", plan, "--out", again, "--slice", "1/3", *BUILD]) == 0
    assert tars(again) == tars(out)
    # plan slices and recipe slices are one build for merge (same options, only --slice differs)
    for i in (0, 2):
        for n, d in tars(by_recipe).items():
            if f"-s00{i}of003-" in n:
                open(os.path.join(out, n), "wb").write(d)
        for n in os.listdir(by_recipe):
            if f".slice-{i}-of-3." in n:
                open(os.path.join(out, n), "wb").write(open(os.path.join(by_recipe, n), "rb").read())
    assert cli_main(["merge", out]) == 0
    assert set(shard_samples(out)) == set(shard_samples(by_recipe))


def test_slices_agree_where_the_corpus_is_mounted_elsewhere(tmp_path):
    """Two machines, two mount points: every file, written or skipped, is in exactly one slice."""
    import shutil

    a, b = str(tmp_path / "mnt_a" / "corpus"), str(tmp_path / "elsewhere" / "data")
    corpus(a, 8)
    for i in range(8):
        open(os.path.join(a, f"g{i % 3}", f"empty{i}.wav"), "wb").close()
    shutil.copytree(a, b)
    out, whole = str(tmp_path / "out"), str(tmp_path / "whole")
    assert cli_main(["build", *folder_args(a, whole), *BUILD]) == 0
    assert cli_main(["build", *folder_args(a, out, "--slice", "0/2"), *BUILD]) == 0
    assert cli_main(["build", *folder_args(b, out, "--slice", "1/2"), *BUILD]) == 0
    assert cli_main(["merge", out]) == 0
    merged, ref = (json.load(open(os.path.join(d, "build-report.json"))) for d in (out, whole))
    assert (merged["files_in"], merged["samples_written"]) == (ref["files_in"], ref["samples_written"]) == (17, 8)
    assert sorted(os.path.basename(s["path"]) for s in merged["files_skipped"]) == sorted(
        [f"empty{i}.wav" for i in range(8)] + ["empty.wav"])


def test_plan_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["build", "--plan", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "nope.json: file not found" in err and "shard-tools plan" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    assert cli_main(["build", "--plan", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")]) == 2
    assert "not a musicssl-plan/1 file" in capsys.readouterr().err
