"""train.py end to end on tiny generated shards (CPU): learning, W&B offline, kill -9 + exact resume,
SIGTERM, torchrun with two gloo ranks, non-finite losses, out-of-memory advice, bad configs.

Data: 48 one-second clips at 8 kHz, each a distinct tone (110 + 7 i Hz) in noise (tests/shardgen.py),
so two crops of one clip share a pitch that the contrastive model can learn to match. Every run
uses one torch thread (the same numerics in-process and in subprocesses, and no oversubscription
on a shared 2-core machine) and a 5-block SampleCNN (729-sample crops).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch

import train
import train_config as tc
from tests import shardgen
from training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(ROOT, "train.py")
SMALL = ["--model.channels=16,16,32,32,32", "--logging.wandb_mode=disabled"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("shards")
    clips = shardgen.make_clips(48, sample_rate=8000, seconds=(1.0, 1.0), seed=3)
    return shardgen.write_split(str(folder), clips, [12, 12, 12, 12])


@pytest.fixture(autouse=True)
def one_thread(monkeypatch, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # W&B writes nothing outside tmp_path
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    yield
    torch.set_num_threads(threads)


def config(manifest: str, out: str, *overrides: str) -> tc.Config:
    return tc.apply_overrides(
        tc.preset("clmr_tiny"),
        [f"--data.manifests={manifest}", f"--train.out_dir={out}", *SMALL, *overrides],
    )


def losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT)
    return env


def wait_for_lines(path: str, n: int, proc: subprocess.Popen, timeout: float = 240.0) -> int:
    """Poll metrics.jsonl until it has ``n`` records; fails if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                count = sum(1 for line in f if line.endswith("\n"))
            if count >= n:
                return count
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"train.py exited ({proc.returncode}) before step {n}:\n{out}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no step {n} in {path} after {timeout}s")


def wandb_records(run_file: str, timeout: float = 60.0) -> list:
    """Records of an offline ``run-<id>.wandb`` file, once its ``exit`` record is there.

    wandb-core writes the file from its own process and may still be flushing when ``finish()``
    returns (seen on a loaded 2-core box), so wait up to ``timeout`` seconds for the run's end.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records_now(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _wandb_records_now(run_file: str) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B transaction log"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


# ------------------------------------------------------------------------------------------------


def test_tiny_preset_learns_and_wandb_offline_holds_keys_and_audio(manifest, tmp_path):
    out = str(tmp_path / "run")
    args = [
        "--optim.lr=3e-3", "--data.num_workers=0", "--augment.order=polarity,gain,noise",
        "--logging.wandb_mode=offline", "--logging.every=6", "--logging.audio_every=20",
        "--logging.audio_examples=2", "--checkpoint.every=10", "--checkpoint.keep=2",
    ]
    summary = train.train(config(manifest, out, "--train.steps=36", *args))
    ls = losses(out)
    assert summary["status"] == "completed" and summary["step"] == 36 and len(ls) == 36
    first, last = sum(ls[:6]) / 6, sum(ls[-6:]) / 6
    # chance level for 16 pairs is ln(31) = 3.43; the model must do clearly better by the end
    assert ls[0] == pytest.approx(3.43, abs=0.25)
    assert last < first - 0.3, f"loss did not fall: first six {first:.3f}, last six {last:.3f}"
    assert summary["nonfinite_skipped"] == 0 and summary["loader_stats"]["examples"] == 36 * 16

    # newest two checkpoints kept (10, 20, 30, 36 written)
    names = sorted(os.listdir(os.path.join(out, "checkpoints")))
    assert names == ["ckpt-00000030.pt", "ckpt-00000036.pt"]

    run_dirs = glob.glob(os.path.join(out, "wandb", "offline-run-*"))
    assert len(run_dirs) == 1 and run_dirs[0].endswith(summary["wandb_run_id"])
    records = wandb_records(glob.glob(os.path.join(run_dirs[0], "run-*.wandb"))[0])
    keys: set[str] = set()
    steps: list[int] = []
    captions: list[str] = []
    config_json = {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            keys |= {"/".join(k.split("/")[:2]) for k in items}  # media are nested: examples/clip0_view1/path
            captions += [json.loads(v) for k, v in items.items() if k.startswith("examples/clip") and k.endswith("/caption")]
            if "train/loss" in items:
                steps.append(int(items["_step"]))
                if int(items["_step"]) == 36:
                    assert float(items["train/loss"]) == pytest.approx(sum(ls[-6:]) / 6, rel=1e-5)
        elif kind in ("run", "config"):  # the config arrives with the run record (and later updates)
            update = rec.run.config.update if kind == "run" else rec.config.update
            config_json.update({u.key: json.loads(u.value_json) for u in update})
    expected = {"train/loss", "train/lr", "train/grad_norm", "model/contrastive_acc", "perf/clips_per_s",
                "perf/audio_hours_per_s", "perf/data_wait_fraction", "perf/steps_per_s", "train/nonfinite_skipped",
                "data/skipped_corrupt", "data/skipped_short", "examples/table", "examples/clip0_view1"}
    assert expected <= keys, f"missing W&B keys: {sorted(expected - keys)}"
    assert steps == [6, 12, 18, 24, 30, 36]
    assert config_json["optim"]["lr"] == 3e-3 and config_json["train"]["steps"] == 36

    # audio: 2 clips x 2 views on steps 1 and 21, as W&B media and as WAV + params.json on disk
    wavs = glob.glob(os.path.join(run_dirs[0], "files", "media", "audio", "**", "*.wav"), recursive=True)
    assert len(wavs) >= 8
    meta = json.load(open(os.path.join(out, "examples", "step-00000021", "params.json")))
    assert meta["sample_rate"] == 8000 and len(meta["examples"]) == 4
    assert all(set(e["params"]) <= {"polarity", "gain", "noise"} for e in meta["examples"])
    # each augmented view's caption names the transforms it got and their drawn parameters
    assert len(captions) == 8 and any("polarity" in c for c in captions)
    gains = [float(c.split("gain(gain_db=")[1].split(")")[0]) for c in captions if "gain(gain_db=" in c]
    assert gains and all(-20.0 <= g <= -1.0 for g in gains)
    assert summary["audio_examples_logged"] == 8

    # a longer run resumed from the last checkpoint continues the same W&B run id
    again = train.train(config(manifest, out, "--train.steps=38", *args, "--logging.audio_every=0",
                               "--checkpoint.resume=auto"))
    assert again["resumed_from"].endswith("ckpt-00000036.pt") and again["steps_run"] == 2
    assert again["wandb_run_id"] == summary["wandb_run_id"]
    assert len(glob.glob(os.path.join(out, "wandb", f"offline-run-*-{summary['wandb_run_id']}"))) == 2
    assert len(losses(out)) == 38


def test_kill9_then_resume_repeats_the_uninterrupted_losses(manifest, tmp_path):
    # Full default augmentation chain and one loader worker process: the augmentation generator, the
    # data position (with a worker's shuffle buffer) and the optimizer must all come back.
    common = ["--train.steps=12", "--checkpoint.every=4", "--data.num_workers=1", "--logging.every=4"]
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    train.train(config(manifest, ref_out, *common))
    reference = losses(ref_out)

    proc = subprocess.Popen(
        [sys.executable, TRAIN_PY, "--config", "clmr_tiny", f"--data.manifests={manifest}",
         f"--train.out_dir={out}", *SMALL, *common],
        cwd=str(tmp_path), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_for_lines(os.path.join(out, "metrics.jsonl"), 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    logged_before_kill = len(losses(out))
    assert 6 <= logged_before_kill < 12
    ckpts = checkpoint.list_checkpoints(os.path.join(out, "checkpoints"))
    assert ckpts and ckpts[-1][0] in (4, 8)

    summary = train.train(config(manifest, out, *common, "--checkpoint.resume=auto"))
    assert summary["resumed_from"] == ckpts[-1][1] and summary["steps_run"] == 12 - ckpts[-1][0]
    resumed = losses(out)
    assert len(resumed) == 12  # metrics.jsonl was cut back to the checkpoint's step on resume
    assert resumed == pytest.approx(reference, rel=1e-6, abs=1e-7)
    assert len(set(round(x, 4) for x in reference)) > 6  # the sequence is not trivially constant


def test_sigterm_writes_a_loadable_checkpoint_and_exits_0(manifest, tmp_path):
    # SIGTERM to the trainer process (what torchrun forwards on preemption), with a loader worker
    out = str(tmp_path / "run")
    proc = subprocess.Popen(
        [sys.executable, TRAIN_PY, "--config", "clmr_tiny", f"--data.manifests={manifest}",
         f"--train.out_dir={out}", *SMALL, "--train.steps=1000", "--data.num_workers=1", "--checkpoint.every=500"],
        cwd=str(tmp_path), env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wait_for_lines(os.path.join(out, "metrics.jsonl"), 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout
    assert "SIGTERM received" in stdout and "stopped at step" in stdout
    summary = json.load(open(os.path.join(out, "summary.json")))
    step = summary["step"]
    assert summary["status"] == "stopped" and 3 <= step < 1000
    assert len(losses(out)) == step
    assert summary["checkpoint"].endswith(f"ckpt-{step:08d}.pt")

    state = torch.load(summary["checkpoint"], weights_only=True)  # docs/architecture.md §5
    assert state["format"] == "musicssl-ckpt/1" and state["step"] == step and state["model_name"] == "clmr"
    assert {"model", "optimizer", "scheduler", "loader", "augment", "rng", "config", "wandb_run_id", "epoch"} <= set(state)
    assert state["loader"]["step"] == step  # batches consumed, one per step
    assert state["config"]["train"]["steps"] == 1000 and state["wandb_run_id"] == summary["wandb_run_id"]
    model, cfg = train.load_model_from_checkpoint(summary["checkpoint"])
    assert cfg.arch == "clmr" and cfg.model.channels == (16, 16, 32, 32, 32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k])


def test_torchrun_two_gloo_ranks_with_accumulation_and_exact_resume(manifest, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN_PY,
           "--config", "clmr_tiny", f"--data.manifests={manifest}", f"--train.out_dir={out}", *SMALL,
           "--train.steps=4", "--train.grad_accum=2", "--train.global_batch_size=16", "--data.num_workers=0",
           "--checkpoint.every=2", "--checkpoint.keep=3", "--logging.every=2"]
    res = subprocess.run(cmd, cwd=str(tmp_path), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "on 2 x cpu, global batch 16 = 2 ranks x 2 micro-steps x 4 clips" in res.stdout
    ls = losses(out)
    assert len(ls) == 4 and all(x is not None and 0 < x < 10 for x in ls)
    state = torch.load(os.path.join(out, "checkpoints", "ckpt-00000004.pt"), weights_only=True)
    ranks = state["ranks"]
    assert len(ranks) == 2
    # each rank augments with its own generator and saw 4 steps x 2 micro-steps of the stream
    assert not torch.equal(ranks[0]["augment"]["_extra_state"]["generator"], ranks[1]["augment"]["_extra_state"]["generator"])
    assert [r["loader"]["step"] for r in ranks] == [8, 8]
    assert state["loader"]["world_size"] == 2

    # both ranks restore their own stream position, augmentation generator and RNG from step 2
    os.remove(os.path.join(out, "checkpoints", "ckpt-00000004.pt"))
    res = subprocess.run([*cmd, "--resume", "auto"], cwd=str(tmp_path), env=subprocess_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resuming from" in res.stdout and "ckpt-00000002.pt at step 2" in res.stdout
    assert losses(out) == pytest.approx(ls, rel=1e-6, abs=1e-7)


def test_nonfinite_losses_are_skipped_then_stop_with_a_checkpoint(manifest, tmp_path):
    out = str(tmp_path / "run")
    # lr 1e30: the first Adam update moves every weight by ~1e30 and every later loss overflows
    cfg = config(manifest, out, "--optim.lr=1e30", "--train.steps=50", "--train.max_nonfinite=3", "--data.num_workers=0")
    with pytest.raises(train.TrainingDiverged, match=r"non-finite for 3 steps in a row.*--optim.lr"):
        train.train(cfg)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["skipped"] for r in records] == [False, True, True, True]
    assert records[0]["loss"] is not None and records[1]["loss"] is None
    state = torch.load(os.path.join(out, "checkpoints", "ckpt-00000004.pt"), weights_only=True)
    assert state["counters"]["nonfinite_total"] == 3


def test_out_of_memory_names_the_batch_flags(manifest, tmp_path, monkeypatch):
    class Exploding(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    real = tc.model_classes
    monkeypatch.setattr(tc, "model_classes", lambda arch: (real(arch)[0], Exploding))
    cfg = config(manifest, str(tmp_path / "run"), "--train.steps=2", "--data.num_workers=0")
    with pytest.raises(RuntimeError, match=r"per-rank micro-batch of 16 clips.*--train.grad_accum=2"):
        train.train(cfg)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--optim.lrr=1"], "unknown config key --optim.lrr (did you mean --optim.lr?)"),
        (["--optimizer.lr=1"], "unknown config key --optimizer"),
        (["--optim.lr=fast"], "--optim.lr=fast: expected a number"),
        (["--optim.lr=-1"], "--optim.lr must be > 0"),
        (["--optim.schedule=cosine"], "--optim.schedule=cosine: must be one of constant, warmup_linear, warmup_cosine"),
        (["--augment.pitch_p=2"], "--augment.pitch_p must be a probability"),
        (["--train.global_batch_size=30", "--train.grad_accum=4"], "--train.global_batch_size=30 is not divisible"),
        (["--data.manifests=/nonexistent/train.manifest.json"], "--data.manifests: /nonexistent/train.manifest.json does not exist"),
        (["--resume", "/nonexistent/ckpt-00000001.pt"], "--resume / --checkpoint.resume: /nonexistent/ckpt-00000001.pt does not exist"),
        (["--train"], "unrecognised argument '--train'"),
    ],
)
def test_bad_configs_name_the_flag(manifest, tmp_path, capsys, argv, message):
    argv = ["--config", "clmr_tiny", f"--data.manifests={manifest}", f"--train.out_dir={tmp_path}", *SMALL, *argv]
    assert train.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_fresh_run_refuses_a_folder_with_checkpoints(manifest, tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "ckpt-00000050.pt").write_bytes(b"")
    with pytest.raises(train.ConfigError, match=r"already holds checkpoints .*ckpt-00000050.pt.*--resume auto"):
        train.validate(config(manifest, str(tmp_path / "run")), world_size=1)


def test_unknown_preset_and_world_size_divisibility(manifest):
    with pytest.raises(ValueError, match="unknown preset 'clmr_tinny' \\(did you mean 'clmr_tiny'\\?\\)"):
        tc.preset("clmr_tinny")
    cfg = tc.apply_overrides(tc.preset("clmr_tiny"), [f"--data.manifests={manifest}", "--train.global_batch_size=12"])
    assert train.validate(cfg, world_size=2)["sample_rate"] == 8000  # 12 = 2 ranks x 6
    with pytest.raises(train.ConfigError, match="world size 8 x --train.grad_accum=1 = 8; use e.g. --train.global_batch_size=16"):
        train.validate(cfg, world_size=8)


@pytest.mark.parametrize("preset", ["wav2vec2_tiny", "cpc_tiny"])
def test_single_view_presets_train(manifest, tmp_path, preset):
    out = str(tmp_path / "run")
    cfg = tc.apply_overrides(tc.preset(preset), [
        f"--data.manifests={manifest}", f"--train.out_dir={out}", "--logging.wandb_mode=disabled",
        "--data.num_workers=0", "--train.steps=3", "--train.global_batch_size=4", "--data.sample_rate=8000",
        *(["--data.crop_samples=4000"] if preset == "wav2vec2_tiny" else []),
    ])
    summary = train.train(cfg)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert summary["status"] == "completed" and [r["step"] for r in records] == [1, 2, 3]
    assert all(0 < r["loss"] < 20 and not r["skipped"] for r in records)
    if preset == "wav2vec2_tiny":
        from models.wav2vec2 import gumbel_temperature

        # the trainer calls set_step(step) before each step: Gumbel temperature follows the step
        assert [r["temperature"] for r in records] == pytest.approx(
            [gumbel_temperature(cfg.model, s) for s in range(3)], rel=1e-6)
        # warmup_linear: lr rises by one warmup step per step
        assert [r["lr"] for r in records] == pytest.approx([cfg.optim.lr * (s + 1) / 20 for s in range(3)])
    else:
        assert all("contrastive_acc" in r for r in records)


def test_checkpoints_in_a_bucket_rotate_and_resume(manifest, tmp_path, moto_s3):
    from tests.conftest import make_bucket

    make_bucket("train-ckpts")
    url = "s3://train-ckpts/runs/clmr"
    common = ["--data.num_workers=0", "--checkpoint.every=1", "--checkpoint.keep=2", f"--checkpoint.dir={url}"]
    out = str(tmp_path / "run")
    train.train(config(manifest, out, "--train.steps=3", *common))
    assert [s for s, _ in checkpoint.list_checkpoints(url)] == [2, 3]
    summary = train.train(config(manifest, out, "--train.steps=5", *common, "--checkpoint.resume=auto"))
    assert summary["resumed_from"] == f"{url}/ckpt-00000003.pt" and summary["steps_run"] == 2
    assert [s for s, _ in checkpoint.list_checkpoints(url)] == [4, 5]
    assert checkpoint.load(f"{url}/ckpt-00000005.pt")["step"] == 5
