"""Model training-step benchmark: our wav2vec2 vs HF Wav2Vec2ForPreTraining (pre-training) and
Wav2Vec2Model (fine-tuning), plus CLMR and CPC steps.

    .venv/bin/python benchmarks/models.py            # small preset, batch 8 x 2 s at 16 kHz
    .venv/bin/python benchmarks/models.py --quick    # tiny sizes (what the test runs)
    .venv/bin/python benchmarks/models.py --profile  # also print where the wav2vec2 step spends time
    .venv/bin/python benchmarks/models.py --device cuda --precision bf16 --w2v-config base \
        --batch 4 --seconds 15.625 --seam-batch 48      # the GPU rows of benchmarks/gpu.py

wav2vec2: one training step = zero_grad + forward + backward on the same batch, same config, same
threads, both in train mode (dropout, layerdrop, Gumbel noise on), both under the same autocast
(``--precision bf16``) or none. HF is given the mask and negative
indices we drew (converted to its layout) outside its timed region, so its numpy samplers are not
charged to it; ours samples them inside the step. Steps of the two models are interleaved and the
median is reported, which keeps a machine shared with other jobs from favouring either side.

CLMR (SampleCNN + NT-Xent) and CPC are timed through the model seam (``model(batch)``, backward) at
their tiny and full presets; no peer, timing only. A model file that is not in the checkout yet is
reported as missing. ``benchmark_step(model, batch, ...)`` times full Adam steps of any model on the
seam (optionally under bf16 autocast), for use from Python.

wav2vec2 fine-tuning (the supervised baseline's and ``evaluate.py finetune``'s step): ``embed`` forward
(unmasked, every frame), a loss on the pooled output, backward; HF's ``Wav2Vec2Model`` with the same
weights, the loss on the mean of its last hidden state, and the attention mask when clips are padded
(``padded``: every second clip valid for half its length). HF's group norm sees the padding
(ours takes each clip's valid frames only), so the two compute slightly different things there.

The last line printed is one JSON object; ``ratios.wav2vec2_vs_hf``, ``wav2vec2_finetune_vs_hf`` and
``wav2vec2_finetune_padded_vs_hf`` = HF's median step time / ours (above 1: ours is faster).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.wav2vec2 import (  # noqa: E402
    Wav2Vec2Config,
    Wav2Vec2Pretrain,
    compute_mask_spans,
    frame_lengths,
    hf_negative_indices,
    sample_negatives,
    to_hf,
)


def _interleaved(fns: dict[str, Callable[[], None]], steps: int, warmup: int, sync: Callable[[], None]
                 ) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def benchmark_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, steps: int, warmup: int = 2,
                   lr: float = 3e-4, dtype: torch.dtype | None = None) -> dict[str, float]:
    """Time full training steps (zero_grad, ``loss, _ = model(batch)``, backward, Adam) of any model on
    the seam of docs/architecture.md §4, on the device ``batch["audio"]`` lives on.

    ``dtype=torch.bfloat16`` runs the forward under autocast. Returns ``ms_per_step`` (mean),
    ``clips_per_s``, ``params`` (all trainable), ``encoder_params`` (when the model has an
    ``encoder``) and the last ``loss``. For example, on a GPU::

        benchmark_step(CLMR(CLMRConfig.tiny()).cuda(), {"audio": audio.cuda()}, steps=10, dtype=torch.bfloat16)
    """
    device = batch["audio"].device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    last: list[torch.Tensor] = []

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last[:] = [loss.detach()]

    elapsed = sum(_interleaved({"step": step}, steps, warmup, sync)["step"])
    clips = batch["audio"].shape[0]
    result = {
        "ms_per_step": 1000 * elapsed / max(steps, 1),
        "clips_per_s": clips * steps / elapsed if elapsed > 0 else float("inf"),
        "params": float(sum(p.numel() for p in model.parameters())),
        "loss": float(last[0]) if last else float("nan"),
    }
    if isinstance(getattr(model, "encoder", None), torch.nn.Module):
        result["encoder_params"] = float(sum(p.numel() for p in model.encoder.parameters()))
    return result


def _autocast(device: str, precision: str):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


W2V_CONFIGS = {"tiny": Wav2Vec2Config.tiny, "small": Wav2Vec2Config.small, "base": Wav2Vec2Config.base}


def wav2vec2_vs_hf(config: Wav2Vec2Config, *, batch: int, seconds: float, steps: int, warmup: int,
                   device: str, profile: bool, precision: str = "fp32") -> dict:
    torch.manual_seed(0)
    ours = Wav2Vec2Pretrain(config).to(device).train()
    hf = to_hf(ours).to(device).train()
    samples = int(seconds * 16000)
    audio = 0.1 * torch.randn(batch, samples, device=device)
    lengths = torch.full((batch,), samples, device=device)
    b_ours = {"audio": audio[:, None, None], "lengths": lengths}
    t = int(frame_lengths(config, torch.tensor(samples)))
    gen = torch.Generator().manual_seed(0)
    mask = compute_mask_spans((batch, t), mask_prob=config.mask_prob, mask_length=config.mask_length,
                              min_spans=config.mask_min_spans, generator=gen).to(device)
    neg = sample_negatives(int(mask[0].sum()), config.num_negatives, batch, generator=gen).to(device)
    hf_neg = hf_negative_indices(mask, neg)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step_ours() -> None:
        ours.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss, _ = ours(b_ours)
        loss.backward()

    def step_hf() -> None:
        hf.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            out = hf(audio, mask_time_indices=mask, sampled_negative_indices=hf_neg)
        out.loss.backward()

    times = _interleaved({"ours": step_ours, "hf": step_hf}, steps, warmup, sync)
    med = {k: statistics.median(v) for k, v in times.items()}
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        for name, fn in (("ours", step_ours), ("hf", step_hf)):
            with prof(activities=[ProfilerActivity.CPU]) as p:
                fn()
            print(f"--- profile: {name} ---")
            print(p.key_averages().table(sort_by="cpu_time_total", row_limit=18))
    return {
        "config": next((k for k, f in W2V_CONFIGS.items() if f() == config), "custom"), "precision": precision,
        "batch": batch, "seconds": seconds, "frames": t, "masked_per_clip": int(mask[0].sum()),
        "params": sum(p.numel() for p in ours.parameters()),
        "ours_ms": 1000 * med["ours"], "hf_ms": 1000 * med["hf"],
        "ours_ms_all": [round(1000 * x, 1) for x in times["ours"]],
        "hf_ms_all": [round(1000 * x, 1) for x in times["hf"]],
    }


def wav2vec2_finetune_vs_hf(config: Wav2Vec2Config, *, batch: int, seconds: float, steps: int, warmup: int,
                            device: str, padded: bool, precision: str = "fp32") -> dict:
    """A fine-tuning / supervised step of the encoder: ``embed`` (unmasked, every frame) forward,
    a loss on the pooled output, backward; against HF ``Wav2Vec2Model`` given the same weights and
    the same attention mask. ``padded``: every second clip is valid for half its length."""
    torch.manual_seed(0)
    ours = Wav2Vec2Pretrain(config).to(device).train()
    hf = to_hf(ours).wav2vec2.to(device).train()
    samples = int(seconds * 16000)
    lengths = torch.full((batch,), samples)
    if padded:
        lengths[1::2] = samples // 2
    valid = (torch.arange(samples)[None, :] < lengths[:, None]).to(device)
    audio = 0.1 * torch.randn(batch, samples, device=device) * valid
    lengths, attn = lengths.to(device), valid.long()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step_ours() -> None:
        ours.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            pooled = ours.embed(audio, lengths)["pooled"]
        pooled.float().square().mean().backward()

    def step_hf() -> None:
        hf.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            h = hf(audio, attention_mask=attn if padded else None).last_hidden_state
        h.float().square().mean().backward()

    times = _interleaved({"ours": step_ours, "hf": step_hf}, steps, warmup, sync)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "seconds": seconds, "padded": padded, "ours_ms": 1000 * med["ours"], "hf_ms": 1000 * med["hf"]}


def seam_step(module: str, cls_name: str, cfg_name: str, preset: str, *, batch: int, views: int,
              steps: int, warmup: int, device: str, precision: str = "fp32") -> dict:
    """Time forward+backward of ``module.cls_name(cfg_name.preset())`` through the model seam."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        return {"missing": f"{module}: {exc}"}
    config = getattr(getattr(mod, cfg_name), preset)()
    model = getattr(mod, cls_name)(config).to(device).train()
    samples = int(config.input_samples)
    audio = 0.1 * torch.randn(batch, views, 1, samples, device=device)
    b = {"audio": audio, "lengths": torch.full((batch,), samples, device=device)}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss, _ = model(b)
        loss.backward()

    times = _interleaved({"step": step}, steps, warmup, sync)["step"]
    return {"preset": preset, "precision": precision, "batch": batch, "input_samples": samples,
            "params": sum(p.numel() for p in model.parameters()),
            "ms": 1000 * statistics.median(times)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 timed steps (for the test)")
    ap.add_argument("--batch", type=int, default=8, help="clips per wav2vec2 step (default 8)")
    ap.add_argument("--seconds", type=float, default=2.0, help="clip length at 16 kHz (default 2.0)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model (default 10)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--profile", action="store_true", help="print a CPU op profile of one step each")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="bf16: every model's forward under bf16 autocast, ours and HF alike (default fp32)")
    ap.add_argument("--w2v-config", choices=list(W2V_CONFIGS), default=None,
                    help="wav2vec2 size (default: small; --quick: tiny); base = fairseq's BASE")
    ap.add_argument("--seam-batch", type=int, default=None, help="clips per CLMR / CPC step (default: --batch)")
    ap.add_argument("--presets", nargs="+", choices=["tiny", "default"], default=None,
                    help="CLMR / CPC presets to time (default: tiny default; --quick: tiny)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps, warmup = (2, 1) if args.quick else (args.steps, 2)
    w2v_cfg = W2V_CONFIGS[args.w2v_config or ("tiny" if args.quick else "small")]()
    batch, seconds = (2, 1.0) if args.quick else (args.batch, args.seconds)
    seam_batch = args.seam_batch or batch

    print(f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    w2v = wav2vec2_vs_hf(w2v_cfg, batch=batch, seconds=seconds, steps=steps, warmup=warmup,
                         device=args.device, profile=args.profile, precision=args.precision)
    print(f"wav2vec2 {w2v['config']} (batch {batch} x {seconds} s, {w2v['params'] / 1e6:.1f}M params): "
          f"ours {w2v['ours_ms']:.1f} ms, HF {w2v['hf_ms']:.1f} ms per step", flush=True)
    finetune = {}
    for padded in (False, True):
        r = wav2vec2_finetune_vs_hf(w2v_cfg, batch=batch, seconds=seconds, steps=steps, warmup=warmup,
                                    device=args.device, padded=padded, precision=args.precision)
        finetune["padded" if padded else "full"] = r
        print(f"wav2vec2 {w2v['config']} fine-tuning step ({'half the clips padded to' if padded else 'clips of'} "
              f"{seconds} s): ours {r['ours_ms']:.1f} ms, HF Wav2Vec2Model {r['hf_ms']:.1f} ms", flush=True)
    others = {}
    presets = args.presets or (("tiny",) if args.quick else ("tiny", "default"))
    for preset in presets:
        others[f"clmr_{preset}"] = seam_step("models.clmr", "CLMR", "CLMRConfig", preset, batch=seam_batch,
                                             views=2, steps=steps, warmup=warmup, device=args.device,
                                             precision=args.precision)
    for preset in presets:
        others[f"cpc_{preset}"] = seam_step("models.cpc", "CPC", "CPCConfig", preset, batch=seam_batch,
                                            views=1, steps=steps, warmup=warmup, device=args.device,
                                            precision=args.precision)
    for name, r in others.items():
        print(f"{name}: " + (r["missing"] if "missing" in r else
                             f"{r['ms']:.1f} ms per step (batch {r['batch']} x {r['input_samples']} samples, "
                             f"{r['params'] / 1e6:.2f}M params)"), flush=True)
    result = {
        "benchmark": "models", "device": args.device, "precision": args.precision, "threads": torch.get_num_threads(),
        "quick": args.quick, "wav2vec2": w2v, "wav2vec2_finetune": finetune, **others,
        "ratios": {"wav2vec2_vs_hf": w2v["hf_ms"] / w2v["ours_ms"],
                   "wav2vec2_finetune_vs_hf": finetune["full"]["hf_ms"] / finetune["full"]["ours_ms"],
                   "wav2vec2_finetune_padded_vs_hf": finetune["padded"]["hf_ms"] / finetune["padded"]["ours_ms"]},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
