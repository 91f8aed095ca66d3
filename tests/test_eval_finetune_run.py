"""Fine-tuning runs like training: kill -9 and ``--resume auto`` repeat the uninterrupted run, two
gloo ranks under torchrun, and the bad inputs a user can give (another sample rate, a split without
a task's labels, out of memory, a used run folder) are one line naming what to change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import evaluate
from tests import evaldata, shardgen

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    return evaldata.write_toy(str(tmp_path_factory.mktemp("ftrun") / "toy"), sizes=(48, 12, 12))


def _records(out: str, run: str = "pitch") -> tuple[list[float], list[dict]]:
    """(the step losses, the valid evaluations) of ``out/runs/<run>/metrics.jsonl``."""
    with open(os.path.join(out, "runs", run, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.endswith("\n")]
    return [r["loss"] for r in recs if "loss" in r], [r for r in recs if "valid/score" in r]


def _wait_for_losses(out: str, n: int, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    path = os.path.join(out, "runs", "pitch", "metrics.jsonl")
    while time.time() < deadline:
        if os.path.exists(path) and len(_records(out)[0]) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"finetune exited ({proc.returncode}) before step {n}:\n{proc.stdout.read()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no step {n} in {path} after {timeout}s")


def test_kill9_then_resume_auto_repeats_the_uninterrupted_run(toy, tmp_path) -> None:
    # one loader worker process (its shuffle buffer's position must come back), a checkpoint with every valid scoring
    common = ["finetune", "--data", toy, "--preset", "cpc_tiny", "--tasks", "pitch", "--steps", "30", "--eval-every", "6",
              "--batch-size", "8", "--workers", "1", "--device", "cpu", "--no-progress"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert evaluate.main([*common, "--out", ref]) == 0
    ref_losses, ref_valid = _records(ref)
    assert len(ref_losses) == 30 and [r["step"] for r in ref_valid] == [6, 12, 18, 24, 30]

    proc = subprocess.Popen([sys.executable, "evaluate.py", *common, "--out", out], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_losses(out, 14, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    from training import checkpoint

    ckpts = checkpoint.list_checkpoints(os.path.join(out, "runs", "pitch", "checkpoints"))
    assert ckpts and ckpts[-1][0] in (12, 18, 24)
    state = checkpoint.load(ckpts[-1][1])
    assert state["best"]["step"] in (6, 12, 18, 24) and state["best"]["model"] is not None  # the best weights travel

    # a fresh run into the same folder would rotate the killed run's checkpoints away: refused
    assert evaluate.main([*common, "--out", out]) != 0
    assert evaluate.main([*common, "--out", out, "--resume", "auto"]) == 0
    losses, valid = _records(out)
    # metrics.jsonl was cut back to the checkpoint, then the same steps followed
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=1e-7)
    assert [(r["step"], r["valid/score"]) for r in valid] == [(r["step"], r["valid/score"]) for r in ref_valid]
    assert len(set(round(x, 4) for x in ref_losses)) > 10  # not trivially constant
    r1, r2 = (json.load(open(os.path.join(d, "results.json"))) for d in (ref, out))
    assert r2["finetune"]["pitch"]["resumed_from"] == ckpts[-1][1] and r2["finetune"]["pitch"]["steps_run"] == 30 - ckpts[-1][0]
    assert r2["finetune"]["pitch"]["best_step"] == r1["finetune"]["pitch"]["best_step"]
    assert r2["rows"][0]["test"] == r1["rows"][0]["test"]  # the best weights were restored, not the last ones
    # a finished run resumed again trains nothing and gives the same scores
    assert evaluate.main([*common, "--out", out, "--resume", "auto"]) == 0
    r3 = json.load(open(os.path.join(out, "results.json")))
    assert r3["finetune"]["pitch"]["steps_run"] == 0 and r3["rows"][0]["test"] == r1["rows"][0]["test"]


def test_sigterm_checkpoints_and_exits_0_then_resume_finishes(toy, tmp_path, capsys) -> None:
    out = str(tmp_path / "term")
    common = ["finetune", "--data", toy, "--preset", "cpc_tiny", "--tasks", "pitch", "--eval-every", "1000", "--batch-size", "8",
              "--workers", "1", "--device", "cpu", "--no-progress", "--out", out]
    proc = subprocess.Popen([sys.executable, "evaluate.py", *common, "--steps", "5000"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_losses(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout
    assert "SIGTERM received" in stdout and "Continue with the same command and --resume auto" in stdout
    from training import checkpoint

    (at, url), = checkpoint.list_checkpoints(os.path.join(out, "runs", "pitch", "checkpoints"))
    assert at == len(_records(out)[0]) >= 3 and not checkpoint.load(url)["done"]
    assert not os.path.exists(os.path.join(out, "results.json"))  # no scores from a stopped run
    # a fine-tune checkpoint is not an encoder checkpoint: said in one line
    assert evaluate.main(["probe", "--data", toy, "--checkpoint", url, "--baselines", "", "--out", str(tmp_path / "p")]) == 2
    assert "fine-tuning run's checkpoint" in capsys.readouterr().err
    # another batch size cannot continue this data stream: one line naming the flag
    bad = [*common, "--steps", str(at + 2), "--resume", "auto"]
    bad[bad.index("--batch-size") + 1] = "4"
    assert evaluate.main(bad) == 2
    assert "cannot continue with a changed --batch-size (8 -> 4)" in capsys.readouterr().err
    # --steps is not part of what a resume must match: finish two steps later
    assert evaluate.main([*common, "--steps", str(at + 2), "--resume", "auto"]) == 0
    doc = json.load(open(os.path.join(out, "results.json")))
    assert doc["finetune"]["pitch"]["steps"] == at + 2 and doc["finetune"]["pitch"]["steps_run"] == 2


def test_two_gloo_ranks_under_torchrun(toy, tmp_path) -> None:
    """Each rank streams its half of the training split (4 crops a step each), DDP averages the
    gradients, both ranks embed half of valid/test, rank 0 writes the results."""
    out = str(tmp_path / "two")
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py"]
    res = subprocess.run([*run, "finetune", "--data", toy, "--preset", "cpc_tiny", "--tasks", "pitch", "--steps", "4",
                          "--eval-every", "2", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress",
                          "--out", out], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.load(open(os.path.join(out, "results.json")))
    ft = doc["finetune"]["pitch"]
    assert doc["config"]["world_size"] == 2 and ft["world_size"] == 2 and ft["steps"] == 4
    assert ft["labels_seen"] == {"pitch": 4 * 8}  # summed over both ranks
    assert doc["rows"][0]["test"]["n"] == 12  # both halves of the test split gathered
    from training import checkpoint

    state = checkpoint.load(checkpoint.list_checkpoints(os.path.join(out, "runs", "pitch", "checkpoints"))[-1][1])
    ranks = state["ranks"]
    assert len(ranks) == 2 and [r["loader"]["world_size"] for r in ranks] == [2, 2]
    assert [r["loader"]["step"] for r in ranks] == [4, 4] and ranks[0]["loader"]["batch_size"] == 4
    assert not torch.equal(ranks[0]["rng"]["torch"], ranks[1]["rng"]["torch"])  # each rank its own generator


def _write(folder: str, *, drop: dict[str, str] | None = None, sample_rate: int = evaldata.SR) -> str:
    """The toy splits; ``drop``: split -> a label field its clips do not carry."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("valid", 8), ("test", 8)):
        clips = [evaldata.toy_clip(rng, i, split, sample_rate=sample_rate) for i in range(n)]
        for c in clips:
            if drop and split in drop:
                c["labels"].pop(drop[split])
        shardgen.write_split(folder, clips, [n // 2, n - n // 2], split=split, dataset="toy", labels=evaldata.SPEC)
    return folder


def _finetune(data: str, out: str, *extra: str) -> list[str]:
    return ["finetune", "--data", data, "--preset", "cpc_tiny", "--tasks", "pitch", "--steps", "2", "--eval-every", "2",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress", "--out", out, *extra]


def test_another_sample_rate_is_resampled_or_refused_naming_both(tmp_path, capsys) -> None:
    data = _write(str(tmp_path / "sr"), sample_rate=22050)  # an encoder trained at 16 kHz (its config says so)
    assert evaluate.main(_finetune(data, str(tmp_path / "no"), "--set", "data.sample_rate=16000", "--no-resample")) == 2
    err = capsys.readouterr().err
    assert "22050 Hz" in err and "16000 Hz" in err and "--no-resample" in err and len(err.strip().splitlines()) == 1
    assert evaluate.main(_finetune(data, str(tmp_path / "yes"), "--set", "data.sample_rate=16000")) == 0
    printed = capsys.readouterr().out
    assert "shards are 22050 Hz, the encoder expects 16000 Hz: resampling on the fly" in printed


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_a_split_without_the_task_labels_names_task_and_split(tmp_path, capsys, split) -> None:
    data = _write(str(tmp_path / split / "toy"), drop={split: "pitch"})
    assert evaluate.main(_finetune(data, str(tmp_path / "out"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate.py: error: --tasks pitch:") and f"the {split} split of toy " in err
    # train: noticed in the stream at the first valid scoring (no separate pass over a big split)
    assert ("gave no pitch labels in 2 steps" if split == "train" else "has no pitch labels") in err


def test_a_label_fraction_of_a_train_split_without_labels_is_named(tmp_path, capsys) -> None:
    """--label-fraction < 1 reads the training labels once to draw its subset: an empty one is named then."""
    data = _write(str(tmp_path / "d" / "toy"), drop={"train": "pitch"})
    assert evaluate.main(_finetune(data, str(tmp_path / "out"), "--label-fraction", "0.5")) == 2
    assert "the train split of toy has no pitch labels" in capsys.readouterr().err


def test_the_supervised_baseline_reruns_from_its_own_run_folder(toy, tmp_path) -> None:
    """probe's supervised baseline is a fine-tune run in OUT/runs/supervised-<dataset>-f<fraction>-<config hash>:
    the same command again reuses the finished run; another step count is another folder."""
    argv = ["probe", "--data", toy, "--preset", "cpc_tiny", "--baselines", "supervised", "--tasks", "pitch",
            "--supervised-batch-size", "8", "--workers", "0", "--device", "cpu", "--no-progress", "--cache", "", "--max-epochs", "5", "--out", str(tmp_path)]
    assert evaluate.main([*argv, "--supervised-steps", "4"]) == 0
    first = json.load(open(tmp_path / "results.json"))
    run = first["encoders"]["supervised"]["supervised_run"]
    assert os.path.basename(run).startswith("supervised-toy-f1-") and os.path.exists(os.path.join(run, "scores.json"))
    mtime = os.path.getmtime(os.path.join(run, "checkpoints", "ckpt-00000004.pt"))
    assert evaluate.main([*argv, "--supervised-steps", "4"]) == 0
    again = json.load(open(tmp_path / "results.json"))
    assert again["rows"][0]["test"] == first["rows"][0]["test"]
    assert os.path.getmtime(os.path.join(run, "checkpoints", "ckpt-00000004.pt")) == mtime  # nothing retrained
    assert evaluate.main([*argv, "--supervised-steps", "2"]) == 0
    assert json.load(open(tmp_path / "results.json"))["encoders"]["supervised"]["supervised_run"] != run


def test_wandb_offline_gets_the_training_curve_and_the_valid_scores(toy, tmp_path) -> None:
    import glob

    from tests.test_train import wandb_records

    out = str(tmp_path / "wb")
    argv = _finetune(toy, out, "--wandb-mode", "offline", "--log-every", "1")
    argv[argv.index("--steps") + 1] = "4"
    assert evaluate.main(argv) == 0
    doc = json.load(open(os.path.join(out, "results.json")))
    run_dirs = glob.glob(os.path.join(out, "runs", "pitch", "wandb", "offline-run-*"))
    assert len(run_dirs) == 1 and run_dirs[0].endswith(doc["finetune"]["pitch"]["wandb_run_id"])
    history: dict[int, dict] = {}
    config = {}
    for rec in wandb_records(glob.glob(os.path.join(run_dirs[0], "run-*.wandb"))[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(int(items["_step"]), {}).update(items)
        elif kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
    assert sorted(history) == [1, 2, 3, 4] and all("train/loss" in h for h in history.values())
    valid = [r for r in _records(out)[1]]
    assert [r["step"] for r in valid] == [2, 4]
    for r in valid:  # the same valid scores as metrics.jsonl, at the same steps
        assert history[r["step"]]["valid/score"] == pytest.approx(r["valid/score"])
    assert config["finetune"]["eval_every"] == 2 and config["tasks"] == ["pitch"]  # the run's config reached W&B


def test_out_of_memory_names_the_batch_flag(toy, tmp_path, capsys, monkeypatch) -> None:
    from models.supervised import Supervised

    def oom(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Supervised, "forward", oom)
    assert evaluate.main(_finetune(toy, str(tmp_path / "ft"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("evaluate.py: error: out of memory") and "lower --batch-size" in err
    # the supervised baseline of probe/sweep names its own flag
    argv = ["probe", "--data", toy, "--preset", "cpc_tiny", "--baselines", "supervised", "--tasks", "pitch",
            "--supervised-steps", "2", "--supervised-batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "p")]
    assert evaluate.main(argv) == 2
    assert "lower --supervised-batch-size" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_finetune_checkpoints_and_scores(toy, tmp_path) -> None:
    """On a GPU: bf16 autocast (the default there), the CUDA prefetcher's look-ahead kept out of the
    checkpointed loader position, and scores from the best weights."""
    out = str(tmp_path / "gpu")
    argv = ["finetune", "--data", toy, "--preset", "wav2vec2_tiny", "--tasks", "pitch", "--steps", "6", "--eval-every", "3",
            "--batch-size", "8", "--workers", "1", "--device", "cuda", "--no-progress", "--out", out]
    assert evaluate.main(argv) == 0
    doc = json.load(open(os.path.join(out, "results.json")))
    assert doc["config"]["precision"] == "bf16" and doc["finetune"]["pitch"]["steps"] == 6
    from training import checkpoint

    state = checkpoint.load(checkpoint.list_checkpoints(os.path.join(out, "runs", "pitch", "checkpoints"))[-1][1])
    assert state["loader"]["step"] == 6 and state["done"]
    losses, _ = _records(out)
    assert len(losses) == 6 and all(np.isfinite(losses))


def test_a_tag_train_split_without_a_positive_tag_is_named(tmp_path, capsys) -> None:
    """Every train clip carries the tags field but no tag: the row count is not zero, the positives are."""
    folder = str(tmp_path / "notags" / "toy")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("valid", 8), ("test", 8)):
        clips = [evaldata.toy_clip(rng, i, split) for i in range(n)]
        if split == "train":
            for c in clips:
                c["labels"]["tags"] = []
        shardgen.write_split(folder, clips, [n // 2, n - n // 2], split=split, dataset="toy", labels=evaldata.SPEC)
    argv = _finetune(folder, str(tmp_path / "out"))
    argv[argv.index("--tasks") + 1] = "tags"
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--tasks tags: the train split of toy gave no clip with a positive tag in 2 steps" in err, err
