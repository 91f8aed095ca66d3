"""The loader on shards from elsewhere: a local moto S3 server, and the real shard builder."""

from __future__ import annotations

import io
import itertools
import os

import numpy as np
import soundfile as sf
import torch

from pipeline.loader import LoaderConfig, StreamingLoader, iter_samples
from tests import shardgen


def _cfg(manifest: str, **kw) -> LoaderConfig:
    base = dict(manifests=[manifest], batch_size=4, crop_samples=1000, shuffle_buffer=6, num_workers=2, seed=3)
    base.update(kw)
    return LoaderConfig(**base)


def test_reads_from_s3_same_batches_as_local(tmp_path, moto_s3):
    import s3fs

    from tests.conftest import make_bucket

    clips = shardgen.make_clips(24, sample_rate=8000, seed=21)
    local = shardgen.write_split(str(tmp_path), clips, [9, 8, 7])
    make_bucket("loader-test")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3})
    for name in sorted(os.listdir(tmp_path)):
        fs.put_file(str(tmp_path / name), f"loader-test/data/{name}")
    remote = "s3://loader-test/data/train.manifest.json"

    want = list(itertools.islice(StreamingLoader(_cfg(local, num_workers=0), rank=1, world_size=2), 5))
    ld = StreamingLoader(_cfg(remote, num_workers=0), rank=1, world_size=2)
    got = list(itertools.islice(ld, 5))
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    assert all(torch.equal(g["audio"], w["audio"]) for g, w in zip(got, want))
    # a mid-epoch resume over S3 skips by tar headers and still lands on the same batches
    st = StreamingLoader(_cfg(remote), rank=1, world_size=2)  # 2 workers: fsspec in forked processes
    st.load_state_dict(StreamingLoader(_cfg(remote), rank=1, world_size=2).state_dict() | {"step": 2})
    want2 = list(itertools.islice(StreamingLoader(_cfg(local), rank=1, world_size=2), 5))
    got2 = list(itertools.islice(st, 3))
    assert [b["keys"] for b in got2] == [b["keys"] for b in want2[2:5]]
    assert all(torch.equal(g["audio"], w["audio"]) for g, w in zip(got2, want2[2:5]))
    assert [s["key"] for s in iter_samples([remote])] == [c["key"] for c in clips]


def test_reads_shards_written_by_shard_tools_build(tmp_path):
    from shard_tools.build import build_dataset
    from shard_tools.recipe import Item, Recipe

    rng = np.random.default_rng(5)
    items, source = [], {}
    families = ["guitar", "organ", "flute"]
    for i in range(18):
        x = (0.3 * rng.standard_normal(4000 + 250 * i)).astype(np.float32)
        path = tmp_path / "src" / f"note{i}.wav"
        path.parent.mkdir(exist_ok=True)
        sf.write(str(path), x, 16000, subtype="PCM_16")
        key = f"note-{i:03d}"
        source[key] = sf.read(str(path), dtype="float32", always_2d=True)[0].T
        items.append(Item(path=str(path), source=f"note{i}.wav", split="train", id=str(i), key=key,
                          labels={"instrument_family_str": families[i % 3], "qualities": ["bright"] if i % 2 else []}))
    recipe = Recipe(dataset="folder", items=items, skipped=[], files_in=18,
                    labels={"instrument_family_str": {"kind": "class", "names": families},
                            "qualities": {"kind": "multi_hot", "names": ["bright", "dark"]}})
    out = str(tmp_path / "shards")
    build_dataset(recipe, out, shard_size=40_000, progress=False)
    manifest = os.path.join(out, "train.manifest.json")

    ld = StreamingLoader(_cfg(manifest, mode="single", crop_samples=3000, batch_size=3), world_size=2)
    ld2 = StreamingLoader(_cfg(manifest, mode="single", crop_samples=3000, batch_size=3), rank=1, world_size=2)
    assert len(ld.manifests[0].shards) > 1  # the small shard size forced several tars
    keys = []
    for b in itertools.islice(ld, ld.steps_per_epoch):
        for i, k in enumerate(b["keys"]):
            i_src = int(k.split("-")[1])
            view = b["audio"][i, 0, 0].numpy()
            win = np.lib.stride_tricks.sliding_window_view(source[k][0], 3000)
            assert (win == view).all(axis=1).any(), f"{k}: crop is not a window of the source file"
            assert b["labels"]["instrument_family_str"][i] == i_src % 3
            assert b["labels"]["qualities"][i].tolist() == [float(i_src % 2), 0.0]
        keys += b["keys"]
    keys += [k for b in itertools.islice(ld2, ld2.steps_per_epoch) for k in b["keys"]]
    assert sorted(keys) == sorted(source)
    whole = {s["key"]: s["audio"] for s in iter_samples([manifest])}
    assert all(np.array_equal(whole[k], source[k]) for k in source)


def test_decoding_reads_the_tar_bytes_without_temp_files(tmp_path, monkeypatch):
    # the loader must decode from memory: make any temp-file creation fail loudly
    import tempfile

    clips = shardgen.make_clips(6, sample_rate=8000, seed=22)
    man = shardgen.write_split(str(tmp_path), clips, [6])

    def no_temp(*a, **k):
        raise AssertionError("the loader created a temp file")

    monkeypatch.setattr(tempfile, "mkstemp", no_temp)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_temp)
    monkeypatch.setattr(tempfile, "TemporaryDirectory", no_temp)
    b = next(iter(StreamingLoader(_cfg(man, num_workers=0, batch_size=3))))
    src = {c["key"]: sf.read(io.BytesIO(shardgen.encode(c["audio"], 8000)), dtype="float32")[0] for c in clips}
    for i, k in enumerate(b["keys"]):
        win = np.lib.stride_tricks.sliding_window_view(src[k], 1000)
        assert (win == b["audio"][i, 0, 0].numpy()).all(axis=1).any()


def test_transient_read_error_is_retried_by_reopening(tmp_path, monkeypatch, capsys):
    from pipeline import shards

    clips = shardgen.make_clips(12, sample_rate=8000, seed=23)
    man = shardgen.write_split(str(tmp_path), clips, [12])
    want = list(itertools.islice(StreamingLoader(_cfg(man, num_workers=0, batch_size=3)), 4))

    real_open = shards.fsio.open_url
    failures = {"left": 2}

    class Flaky(io.RawIOBase):
        """A shard file whose connection resets (twice) once the reader is past the first members."""

        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            if self.f.tell() > 20_000 and failures["left"]:
                failures["left"] -= 1
                raise ConnectionResetError("connection reset by peer (simulated)")
            return self.f.read(n)

        def seek(self, off, whence=0):
            return self.f.seek(off, whence)

        def tell(self):
            return self.f.tell()

        def seekable(self):
            return True

        def readable(self):
            return True

        def close(self):
            self.f.close()
            super().close()

    monkeypatch.setattr(shards.fsio, "open_url", lambda url, mode="rb": Flaky(real_open(url, mode)) if url.endswith(".tar") else real_open(url, mode))
    got = list(itertools.islice(StreamingLoader(_cfg(man, num_workers=0, batch_size=3)), 4))
    assert failures["left"] == 0 and "transient error" in capsys.readouterr().out
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    assert all(torch.equal(g["audio"], w["audio"]) for g, w in zip(got, want))
