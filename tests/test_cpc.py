"""CPC: InfoNCE against a per-step formula, the shifted-copy alignment test, training, embed, lengths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from benchmarks.models import benchmark_step
from models.cpc import CPC, CPCConfig, cpc_infonce, sample_negatives
from tests.notes import rendered_notes

SR = 22050
NOTES = ((0, 24, 40, 56, 73, 11), (52, 64))  # piano, guitar, violin, trumpet, flute, vibraphone at E3, E4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_config_frames_and_sizes():
    cfg = CPCConfig.default()
    assert cfg.hop == 480 and cfg.num_frames(59049) == 124
    model = CPC(cfg)
    with torch.no_grad():
        z = model.encoder(torch.zeros(1, 1, 59049))
    assert z.shape == (1, 512, 124)  # the formula agrees with the convolutions
    enc = sum(p.numel() for p in model.encoder.parameters())
    assert enc == 5_775_872
    assert sum(p.numel() for p in model.context.parameters()) == 3 * (512 * 256 + 256 * 256 + 2 * 256)
    assert sum(p.numel() for p in model.predictor.parameters()) == 256 * 20 * 512
    tiny = CPCConfig.tiny()
    assert tiny.num_frames(tiny.input_samples) == 41
    # CLMR's init (the paper preset): kaiming_uniform_(fan_in, relu) weights, in +-sqrt(6 / fan_in) with
    # std sqrt(2 / fan_in); biases at PyTorch's default, uniform in +-1 / sqrt(fan_in).
    assert CPCConfig.default().init == "kaiming_uniform" and tiny.init == "kaiming"
    second = CPC(CPCConfig(**{**tiny.__dict__, "init": "kaiming_uniform"})).encoder.layers[2]
    fan_in = 32 * 6
    assert second.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    assert second.weight.abs().max() <= math.sqrt(6 / fan_in) and second.weight.abs().max() > 0.95 * math.sqrt(6 / fan_in)
    assert 0 < second.bias.abs().max() <= 1 / math.sqrt(fan_in)
    # He-normal (ours, tiny's default): the same std, zero biases.
    normal = CPC(tiny).encoder.layers[2]
    assert normal.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.05)
    assert normal.bias.abs().max() == 0
    legacy = CPC(CPCConfig(**{**tiny.__dict__, "init": "pytorch"})).encoder.layers[2]
    assert legacy.weight.std().item() == pytest.approx(math.sqrt(1 / (3 * 32 * 6)), rel=0.05)
    assert legacy.bias.abs().max() > 0
    with pytest.raises(ValueError, match="model.init"):
        CPCConfig(init="xavier")
    with pytest.raises(ValueError, match="model.prediction_steps"):
        CPCConfig(input_samples=4800)  # 11 frames < 20 steps
    with pytest.raises(ValueError, match="model.strides, model.kernels and model.padding"):
        CPCConfig(strides=(5, 3), kernels=(10,), padding=(2, 2))


def direct_infonce(preds, z, negatives, start, num_valid) -> tuple[float, list[float], list[float]]:
    """Per step, per anchor, float64 loops: -log softmax of the positive among it and its negatives."""
    preds, z, negatives = preds.double().numpy(), z.double().numpy(), negatives.numpy()
    b_n, a_n, k_n, c = preds.shape
    length = z.shape[1]
    z_flat = z.reshape(-1, c)
    step_losses, step_accs = [], []
    for k in range(1, k_n + 1):
        losses, hits = [], []
        for b in range(b_n):
            for a in range(a_n):
                t = start + a
                if t + k >= num_valid[b]:
                    continue
                p = preds[b, a, k - 1]
                pos_index = b * length + t + k
                scores = [p @ z_flat[pos_index]] + [p @ z_flat[n] for n in negatives[b, a] if n != pos_index]
                m = max(scores)
                losses.append(m + math.log(sum(math.exp(s - m) for s in scores)) - scores[0])
                hits.append(all(scores[0] > s for s in scores[1:]))
        step_losses.append(float(np.mean(losses)))
        step_accs.append(float(np.mean(hits)))
    return float(np.mean(step_losses)), step_losses, step_accs


def test_loss_matches_the_direct_per_step_formula():
    gen = torch.Generator().manual_seed(0)
    b, length, c, k, m, start, a = 3, 9, 5, 3, 4, 1, 6
    z = torch.randn(b, length, c, generator=gen)
    preds = torch.randn(b, a, k, c, generator=gen)
    negatives = torch.randint(b * length, (b, a, m), generator=gen)
    # Make some negatives equal to a step's positive: they must leave that step's softmax.
    negatives[0, 0, 0] = 0 * length + start + 0 + 1
    negatives[1, 2, 1] = 1 * length + start + 2 + 3
    num_valid = torch.tensor([9, 6, 8])
    out = cpc_infonce(preds, z, negatives, start=start, num_valid=num_valid)
    loss, step_losses, step_accs = direct_infonce(preds, z, negatives, start, num_valid.tolist())
    assert out["loss"].item() == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(out["step_loss"].numpy(), step_losses, rtol=1e-5)
    np.testing.assert_allclose(out["step_acc"].numpy(), step_accs)
    # Anchors per step: t + k inside the clip's valid frames.
    expected = [sum(max(0, min(a, nv - k_ - start)) for nv in (9, 6, 8)) for k_ in (1, 2, 3)]
    assert out["step_count"].tolist() == expected
    # Without lengths every target inside the crop counts.
    full = cpc_infonce(preds, z, negatives, start=start)
    assert full["step_count"].tolist() == [b * min(a, length - kk - start) for kk in (1, 2, 3)]


def _copy_context(z: torch.Tensor, k_steps: int, shift: int) -> torch.Tensor:
    """c_t = [z_{t+shift}, ..., z_{t+shift+K-1}] (zeros past the end): (B, L, K*C)."""
    b, length, c = z.shape
    padded = torch.cat([z, torch.zeros(b, k_steps + shift, c)], dim=1)
    return torch.cat([padded[:, shift + j : shift + j + length] for j in range(k_steps)], dim=-1)


def _fit_predictor(z: torch.Tensor, context: torch.Tensor, k_steps: int, m: int, iters: int, lr: float = 0.2) -> dict[str, torch.Tensor]:
    b, length, c = z.shape
    torch.manual_seed(0)
    predictor = torch.nn.Linear(context.shape[-1], k_steps * c, bias=False)
    torch.nn.init.zeros_(predictor.weight)
    opt = torch.optim.Adam(predictor.parameters(), lr=lr)
    for _ in range(iters):
        preds = predictor(context[:, : length - 1]).reshape(b, length - 1, k_steps, c)
        negatives = sample_negatives(None, length - 1, m, shape=(b, length))
        out = cpc_infonce(preds, z, negatives)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    return out


def test_shifted_copy_predictions_line_up_with_their_targets():
    """If c_t holds z_{t+1}..z_{t+K}, a linear W_k can copy z_{t+k} and the loss must reach ~0.

    The control holds z_t..z_{t+K-1}: step K's target is missing, so only steps 1..K-1 can be learned.
    An off-by-one between anchors and targets in the loss would fail the first half or pass the second.
    """
    gen = torch.Generator().manual_seed(0)
    k_steps, m = 4, 6
    # 504 anchors against a 64-d context: too many for the linear maps to memorise a missing target.
    z = torch.nn.functional.normalize(torch.randn(8, 64, 16, generator=gen), dim=-1)
    out = _fit_predictor(z, _copy_context(z, k_steps, shift=1), k_steps, m, iters=100)
    assert out["loss"].item() < 0.05, out["step_loss"]
    assert (out["step_acc"] > 0.99).all(), out["step_acc"]

    control = _fit_predictor(z, _copy_context(z, k_steps, shift=0), k_steps, m, iters=100)
    assert (control["step_acc"][:-1] > 0.99).all(), control["step_acc"]
    assert control["step_acc"][-1] < 0.7 and control["step_loss"][-1] > 0.5, (control["step_acc"], control["step_loss"])


def _crops(clips: np.ndarray, crop: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.from_numpy(clips)
    starts = torch.randint(0, x.shape[1] - crop, (x.shape[0],), generator=gen).tolist()
    return torch.stack([x[i, s : s + crop] for i, s in enumerate(starts)])[:, None, None]  # (B, 1, 1, T)


@pytest.mark.parametrize("init", ["kaiming_uniform", "kaiming", "pytorch"])
def test_a_few_adam_steps_lower_the_loss_on_rendered_notes(init):
    # Measured (held-out loss, 50 steps): kaiming_uniform 2.20 -> 0.13, kaiming -> 0.09, pytorch -> 2.07.
    clips = rendered_notes(*NOTES, seconds=1.0, sample_rate=SR)
    cfg = CPCConfig(**{**CPCConfig.tiny().__dict__, "init": init})
    torch.manual_seed(0)
    model = CPC(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    held_out = {"audio": _crops(clips, cfg.input_samples, torch.Generator().manual_seed(99))}

    def held_out_loss() -> float:
        torch.manual_seed(7)  # the same negatives before and after training
        with torch.no_grad():
            loss, _ = model(held_out)
        return loss.item()

    before = held_out_loss()
    assert before == pytest.approx(math.log(1 + cfg.negatives), abs=0.3)  # chance level at init
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        loss, metrics = model({"audio": _crops(clips, cfg.input_samples, gen)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    if init == "pytorch":  # PyTorch's default init shrinks the activations: still near chance
        assert after > before - 0.5, (before, after)
        return
    assert after < before - 1.0, (before, after)
    assert set(metrics) == {"contrastive_acc", "loss_step1", "loss_step4", "acc_step1", "acc_step2", "acc_step4"}
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    assert metrics["contrastive_acc"] > 0.5  # chance is 1 / (1 + 8)


def test_embed_shapes_values_causality_and_determinism():
    cfg = CPCConfig.tiny()
    torch.manual_seed(0)
    model = CPC(cfg).eval()
    audio = torch.from_numpy(rendered_notes(*NOTES, seconds=1.0, sample_rate=SR)[:3, : cfg.input_samples])
    with torch.no_grad():
        out = model.embed(audio)
        again = model.embed(audio)
        changed = audio.clone()
        changed[:, 1800:] = torch.randn(3, cfg.input_samples - 1800)
        late = model.embed(changed)
    frames = cfg.num_frames(cfg.input_samples)
    assert out["frames"].shape == (3, frames, cfg.context_dim) and out["pooled"].shape == (3, cfg.context_dim)
    assert out["encoder_frames"].shape == (3, frames, cfg.channels)
    torch.testing.assert_close(out["pooled"], out["frames"].mean(1))
    torch.testing.assert_close(out["encoder_pooled"], out["encoder_frames"].mean(1))
    torch.testing.assert_close(out["frames"], again["frames"], rtol=0, atol=0)
    # The context is causal: frames that end before sample 1800 do not see the change (the last
    # sample that frame t sees is below (t + 1) * hop + receptive-field slack, well under 1800 for t < 25).
    torch.testing.assert_close(late["frames"][:, :25], out["frames"][:, :25], rtol=0, atol=0)
    assert (late["frames"][:, -5:] - out["frames"][:, -5:]).abs().max() > 1e-4
    # The context is the GRU over the encoder frames.
    with torch.no_grad():
        gru, _ = model.context(out["encoder_frames"])
    torch.testing.assert_close(out["frames"], gru)


def test_lengths_mask_padding_out_of_targets_and_negatives():
    cfg = CPCConfig.tiny()
    torch.manual_seed(0)
    model = CPC(cfg)
    clips = torch.from_numpy(rendered_notes(*NOTES, seconds=1.0, sample_rate=SR)[:2, : cfg.input_samples])
    short = 1300
    clips[1, short:] = 0.0  # the loader pads with zeros at the end
    lengths = torch.tensor([cfg.input_samples, short])
    valid = model.frame_lengths(lengths, cfg.input_samples)
    assert valid[0] == cfg.num_frames(cfg.input_samples) and 0 < valid[1] < cfg.num_frames(short)
    with torch.no_grad():
        z_batch, _ = model.encode(clips)
        z_alone, _ = model.encode(clips[1:, :short])
    # Valid frames of the padded clip are exactly the frames of the clip alone; the next one is not.
    torch.testing.assert_close(z_batch[1, : valid[1]], z_alone[0, : valid[1]], rtol=1e-5, atol=1e-6)
    assert (z_batch[1, valid[1] + 1] - z_alone[0, valid[1] + 1]).abs().max() > 1e-4

    frame_valid = torch.arange(z_batch.shape[1])[None] < valid[:, None]
    negatives = sample_negatives(frame_valid, 40, 50)
    flat_valid = frame_valid.reshape(-1)
    assert flat_valid[negatives].all()  # never a padded frame
    assert torch.unique(negatives).numel() == int(flat_valid.sum())  # every valid frame can be drawn

    loss, metrics = model({"audio": clips[:, None, None], "lengths": lengths})
    assert torch.isfinite(loss) and 0 <= metrics["acc_step4"] <= 1


def test_window_bounds_the_anchors():
    cfg = CPCConfig(**{**CPCConfig.tiny().__dict__, "window": 8})
    torch.manual_seed(0)
    model = CPC(cfg)
    calls = {}
    original = model.predictor.forward

    def spy(x):
        calls["anchors"] = x.shape[1]
        return original(x)

    model.predictor.forward = spy
    loss, _ = model({"audio": torch.randn(2, 1, 1, cfg.input_samples)})
    assert calls["anchors"] == 8 and torch.isfinite(loss)


def test_bf16_autocast_forward_gives_a_finite_loss_close_to_fp32():
    cfg = CPCConfig.tiny()
    torch.manual_seed(0)
    model = CPC(cfg)
    batch = {"audio": _crops(rendered_notes(*NOTES, seconds=1.0, sample_rate=SR), cfg.input_samples, torch.Generator().manual_seed(1))}
    torch.manual_seed(3)
    loss32, _ = model(batch)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _ = model(batch)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert loss16.item() == pytest.approx(loss32.item(), abs=0.05)
    loss16.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_benchmark_step_runs_and_reports_the_model_size():
    audio = 0.1 * torch.randn(2, 1, 1, CPCConfig.tiny().input_samples, generator=torch.Generator().manual_seed(0))
    res = benchmark_step(CPC(CPCConfig.tiny()), {"audio": audio}, steps=1, warmup=1, lr=2e-4)
    assert res["params"] == sum(p.numel() for p in CPC(CPCConfig.tiny()).parameters())
    assert res["ms_per_step"] > 0 and math.isfinite(res["loss"])


def test_dataset_input_norm_is_clmrs_statistic_frozen_after_its_batches_and_carried_by_the_state_dict():
    """input_norm="dataset": (x - mean) / std with CLMR's statistic (the mean of per-clip means and of
    per-clip unbiased stds), over the first norm_batches training batches, then frozen."""
    tiny = CPCConfig.tiny()
    cfg = CPCConfig(**{**tiny.__dict__, "input_norm": "dataset", "norm_batches": 3})
    torch.manual_seed(0)
    model = CPC(cfg)
    g = torch.Generator().manual_seed(1)
    t = cfg.input_samples
    batches = [0.02 + 0.1 * (1 + k) * torch.randn(4, 1, 1, t, generator=g) for k in range(4)]
    lengths = torch.tensor([t, t, t // 2, t])
    model.eval()
    model({"audio": batches[0]})  # evaluation does not estimate
    assert model.input_stats() == (0.0, 1.0) and int(model.norm_counts[1]) == 0
    model.train()
    for k in range(3):
        model({"audio": batches[k], "lengths": lengths if k == 1 else None})
    clips = [b[i, 0, 0, : (int(lengths[i]) if k == 1 else t)].double().numpy()
             for k, b in enumerate(batches[:3]) for i in range(4)]
    want = (float(np.mean([c.mean() for c in clips])), float(np.mean([c.std(ddof=1) for c in clips])))
    assert model.input_stats() == pytest.approx(want, rel=1e-9)
    assert want[1] == pytest.approx(0.1 * (1 + 2 + 3) / 3, rel=0.05)  # the stds of the three batches
    model({"audio": batches[3]})  # a fourth batch: frozen
    assert model.input_stats() == pytest.approx(want, rel=1e-9) and int(model.norm_counts[1]) == 3
    # embed sees the normalised input: equal to a raw model's embed of (x - mean) / std
    raw = CPC(tiny)
    raw.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("norm_")})
    x = batches[3][:, 0, 0]
    with torch.no_grad():
        np.testing.assert_allclose(model.embed(x)["pooled"].numpy(),
                                   raw.embed((x - want[0]) / want[1])["pooled"].numpy(), atol=1e-5)
    # the statistics travel with the weights (checkpoints, evaluation); "none" adds no keys
    again = CPC(cfg)
    again.load_state_dict(model.state_dict())
    assert again.input_stats() == pytest.approx(want, rel=1e-9)
    assert not any(k.startswith("norm_") for k in raw.state_dict())
    with pytest.raises(ValueError, match="model.input_norm"):
        CPCConfig(input_norm="clip")
