"""CLMR: SampleCNN size, NT-Xent against a per-pair formula, all-gather NT-Xent over 2 gloo ranks, training."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from benchmarks.models import benchmark_step
from models.clmr import CLMR, CLMRConfig, SampleCNN, nt_xent, nt_xent_stats
from tests.notes import rendered_notes

SR = 22050


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


NOTES = ((0, 24, 40, 56, 73, 11), (52, 64))  # piano, guitar, violin, trumpet, flute, vibraphone at E3, E4


def two_crops(clips: np.ndarray, crop: int, gen: torch.Generator) -> torch.Tensor:
    """Two random crops with random gains of every clip: (B, 2, 1, crop), the loader's CLMR layout."""
    x = torch.from_numpy(clips)
    starts = torch.randint(0, x.shape[1] - crop, (x.shape[0], 2), generator=gen)
    gains = 0.5 + torch.rand(x.shape[0], 2, generator=gen)
    views = [[x[b, s : s + crop] * g for s, g in zip(starts[b].tolist(), gains[b].tolist())] for b in range(x.shape[0])]
    return torch.stack([torch.stack(v) for v in views]).unsqueeze(2)


def test_samplecnn_default_has_the_original_parameter_count():
    enc = SampleCNN(CLMRConfig.default())
    # Convolution weights+biases and BatchNorm weights+biases, as the original's SampleCNN without its fc.
    assert sum(p.numel() for p in enc.parameters()) == 2_368_512
    model = CLMR(CLMRConfig.default())
    # SimCLR's head with CLMR v2's projection_dim 64 (config/config.yaml at 423414d).
    assert CLMRConfig.default().projection_dim == 64
    assert sum(p.numel() for p in model.projector.parameters()) == 512 * 512 + 512 * 64
    assert CLMRConfig.default().input_samples == 59049 and CLMRConfig.tiny().input_samples == 2187
    # 59049 samples reduce to exactly one 512-d frame; one more block needs 3x the input.
    model.eval()
    with torch.no_grad():
        out = model.embed(torch.randn(2, 59049))
    assert out["frames"].shape == (2, 1, 512) and out["pooled"].shape == (2, 512)


def test_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="model.temperature"):
        CLMRConfig(temperature=0.0)
    with pytest.raises(ValueError, match="model.channels"):
        CLMRConfig(channels=())
    with pytest.raises(ValueError, match="crop length"):
        CLMR(CLMRConfig.tiny())({"audio": torch.zeros(2, 2, 1, 100)})


def direct_nt_xent(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """Per-pair NT-Xent (SimCLR eq. 1), float64 loops: mean over the 2N anchors."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        denom = sum(math.exp(z[i] @ z[k] / tau) for k in range(n2) if k != i)
        total += -math.log(math.exp(z[i] @ z[j] / tau) / denom)
    return total / n2


def test_nt_xent_matches_the_per_pair_formula():
    gen = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    for tau in (0.5, 0.1):
        loss, acc = nt_xent(z1, z2, tau, gather=True)  # no process group: local negatives
        assert loss.item() == pytest.approx(direct_nt_xent(z1.numpy(), z2.numpy(), tau), rel=1e-5)
    # Accuracy: the positive is top-1 for these anchors only; make views 0..2 near-copies.
    z2b = z2.clone()
    z2b[:3] = z1[:3] + 0.01 * torch.randn(3, 8, generator=gen)
    stats = nt_xent_stats(z1, z2b, 0.5, gather=False)
    zn = F.normalize(torch.cat([z1, z2b]), dim=1)
    sim = zn @ zn.t()
    sim.fill_diagonal_(-2)
    expected_acc = (sim.argmax(1) == (torch.arange(12) + 6) % 12).float().mean()
    assert stats["accuracy"].item() == pytest.approx(expected_acc.item())
    assert expected_acc.item() >= 0.5  # the 6 near-copy anchors are right
    assert stats["pos_sim"].item() == pytest.approx(torch.cat([sim[:6, 6:].diag(), sim[6:, :6].diag()]).mean().item(), rel=1e-5)
    negative = ~torch.eye(12, dtype=torch.bool) & ~torch.eye(12, dtype=torch.bool).roll(6, dims=1)
    assert stats["neg_sim"].item() == pytest.approx(sim[negative].mean().item(), rel=1e-5)


# ---- two gloo processes ----------------------------------------------------------------------

N_GLOBAL, DIM = 8, 16


def _global_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N_GLOBAL, DIM, generator=gen), torch.randn(N_GLOBAL, DIM, generator=gen)


def _global_audio(config: CLMRConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(4, 1, 1, config.input_samples, generator=gen)
    return torch.cat([base, base + 0.3 * torch.randn(base.shape, generator=gen)], dim=1)  # (4, 2, 1, T)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        n = N_GLOBAL // world
        z1, z2 = _global_embeddings()
        mine1 = z1[rank * n : (rank + 1) * n].clone().requires_grad_()
        mine2 = z2[rank * n : (rank + 1) * n].clone().requires_grad_()
        loss, acc = nt_xent(mine1, mine2, 0.5, gather=True)
        loss.backward()
        local_loss, _ = nt_xent(mine1.detach(), mine2.detach(), 0.5, gather=False)

        config = CLMRConfig.tiny()
        torch.manual_seed(0)
        model = CLMR(config).eval()  # running BN statistics: each clip's embedding is independent of its rank
        audio = _global_audio(config)
        m = audio.shape[0] // world
        model_loss, metrics = model({"audio": audio[rank * m : (rank + 1) * m]})
        model_loss.backward()
        # What DDP's reducer does to every gradient (DDP itself is left out: constructing it imports
        # torch._dynamo, seconds per process on a loaded CI machine, and adds nothing to this check).
        for p in model.parameters():
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world
        torch.save(
            {
                "loss": loss.detach(),
                "acc": acc,
                "local_loss": local_loss,
                "grad1": mine1.grad,
                "grad2": mine2.grad,
                "model_loss": model_loss.detach(),
                "model_acc": metrics["contrastive_acc"],
                "model_grads": {k: p.grad.clone() for k, p in model.named_parameters()},
            },
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_all_gather_nt_xent_over_two_gloo_ranks_equals_the_concatenated_batch(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "pg"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]

    # Embeddings: the mean of the rank losses is the single-process loss on the full batch, and each
    # rank's embedding gradient / W (what DDP's averaging applies) is that loss's gradient.
    z1, z2 = _global_embeddings()
    z1.requires_grad_()
    z2.requires_grad_()
    full_loss, full_acc = nt_xent(z1, z2, 0.5, gather=True)
    full_loss.backward()
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(full_loss.item(), rel=1e-6)
    assert torch.stack([r["acc"] for r in ranks]).mean().item() == pytest.approx(full_acc.item())
    n = N_GLOBAL // world
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["grad1"] / world, z1.grad[r * n : (r + 1) * n], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res["grad2"] / world, z2.grad[r * n : (r + 1) * n], rtol=1e-5, atol=1e-7)

    # Per-GPU negatives (the original CLMR): each rank's loss is NT-Xent on its own sub-batch alone,
    # and with fewer negatives in every softmax it is strictly below the gathered loss.
    for r, res in enumerate(ranks):
        sub, _ = nt_xent(z1[r * n : (r + 1) * n].detach(), z2[r * n : (r + 1) * n].detach(), 0.5, gather=False)
        assert res["local_loss"].item() == pytest.approx(sub.item(), rel=1e-6)
        assert res["local_loss"].item() < res["loss"].item() - 1e-3

    # The model with DDP's gradient averaging: loss values and parameter gradients match one process
    # on the concatenated batch.
    config = CLMRConfig.tiny()
    torch.manual_seed(0)
    model = CLMR(config).eval()
    loss, metrics = model({"audio": _global_audio(config)})
    loss.backward()
    assert torch.stack([r["model_loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        for res in ranks:
            torch.testing.assert_close(res["model_grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert sum(p.grad.abs().sum().item() for p in model.parameters()) > 0


def test_a_few_adam_steps_lower_the_loss_on_rendered_notes():
    clips = rendered_notes(*NOTES, seconds=1.0, sample_rate=SR)
    config = CLMRConfig.tiny()
    torch.manual_seed(0)
    model = CLMR(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    held_out = two_crops(clips, config.input_samples, torch.Generator().manual_seed(123))

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss, _ = model({"audio": held_out})
        model.train()
        return loss.item()

    before = held_out_loss()
    for _ in range(40):
        loss, metrics = model({"audio": two_crops(clips, config.input_samples, gen)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    assert math.isfinite(before) and after < before - 0.3, (before, after)
    assert set(metrics) >= {"contrastive_acc", "pos_sim", "neg_sim", "embed_std"}
    assert all(v.dim() == 0 and not v.requires_grad for v in metrics.values())
    assert metrics["pos_sim"] > metrics["neg_sim"]


def test_bf16_autocast_forward_gives_a_finite_loss_close_to_fp32():
    config = CLMRConfig.tiny()
    torch.manual_seed(0)
    model = CLMR(config)
    audio = _global_audio(config)
    loss32, _ = model({"audio": audio})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, metrics = model({"audio": audio})
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert loss16.item() == pytest.approx(loss32.item(), abs=0.05)
    loss16.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_embed_shapes_values_and_determinism():
    config = CLMRConfig.tiny()
    torch.manual_seed(0)
    model = CLMR(config).eval()
    audio = torch.from_numpy(rendered_notes(*NOTES, seconds=1.0, sample_rate=SR)[:3, : 3 * config.input_samples])
    with torch.no_grad():
        out = model.embed(audio)
        again = model.embed(audio)
        single = model.embed(audio[:, config.input_samples : 2 * config.input_samples])
    assert out["frames"].shape == (3, 3, config.last_channels) and out["pooled"].shape == (3, config.last_channels)
    torch.testing.assert_close(out["pooled"], out["frames"].mean(1))
    torch.testing.assert_close(out["frames"], again["frames"], rtol=0, atol=0)
    # One input_samples crop is one frame: the encoder's own output, as the original SampleCNN gives.
    assert single["frames"].shape == (3, 1, config.last_channels)
    torch.testing.assert_close(single["pooled"], model.encoder(audio[:, None, config.input_samples : 2 * config.input_samples]))
    assert (out["pooled"] >= 0).all() and out["pooled"].abs().sum() > 0  # after the final ReLU


def test_benchmark_step_runs_and_reports_the_model_size():
    audio = 0.1 * torch.randn(4, 2, 1, CLMRConfig.tiny().input_samples, generator=torch.Generator().manual_seed(0))
    res = benchmark_step(CLMR(CLMRConfig.tiny()), {"audio": audio}, steps=1, warmup=1)
    tiny_params = sum(p.numel() for p in CLMR(CLMRConfig.tiny()).parameters())
    assert res["params"] == tiny_params and res["ms_per_step"] > 0 and math.isfinite(res["loss"])


def test_per_view_encoder_calls_make_one_batchnorm_batch_per_view():
    """SimCLR/CLMR run the encoder once per view: in training mode view 1's embeddings depend on the
    view-1 crops only. The shared call (ours) normalises both views together."""
    torch.manual_seed(0)
    per_view = CLMR(CLMRConfig.tiny())
    assert per_view.config.encoder_calls == "per_view" and CLMRConfig.default().encoder_calls == "per_view"
    shared = CLMR(dataclasses.replace(CLMRConfig.tiny(), encoder_calls="shared"))
    shared.load_state_dict(per_view.state_dict())
    audio = _global_audio(CLMRConfig.tiny())
    changed = audio.clone()
    changed[:, 1] = torch.randn_like(changed[:, 1]) * 3.0  # a different second view, other statistics

    def view1_embeddings(model, a):
        seen = []
        hook = model.projector.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
        model.train()
        model({"audio": a})
        hook.remove()
        return seen[0][: a.shape[0]]

    torch.testing.assert_close(view1_embeddings(per_view, audio), view1_embeddings(per_view, changed))
    torch.testing.assert_close(view1_embeddings(per_view, audio), per_view.encoder(audio[:, 0]))
    diff = (view1_embeddings(shared, audio) - view1_embeddings(shared, changed)).abs().max()
    assert diff > 1e-3
    with pytest.raises(ValueError, match="encoder_calls"):
        CLMRConfig(encoder_calls="twice")
