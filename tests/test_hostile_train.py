"""train.py against an unlucky or hostile user (issue 13: items 13, 14, 19, 21, 23): a shard that
vanishes mid-run, damaged and malicious checkpoints, resumes that cannot continue, malformed
manifests, skipped samples that must be reported. Every failure must be one line naming the flag
or file, never a traceback, and finished work must survive."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from tests import shardgen
from tests.test_train import SMALL, TRAIN_PY, config, losses, one_thread, subprocess_env, wait_for_lines  # noqa: F401 - one_thread is an autouse fixture
from training import checkpoint


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("shards")
    clips = shardgen.make_clips(48, sample_rate=8000, seconds=(1.0, 1.0), seed=3)
    return shardgen.write_split(str(folder), clips, [12, 12, 12, 12])


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    code = train.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def cli(manifest: str, out: str, *extra: str) -> list[str]:
    return ["--config", "clmr_tiny", f"--data.manifests={manifest}", f"--train.out_dir={out}", *SMALL,
            "--data.num_workers=0", *extra]


# ---- 13: a shard missing mid-run ---------------------------------------------------------------


def test_a_shard_vanishing_mid_run_checkpoints_names_it_and_resumes_exactly(tmp_path):
    folder = tmp_path / "shards"
    man = shardgen.write_split(str(folder), shardgen.make_clips(48, sample_rate=8000, seconds=(1.0, 1.0), seed=3),
                               [12, 12, 12, 12])
    common = ["--data.num_workers=1", "--logging.every=1", "--checkpoint.every=1000"]
    out = str(tmp_path / "run")
    proc = subprocess.Popen(
        [sys.executable, TRAIN_PY, "--config", "clmr_tiny", f"--data.manifests={man}", f"--train.out_dir={out}",
         *SMALL, *common, "--train.steps=1000"],
        cwd=str(tmp_path), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_for_lines(os.path.join(out, "metrics.jsonl"), 4, proc)
    shard = folder / "train-000002.tar"
    shutil.move(shard, tmp_path / "aside.tar")  # gone: every epoch (3 steps) reads every shard
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 2, stdout + stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "train-000002.tar" in stderr and "--resume auto" in stderr
    step = len(losses(out))
    ckpts = checkpoint.list_checkpoints(os.path.join(out, "checkpoints"))
    assert [s for s, _ in ckpts] == [step] and 4 <= step < 1000  # every finished step kept
    assert f"ckpt-{step:08d}.pt holds step {step}" in stderr

    shutil.move(tmp_path / "aside.tar", shard)
    total = step + 3
    ref_out = str(tmp_path / "ref")
    train.train(config(man, ref_out, *common, f"--train.steps={total}"))
    summary = train.train(config(man, out, *common, f"--train.steps={total}", "--checkpoint.resume=auto"))
    assert summary["resumed_from"] == ckpts[-1][1] and summary["steps_run"] == 3
    assert losses(out) == pytest.approx(losses(ref_out), rel=1e-6, abs=1e-7)


# ---- 14 and 21: damaged and malicious checkpoints ----------------------------------------------


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("damage", ["truncated", "empty", "hostile"])
def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(manifest, tmp_path, capsys, damage):
    common = ["--data.num_workers=0", "--checkpoint.every=2", "--checkpoint.keep=3"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    train.train(config(manifest, ref, *common, "--train.steps=6"))
    train.train(config(manifest, out, *common, "--train.steps=4"))
    newest = os.path.join(out, "checkpoints", "ckpt-00000004.pt")
    marker = str(tmp_path / "executed")
    if damage == "truncated":
        data = open(newest, "rb").read()
        open(newest, "wb").write(data[: len(data) // 3])
    elif damage == "empty":
        open(newest, "wb").close()
    else:
        torch.save({"format": checkpoint.FORMAT, "step": 4, "model": _Payload(marker)}, newest)
    capsys.readouterr()
    summary = train.train(config(manifest, out, *common, "--train.steps=6", "--checkpoint.resume=auto"))
    said = capsys.readouterr().out
    assert f"{newest}:" in said and "falling back to" in said and "ckpt-00000002.pt" in said
    expected = {"truncated": "truncated or not a checkpoint", "empty": "is empty",
                "hostile": "holds non-tensor Python objects (posix.system)"}[damage]
    assert expected in said and "weights_only" not in said
    assert summary["resumed_from"].endswith("ckpt-00000002.pt") and summary["steps_run"] == 4
    assert losses(out) == pytest.approx(losses(ref), rel=1e-6, abs=1e-7)
    assert not os.path.exists(marker)


def test_a_malicious_or_unreadable_checkpoint_is_one_line_and_runs_nothing(manifest, tmp_path, capsys):
    marker = str(tmp_path / "executed")
    evil = str(tmp_path / "ckpt-00000009.pt")
    torch.save({"format": checkpoint.FORMAT, "step": 9, "model": _Payload(marker)}, evil)
    code, _, err = run_main(cli(manifest, str(tmp_path / "a"), "--resume", evil), capsys)
    assert code == 2 and not os.path.exists(marker)
    assert err.strip() == (f"train.py: error: --resume {evil}: the file holds non-tensor Python objects (posix.system); "
                           "a musicssl checkpoint holds only tensors and plain values, so this file will not be loaded")
    folder = tmp_path / "b" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "ckpt-00000003.pt").write_bytes(b"")
    code, out, err = run_main(cli(manifest, str(tmp_path / "b"), "--resume", "auto"), capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{folder / 'ckpt-00000003.pt'}: the file is empty" in out
    assert f"none of the 1 checkpoints in {folder} is readable" in err


# ---- 19: resumes that cannot continue, malformed manifests, a batch larger than the data -------


@pytest.mark.parametrize(("change", "message"), [
    (["--train.global_batch_size=8"], "was written with 16 clips per rank and micro-step"),
    (["--model.channels=16,16,32,32,64"], "--model.channels: [16, 16, 32, 32, 32] -> [16, 16, 32, 32, 64]"),
    (["--train.seed=5"], "--train.seed: 0 -> 5"),
    ("manifests", "--data.manifests:"),
])
def test_resume_with_a_changed_run_is_a_config_error(manifest, tmp_path, capsys, change, message):
    out = str(tmp_path / "run")
    train.train(config(manifest, out, "--train.steps=2", "--data.num_workers=0"))
    if change == "manifests":
        other = shardgen.write_split(str(tmp_path / "other"), shardgen.make_clips(24, sample_rate=8000, seed=4), [24])
        argv = cli(other, out, "--train.steps=4", "--resume", "auto")
    else:
        argv = cli(manifest, out, "--train.steps=4", "--resume", "auto", *change)
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err and "ckpt-00000002.pt" in err


def _manifest_with(tmp_path, manifest: str, **fields) -> str:
    d = json.load(open(manifest))
    for shard in d["shards"]:
        shard["url"] = os.path.join(os.path.dirname(manifest), shard["url"])
    d.update(fields)
    path = tmp_path / "bad" / "train.manifest.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize(("fields", "message"), [
    ({"shards": [{"url": "x.tar", "num_samples": "many"}]}, "--data.manifests:"),
    ({"shards": "train-000000.tar"}, "--data.manifests:"),
    ({"sample_rate": "fast"}, "sample_rate 'fast'"),
    ({"channels": -2}, "channels -2"),
    ({"labels": {"pitch": "class"}}, "--data.manifests:"),
])
def test_malformed_manifest_fields_are_config_errors(manifest, tmp_path, capsys, fields, message):
    bad = _manifest_with(tmp_path, manifest, **fields)
    code, _, err = run_main(cli(bad, str(tmp_path / "run"), "--train.steps=1"), capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert message in err and bad in err


def test_a_global_batch_larger_than_the_data_names_the_flag(manifest, tmp_path, capsys):
    code, _, err = run_main(cli(manifest, str(tmp_path / "run"), "--train.global_batch_size=64"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--train.global_batch_size=64" in err and "48 clips" in err


def test_a_manifest_folder_is_told_to_give_a_manifest(manifest, tmp_path, capsys):
    folder = os.path.dirname(manifest)
    code, _, err = run_main(cli(folder, str(tmp_path / "run")), capsys)
    assert code == 2
    assert f"give a <split>.manifest.json, e.g. {os.path.join(folder, 'train.manifest.json')}" in err


# ---- 23: skipped samples and skipped steps are reported --------------------------------------


def test_skipped_samples_reach_the_progress_line_metrics_and_summary(tmp_path, capsys):
    clips = shardgen.make_clips(48, sample_rate=8000, seconds=(1.0, 1.0), seed=3)
    bad = [c["key"] for c in clips[::8]]  # 6 corrupt samples, each met once per epoch (3 steps)
    man = shardgen.write_split(str(tmp_path / "shards"), clips, [12, 12, 12, 12], corrupt_keys=tuple(bad))
    out = str(tmp_path / "run")
    with pytest.warns(UserWarning, match="skipping bad sample"):
        summary = train.train(config(man, out, "--train.steps=6", "--data.num_workers=0", "--logging.every=3"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    logged = [r for r in records if "samples_skipped" in r]
    assert [r["step"] for r in logged] == [3, 6]
    # each corrupt sample is met once an epoch (a substitute drawn for it may be corrupt too)
    counts = [r["data/skipped_corrupt"] for r in logged]
    assert 6 <= counts[0] < counts[1] and [r["samples_skipped"] for r in logged] == counts
    assert [f"skipped {n} samples, 0 non-finite steps" in line for n, line in zip(counts, lines)] == [True, True]
    assert summary["samples_skipped"] == counts[1] == summary["loader_stats"]["skipped_corrupt"]
    assert summary["nonfinite_skipped"] == 0


def test_a_window_of_only_skipped_steps_prints_loss_n_a(manifest, tmp_path, capsys):
    out = str(tmp_path / "run")
    with pytest.raises(train.TrainingDiverged):
        train.train(config(manifest, out, "--optim.lr=1e30", "--train.steps=50", "--train.max_nonfinite=4",
                           "--data.num_workers=0", "--logging.every=2"))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    # step 1 is finite (the first update explodes the weights), steps 2-4 are not
    assert " | loss n/a | " in lines[1] and "0 samples, 3 non-finite steps" in lines[1]
    assert " | loss n/a | " not in lines[0]
