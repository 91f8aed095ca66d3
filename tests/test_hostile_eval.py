"""Issue 13's evaluation cases, replayed on tiny data: nothing scored on a silently reduced split,
no cache of a partial read, every sample not embedded counted, no hang on a FIFO, no traceback.

Items: 2 (an incomplete split says so at the top and is refused under --min-read unless
--allow-incomplete), 3 (the cache holds only what was actually read whole), 4 (embed counts a
truncated shard's lost samples), 10 (a FIFO named *.wav is skipped, not opened), 17 (bad flags and
files are one line each), 18 (a dangling symlink, a manifest with a missing shard: listed, not fatal).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import evaluate
from tests import evaldata, shardgen

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def toy(tmp_path) -> str:
    return evaldata.write_toy(str(tmp_path / "toy"), sizes=(16, 8, 12))


def _probe(toy: str, out: str, *extra: str) -> list[str]:
    return ["probe", "--data", toy, "--baselines", "logmel", "--tasks", "pitch", "--max-epochs", "10", "--patience", "3",
            "--out", out, "--no-progress", *extra]


def _one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_incomplete_test_split_is_refused_then_flagged_and_never_cached(toy, tmp_path, capsys) -> None:
    """Items 2 and 3: a truncated test shard leaves 6 + some of 12 test clips. The probe refuses;
    with --allow-incomplete the table starts by saying so; after the shard is repaired the same
    cache folder gives scores on all 12 clips (the partial pass was never cached)."""
    shard = os.path.join(toy, "test-000001.tar")
    good = open(shard, "rb").read()
    shardgen.truncate(shard, 0.5)
    out, cache = str(tmp_path / "e"), str(tmp_path / "cache")
    line = _one_line_error(capsys, evaluate.main(_probe(toy, out, "--cache", cache)))
    assert "the test split is incomplete: read " in line and "of 12 samples" in line and "test-000001.tar" in line
    assert "--allow-incomplete" in line and not os.path.exists(os.path.join(out, "results.json"))

    assert evaluate.main(_probe(toy, out, "--cache", cache, "--allow-incomplete")) == 0
    printed = capsys.readouterr().out
    res = json.load(open(os.path.join(out, "results.json")))
    inc = res["incomplete"]["toy/test"]
    assert inc["listed"] == 12 and inc["read"] + inc["not_read"] == 12 and 6 <= inc["read"] < 12
    assert res["rows"][0]["test"]["n"] == inc["read"]
    md = open(os.path.join(out, "results.md")).read()
    assert md.startswith("**INCOMPLETE DATA**") and "toy/test: read" in md
    assert printed.index("INCOMPLETE DATA") < printed.index("| encoder |")
    cached = [f for _, _, fs in os.walk(cache) for f in fs]
    assert not any("-test-" in f for f in cached) and any("-train-" in f for f in cached)

    with open(shard, "wb") as f:  # repaired: `shard-tools verify` would say OK again
        f.write(good)
    out2 = str(tmp_path / "e2")
    assert evaluate.main(_probe(toy, out2, "--cache", cache)) == 0
    res2 = json.load(open(os.path.join(out2, "results.json")))
    assert res2["rows"][0]["test"]["n"] == 12 and "incomplete" not in res2
    assert not open(os.path.join(out2, "results.md")).read().startswith("**INCOMPLETE")


def test_min_read_threshold(toy, tmp_path, capsys) -> None:
    """--min-read 0.4 accepts a test split missing some samples (and still heads the table with it)."""
    shardgen.truncate(os.path.join(toy, "test-000001.tar"), 0.5)
    assert evaluate.main(_probe(toy, str(tmp_path / "e"), "--cache", "", "--min-read", "0.4")) == 0
    assert open(tmp_path / "e" / "results.md").read().startswith("**INCOMPLETE DATA**")


def test_cache_entry_is_keyed_by_the_manifest_and_checked_against_it(toy, tmp_path) -> None:
    """Item 3: a cache entry is used only for the manifest it was read from (its shards' bytes and
    sha256) and only when it holds as many clips as that manifest lists."""
    from eval_tools.data import Dataset
    from eval_tools.encoders import logmel_encoder
    from eval_tools.extract import cache_path, extract

    ds = Dataset.from_dir(toy)
    enc = logmel_encoder(16000)
    cache = str(tmp_path / "c")
    first = extract(enc, ds, "test", cache_dir=cache, progress=False)
    path = cache_path(cache, enc, ds, "test", evaluate_view())
    assert os.path.exists(path) and first.report.complete and len(first.keys) == 12
    # an entry that disagrees with the manifest's count is not used (a stale or tampered entry)
    stale = first.subset(np.arange(10))
    stale.report = first.report
    stale.save(path)
    again = extract(enc, ds, "test", cache_dir=cache, progress=False)
    assert len(again.keys) == 12
    # rewriting the manifest (new shard hashes) changes the key
    m = json.load(open(os.path.join(toy, "test.manifest.json")))
    m["shards"][0]["sha256"] = "0" * 64
    json.dump(m, open(os.path.join(toy, "test.manifest.json"), "w"))
    assert cache_path(cache, enc, Dataset.from_dir(toy), "test", evaluate_view()) != path


def evaluate_view():
    from eval_tools.extract import View

    return View()


def _embed(capsys, *args: str) -> tuple[int, str]:
    rc = evaluate.main(["embed", "--logmel", "--no-progress", *args])
    return rc, capsys.readouterr().out


def test_embed_counts_a_truncated_shards_lost_samples(toy, tmp_path, capsys) -> None:
    """Item 4: 12 test clips, the second shard cut in half: every lost sample is counted."""
    shardgen.truncate(os.path.join(toy, "test-000001.tar"), 0.5)
    out = tmp_path / "emb"
    rc, printed = _embed(capsys, "--out", str(out), os.path.join(toy, "test.manifest.json"))
    assert rc == 0
    rep = json.load(open(out / "report.json"))
    n = len((out / "keys.txt").read_text().split())
    assert rep["embedded"] == n and rep["not_embedded"] == 12 - n > 0
    (src,) = rep["sources"][1:]
    assert src["listed"] == 12 and src["skipped"][0]["where"].endswith("test-000001.tar")
    assert f"{12 - n} not embedded" in printed and "test-000001.tar" in printed


@pytest.mark.timeout(60)
def test_embed_skips_a_fifo_and_a_dangling_symlink(tmp_path, capsys) -> None:
    """Items 10 and 18: a FIFO named *.wav would block open() forever; a dangling link cannot be read.
    Both are listed; the real file is embedded."""
    folder = tmp_path / "audio"
    folder.mkdir()
    from tests.conftest import write_tone

    write_tone(str(folder / "a.wav"), seconds=0.5)
    os.mkfifo(folder / "pipe.wav")
    os.symlink(folder / "gone.wav", folder / "link.wav")
    out = tmp_path / "emb"
    rc, printed = _embed(capsys, "--out", str(out), str(folder))
    assert rc == 0
    assert [os.path.basename(k) for k in (out / "keys.txt").read_text().split()] == ["a.wav"]
    rep = json.load(open(out / "report.json"))
    reasons = {os.path.basename(s["where"]): s["reason"] for s in rep["sources"][0]["skipped"]}
    assert reasons == {"link.wav": "dangling symlink", "pipe.wav": "not a regular file (FIFO)"}
    assert rep["not_embedded"] == 2 and "2 not embedded" in printed


def test_embed_lists_a_manifest_with_a_missing_shard(toy, tmp_path, capsys) -> None:
    """Item 18: the first test shard is gone; its samples are listed as not embedded, the rest are."""
    os.remove(os.path.join(toy, "test-000000.tar"))
    out = tmp_path / "emb"
    rc, printed = _embed(capsys, "--out", str(out), os.path.join(toy, "test.manifest.json"))
    assert rc == 0
    rep = json.load(open(out / "report.json"))
    assert rep["embedded"] == 6 and rep["not_embedded"] == 6
    assert rep["sources"][1]["skipped"][0]["samples"] == 6 and "shard not readable" in rep["sources"][1]["skipped"][0]["reason"]
    assert "6 not embedded" in printed


def test_nothing_readable_is_one_line(tmp_path, capsys) -> None:
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "x.wav").write_bytes(b"RIFF not audio")
    line = _one_line_error(capsys, evaluate.main(["embed", "--logmel", "--no-progress", "--out", str(tmp_path / "o"), str(folder)]))
    assert "no clip could be read" in line and "x.wav" in line


def _checkpoint(path: str) -> None:
    import train_config

    cfg = train_config.preset("wav2vec2_tiny")
    _, model_cls = train_config.model_classes(cfg.arch)
    torch.save({"format": "musicssl-ckpt/1", "step": 1, "epoch": 0, "model_name": cfg.arch,
                "model": model_cls(cfg.model).state_dict(), "config": train_config.to_dict(cfg)}, path)


@pytest.mark.parametrize("case", ["label-fraction-0", "no-valid-split", "no-checkpoint", "baselines-randum", "tasks-nosuch",
                                  "layer-99", "not-a-checkpoint", "pickle-checkpoint", "finetune-label-fraction",
                                  "finetune-tasks", "device-cuda-missing", "probe-preset-with-checkpoint",
                                  "finetune-set-with-checkpoint", "embed-preset-with-checkpoint"])
def test_bad_flags_and_files_are_one_line_each(case, toy, tmp_path, capsys) -> None:
    """Item 17: each of these was a traceback."""
    ckpt = str(tmp_path / "ckpt-00000001.pt")
    _checkpoint(ckpt)
    out = str(tmp_path / "o")
    base = ["probe", "--data", toy, "--out", out, "--no-progress", "--max-epochs", "2"]
    if case == "label-fraction-0":
        argv, want = [*base, "--baselines", "logmel", "--label-fraction", "0"], "--fractions/--label-fraction must be in (0, 1]"
    elif case == "no-valid-split":
        os.remove(os.path.join(toy, "valid.manifest.json"))
        argv, want = [*base, "--baselines", "logmel"], "valid.manifest.json"
    elif case == "no-checkpoint":
        argv, want = [*base, "--checkpoint", str(tmp_path / "nope.pt")], "--checkpoint"
    elif case == "baselines-randum":
        argv, want = [*base, "--baselines", "randum"], "--baselines: unknown ['randum']"
    elif case == "tasks-nosuch":
        argv, want = [*base, "--baselines", "logmel", "--tasks", "nosuch"], "--tasks nosuch: no such label field"
    elif case == "layer-99":
        argv, want = [*base, "--checkpoint", ckpt, "--baselines", "", "--layer", "99"], "--layer 99: this wav2vec2 has layers 0..2"
    elif case == "not-a-checkpoint":
        with open(str(tmp_path / "fake.pt"), "w") as f:
            f.write("123")
        argv, want = [*base, "--checkpoint", str(tmp_path / "fake.pt")], "truncated or not a checkpoint"
    elif case == "pickle-checkpoint":
        torch.save({"format": "musicssl-ckpt/1", "obj": shutil.copyfile}, str(tmp_path / "evil.pt"))  # a non-tensor object
        argv, want = [*base, "--checkpoint", str(tmp_path / "evil.pt")], "holds non-tensor Python objects"
    elif case == "finetune-label-fraction":
        argv = ["finetune", "--data", toy, "--preset", "clmr_tiny", "--label-fraction", "0", "--out", out]
        want = "--label-fraction must be in (0, 1]"
    elif case == "finetune-tasks":
        argv, want = ["finetune", "--data", toy, "--preset", "clmr_tiny", "--tasks", "nosuch", "--out", out], "--tasks nosuch"
    elif case == "probe-preset-with-checkpoint":  # item 23: the preset was silently ignored
        argv, want = [*base, "--checkpoint", ckpt, "--preset", "clmr_tiny"], "--preset/--set: not used with --checkpoint"
    elif case == "finetune-set-with-checkpoint":
        argv = ["finetune", "--data", toy, "--checkpoint", ckpt, "--set", "model.temperature=0.1", "--out", out]
        want = "--preset/--set: not used with --checkpoint"
    elif case == "embed-preset-with-checkpoint":
        argv = ["embed", "--checkpoint", ckpt, "--preset", "clmr_tiny", "--out", out, toy]
        want = "--preset/--set: not used with --checkpoint"
    else:
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        argv, want = [*base, "--baselines", "logmel", "--device", "cuda"], "--device cuda: CUDA is not available"
    line = _one_line_error(capsys, evaluate.main(argv))
    assert want in line, line
    assert "weights_only=False" not in line
