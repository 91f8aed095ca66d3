"""The trainer's parts (training/) driven without train.py: one step of any model on the models seam,
the loader position a checkpoint takes, the checkpoint reader's refusals."""

from __future__ import annotations

import io
import itertools
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from pipeline.loader import DevicePrefetcher, LoaderConfig, StreamingLoader
from tests import shardgen
from training import checkpoint
from training.distributed import Dist
from training.errors import CheckpointError
from training.log import RunLogger
from training.step import TrainStep, build_optimizer

CPU = Dist(rank=0, world=1, device=torch.device("cpu"))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Regression(torch.nn.Module):
    """A supervised model on the models seam: ``forward(batch) -> (loss, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def forward(self, batch):
        err = self.lin(batch["x"]).squeeze(-1) - batch["y"]
        return (err**2).mean(), {"mae": err.abs().mean().detach()}


def _batches(n: int, seed: int = 0, bad: int | None = None):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        x = torch.randn(4, 3, generator=g)
        y = x @ torch.tensor([1.0, -2.0, 0.5]) + (float("nan") if i == bad else 0.0)
        yield {"x": x, "y": y}


def _setup(**kw):
    from train_config import OptimConfig

    torch.manual_seed(0)
    model = Regression()
    opt, sched = build_optimizer(OptimConfig(name="adam", lr=0.1, schedule="warmup_linear", warmup_steps=2), model, 10)
    return model, opt, sched, TrainStep(model, opt, sched, CPU, **kw)


def test_train_step_averages_micro_steps_clips_and_steps_like_a_hand_written_loop():
    model, opt, sched, step = _setup(accum=2, grad_clip=0.5)
    ref = Regression()
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.1)
    for group in ref_opt.param_groups:
        group["lr"] = 0.1 * 0.5  # the first of 2 warmup steps
    b = list(_batches(2))
    r = step(iter(b))
    losses = [((ref.lin(x["x"]).squeeze(-1) - x["y"]) ** 2).mean() for x in b]
    (sum(losses) / 2).backward()
    expected = float(sum(losses).detach() / 2)
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    ref_opt.step()
    assert r.loss == pytest.approx(expected, rel=1e-6) and r.grad_norm == pytest.approx(float(norm), rel=1e-6)
    assert r.consumed == 2 and not (r.skipped or r.stop or r.data_failed) and r.lr == pytest.approx(0.05)
    assert set(r.metrics) == {"mae"}
    for a, c in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(a, c, atol=1e-7)
    assert sched.get_last_lr()[0] == pytest.approx(0.1)  # the schedule moved to its second step


def test_train_step_skips_a_non_finite_step_and_stops_on_a_failed_stream():
    model, opt, sched, step = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    r = step(_batches(1, bad=0))
    assert r.skipped and not r.data_failed and r.lr == pytest.approx(0.05)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert sched.get_last_lr()[0] == pytest.approx(0.1)  # a skipped step still advances the schedule

    def failing():
        yield from _batches(1)
        raise FileNotFoundError(2, "No such file or directory", "/shards/train-000003.tar")

    model, opt, sched, step = _setup(accum=2)
    before = [p.detach().clone() for p in model.parameters()]
    r = step(failing())
    assert r.data_failed and r.consumed == 1 and "train-000003.tar" in r.data_error
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert sched.get_last_lr()[0] == pytest.approx(0.05)  # the failed step did not happen
    assert all(p.grad is None for p in model.parameters())


def test_loader_state_before_held_batches_yields_them_again(tmp_path):
    clips = shardgen.make_clips(24, sample_rate=8000, seconds=(0.3, 0.3), seed=1)
    man = shardgen.write_split(str(tmp_path), clips, [12, 12])
    cfg = LoaderConfig(manifests=[man], batch_size=2, crop_samples=1000, shuffle_buffer=4, num_workers=0, seed=3)
    loader = StreamingLoader(cfg)
    taken = [b["keys"] for b in itertools.islice(loader, 5)]
    state = loader.state_dict(held=2)  # the last two were never used
    assert state["step"] == 3 and state["epoch"] == 0
    again = StreamingLoader(cfg)
    again.load_state_dict(state)
    assert [b["keys"] for b in itertools.islice(again, 2)] == taken[3:]
    # a CPU prefetcher is a pass-through and holds nothing back
    ahead = DevicePrefetcher(again, torch.device("cpu"))
    next(iter(ahead))
    assert ahead.state_dict()["step"] == 6


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetcher_state_counts_only_the_batches_it_yielded(tmp_path):
    clips = shardgen.make_clips(24, sample_rate=8000, seconds=(0.3, 0.3), seed=1)
    man = shardgen.write_split(str(tmp_path), clips, [12, 12])
    cfg = LoaderConfig(manifests=[man], batch_size=2, crop_samples=1000, shuffle_buffer=4, num_workers=0, seed=3)
    loader = StreamingLoader(cfg)
    pre = DevicePrefetcher(loader, torch.device("cuda"))
    got = [b["keys"] for b in itertools.islice(iter(pre), 3)]
    assert loader.state_dict()["step"] == 4 and pre.state_dict()["step"] == 3  # one batch in flight
    again = StreamingLoader(cfg)
    again.load_state_dict(pre.state_dict())
    ref = [b["keys"] for b in itertools.islice(StreamingLoader(cfg), 4)]
    assert got == ref[:3] and next(iter(again))["keys"] == ref[3]


def _save(path, obj) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return str(path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo should-never-run",))


def test_checkpoint_reader_names_the_file_and_never_unpickles(tmp_path):
    good = _save(tmp_path / "ckpt-00000001.pt", {"format": checkpoint.FORMAT, "step": 1, "w": torch.ones(2)})
    state, sha = checkpoint.read(good)
    assert state["step"] == 1 and len(sha) == 64
    data = open(good, "rb").read()
    cases = {
        "empty.pt": (b"", "is empty"),
        "cut.pt": (data[: len(data) // 2], "truncated or not a checkpoint"),
        "evil.pt": (None, "holds non-tensor Python objects (posix.system)"),
        "plain.pt": (pickle.dumps(123), "truncated or not a checkpoint"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is None:
            _save(path, {"format": checkpoint.FORMAT, "x": _Payload()})
        else:
            path.write_bytes(content)
        with pytest.raises(CheckpointError) as exc:
            checkpoint.load(str(path), flag="--checkpoint")
        text = str(exc.value)
        assert text.startswith(f"--checkpoint {path}") and message in text, text
        assert "weights_only" not in text
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint.load(str(tmp_path / "missing.pt"))


class _Normed(torch.nn.Module):
    """With a BatchNorm: DDP broadcasts its buffers in forward, one more collective to match."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn = torch.nn.Linear(3, 1), torch.nn.BatchNorm1d(1)

    def forward(self, batch):
        err = self.bn(self.lin(batch["x"])).squeeze(-1) - batch["y"]
        return (err**2).mean(), {"mae": err.abs().mean().detach()}


def _ddp_rank(accum: int, out: str) -> None:
    """One rank of the stand-in check, launched by torchrun (``python tests/test_train_parts.py ACCUM OUT``)."""
    import torch.distributed as dist

    from train_config import OptimConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    raw = _Normed()
    opt, sched = build_optimizer(OptimConfig(lr=0.1), raw, 10)
    model = torch.nn.parallel.DistributedDataParallel(raw)
    env = Dist(rank=rank, world=2, device=torch.device("cpu"))
    step = TrainStep(model, opt, sched, env, accum=accum)

    def stream():
        yield from _batches(accum + (0 if rank == 1 else accum), seed=rank)  # rank 1 runs dry in step 2
        raise FileNotFoundError(2, "No such file or directory", f"/shards/rank{rank}.tar")

    it = stream()
    first = step(it)
    params, buffers = ([t.detach().clone() for t in ts] for ts in (raw.parameters(), raw.buffers()))
    second = step(it)
    same = {name: all(torch.equal(a, b) for a, b in zip(before, now))
            for name, before, now in (("params", params, raw.parameters()), ("buffers", buffers, raw.buffers()))}
    torch.save({"first": first.data_failed, "failed": second.data_failed, "error": second.data_error,
                "consumed": second.consumed, **same, "lr": sched.get_last_lr()[0]},
               os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    del step, model
    dist.destroy_process_group()


@pytest.mark.parametrize("accum", [1, 2])
def test_a_rank_whose_stream_fails_stands_in_so_no_rank_hangs(tmp_path, accum):
    # launched as train.py is (torchrun, env:// rendezvous); the timeout is the hang check
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           str(accum), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"a rank hung: {exc.stderr}") from None
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not r0["first"] and not r1["first"]
    assert r0["failed"] and r1["failed"]  # every rank learns of rank 1's failure in the same step
    assert r0["error"] is None and "rank1.tar" in r1["error"]
    assert (r0["consumed"], r1["consumed"]) == (accum, 0)
    # no update on any rank, the schedule did not move; the stand-in left rank 1's BatchNorm
    # statistics as they were (rank 0 ran real forwards, so its statistics moved)
    assert r0["params"] and r1["params"] and r0["lr"] == r1["lr"] == pytest.approx(0.1)
    assert r1["buffers"] and not r0["buffers"]


class PitchHead(torch.nn.Module):
    """A supervised model on the seam (what fine-tuning trains): spectrum bands -> pitch class."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(64, classes)

    def forward(self, batch):
        spec = torch.fft.rfft(batch["audio"][:, 0, 0]).abs()[:, :256]  # (B, 256)
        logits = self.head(spec.reshape(len(spec), 64, 4).mean(-1))
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"]["pitch"])
        return loss, {"acc": (logits.argmax(-1) == batch["labels"]["pitch"]).float().mean()}


def _second_trainer(man: str, out: str, steps: int, resume: str) -> list[float]:
    """A fine-tuning-style loop built only from training/ (the lines a second trainer needs)."""
    from train_config import LoggingConfig, OptimConfig

    torch.manual_seed(0)
    loader = StreamingLoader(LoaderConfig(manifests=[man], batch_size=8, mode="single", crop_samples=2000,
                                          shuffle_buffer=8, num_workers=0, seed=1))
    model = PitchHead(len(loader.label_specs["pitch"]["names"]))
    optimizer, scheduler = build_optimizer(OptimConfig(lr=3e-2), model, steps)
    logger = RunLogger(LoggingConfig(every=2, wandb_mode="disabled"), CPU, out_dir=out, total_steps=steps,
                       run_name="pitch", config={}, audio_seconds=0.25)
    step, (_, state) = 0, checkpoint.resume_point(resume, f"{out}/ckpt")
    if state is not None:
        step = state["step"]
        for part, key in ((model, "model"), (optimizer, "optimizer"), (scheduler, "scheduler"), (loader, "loader")):
            part.load_state_dict(state[key])
    logger.start(step=step, resumed=state is not None, run_id=None)
    train_step, batches = TrainStep(model, optimizer, scheduler, CPU), iter(loader)
    while step < steps:
        r = train_step(batches)
        step += 1
        logger.log_step(step, r, clips=8, data_counters=loader.stats)
        if step % 2 == 0:
            checkpoint.save_run(f"{out}/ckpt", 2, CPU, step=step, mine={"loader": loader.state_dict()},
                                shared=lambda: {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                "scheduler": scheduler.state_dict()})
    return [json.loads(line)["loss"] for line in open(f"{out}/metrics.jsonl")]


def test_a_second_trainer_from_the_parts_learns_and_resumes_exactly(tmp_path):
    clips = shardgen.make_clips(48, sample_rate=8000, seconds=(0.5, 0.5), seed=2)
    man = shardgen.write_split(str(tmp_path / "shards"), clips, [24, 24])
    ref = _second_trainer(man, str(tmp_path / "ref"), 8, "none")
    assert sum(ref[-2:]) < sum(ref[:2]) - 0.5, ref  # it learns the pitch classes
    _second_trainer(man, str(tmp_path / "run"), 4, "none")
    assert _second_trainer(man, str(tmp_path / "run"), 8, "auto") == pytest.approx(ref, rel=1e-6)


def test_fp16_step_on_cpu_is_finite_close_to_fp32_and_overflow_is_a_skipped_step():
    """--train.precision=fp16 on CPU: autocast float16 + GradScaler, unscaled before clipping."""
    results = {}
    for precision in ("fp32", "fp16"):
        # 2**10: torch's default first scale (2**16) overflows this model's fp16 gradients (~10) at once
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=precision == "fp16")
        model, opt, sched, step = _setup(precision=precision, grad_clip=1.0, accum=2, scaler=scaler)
        r = step(_batches(2, seed=4))
        results[precision] = (r, [p.detach().clone() for p in model.parameters()], step.scaler)
    (r32, w32, s32), (r16, w16, s16) = results["fp32"], results["fp16"]
    assert not s32.is_enabled() and s16.is_enabled() and s16.get_scale() == 1024.0
    assert not r16.skipped and torch.isfinite(torch.tensor(r16.loss))
    assert r16.loss == pytest.approx(r32.loss, rel=5e-3) and r16.loss > 1.0  # fp16 rounds at ~1e-3
    # the norm is of the unscaled gradients (not 65536 x them), so clipping sees the true size
    assert r16.grad_norm == pytest.approx(r32.grad_norm, rel=5e-3)
    for a, b in zip(w16, w32):
        assert torch.allclose(a, b, atol=2e-3)  # the same update, up to fp16 rounding

    # The default first scale overflows: the update is skipped (counted like a non-finite loss), the
    # scale halves until the gradients fit, then steps go through
    model, opt, sched, step = _setup(precision="fp16")
    before = [p.detach().clone() for p in model.parameters()]
    r = step(_batches(1))
    assert r.skipped and not r.data_failed and step.scaler.get_scale() == 2.0**15
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    skipped = [step(_batches(1, seed=i)).skipped for i in range(1, 12)]
    assert skipped[-1] is False and skipped.index(False) >= 1  # some halvings, then a finite update
    assert step.scaler.state_dict()["_growth_tracker"] == len(skipped) - skipped.index(False)


def test_scaler_state_round_trips_through_a_checkpoint(tmp_path):
    _, _, _, step = _setup(precision="fp16", scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    step(_batches(1))
    url = checkpoint.save(str(tmp_path), {"format": checkpoint.FORMAT, "step": 1, "scaler": step.scaler.state_dict()}, 1)
    state = checkpoint.load(url)  # weights_only: the scaler's state is plain numbers
    _, _, _, fresh = _setup(precision="fp16")
    said = []
    checkpoint.set_scaler_state(fresh.scaler, state["scaler"], say=said.append)
    assert fresh.scaler.state_dict() == step.scaler.state_dict() and fresh.scaler.get_scale() == 1024.0 and not said
    _, _, _, other = _setup(precision="fp16")
    checkpoint.set_scaler_state(other.scaler, {}, say=said.append)  # a bf16 run's checkpoint
    assert other.scaler.get_scale() == 2.0**16 and "starts afresh" in said[0]


if __name__ == "__main__":
    _ddp_rank(int(sys.argv[1]), sys.argv[2])
