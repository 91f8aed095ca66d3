"""The loader's fast paths give the same values as the plain ones: recycled worker buffers, direct
libsndfile reads, overlapping views decoded once."""

from __future__ import annotations

import io
import itertools
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import pipeline.decode as decode_mod
import pipeline.workers as workers_mod
from pipeline.loader import LoaderConfig, StreamingLoader
from tests import shardgen

SR = 8000


def _source(clip: dict) -> np.ndarray:
    """The clip as the loader sees it after the 16-bit FLAC round trip, (1, N)."""
    x, _ = sf.read(io.BytesIO(shardgen.encode(clip["audio"], clip["sample_rate"])), dtype="float32", always_2d=True)
    return x.T


def _offset(source: np.ndarray, view: np.ndarray) -> int:
    """Where ``view`` (1, L) occurs in ``source`` (1, N); -1 if nowhere."""
    win = np.lib.stride_tricks.sliding_window_view(source[0], view.shape[-1])
    hits = np.flatnonzero((win == view[0]).all(axis=1))
    return int(hits[0]) if len(hits) else -1


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    clips = shardgen.make_clips(24, sample_rate=SR, seconds=(0.3, 0.5), seed=11)
    man = shardgen.write_split(str(tmp_path_factory.mktemp("short")), clips, [12, 12])
    return man, {c["key"]: _source(c) for c in clips}


def _cfg(man: str, **kw) -> LoaderConfig:
    base = dict(manifests=[man], batch_size=3, crop_samples=700, shuffle_buffer=6, num_workers=2, prefetch_factor=2, seed=3)
    base.update(kw)
    return LoaderConfig(**base)


def test_held_worker_batches_are_not_overwritten(short):
    """Workers recycle a few shared buffers; batches the caller keeps must stay intact."""
    man, source = short
    ld = StreamingLoader(_cfg(man))
    held = list(itertools.islice(ld, 3 * ld.steps_per_epoch))  # 24 batches through 4 slots per worker
    storages = {b["audio"].untyped_storage().data_ptr() for b in held}
    assert len(storages) == len(held)  # every batch owns its memory
    for b in held:
        for i, key in enumerate(b["keys"]):
            for v in range(2):
                assert _offset(source[key], b["audio"][i, v].numpy()) >= 0, f"view {v} of {key} was overwritten"


def test_batches_kept_out_of_order_stay_intact(short):
    """Dropping some batches and keeping others frees slots out of order; the kept ones must survive."""
    man, source = short
    ld = StreamingLoader(_cfg(man))
    kept = []
    for n, b in enumerate(itertools.islice(ld, 4 * ld.steps_per_epoch)):
        if n % 3 == 1:
            kept.append(b)
        del b
    for b in kept:
        for i, key in enumerate(b["keys"]):
            for v in range(2):
                assert _offset(source[key], b["audio"][i, v].numpy()) >= 0, f"view {v} of {key} was overwritten"


class _NoSlots(workers_mod.Ring):
    def __init__(self, workers: int, slots: int, ctx) -> None:
        super().__init__(workers, 0, ctx)


class _OneSlot(workers_mod.Ring):
    def __init__(self, workers: int, slots: int, ctx) -> None:
        super().__init__(workers, 1, ctx)


@pytest.mark.parametrize("ring", [_NoSlots, _OneSlot])
def test_without_free_slots_workers_fall_back_to_fresh_buffers(short, monkeypatch, ring):
    man, _ = short
    ld = StreamingLoader(_cfg(man))
    want = list(itertools.islice(ld, 2 * ld.steps_per_epoch))
    monkeypatch.setattr(workers_mod, "Ring", ring)  # workers fork after this, so they see it too
    ld = StreamingLoader(_cfg(man))
    got = list(itertools.islice(ld, 2 * ld.steps_per_epoch))
    for g, w in zip(got, want):
        assert g["keys"] == w["keys"]
        assert torch.equal(g["audio"], w["audio"]) and torch.equal(g["lengths"], w["lengths"])
        assert all(torch.equal(g["labels"][k], w["labels"][k]) for k in w["labels"])


@pytest.fixture(scope="module")
def long(tmp_path_factory):
    # 2 s clips: a 6000-frame crop spans several FLAC blocks and two crops overlap most of the time
    clips = shardgen.make_clips(8, sample_rate=SR, seconds=(2.0, 2.0), seed=12)
    man = shardgen.write_split(str(tmp_path_factory.mktemp("long")), clips, [8])
    return man, {c["key"]: _source(c) for c in clips}


@pytest.mark.parametrize("direct_read", [True, False])
def test_views_are_exact_windows_overlapping_or_not(long, monkeypatch, direct_read):
    man, source = long
    if not direct_read:  # the public SoundFile.read path must give the same frames
        monkeypatch.setattr(decode_mod, "_SF_READF", None)
    ld = StreamingLoader(_cfg(man, batch_size=2, crop_samples=6000, num_workers=0))
    overlapping = apart = 0
    for b in itertools.islice(ld, 2 * ld.steps_per_epoch):
        for i, key in enumerate(b["keys"]):
            a, c = (_offset(source[key], b["audio"][i, v].numpy()) for v in range(2))
            assert a >= 0 and c >= 0, f"a view of {key} is not a window of its clip"
            overlapping += abs(a - c) < 6000
            apart += abs(a - c) >= 6000
    assert overlapping >= 3 and apart >= 1  # both decode paths ran


def test_direct_reads_equal_public_reads_batch_for_batch(long, monkeypatch):
    man, _ = long
    cfg = _cfg(man, batch_size=2, crop_samples=6000, num_workers=0)
    fast = list(itertools.islice(StreamingLoader(cfg), 8))
    monkeypatch.setattr(decode_mod, "_SF_READF", None)
    plain = list(itertools.islice(StreamingLoader(cfg), 8))
    for f, p in zip(fast, plain):
        assert f["keys"] == p["keys"] and torch.equal(f["audio"], p["audio"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_batches_from_worker_slots(short):
    """With pin_memory the slot is copied into pinned memory and released at once."""
    man, source = short
    ld = StreamingLoader(_cfg(man, pin_memory=True))
    held = list(itertools.islice(ld, 2 * ld.steps_per_epoch))
    for b in held:
        assert b["audio"].is_pinned() and b["lengths"].is_pinned()
        for i, key in enumerate(b["keys"]):
            assert _offset(source[key], b["audio"][i, 1].numpy()) >= 0


def test_shm_fit_lowers_prefetch_or_explains():
    MB = 2**20
    fit = workers_mod.fit_prefetch
    assert fit(2, 2, MB, None, 1) == 2  # no /dev/shm (not Linux): nothing to check
    assert fit(2, 0, MB, 0, 1) == 2  # no workers: batches never enter /dev/shm
    assert fit(2, 2, MB, 8 * MB, 1) == 2  # 2 workers x (2 + 2) batches of 1 MB fit exactly
    with pytest.warns(UserWarning, match=r"prefetch_factor 4 needs 12 MB; using 2"):
        assert fit(4, 2, MB, 9 * MB, 1) == 2
    with pytest.raises(RuntimeError, match=r"/dev/shm is too small.*needs 6 MB.*--shm-size"):
        fit(2, 2, MB, 5 * MB, 1)
    with pytest.raises(RuntimeError, match=r"2 loader\(s\)"):  # every rank on the node holds its own
        fit(2, 2, MB, 10 * MB, 2)


def test_small_shm_runs_with_lower_prefetch_and_same_batches(short, monkeypatch):
    man, _ = short
    ref = [b["audio"].clone() for b in itertools.islice(StreamingLoader(_cfg(man, prefetch_factor=3)), 6)]
    batch_bytes = 4 * 3 * 2 * 700  # B x V x T float32
    monkeypatch.setattr(workers_mod, "shm_free_bytes", lambda: 2 * 3 * batch_bytes)  # room for prefetch 1 only
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    with pytest.warns(UserWarning, match="using 1"):
        got = [b["audio"].clone() for b in itertools.islice(StreamingLoader(_cfg(man, prefetch_factor=3)), 6)]
    assert all(torch.equal(a, b) for a, b in zip(ref, got))  # prefetch changes timing, never content
    monkeypatch.setattr(workers_mod, "shm_free_bytes", lambda: batch_bytes)
    with pytest.raises(RuntimeError, match="/dev/shm is too small"):
        next(iter(StreamingLoader(_cfg(man))))


_FAULTS_SCRIPT = """
import itertools, os, sys
sys.path.insert(0, {repo!r})
import pipeline.workers as workers_mod
from pipeline.loader import LoaderConfig, StreamingLoader
if not {tuned!r}:
    workers_mod.keep_freed_memory = lambda: None  # the workers fork after this: glibc defaults
cfg = LoaderConfig(manifests=[{man!r}], batch_size=4, crop_samples=1000, num_workers=1, shuffle_buffer=48, seed=0)
it = iter(StreamingLoader(cfg))
for _ in range(4):
    next(it)
(pid,) = [int(p) for p in os.listdir("/proc") if p.isdigit()
          and open(f"/proc/{{p}}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid())]
minflt = lambda: int(open(f"/proc/{{pid}}/stat").read().rsplit(")", 1)[1].split()[7])
before = minflt()
for _ in range(10):
    next(it)
print((minflt() - before) / 40)
it.close()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_workers_reuse_freed_memory_for_sample_bytes(tmp_path):
    # ~240 KB FLAC members (8 s of noise at 16 kHz) churning through a 48-sample shuffle buffer:
    # glibc's defaults serve each sample's bytes with fresh pages, a minor page fault per 4 KiB
    # (measured ~63 a sample here); the workers' malloc settings reuse freed memory (< 1)
    clips = shardgen.make_clips(48, sample_rate=16000, seconds=(8.0, 8.0), seed=5)
    man = shardgen.write_split(str(tmp_path / "big"), clips, [24, 24])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    faults = {}
    for tuned in (False, True):
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT.format(repo=repo, tuned=tuned, man=man)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        faults[tuned] = float(out.stdout.strip().splitlines()[-1])
    assert faults[False] >= 30, faults  # the setup shows the cost: tens of faults a sample
    assert faults[True] < 3, faults
