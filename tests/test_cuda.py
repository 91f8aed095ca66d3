"""Every CUDA path checked on values (issue 18): ``pytest -m cuda`` on a GPU node, or
``python benchmarks/gpu.py``, which runs these first.

Each check is a helper that takes the device. The ``cuda``-marked tests call it with ``cuda`` (skipped
without a GPU); where the same assertion means something on a CPU, an unmarked twin calls it with
``cpu`` so CI runs the helper's code and it cannot rot before a GPU arrives:

- augmentation, per transform: the same CPU generator state gives the same drawn parameters on
  every device and the same output as the CPU within ``AUG_REL_L2`` (relative L2 per example).
  Noise and generated impulse responses come from a device generator seeded by one CPU draw
  (pipeline/augment.py), so their streams differ by device: for those the device's own stream is
  replayed on the CPU and the output compared with that.
- one bf16 training step per model (CLMR, wav2vec2 tiny, CPC tiny): finite loss and gradients, loss
  within ``BF16_LOSS_REL`` of the fp32 step's from the same weights and RNG state.
- ``DevicePrefetcher`` over a loader built as train.py builds it: the loader's batches unchanged,
  on the device; on CUDA the host batches are pinned.
- ``torchrun`` (one process) on CUDA, then ``--resume auto`` from the middle checkpoint: the same
  losses (``RESUME_REL``: cuDNN's backward kernels may sum in another order). A world of one makes
  no process group (training/distributed.py), so NCCL itself is checked by the DDP test below.
- ``torch.compile``: one step equals the eager step (inductor on CUDA; ``aot_eager`` on the CPU,
  which traces the same graph without building C++).
- SyncBatchNorm under DDP (an NCCL group of one; train.py converts only with CUDA and more than one
  rank, and DDP refuses SyncBatchNorm on a CPU): the step equals the plain BatchNorm step.

Evaluation on CUDA against the CPU (extraction and probe) lives with the other evaluation device
tests in tests/test_eval_devices.py; the prefetcher's state and pinned worker slots in
tests/test_train_parts.py and tests/test_loader_fastpath.py.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import pipeline.augment as aug
import train_config as tc
from pipeline.augment import (
    AugmentConfig, Delay, Gain, HighLowPass, Noise, PitchShift, PolarityInversion, Reverb, Speed, build_augment,
)
from pipeline.loader import DevicePrefetcher, StreamingLoader
from tests import shardgen
from training.distributed import Dist
from training.step import TrainStep, build_optimizer, to_device

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]

SR = 22050
# Augmentation on CUDA against the CPU, relative L2 per example. Everything is float32 FFTs and
# elementwise ops (no convolutions, so no TF32): cuFFT and pocketfft agree to ~1e-6; 1e-4 leaves
# room for the longer FFT chains (vocoder pitch, freeverb rendered as impulse responses on CUDA
# against its recursion on the CPU, which agree to 2e-6 absolute, tests/test_augment_reverb.py).
AUG_REL_L2 = 1e-4
# Granular pitch shift picks each grain's offset by an argmax over a cross-correlation; a near-tie
# may resolve differently on another device, moving one grain (of 2048 samples) by a few samples.
PITCH_GRANULAR_REL_L2 = 2e-2
# bf16 autocast against fp32, loss of one step from the same weights and RNG state; measured on CPU
# autocast with these tiny random-init models (CLMR 1.4 %, wav2vec2 0.1 %, CPC 0.0003 %), allowed ~3x.
BF16_LOSS_REL = 0.05
RESUME_REL = 1e-3


def _clips(n: int = 6, channels: int = 1, seconds: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Music-like clips ``(n, channels, T)``: a harmonic note with vibrato and a decay, a little noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    out = []
    for _ in range(n * channels):
        f0 = 110 * 2 ** (4 * float(torch.rand((), generator=g)))
        phase = 2 * torch.pi * f0 * (t + 0.002 * torch.sin(2 * torch.pi * 5 * t))
        note = sum(torch.sin(k * phase) / k for k in range(1, 6)) * torch.exp(-2 * t)
        out.append(0.3 * note + 0.01 * torch.randn(t.shape, generator=g))
    return torch.stack(out).view(n, channels, -1).float()


def _device(device: str) -> torch.device:
    """``cuda`` -> ``cuda:<current>`` (DDP and NCCL want an index)."""
    dev = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(1e-12)


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory) -> str:
    """Two decaying-noise impulse responses as files (the ``reverb_method=ir`` file bank)."""
    folder = tmp_path_factory.mktemp("irs")
    rng = np.random.default_rng(0)
    for i, rt60 in enumerate((0.3, 0.8)):
        n = int(SR * rt60)
        ir = rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / n)
        sf.write(str(folder / f"ir{i}.wav"), (ir / np.abs(ir).max()).astype(np.float32), SR)
    return str(folder)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# name -> (factory(seed, ir_dir), channels). Probabilities below 1 exercise the partial-batch path.
AUGMENTS = {
    "polarity": (lambda s, d: PolarityInversion(p=0.5, generator=_gen(s)), 1),
    "gain": (lambda s, d: Gain(p=0.6, generator=_gen(s)), 1),
    "filter_fir": (lambda s, d: HighLowPass(sample_rate=SR, p=0.8, filter_type="fir", generator=_gen(s)), 1),
    "filter_first_order": (lambda s, d: HighLowPass(sample_rate=SR, p=1.0, filter_type="first_order",
                                                    generator=_gen(s)), 1),
    "filter_butterworth": (lambda s, d: HighLowPass(sample_rate=SR, p=1.0, filter_type="butterworth",
                                                    generator=_gen(s)), 1),
    "delay": (lambda s, d: Delay(sample_rate=SR, p=0.7, generator=_gen(s)), 1),
    "pitch_granular": (lambda s, d: PitchShift(sample_rate=SR, p=1.0, method="granular", generator=_gen(s)), 1),
    "pitch_vocoder": (lambda s, d: PitchShift(sample_rate=SR, p=1.0, method="vocoder", generator=_gen(s)), 1),
    "speed": (lambda s, d: Speed(sample_rate=SR, p=1.0, generator=_gen(s)), 1),
    "reverb_freeverb": (lambda s, d: Reverb(sample_rate=SR, p=1.0, generator=_gen(s)), 1),
    "reverb_freeverb_stereo": (lambda s, d: Reverb(sample_rate=SR, p=0.7, generator=_gen(s)), 2),
    "reverb_ir_files": (lambda s, d: Reverb(sample_rate=SR, p=1.0, method="ir", ir_dir=d, generator=_gen(s)), 1),
    # CLMR's chain as the trainer builds it, noise off (its stream is the device's: checked below)
    "clmr_chain": (lambda s, d: build_augment(AugmentConfig(noise_p=0.0), sample_rate=SR, seed=s), 1),
}


def _augment(make, x: torch.Tensor, device: str, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module = make(seed).to(device)
    y = module(x.to(device))
    assert y.device.type == torch.device(device).type and y.dtype == x.dtype and y.shape == x.shape
    return y.cpu(), module.last_params


def check_augment_matches_cpu(name: str, device: str, ir_dir: str, seed: int = 3) -> None:
    factory, channels = AUGMENTS[name]
    x = _clips(channels=channels)
    ref, p_ref = _augment(lambda s: factory(s, ir_dir), x, "cpu", seed)
    y, p = _augment(lambda s: factory(s, ir_dir), x, device, seed)
    assert p.keys() == p_ref.keys()
    for k in p:  # the same generator state draws the same parameters on every device
        assert torch.equal(p[k].cpu(), p_ref[k]), (name, k)
    masks = [v for k, v in p.items() if k == "apply" or k.endswith(".apply")]
    applied = torch.stack(masks).any(0)
    assert bool(applied.any()), name
    assert float(_rel_l2(ref[applied], x[applied]).min()) > 1e-3, name  # it really transformed them
    tol = PITCH_GRANULAR_REL_L2 if name == "pitch_granular" else AUG_REL_L2
    err = _rel_l2(y, ref)
    assert float(err.max()) <= tol, (name, err.tolist())
    if device == "cpu":
        assert torch.equal(y, ref)  # same device, same state: bit for bit


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(AUGMENTS))
def test_augmentation_matches_the_cpu_for_the_same_generator_state(name, device, ir_dir):
    check_augment_matches_cpu(name, device, ir_dir)


def check_noise_replays_the_device_stream(device: str) -> None:
    """White std-ratio noise (CLMR's): ``y - x`` is the device generator's ``randn`` stream seeded
    by the drawn seed, times the clip's std and the drawn ratio, computed on the CPU."""
    x = _clips()
    noise = Noise(p=1.0, generator=_gen(5)).to(device)
    y = noise(x.to(device)).cpu()
    p = noise.last_params
    assert torch.equal(p["std_ratio"], Noise(p=1.0, generator=_gen(5)).draw(x.shape[0])["std_ratio"])
    g = torch.Generator(device=device).manual_seed(int(p["seed"]))
    stream = torch.randn(x.shape, generator=g, device=device).cpu()
    expected = x + stream * x.flatten(1).std(dim=1).view(-1, 1, 1) * p["std_ratio"].view(-1, 1, 1)
    assert float(_rel_l2(y, expected).max()) <= AUG_REL_L2


def check_coloured_noise_snr(device: str) -> None:
    """Pink noise at a drawn SNR: the measured SNR is the drawn one on every device (0.05 dB)."""
    x = _clips()
    noise = Noise(p=1.0, mode="snr_db", snr_db=(0.0, 40.0), colors=("pink",), generator=_gen(6)).to(device)
    y = noise(x.to(device)).cpu()
    measured = 10 * torch.log10(x.pow(2).mean((1, 2)) / (y - x).pow(2).mean((1, 2)))
    assert float((measured - noise.last_params["snr_db"]).abs().max()) < 0.05


def check_generated_ir_reverb_replays_the_device_stream(device: str, monkeypatch) -> None:
    """Generated impulse responses: the CPU run, given the device's IRs (same seed, device
    generator), equals the device run."""
    x = _clips()
    y, p = _augment(lambda s: Reverb(sample_rate=SR, p=1.0, method="ir", generator=_gen(s)), x, device, 7)
    real = aug.generate_irs

    def device_irs(rt60_s, channels, length, sample_rate, generator, dev):
        g = torch.Generator(device=device).manual_seed(generator.initial_seed())
        return real(rt60_s, channels, length, sample_rate, g, torch.device(device)).to(dev)

    monkeypatch.setattr(aug, "generate_irs", device_irs)
    ref, p_ref = _augment(lambda s: Reverb(sample_rate=SR, p=1.0, method="ir", generator=_gen(s)), x, "cpu", 7)
    assert all(torch.equal(p[k], p_ref[k]) for k in p)
    assert float(_rel_l2(y, ref).max()) <= AUG_REL_L2
    assert float(_rel_l2(ref, x).min()) > 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_device_generated_noise_and_impulse_responses(device, monkeypatch):
    check_noise_replays_the_device_stream(device)
    check_coloured_noise_snr(device)
    check_generated_ir_reverb_replays_the_device_stream(device, monkeypatch)


# ------------------------------------------------------------------------------------------------
# Models: one bf16 step against fp32


def _seam_batch(cfg: tc.Config, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    crop = cfg.crop_samples
    sr = cfg.data.sample_rate or 16000
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(crop) / sr
    f0 = 110 * 2 ** (3 * torch.rand(batch, cfg.views, 1, 1, generator=g))
    audio = 0.3 * torch.sin(2 * torch.pi * f0 * t) + 0.02 * torch.randn(batch, cfg.views, 1, crop, generator=g)
    return {"audio": audio.float(), "lengths": torch.full((batch,), crop)}


def one_step(cfg: tc.Config, model: torch.nn.Module, batch: dict, device: torch.device, precision: str,
             env: Dist | None = None) -> tuple[float, float, list[torch.Tensor]]:
    """One TrainStep from the same RNG state: (loss, grad norm, parameters after the update)."""
    opt, sched = build_optimizer(cfg.optim, model, 10)
    step = TrainStep(model, opt, sched, env or Dist(rank=0, world=1, device=device), precision=precision,
                     prepare=lambda b, micro: to_device(b, device))
    torch.manual_seed(1)  # masks, negatives, layerdrop, Gumbel noise: the same draws for every run
    r = step(iter([batch]))
    assert not r.skipped and not r.data_failed
    return r.loss, r.grad_norm, [q.detach().float().cpu() for q in model.parameters()]


def check_bf16_step(preset: str, device: str) -> None:
    cfg = tc.preset(preset)
    dev = _device(device)
    _, model_cls = tc.model_classes(cfg.arch)
    torch.manual_seed(0)
    fp32_model = model_cls(cfg.model).to(dev)
    bf16_model = copy.deepcopy(fp32_model)
    batch = _seam_batch(cfg, 8)
    l32, g32, _ = one_step(cfg, fp32_model, batch, dev, "fp32")
    l16, g16, after = one_step(cfg, bf16_model, batch, dev, "bf16")
    assert np.isfinite([l32, g32, l16, g16]).all() and all(torch.isfinite(q).all() for q in after)
    assert abs(l16 - l32) <= BF16_LOSS_REL * abs(l32), (preset, l32, l16)
    assert l16 != l32  # autocast really ran in bf16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["clmr_tiny", "wav2vec2_tiny", "cpc_tiny"])
def test_one_bf16_step_per_model_is_finite_and_close_to_fp32(preset, device, one_thread):
    check_bf16_step(preset, device)


# ------------------------------------------------------------------------------------------------
# Loader -> DevicePrefetcher


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("shards")
    clips = shardgen.make_clips(48, sample_rate=8000, seconds=(1.0, 1.0), seed=3)
    return shardgen.write_split(str(folder), clips, [12, 12, 12, 12])


def check_prefetcher(manifest: str, device: str) -> None:
    """A loader built as train.py builds it (``cuda=`` pins host batches), two workers: the prefetcher
    yields the loader's batches unchanged, on the device."""
    cfg = tc.apply_overrides(tc.preset("clmr_tiny"), [f"--data.manifests={manifest}", "--data.num_workers=2",
                                                      "--data.sample_rate=8000"])
    dev = _device(device)
    lc = cfg.data.loader_config(batch_size=4, views=2, crop_samples=2187, sample_rate=8000, seed=0,
                                cuda=dev.type == "cuda")
    ref = list(itertools.islice(StreamingLoader(lc), 8))  # 12 batches an epoch
    got = list(itertools.islice(DevicePrefetcher(StreamingLoader(lc), dev), 8))
    assert len(got) == len(ref) == 8
    for a, b in zip(got, ref):
        assert a["keys"] == b["keys"]
        for k in ("audio", "lengths"):
            assert a[k].device.type == dev.type and a[k].dtype == b[k].dtype
            assert torch.equal(a[k].cpu(), b[k])
            if dev.type == "cuda":
                assert b[k].is_pinned(), k  # what makes the prefetcher's non_blocking copy asynchronous


@pytest.mark.parametrize("device", DEVICES)
def test_prefetcher_yields_the_loaders_batches_unchanged(manifest, device):
    check_prefetcher(manifest, device)


# ------------------------------------------------------------------------------------------------
# torchrun on the device, then resume


def _losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def check_torchrun_resume(manifest: str, out: str, device: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(ROOT, "train.py"), "--config", "clmr_tiny", f"--data.manifests={manifest}",
           f"--train.out_dir={out}", f"--train.device={device}", "--model.channels=16,16,32,32,32",
           "--logging.wandb_mode=disabled", "--train.steps=4", "--train.global_batch_size=8",
           f"--data.num_workers={1 if device == 'cuda' else 0}", "--checkpoint.every=2", "--checkpoint.keep=3",
           "--logging.every=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=ROOT)
    res = subprocess.run(cmd, cwd=out.rsplit("/", 1)[0], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"on 1 x {device}" in res.stdout and ("bf16" if device == "cuda" else "fp32") in res.stdout
    first = _losses(out)
    assert len(first) == 4 and all(np.isfinite(first))
    os.remove(os.path.join(out, "checkpoints", "ckpt-00000004.pt"))
    res = subprocess.run([*cmd, "--resume", "auto"], cwd=out.rsplit("/", 1)[0], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ckpt-00000002.pt at step 2" in res.stdout
    again = _losses(out)
    assert again[:2] == first[:2] and len(again) == 4
    rel = RESUME_REL if device == "cuda" else 1e-6
    assert again[2:] == pytest.approx(first[2:], rel=rel, abs=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_torchrun_one_process_on_cuda_then_resume_repeats_the_losses(manifest, tmp_path):
    # No CPU twin here: two torchrun launches cost ~35 s on a CI core, and tests/test_train.py runs the
    # same assertions on the CPU (two gloo ranks, accumulation, --resume auto).
    check_torchrun_resume(manifest, str(tmp_path / "run"), "cuda")


# ------------------------------------------------------------------------------------------------
# torch.compile


def _assert_same_update(after: list[torch.Tensor], ref: list[torch.Tensor], lr: float, *, exact: bool) -> None:
    """Parameters after one Adam step agree: to 1e-6 where the arithmetic is the same; else within
    2.5 x lr, as Adam's first step moves each weight by about lr x sign(grad) and a near-zero gradient
    may change sign under other rounding."""
    worst = max(float((a - b).abs().max()) for a, b in zip(after, ref))
    assert worst <= (1e-6 if exact else 2.5 * lr), worst


def check_compile_step(device: str, backend: str) -> None:
    cfg = tc.apply_overrides(tc.preset("clmr_tiny"), ["--model.channels=16,16,32,32,32"])
    dev = _device(device)
    _, model_cls = tc.model_classes(cfg.arch)
    torch.manual_seed(0)
    eager = model_cls(cfg.model).to(dev)
    raw = copy.deepcopy(eager)
    compiled = torch.compile(raw, backend=backend)
    batch = _seam_batch(cfg, 8)
    le, _, pe = one_step(cfg, eager, batch, dev, "auto")
    lc, _, pc = one_step(cfg, compiled, batch, dev, "auto")
    rel = 2e-2 if dev.type == "cuda" else 1e-5  # bf16 on CUDA: fused kernels round differently
    assert np.isfinite(lc) and abs(lc - le) <= rel * abs(le), (le, lc)
    # the compiled module stepped the raw module's parameters (what checkpoints hold) as eager did
    _assert_same_update(pc, pe, cfg.optim.lr, exact=dev.type == "cpu")
    raw_after = [q.detach().float().cpu() for q in raw.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(raw_after, pc))


@pytest.mark.parametrize("device,backend", [("cpu", "aot_eager"), pytest.param("cuda", "inductor", marks=cuda_only)])
def test_torch_compile_step_equals_eager(device, backend, one_thread):
    check_compile_step(device, backend)


# ------------------------------------------------------------------------------------------------
# SyncBatchNorm under DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ddp_step(device: str) -> None:
    """DDP over a process group of one (NCCL on CUDA, with SyncBatchNorm as train.py converts it;
    gloo and plain BatchNorm on the CPU): the step equals the unwrapped model's."""
    import torch.distributed as dist

    cfg = tc.apply_overrides(tc.preset("clmr_tiny"), ["--model.channels=16,16,32,32,32"])
    dev = _device(device)
    _, model_cls = tc.model_classes(cfg.arch)
    torch.manual_seed(0)
    plain = model_cls(cfg.model).to(dev)
    batch = _seam_batch(cfg, 8)
    lp, _, pp = one_step(cfg, plain, batch, dev, "fp32")
    torch.manual_seed(0)
    raw = model_cls(cfg.model).to(dev)
    if dev.type == "cuda":
        raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw)
        assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in raw.modules()) >= 5
    assert not dist.is_initialized()
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1, device_id=dev if dev.type == "cuda" else None)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[dev.index] if dev.type == "cuda" else None)
        ld, _, pd = one_step(cfg, ddp, batch, dev, "fp32")
    finally:
        dist.destroy_process_group()
    # the same forward (the update differs at most by cuDNN's backward summing in another order)
    assert abs(ld - lp) <= (1e-5 if dev.type == "cuda" else 1e-6) * abs(lp), (lp, ld)
    _assert_same_update(pd, pp, cfg.optim.lr, exact=dev.type == "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_ddp_step_with_syncbatchnorm_equals_the_plain_step(device, one_thread):
    check_ddp_step(device)
