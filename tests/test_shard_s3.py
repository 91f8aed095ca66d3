"""Shards straight to a bucket: build, crash + resume, verify and info against a local moto S3."""

from __future__ import annotations

import json
import os

import pytest

from pipeline import fsio
from shard_tools.build import build_dataset
from shard_tools.cli import main as cli_main
from shard_tools.writer import ShardWriter
from tests.conftest import make_bucket, write_tone
from tests.fixtures_layouts import folder_recipe


def recipe(root: str):
    return folder_recipe(root, valid_fraction=0.25, test_fraction=0.0)


def test_s3_round_trip_with_resume(moto_s3, tmp_path, capsys, monkeypatch):
    root = str(tmp_path / "src")
    for i in range(12):
        write_tone(os.path.join(root, f"d{i % 2}", f"t{i}.wav"), freq=250 + 40 * i, seconds=0.4,
                   sample_rate=22050, channels=2)
    open(os.path.join(root, "d0", "broken.wav"), "wb").write(b"RIFF\x00\x00")
    make_bucket("musicssl-shards")
    url = "s3://musicssl-shards/sets/tones"
    local = str(tmp_path / "local")
    ref = build_dataset(recipe(root), local, shard_size=8000, sample_rate=16000, mono=True, seed=5, progress=False)
    assert ref["shards"] >= 4

    # crash while publishing the third shard: earlier shards stay, nothing half-written is visible
    real_publish = ShardWriter.publish
    calls = {"n": 0}

    def failing_publish(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ConnectionAbortedError("simulated crash before the upload")
        return real_publish(self)

    monkeypatch.setattr(ShardWriter, "publish", failing_publish)
    with pytest.raises(ConnectionAbortedError):
        build_dataset(recipe(root), url, shard_size=8000, sample_rate=16000, mono=True, seed=5, progress=False)
    monkeypatch.setattr(ShardWriter, "publish", real_publish)
    listed = fsio.list_dir(url)
    assert len([n for n in listed if n.endswith(".tar")]) == 2 and ".build-progress.json" in listed
    assert not [n for n in listed if "manifest" in n]

    # the same command through the CLI resumes into the bucket
    code = cli_main(["build", "folder", "--root", root, "--out", url, "--shard-size", "8000", "--sample-rate",
                     "16000", "--mono", "--seed", "5", "--valid-fraction", "0.25", "--test-fraction", "0",
                     "--workers", "1", "--quiet"])
    assert code == 0
    report = json.loads(fsio.read_bytes(fsio.join_url(url, "build-report.json")))
    assert report["shards_kept_from_earlier_run"] == 2
    assert report["files_in"] == 13 and report["samples_written"] == 12
    assert [s["reason"].split(":")[0] for s in report["files_skipped"]] == ["not decodable audio"]
    assert ".build-progress.json" not in fsio.list_dir(url)
    # byte-identical to the local build of the same inputs
    for split in ("train", "valid"):
        remote_m = json.loads(fsio.read_bytes(fsio.join_url(url, f"{split}.manifest.json")))
        local_m = json.load(open(os.path.join(local, f"{split}.manifest.json")))
        assert remote_m["shards"] == local_m["shards"]
        for s in remote_m["shards"]:
            assert fsio.read_bytes(fsio.join_url(url, s["url"])) == open(os.path.join(local, s["url"]), "rb").read()

    capsys.readouterr()
    assert cli_main(["verify", url, "--quiet"]) == 0
    assert "12 samples" in capsys.readouterr().out
    assert cli_main(["info", url]) == 0
    info = capsys.readouterr().out
    assert "train" in info and "valid" in info and "1 files skipped" in info
    # a damaged object in the bucket fails verification, naming it
    first = json.loads(fsio.read_bytes(fsio.join_url(url, "train.manifest.json")))["shards"][0]["url"]
    data = bytearray(fsio.read_bytes(fsio.join_url(url, first)))
    data[1500] ^= 1
    fsio.write_bytes_atomic(fsio.join_url(url, first), bytes(data))
    assert cli_main(["verify", url, "--quiet"]) == 1
    assert first in capsys.readouterr().err
