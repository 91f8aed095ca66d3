"""The loader, shard-tools verify and the loader benchmark against damaged, hostile or absent data
(issue 13 items 1, 7, 9, 13, 20): nothing executed, nothing used silently, no hang, no traceback."""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from pipeline.errors import UserError
from pipeline.loader import LoaderConfig, ShardUnavailableError, StreamingLoader, iter_samples
from pipeline.manifest import ManifestError, load_manifest, write_manifest
from tests import shardgen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(manifest: str, **kw) -> LoaderConfig:
    base = dict(manifests=[manifest], batch_size=3, crop_samples=800, shuffle_buffer=4, num_workers=0, seed=5)
    base.update(kw)
    return LoaderConfig(**base)


def _split(folder, n: int = 12, sizes: tuple[int, ...] = (6, 6), seed: int = 31) -> str:
    return shardgen.write_split(str(folder), shardgen.make_clips(n, sample_rate=8000, seed=seed), list(sizes))


def _rewrite_shard(manifest: str, index: int, change) -> str:
    """Rewrite shard ``index``'s members through ``change(members) -> members`` ((name, bytes)
    pairs) and record the new tar's size and sha256 in the manifest: a well-formed shard whose
    *content* is hostile. Returns the shard's path."""
    man = json.load(open(manifest))
    path = os.path.join(os.path.dirname(manifest), man["shards"][index]["url"])
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers() if m.isfile()]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in change(members):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    blob = open(path, "rb").read()
    man["shards"][index].update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    json.dump(man, open(manifest, "w"))
    return path


def _same_batches(got: list[dict], want: list[dict]) -> None:
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    assert all(torch.equal(g["audio"], w["audio"]) for g, w in zip(got, want))


# --- item 20: a deeply nested sample JSON is a counted corrupt sample, not a RecursionError ------


def _nest_json(key: str):
    def change(members):
        return [(n, b"[" * 200_000 + b"]" * 200_000 if n == f"{key}.json" else d) for n, d in members]
    return change


def test_deeply_nested_sample_json_is_a_counted_corrupt_sample(tmp_path):
    man = _split(tmp_path)
    _rewrite_shard(man, 0, _nest_json("clip-00002"))
    ld = StreamingLoader(_cfg(man))
    with pytest.warns(UserWarning, match=r"clip-00002\.json: invalid JSON \(nested too deeply\)"):
        keys = [k for b in itertools.islice(ld, ld.steps_per_epoch) for k in b["keys"]]
    assert len(keys) == 12 and "clip-00002" not in keys
    assert ld.stats()["skipped_corrupt"] == 1 and ld.stats()["substituted"] == 1
    with pytest.warns(UserWarning, match="nested too deeply"):
        rows = [s["key"] for s in iter_samples([man])]
    assert rows == [f"clip-{i:05d}" for i in range(12) if i != 2]


def test_verify_counts_nested_json_and_names_a_non_integer_count(tmp_path, capsys):
    from shard_tools.cli import main as cli_main
    from shard_tools.verify import verify

    man = _split(tmp_path)
    _rewrite_shard(man, 1, _nest_json("clip-00008"))
    problems, stats = verify(man, progress=False)
    assert [p for p in problems if "clip-00008" in p and "nested too deeply" in p], problems
    assert stats["samples"] == 12

    m = json.load(open(man))
    m["shards"][0]["num_samples"] = "6"
    json.dump(m, open(man, "w"))
    with pytest.raises(ManifestError, match=r"shard entry 0 \(train-000000.tar\): num_samples '6' is not an integer"):
        verify(man, progress=False)
    assert cli_main(["verify", man, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert man in err and "num_samples '6' is not an integer >= 0" in err and "Traceback" not in err


# --- the manifest's one reader and writer --------------------------------------------------------


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["shards"][1].pop("bytes"), r"shard entry 1 \(train-000001.tar\): bytes None is not an integer"),
    (lambda m: m["shards"][0].update(num_samples=True), r"shard entry 0 .*num_samples True is not an integer >= 0"),
    (lambda m: m["shards"][0].update(sha256="../../x"), r"shard entry 0 .*sha256 '../../x' is not the tar's hex digest"),
    (lambda m: m.update(sample_rate="fast"), r"sample_rate 'fast' is not an integer >= 1"),
    (lambda m: m.update(format="musicssl-shards/0"), r"has format 'musicssl-shards/0'"),
    (lambda m: m["labels"].update(tags={"kind": "bag"}), r"label 'tags' has kind 'bag'"),
    (lambda m: m.update(shards={}), r"has no 'shards' list"),
])
def test_manifest_errors_name_the_url_and_the_entry(tmp_path, edit, message):
    man = _split(tmp_path)
    m = json.load(open(man))
    edit(m)
    json.dump(m, open(man, "w"))
    with pytest.raises(ManifestError, match=message) as err:
        load_manifest(man)
    assert man in str(err.value) and "shard-tools build" in str(err.value) and isinstance(err.value, UserError)
    with pytest.raises(ManifestError, match=message):  # and nothing writes what the reader refuses
        write_manifest(str(tmp_path / "copy.manifest.json"), m)
    assert not os.path.exists(tmp_path / "copy.manifest.json")


def test_manifest_folder_is_told_to_give_a_manifest(tmp_path):
    _split(tmp_path)
    with pytest.raises(ManifestError, match=r"is a folder; give a <split>.manifest.json, e.g. .*train.manifest.json"):
        load_manifest(str(tmp_path))


def test_manifest_round_trip_and_unreadable_json(tmp_path):
    man = _split(tmp_path)
    record = load_manifest(man).record
    write_manifest(str(tmp_path / "again.manifest.json"), record)
    again = load_manifest(str(tmp_path / "again.manifest.json"))
    assert again.record == record and [s.bytes for s in again.shards] == [s["bytes"] for s in record["shards"]]
    open(man, "wb").write(b"{" * 100_000)
    with pytest.raises(ManifestError, match="is not valid JSON"):
        load_manifest(man)


# --- item 7: a shard is compared with its manifest entry when it is opened ------------------------


def test_shard_larger_than_its_manifest_entry_is_counted_or_raised(tmp_path):
    man = _split(tmp_path)
    with open(tmp_path / "train-000001.tar", "ab") as f:  # still a readable tar: only the size tells
        f.write(b"\0" * 10240)
    ld = StreamingLoader(_cfg(man, check_shards=False))  # the check when the shard is opened
    with pytest.warns(UserWarning, match=r"train-000001.tar: .*bytes.*manifest"):
        keys = {k for b in itertools.islice(ld, ld.steps_per_epoch) for k in b["keys"]}
    assert keys <= {f"clip-{i:05d}" for i in range(6)}, "a sample of the mismatched shard was used"
    st = ld.stats()
    # 6 positions held a sample of that shard; a substitute drawn from it is skipped and counted too
    assert st["mismatched_shards"] == 1 and st["skipped_mismatched"] >= 6 and st["substituted"] == 6
    with pytest.raises(RuntimeError, match=r"train-000001.tar.*data.on_error='raise'"):
        list(itertools.islice(StreamingLoader(_cfg(man, check_shards=False, on_error="raise")), 4))


def test_bad_sample_under_on_error_raise_in_a_worker_is_one_clear_line(tmp_path):
    from pipeline.loader import BadDataError

    man = shardgen.write_split(str(tmp_path), shardgen.make_clips(12, sample_rate=8000, seed=8), [6, 6],
                               corrupt_keys=("clip-00004",))
    with pytest.raises(BadDataError, match=r"clip-00004.*data.on_error='raise'") as err:
        list(itertools.islice(StreamingLoader(_cfg(man, num_workers=2, on_error="raise")), 8))
    assert isinstance(err.value, UserError) and "\n" not in str(err.value) and "Traceback" not in str(err.value)


# --- item 13: shards checked at start; a shard lost mid-run is a loader error the trainer catches ---


def test_start_up_check_names_a_missing_or_mismatched_shard(tmp_path):
    man = _split(tmp_path, n=18, sizes=(6, 6, 6))
    os.rename(tmp_path / "train-000001.tar", tmp_path / "moved.tar")
    with pytest.raises(ShardUnavailableError, match=r"train-000001.tar.*listed in .*train.manifest.json.*does not exist") as err:
        StreamingLoader(_cfg(man))
    assert isinstance(err.value, UserError) and "shard-tools verify" in str(err.value)
    os.rename(tmp_path / "moved.tar", tmp_path / "train-000001.tar")
    shardgen.truncate(str(tmp_path / "train-000002.tar"), 0.5)
    with pytest.raises(ShardUnavailableError, match=r"train-000002.tar.* bytes, the manifest says"):
        StreamingLoader(_cfg(man, on_error="raise"))
    with pytest.warns(UserWarning, match=r"train-000002.tar.* bytes, the manifest says"):
        StreamingLoader(_cfg(man))  # skip: its samples will be skipped and counted


@pytest.mark.parametrize("workers", [0, 2])
def test_shard_lost_mid_run_raises_a_loader_error_then_resumes_exactly(tmp_path, workers):
    man = _split(tmp_path, n=24, sizes=(6, 6, 6, 6))
    cfg = _cfg(man, num_workers=workers)
    ref = list(itertools.islice(StreamingLoader(cfg), 24))  # 3 epochs of 8 steps; each epoch reads every shard
    ld = StreamingLoader(cfg)
    got = list(itertools.islice(ld, 2))
    os.rename(tmp_path / "train-000003.tar", tmp_path / "away")
    with pytest.raises(ShardUnavailableError) as err:
        for b in itertools.islice(ld, 22):
            got.append(b)
    msg = str(err.value)
    assert "train-000003.tar" in msg and "\n" not in msg and "Traceback" not in msg
    state = ld.state_dict()  # what the trainer checkpoints before it stops
    assert state["step"] == len(got) < 16
    os.rename(tmp_path / "away", tmp_path / "train-000003.tar")
    again = StreamingLoader(cfg)
    again.load_state_dict(state)
    _same_batches(got + list(itertools.islice(again, 24 - len(got))), ref)


_EXIT_SCRIPT = """
import itertools, multiprocessing, sys
sys.path.insert(0, {repo!r})
from pipeline.loader import LoaderConfig, StreamingLoader
it = iter(StreamingLoader(LoaderConfig(manifests=[{man!r}], batch_size=3, crop_samples=800, num_workers=2)))
next(it)
multiprocessing.get_logger()  # what a library may do: it moves multiprocessing's exit handler last
print("done", flush=True)
"""


def test_exit_with_a_stream_open_after_multiprocessing_get_logger(tmp_path):
    # multiprocessing's exit handler SIGTERMs (ignored by the workers) and joins them forever; the
    # loader's own exit hook must still run first, whatever moved multiprocessing's
    man = _split(tmp_path)
    script = tmp_path / "exit.py"
    script.write_text(_EXIT_SCRIPT.format(repo=REPO, man=man))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]


# --- item 9: a frozen object store: a warning naming the URL, a timeout, retries, then the error ---


@pytest.fixture
def own_moto():
    """A moto S3 server of this test's own (it gets frozen with SIGSTOP), AWS_* pointing at it."""
    pytest.importorskip("moto")
    s3fs = pytest.importorskip("s3fs")
    from tests.conftest import moto_server

    # fsspec caches filesystems by their arguments, not by AWS_ENDPOINT_URL: one made for another
    # server must not serve this test, nor one made for this server (stopped below) the next test
    s3fs.S3FileSystem.clear_instance_cache()
    with moto_server() as proc:
        try:
            yield proc
        finally:
            os.kill(proc.pid, signal.SIGCONT)  # a frozen server would not stop on SIGTERM
    s3fs.S3FileSystem.clear_instance_cache()


def _upload(folder, bucket: str) -> str:
    import s3fs

    from tests.conftest import make_bucket

    make_bucket(bucket)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
    for name in sorted(os.listdir(folder)):
        fs.put_file(os.path.join(folder, name), f"{bucket}/d/{name}")
    return f"s3://{bucket}/d/train.manifest.json"


def test_frozen_object_store_warns_times_out_and_resumes(tmp_path, own_moto, capsys):
    _split(tmp_path / "local", n=24, sizes=(6, 6, 6, 6))
    url = _upload(tmp_path / "local", "frozen")
    cfg = _cfg(url, io_timeout_s=1.0, io_retries=1)
    ref = list(itertools.islice(StreamingLoader(cfg), 12))
    ld = StreamingLoader(cfg)
    got = list(itertools.islice(ld, 1))
    os.kill(own_moto.pid, signal.SIGSTOP)  # the store stops answering (connections stay open)
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match=r"waiting for s3://frozen/d/train-00000\d.tar"):
        with pytest.raises(ShardUnavailableError, match=r"s3://frozen/d/train-00000\d.tar.*data.io_timeout_s"):
            for b in itertools.islice(ld, 11):
                got.append(b)
    waited = time.monotonic() - t0
    assert waited < 15, f"a frozen store held the step for {waited:.0f} s"
    assert "(retry 1/1)" in capsys.readouterr().out
    os.kill(own_moto.pid, signal.SIGCONT)
    again = StreamingLoader(cfg)
    again.load_state_dict(ld.state_dict())
    _same_batches(got + list(itertools.islice(again, 12 - len(got))), ref)


# --- item 1: nothing shipped unpickles shard content ---------------------------------------------


class _WritesAFile:
    """Unpickling this creates ``path``: what a hostile ``.pyd`` member could do instead."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_no_reader_unpickles_a_pyd_member(tmp_path):
    man = _split(tmp_path / "s", n=8, sizes=(8,))
    marker = str(tmp_path / "pwned")
    payload = pickle.dumps(_WritesAFile(marker))
    _rewrite_shard(man, 0, lambda ms: [m for n, d in ms for m in ([(n, d)] + ([(n.replace(".json", ".pyd"), payload)]
                                                                            if n.endswith(".json") else []))])
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import loader as bench
    finally:
        sys.path.pop(0)
    args = argparse.Namespace(crop=800, buffer=4, batch_size=2, workers=0, batches=3)
    rate, cpu = bench.run_webdataset(man, args)
    assert rate > 0 and not os.path.exists(marker), "the webdataset contender unpickled a .pyd member"
    list(itertools.islice(StreamingLoader(_cfg(man, batch_size=2)), 4))
    list(iter_samples([man]))
    assert not os.path.exists(marker)


# --- hostile tar headers: a counted bad shard, never a hang, a crash or a huge allocation ---------


def _long_key_split(folder) -> tuple[str, str]:
    """A split whose keys are longer than ustar's 100-byte names, so each member gets a pax header."""
    clips = shardgen.make_clips(6, sample_rate=8000, seed=33, prefix="k" * 110)
    man = shardgen.write_split(str(folder), clips, [6])
    return man, os.path.join(str(folder), "train-000000.tar")


def _patch_same_length(path: str, old: bytes, new: bytes, nth: int = 2) -> None:
    """Replace the ``nth`` occurrence of ``old`` by ``new`` (same length: the manifest size still holds)."""
    assert len(old) == len(new)
    data = open(path, "rb").read()
    at = -1
    for _ in range(nth):
        at = data.index(old, at + 1)
    open(path, "wb").write(data[:at] + new + data[at + len(old):])


def _in_thread(fn, timeout: float = 20.0):
    """fn() in a thread; fails (instead of hanging the suite) when it does not return in time."""
    import threading

    box: list = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"still running after {timeout:.0f} s (a hang)"
    return box[0]


@pytest.mark.parametrize("record", ["zero length", "negative size"])
def test_malformed_pax_record_is_a_counted_truncation_not_a_hang(tmp_path, record):
    import re

    man, tar = _long_key_split(tmp_path)
    data = open(tar, "rb").read()
    # pax header data blocks start with a "<len> path=<name>\n" record; spoil sample 3's audio member's
    at = [i for i in range(0, len(data), 512) if re.match(rb"\d+ path=k", data[i:i + 32])][6]
    length = int(data[at:data.index(b" ", at)])
    rec = data[at:at + length]
    if record == "zero length":  # before the fix: the record loop never advanced
        bad = b"0" * len(str(length)) + rec[len(str(length)):]
    else:  # a negative size sent the cursor backwards
        head = f"{length} size=-".encode()
        bad = head + b"0" * (length - len(head) - 2) + b"1\n"
    _patch_same_length(tar, rec, bad, nth=1)
    ld = StreamingLoader(_cfg(man, batch_size=2))
    with pytest.warns(UserWarning, match="malformed pax header"):
        batches = _in_thread(lambda: list(itertools.islice(ld, ld.steps_per_epoch)))
    keys = {k for b in batches for k in b["keys"]}
    assert len(batches) == 3 and ld.stats()["truncated_shards"] == 1
    assert keys <= {f"{'k' * 110}-{i:05d}" for i in range(3)}, "a sample at or after the damage was used"
    with pytest.warns(UserWarning, match="malformed pax header"):
        assert len(_in_thread(lambda: list(iter_samples([man])))) == 3


def test_member_claiming_an_absurd_size_is_a_counted_truncation(tmp_path):
    from pipeline.shards import ShardReadError, TarCursor

    man = _split(tmp_path, n=6, sizes=(6,))
    tar = str(tmp_path / "train-000000.tar")
    data = bytearray(open(tar, "rb").read())
    # the header of sample 3's audio member claims 2**80 bytes (GNU base-256), checksum fixed up
    at = next(i for i in range(0, len(data), 512) if data[i:i + 16] == b"clip-00003.flac\0")
    data[at + 124:at + 136] = b"\x80" + (2**80).to_bytes(11, "big")
    data[at + 148:at + 156] = b" " * 8
    data[at + 148:at + 156] = f"{sum(data[at:at + 512]):06o}\0 ".encode()
    open(tar, "wb").write(bytes(data))
    cur = TarCursor(tar, expected_bytes=len(data))
    assert [cur.get(i).key for i in range(3)] == [f"clip-{i:05d}" for i in range(3)]
    with pytest.raises(ShardReadError, match="truncated"):  # before the fix: OverflowError / MemoryError
        cur.get(3)
    cur.close()
    ld = StreamingLoader(_cfg(man, batch_size=2))
    with pytest.warns(UserWarning, match="train-000000.tar"):
        keys = {k for b in itertools.islice(ld, ld.steps_per_epoch) for k in b["keys"]}
    assert ld.stats()["truncated_shards"] == 1 and keys <= {f"clip-{i:05d}" for i in range(3)}


def test_audio_claiming_absurd_channels_or_rate_is_a_counted_corrupt_sample(tmp_path):
    import numpy as np
    import soundfile as sf

    def wav(channels: int, rate: int) -> bytes:
        buf = io.BytesIO()
        sf.write(buf, np.zeros((2000, channels), dtype=np.float32), rate, format="WAV", subtype="PCM_16")
        return buf.getvalue()

    man = _split(tmp_path)
    odd = {"clip-00001.flac": wav(200, 8000), "clip-00004.flac": wav(1, 10)}
    _rewrite_shard(man, 0, lambda ms: [(n, odd.get(n, d)) for n, d in ms])
    ld = StreamingLoader(_cfg(man, sample_rate=16000))
    with pytest.warns(UserWarning, match=r"200 channels at 8000 Hz is not audio this loader takes"):
        keys = [k for b in itertools.islice(ld, ld.steps_per_epoch) for k in b["keys"]]
    assert not {"clip-00001", "clip-00004"} & set(keys) and ld.stats()["skipped_corrupt"] >= 2
