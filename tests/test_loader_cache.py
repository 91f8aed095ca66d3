"""The opt-in local shard cache (issue 16): a bucket is read once, copies are verified, evicted
within their limit and shared safely by the workers and ranks of a node (moto S3)."""

from __future__ import annotations

import itertools
import os
import threading

import pytest
import torch

from pipeline.loader import LoaderConfig, StreamingLoader
from tests import shardgen

SHARDS = 4


@pytest.fixture
def bucket(tmp_path, moto_s3):
    """A split of 4 shards uploaded to a fresh bucket; yields (local manifest, s3 manifest, s3fs)."""
    import s3fs

    from tests.conftest import make_bucket

    local = shardgen.write_split(str(tmp_path / "local"), shardgen.make_clips(24, sample_rate=8000, seed=41), [6] * SHARDS)
    name = f"cache-{os.path.basename(str(tmp_path)).lower().replace('_', '-')[:40]}"
    make_bucket(name)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3})
    for f in sorted(os.listdir(tmp_path / "local")):
        fs.put_file(str(tmp_path / "local" / f), f"{name}/d/{f}")
    yield local, f"s3://{name}/d/train.manifest.json", fs
    fs.invalidate_cache()
    if fs.exists(f"{name}/d"):
        fs.rm(f"{name}/d", recursive=True)


def _cfg(manifest: str, **kw) -> LoaderConfig:
    base = dict(manifests=[manifest], batch_size=3, crop_samples=800, shuffle_buffer=5, num_workers=0, seed=2)
    base.update(kw)
    return LoaderConfig(**base)


def _same(got: list[dict], want: list[dict]) -> None:
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    assert all(torch.equal(g["audio"], w["audio"]) for g, w in zip(got, want))


def _cached(folder) -> dict[str, int]:
    return {n: os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".tar")}


@pytest.mark.parametrize("workers", [0, 2])
def test_second_epoch_reads_nothing_from_the_bucket(bucket, tmp_path, workers):
    local, remote, fs = bucket
    ref = list(itertools.islice(StreamingLoader(_cfg(local, num_workers=workers)), 16))  # 2 epochs of 8
    ld = StreamingLoader(_cfg(remote, num_workers=workers, cache_dir=str(tmp_path / "cache")))
    it = iter(ld)
    got = list(itertools.islice(it, 8))
    # the first epoch is over: from here on a read from the bucket would fail
    fs.rm(remote.removeprefix("s3://").rsplit("/", 1)[0], recursive=True)
    got += list(itertools.islice(it, 8))
    _same(got, ref)
    assert ld.stats()["cache_fetched"] == SHARDS  # each shard fetched once, by whichever worker came first
    assert len(_cached(tmp_path / "cache")) == SHARDS


def test_a_corrupted_or_truncated_cached_shard_is_fetched_again(bucket, tmp_path):
    local, remote, _ = bucket
    ref = list(itertools.islice(StreamingLoader(_cfg(local)), 16))
    cache = tmp_path / "cache"
    ld = StreamingLoader(_cfg(remote, cache_dir=str(cache)))
    it = iter(ld)
    got = list(itertools.islice(it, 8))
    first, second = sorted(_cached(cache))[:2]
    with open(cache / first, "r+b") as f:  # a flipped run of bytes, same size
        f.seek(3000)
        f.write(b"\xff" * 64)
    os.truncate(cache / second, 1000)
    with pytest.warns(UserWarning, match="does not match the manifest; fetching it again"):
        got += list(itertools.islice(it, 8))
    _same(got, ref)
    st = ld.stats()
    assert st["cache_corrupt"] == 2 and st["cache_fetched"] == SHARDS + 2
    assert st["skipped_corrupt"] == st["skipped_truncated"] == 0


def test_eviction_keeps_the_cache_within_its_limit(bucket, tmp_path):
    local, remote, _ = bucket
    ref = list(itertools.islice(StreamingLoader(_cfg(local)), 16))
    sizes = sorted(os.path.getsize(os.path.join(os.path.dirname(local), f"train-{i:06d}.tar")) for i in range(SHARDS))
    limit = sizes[-1] + sizes[-2] + sizes[0] // 2  # room for two shards, not three
    cache = tmp_path / "cache"
    ld = StreamingLoader(_cfg(remote, cache_dir=str(cache), cache_limit_gb=limit / 2**30))
    got = []
    for b in itertools.islice(ld, 16):
        got.append(b)
        assert sum(_cached(cache).values()) <= limit
    _same(got, ref)
    assert ld.stats()["cache_fetched"] > SHARDS  # evicted shards came back when needed again


def test_two_ranks_with_workers_share_one_cache(bucket, tmp_path):
    local, remote, _ = bucket
    cache = str(tmp_path / "cache")
    results: dict[int, tuple[list, list, dict]] = {}

    def run(rank: int) -> None:
        ref = list(itertools.islice(StreamingLoader(_cfg(local, num_workers=2), rank=rank, world_size=2), 8))
        ld = StreamingLoader(_cfg(remote, num_workers=2, cache_dir=cache), rank=rank, world_size=2)
        results[rank] = (list(itertools.islice(ld, 8)), ref, ld.stats())

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1]
    for got, ref, _ in results.values():
        _same(got, ref)
    # four worker processes, one cache: every shard fetched exactly once between them
    assert sum(st["cache_fetched"] for _, _, st in results.values()) == SHARDS
    assert not [n for n in os.listdir(cache) if n.endswith(".part")]
