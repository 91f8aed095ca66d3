"""Streaming loader: split correctness, resume equality, crops, labels, bad-sample policy."""

from __future__ import annotations

import io
import itertools
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.loader import DevicePrefetcher, LoaderConfig, StreamingLoader, iter_samples
from tests import shardgen

SR = 8000


def _quantized(clip: dict) -> np.ndarray:
    """The clip exactly as the loader will see it after the 16-bit FLAC round trip."""
    x, _ = sf.read(io.BytesIO(shardgen.encode(clip["audio"], clip["sample_rate"])), dtype="float32", always_2d=True)
    return x.T


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    clips = shardgen.make_clips(36, sample_rate=SR, seconds=(0.3, 0.6), seed=1)
    man = shardgen.write_split(str(root / "a"), clips, [10, 14, 12])
    return {"root": root, "clips": clips, "manifest": man, "source": {c["key"]: _quantized(c) for c in clips}}


def _cfg(manifests, **kw) -> LoaderConfig:
    base = dict(manifests=manifests if isinstance(manifests, list) else [manifests], batch_size=3, crop_samples=1000,
                shuffle_buffer=8, num_workers=0, seed=7)
    base.update(kw)
    return LoaderConfig(**base)


def _epochs(cfg: LoaderConfig, world: int, epochs: int) -> list[list[list[str]]]:
    """keys[rank][epoch] over `epochs` epochs, checking each rank's steps_per_epoch agrees."""
    out = []
    spe = None
    for r in range(world):
        ld = StreamingLoader(cfg, rank=r, world_size=world)
        spe = spe if spe is not None else ld.steps_per_epoch
        assert ld.steps_per_epoch == spe
        batches = list(itertools.islice(ld, spe * epochs))
        assert all(b["audio"].shape == (3, 2, 1, 1000) for b in batches)
        out.append([[k for b in batches[e * spe : (e + 1) * spe] for k in b["keys"]] for e in range(epochs)])
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_split_disjoint_and_complete(data, world, workers):
    # 36 samples in 3 shards: with world 3 x 2 workers there are twice as many slots as shards
    keys = _epochs(_cfg(data["manifest"], num_workers=workers), world, epochs=2)
    every = set(data["source"])
    for e in range(2):
        per_rank = [keys[r][e] for r in range(world)]
        assert len({len(k) for k in per_rank}) == 1  # same batch count on every rank
        flat = [k for ks in per_rank for k in ks]
        assert len(flat) == len(set(flat)), "a sample appeared twice in one epoch"
        assert set(flat) == every, "an epoch missed samples"
    assert keys[0][0] != keys[0][1], "epochs must be shuffled differently"


def test_order_depends_on_seed_only(data):
    a = _epochs(_cfg(data["manifest"]), 2, 1)
    b = _epochs(_cfg(data["manifest"]), 2, 1)
    c = _epochs(_cfg(data["manifest"], seed=8), 2, 1)
    assert a == b and a != c


def test_uneven_count_drops_less_than_a_global_batch(tmp_path):
    clips = shardgen.make_clips(37, sample_rate=SR, seed=2)
    man = shardgen.write_split(str(tmp_path), clips, [20, 17])
    keys = _epochs(_cfg(man, num_workers=2), 2, 1)
    flat = keys[0][0] + keys[1][0]
    assert len(keys[0][0]) == len(keys[1][0]) == 18
    assert len(set(flat)) == 36 and set(flat) < {c["key"] for c in clips}


def test_weighted_mix_repeats_small_manifest(tmp_path):
    a = shardgen.write_split(str(tmp_path / "a"), shardgen.make_clips(20, prefix="a", seed=3), [12, 8])
    b = shardgen.write_split(str(tmp_path / "b"), shardgen.make_clips(10, prefix="b", seed=4), [10])
    keys = _epochs(_cfg([a, b], weights=[1.0, 2.0], num_workers=2), 2, 1)
    flat = keys[0][0] + keys[1][0]
    assert len(flat) == 30
    from collections import Counter

    count = Counter(flat)
    assert sorted(k for k in count if k.startswith("a")) and sum(v for k, v in count.items() if k.startswith("a")) == 10
    assert all(count[k] == 1 for k in count if k.startswith("a"))
    assert {k for k in count if k.startswith("b")} == {f"b-{i:05d}" for i in range(10)}
    assert all(count[k] == 2 for k in count if k.startswith("b"))
    # both manifests appear on both ranks: the interleave mixes them, not one manifest per rank
    for r in range(2):
        assert {k[0] for k in keys[r][0]} == {"a", "b"}


def _run(ld: StreamingLoader, n: int) -> list[dict]:
    return list(itertools.islice(ld, n))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_uninterrupted(tmp_path, workers):
    # short clips with short_policy=skip and a corrupt sample: substitutes must not break the resume
    clips = shardgen.make_clips(40, sample_rate=SR, seconds=(0.08, 0.6), seed=5)
    man = shardgen.write_split(str(tmp_path), clips, [15, 15, 10], corrupt_keys=("clip-00017",))
    cfg = _cfg(man, num_workers=workers, short_policy="skip", shuffle_buffer=10)
    ref_loader = StreamingLoader(cfg, rank=1, world_size=2)
    spe = ref_loader.steps_per_epoch
    n_before, n_after = spe + 2, spe + 3  # the cut is mid-epoch and the tail crosses an epoch boundary
    ref = _run(ref_loader, n_before + n_after)
    assert ref_loader.stats()["skipped_short"] > 0 and ref_loader.stats()["substituted"] > 0

    first = StreamingLoader(cfg, rank=1, world_size=2)
    head = _run(first, n_before)
    path = tmp_path / "state.pt"
    torch.save(first.state_dict(), path)
    state = torch.load(path, weights_only=True)
    resumed = StreamingLoader(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    tail = _run(resumed, n_after)
    for got, want in zip(head + tail, ref):
        assert got["keys"] == want["keys"]
        assert torch.equal(got["audio"], want["audio"])
        assert torch.equal(got["lengths"], want["lengths"])
        assert all(torch.equal(got["labels"][k], want["labels"][k]) for k in want["labels"])
    assert resumed.stats() == ref_loader.stats()


def test_resume_with_other_layout(data):
    cfg = _cfg(data["manifest"], num_workers=2)
    ld = StreamingLoader(cfg)
    _run(ld, 3)
    state = ld.state_dict()
    other = StreamingLoader(_cfg(data["manifest"], num_workers=0))
    with pytest.raises(ValueError, match="num_workers=2"):
        other.load_state_dict(state)
    with pytest.warns(UserWarning, match="epoch 1"):
        other.load_state_dict(state, strict=False)
    assert other.epoch == 1
    with pytest.raises(ValueError, match="data.seed"):
        StreamingLoader(_cfg(data["manifest"], num_workers=2, seed=1)).load_state_dict(state)


def _offset(source: np.ndarray, view: np.ndarray) -> int:
    """Where ``view`` (1, L) occurs in ``source`` (1, N); -1 if nowhere."""
    win = np.lib.stride_tricks.sliding_window_view(source[0], view.shape[-1])
    hits = np.flatnonzero((win == view[0]).all(axis=1))
    return int(hits[0]) if len(hits) else -1


def test_pairs_are_two_crops_of_the_same_clip(data):
    ld = StreamingLoader(_cfg(data["manifest"], crop_samples=800))
    differ = 0
    for b in _run(ld, ld.steps_per_epoch):
        for i, key in enumerate(b["keys"]):
            src = data["source"][key]
            offs = [_offset(src, b["audio"][i, v].numpy()) for v in range(2)]
            assert min(offs) >= 0, f"view of {key} is not a window of its source clip"
            differ += offs[0] != offs[1]
            assert b["lengths"][i] == 800
    assert differ >= 30  # independent offsets (a tie is possible, but rare)


def test_labels_decoded_per_spec(data):
    ld = StreamingLoader(_cfg(data["manifest"]))
    assert ld.label_specs["tags"]["names"] == ["a", "b", "c"]
    by_key = {c["key"]: c["labels"] for c in data["clips"]}
    b = next(iter(ld))
    assert b["labels"]["pitch"].dtype == torch.int64 and b["labels"]["tags"].dtype == torch.float32
    for i, key in enumerate(b["keys"]):
        assert b["labels"]["pitch"][i].item() == by_key[key]["pitch"] - 21
        want = [1.0 if t in by_key[key]["tags"] else 0.0 for t in ["a", "b", "c"]]
        assert b["labels"]["tags"][i].tolist() == want


def test_missing_class_value_is_minus_one(tmp_path):
    clips = shardgen.make_clips(6, sample_rate=SR, seed=6)
    clips[0]["labels"]["pitch"] = 5  # not in names 21..108
    del clips[1]["labels"]["pitch"]
    man = shardgen.write_split(str(tmp_path), clips, [6])
    rows = {s["key"]: s["labels"] for s in iter_samples([man])}
    assert rows["clip-00000"]["pitch"] == -1 and rows["clip-00001"]["pitch"] == -1
    assert rows["clip-00002"]["pitch"] == clips[2]["labels"]["pitch"] - 21


def test_corrupt_sample_skipped_counted_or_raised(tmp_path):
    clips = shardgen.make_clips(12, sample_rate=SR, seed=8)
    man = shardgen.write_split(str(tmp_path), clips, [6, 6], corrupt_keys=("clip-00004",))
    ld = StreamingLoader(_cfg(man, shuffle_buffer=4))
    with pytest.warns(UserWarning, match="clip-00004"):
        batches = _run(ld, ld.steps_per_epoch)
    keys = [k for b in batches for k in b["keys"]]
    assert "clip-00004" not in keys and len(keys) == 12
    assert ld.stats()["skipped_corrupt"] == 1 and ld.stats()["substituted"] == 1
    assert len(set(keys)) == 11  # the hole was filled with a repeat of another sample of the slot
    with pytest.raises(RuntimeError, match="clip-00004"):
        _run(StreamingLoader(_cfg(man, shuffle_buffer=4, on_error="raise")), 4)


def test_truncated_tar_skipped_counted_or_raised(tmp_path):
    clips = shardgen.make_clips(12, sample_rate=SR, seed=9)
    man = shardgen.write_split(str(tmp_path), clips, [6, 6])
    shardgen.truncate(str(tmp_path / "train-000001.tar"), 0.5)
    ld = StreamingLoader(_cfg(man, shuffle_buffer=4))
    with pytest.warns(UserWarning, match="train-000001.tar"):
        batches = _run(ld, 2 * ld.steps_per_epoch)
    assert len(batches) == 8 and all(len(b["keys"]) == 3 for b in batches)
    st = ld.stats()
    assert st["truncated_shards"] >= 1 and st["skipped_truncated"] >= 3 and st["substituted"] >= 3
    seen = {k for b in batches for k in b["keys"]}
    assert {f"clip-{i:05d}" for i in range(6)} <= seen and "clip-00011" not in seen
    with pytest.raises(RuntimeError, match="train-000001.tar"):
        _run(StreamingLoader(_cfg(man, shuffle_buffer=4, on_error="raise")), 8)


def test_short_clips_padded_with_zeros(tmp_path):
    clips = shardgen.make_clips(6, sample_rate=SR, seconds=(0.05, 0.1), seed=10)  # 400..800 frames
    man = shardgen.write_split(str(tmp_path), clips, [6])
    src = {c["key"]: _quantized(c) for c in clips}
    ld = StreamingLoader(_cfg(man, crop_samples=1000))
    for b in _run(ld, 2):
        for i, k in enumerate(b["keys"]):
            n = src[k].shape[1]
            assert b["lengths"][i] == n
            assert np.array_equal(b["audio"][i, 0, :, :n].numpy(), src[k])
            assert not b["audio"][i, :, :, n:].any()
    assert ld.stats()["padded"] == 6


@pytest.mark.parametrize("pad_to", ["shortest", "longest"])
def test_single_variable_length(tmp_path, pad_to):
    clips = shardgen.make_clips(8, sample_rate=SR, seconds=(0.05, 0.3), seed=11)
    man = shardgen.write_split(str(tmp_path), clips, [8])
    src = {c["key"]: _quantized(c) for c in clips}
    ld = StreamingLoader(_cfg(man, batch_size=4, mode="single", variable_length=True, pad_to=pad_to, crop_samples=1500))
    for b in _run(ld, 2):
        clip_len = [min(src[k].shape[1], 1500) for k in b["keys"]]
        T = b["audio"].shape[-1]
        assert b["audio"].shape[:3] == (4, 1, 1)
        assert T == (min(clip_len) if pad_to == "shortest" else max(clip_len))
        assert b["lengths"].tolist() == [min(n, T) for n in clip_len]
        for i, k in enumerate(b["keys"]):
            n = int(b["lengths"][i])
            assert _offset(src[k], b["audio"][i, 0, :, :n].numpy()) >= 0
            assert not b["audio"][i, 0, :, n:].any()


def test_resample_on_the_fly_keeps_pitch(tmp_path):
    t = np.arange(16000) / 16000
    clips = [{"key": f"tone-{i}", "audio": (0.5 * np.sin(2 * np.pi * 440 * t))[None].astype(np.float32),
              "sample_rate": 16000, "labels": {}} for i in range(3)]
    man = shardgen.write_split(str(tmp_path), clips, [3], labels={})
    b = next(iter(StreamingLoader(_cfg(man, sample_rate=8000, crop_samples=4000, mode="single"))))
    x = b["audio"][0, 0, 0].numpy()
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    f0 = np.argmax(spec) * 8000 / len(x)
    assert abs(f0 - 440) < 4  # a 2x rate change without resampling would read 880 Hz


def test_transform_runs_per_example_with_its_own_rng(data):
    def gain(views: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return views * rng.uniform(2.0, 3.0)

    plain = next(iter(StreamingLoader(_cfg(data["manifest"]))))
    aug = next(iter(StreamingLoader(_cfg(data["manifest"]), transform=gain)))
    assert plain["keys"] == aug["keys"]
    ratios = (aug["audio"].abs().sum((1, 2, 3)) / plain["audio"].abs().sum((1, 2, 3))).numpy()
    assert ((ratios > 1.99) & (ratios < 3.01)).all() and len(set(np.round(ratios, 4))) == 3


def test_iter_samples_ordered_complete_and_split(data):
    whole = list(iter_samples([data["manifest"]]))
    assert [s["key"] for s in whole] == [c["key"] for c in data["clips"]]
    for s in whole:
        assert np.array_equal(s["audio"], data["source"][s["key"]]) and s["sample_rate"] == SR
        assert s["meta"]["key"] == s["key"]
    parts = [[s["key"] for s in iter_samples([data["manifest"]], rank=r, world_size=3)] for r in range(3)]
    assert sum(parts, []) == [s["key"] for s in whole] and {len(p) for p in parts} == {12}


def test_device_prefetcher_cpu_passes_through(data):
    ld = StreamingLoader(_cfg(data["manifest"]))
    src = list(itertools.islice(ld, 2))
    got = list(DevicePrefetcher(src, torch.device("cpu")))
    assert all(a is b for a, b in zip(got, src))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_prefetcher_cuda(data):
    ld = StreamingLoader(_cfg(data["manifest"], pin_memory=True))
    src = list(itertools.islice(ld, 3))
    got = list(DevicePrefetcher(iter(src), torch.device("cuda")))
    for a, b in zip(got, src):
        assert a["audio"].is_cuda and torch.equal(a["audio"].cpu(), b["audio"])
        assert torch.equal(a["labels"]["pitch"].cpu(), b["labels"]["pitch"])


@pytest.mark.parametrize(
    "kw, field",
    [({"batch_size": 0}, "data.batch_size"), ({"mode": "triples"}, "data.mode"), ({"weights": [1.0, 2.0]}, "data.weights"),
     ({"on_error": "ignore"}, "data.on_error"), ({"variable_length": True}, "data.variable_length"),
     ({"short_policy": "drop"}, "data.short_policy")],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        _cfg("x.manifest.json", **kw)


def test_missing_manifest_and_too_small_epoch(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.manifest.json"):
        StreamingLoader(_cfg(str(tmp_path / "nope.manifest.json")))
    with pytest.raises(ValueError, match="lower the per-rank batch_size"):
        StreamingLoader(_cfg(data["manifest"], batch_size=20), world_size=2)
    assert os.path.exists(data["manifest"])


@pytest.mark.parametrize("mono", [True, False])
def test_stereo_sources_downmixed_or_kept(tmp_path, mono):
    clips = shardgen.make_clips(6, sample_rate=SR, channels=2, seed=12)
    man = shardgen.write_split(str(tmp_path), clips, [6])
    src = {c["key"]: _quantized(c) for c in clips}
    b = next(iter(StreamingLoader(_cfg(man, mono=mono, mode="single"))))
    assert b["audio"].shape == (3, 1, 1 if mono else 2, 1000)
    for i, k in enumerate(b["keys"]):
        view = b["audio"][i, 0].numpy()
        # locate the window through the first channel (kept) or the downmix (mono)
        ref = src[k].mean(0, keepdims=True, dtype=np.float32) if mono else src[k]
        off = _offset(ref[:1], view[:1])
        assert off >= 0
        np.testing.assert_array_equal(view, ref[:, off : off + 1000])


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_workers_survive_stop_signals_to_the_process_group(data, signame):
    # preemption (SIGTERM) and Ctrl-C (SIGINT) reach every process of the group; the trainer
    # finishes its step and checkpoints, so its workers must keep serving
    import multiprocessing
    import signal

    before = {p.pid for p in multiprocessing.active_children()}
    ld = StreamingLoader(_cfg(data["manifest"], num_workers=2))
    it = iter(ld)
    first = next(it)
    workers = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
    assert len(workers) == 2
    for pid in workers:  # what a preemption does to the whole process group
        os.kill(pid, getattr(signal, signame))
    more = list(itertools.islice(it, 4))
    assert len(more) == 4 and first["keys"] != more[0]["keys"]
    it.close()


def test_keyed_draws_are_deterministic_and_uniform():
    from pipeline.decode import KeyedDraws as _KeyedDraws

    a, b = _KeyedDraws(7, 1, 0, 2, 5), _KeyedDraws(7, 1, 0, 2, 5)
    seq = [a.integers(0, 1000) for _ in range(50)]
    assert seq == [b.integers(0, 1000) for _ in range(50)]  # same key: same draws
    assert seq != [_KeyedDraws(7, 1, 0, 2, 6).integers(0, 1000) for _ in range(50)]  # the position changes them
    assert len(set(seq)) > 40  # successive draws of one key differ
    # the first draw over many keys (as the loader uses them): every value of a small range about
    # equally often, and a huge range's mean near its middle
    first = np.array([_KeyedDraws(0, 0, 0, 0, p).integers(3, 13) for p in range(20000)])
    assert first.min() == 3 and first.max() == 12
    counts = np.bincount(first - 3, minlength=10)
    assert np.all(np.abs(counts - 2000) < 200), counts
    big = np.array([_KeyedDraws(1, p).integers(0, 2**40) for p in range(4000)], dtype=np.float64)
    assert abs(big.mean() / 2**40 - 0.5) < 0.02 and big.max() < 2**40
    with pytest.raises(ValueError):
        a.integers(5, 5)


_EXIT_SCRIPT = """
import itertools, sys
sys.path.insert(0, {repo!r})
from pipeline.loader import LoaderConfig, StreamingLoader
cfg = LoaderConfig(manifests=[{man!r}], batch_size=3, crop_samples=1000, num_workers=2, seed=0)

def train():
    for step, batch in enumerate(StreamingLoader(cfg)):
        if step == 2:
            raise RuntimeError("boom at step 2")

if {how!r} == "raise":
    train()
it = iter(StreamingLoader(cfg))  # 'alive': the script ends with the stream still open
next(it)
print("done", flush=True)
"""


@pytest.mark.parametrize("how", ["alive", "raise"])
def test_process_exits_with_workers_running(data, tmp_path, how):
    # Workers ignore SIGTERM (preemption); multiprocessing's exit handler stops leftover children
    # with SIGTERM and then joins them, so without the loader's own exit hook a script that ends
    # (or dies of an exception) while a stream is open would hang forever.
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "exit.py"
    script.write_text(_EXIT_SCRIPT.format(repo=repo, man=data["manifest"], how=how))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    if how == "raise":
        assert proc.returncode == 1 and "boom at step 2" in proc.stderr
    else:
        assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]


def test_stop_signal_during_worker_start_up_does_not_kill_it(data, monkeypatch):
    # the window between a worker's start and its _worker_init (which ignores SIGTERM) is made
    # 1.5 s long here; a SIGTERM to the process group then must not kill the worker
    import multiprocessing
    import signal
    import threading
    import time

    import pipeline.workers as workers_mod

    real_init = workers_mod.worker_init

    def slow_init(worker_id):
        time.sleep(1.5)
        real_init(worker_id)

    monkeypatch.setattr(workers_mod, "worker_init", slow_init)
    before = {p.pid for p in multiprocessing.active_children()}
    it = iter(StreamingLoader(_cfg(data["manifest"], num_workers=2)))
    got: list = []
    fetch = threading.Thread(target=lambda: got.extend(itertools.islice(it, 3)))
    fetch.start()
    deadline, workers = time.monotonic() + 30, []
    while len(workers) < 2 and time.monotonic() < deadline:
        workers = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
        time.sleep(0.01)
    assert len(workers) == 2
    for pid in workers:  # well inside the 1.5 s start-up
        os.kill(pid, signal.SIGTERM)
    fetch.join(60)
    assert len(got) == 3 and all(b["audio"].shape == (3, 2, 1, 1000) for b in got)
    it.close()
