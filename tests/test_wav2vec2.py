"""wav2vec2: config, fairseq mask statistics, negatives, temperature schedule, padding, embed, bf16, training."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from models.wav2vec2 import (
    Wav2Vec2Config,
    Wav2Vec2Pretrain,
    compute_mask_spans,
    frame_lengths,
    gumbel_temperature,
    sample_cross_negatives,
    sample_negatives,
)
from tests.notes import rendered_notes

SR = 16000


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _eval_config(**overrides) -> Wav2Vec2Config:
    return dataclasses.replace(
        Wav2Vec2Config.tiny(), dropout=0.0, attention_dropout=0.0, dropout_input=0.0,
        dropout_features=0.0, **overrides,
    )


# ------------------------------------------------------------------ config


def test_config_geometry_and_validation():
    base = Wav2Vec2Config.base()
    assert base.frame_stride == 320 and base.receptive_field == 400
    assert Wav2Vec2Config.small().frame_stride == 320 and Wav2Vec2Config.tiny().frame_stride == 320
    # lists (from JSON / checkpoints) become tuples, and the config round-trips through a dict
    again = Wav2Vec2Config(**base.to_dict() | {"conv_layers": [list(l) for l in base.conv_layers]})
    assert again == base
    with pytest.raises(ValueError, match="--model.num_heads"):
        Wav2Vec2Config(embed_dim=768, num_heads=5)
    with pytest.raises(ValueError, match="--model.mask_prob"):
        Wav2Vec2Config(mask_prob=1.5)
    with pytest.raises(ValueError, match="--model.extractor_mode"):
        Wav2Vec2Config(extractor_mode="batch_norm")
    with pytest.raises(ValueError, match="--model.latent_temp"):
        Wav2Vec2Config(latent_temp=(0.5, 2.0, 0.9))
    with pytest.raises(ValueError, match="at least one negative"):
        Wav2Vec2Config(num_negatives=0)
    with pytest.raises(ValueError, match="cross_sample_negatives must be >= 0"):
        Wav2Vec2Config(cross_sample_negatives=-1)
    assert Wav2Vec2Config(num_negatives=0, cross_sample_negatives=10).cross_sample_negatives == 10


def test_frame_lengths_match_the_encoder_output():
    model = Wav2Vec2Pretrain(Wav2Vec2Config.tiny()).eval()
    for n in (400, 719, 720, 16000, 16321):
        with torch.no_grad():
            t = model.feature_extractor(torch.zeros(1, n)).shape[-1]
        assert int(frame_lengths(model.config, torch.tensor(n))) == t
    assert int(frame_lengths(model.config, torch.tensor(16000))) == 49


# ------------------------------------------------------------------ masking


def _fairseq_expected_fraction(t: int, p: float, length: int, min_spans: int) -> float:
    """E[masked fraction] of fairseq's static span mask without the same-count trim, in closed form.

    num = max(min_spans, int(p*T/L + u)); starts: `num` distinct of [0, R) (R = T - L, or num+1 when
    that is too short); frame f is unmasked iff no start lies in [f-L+1, f]: C(R - c_f, num) / C(R, num).
    """
    x = p * t / length
    lo = math.floor(x)
    expected = 0.0
    for num, prob in ((max(min_spans, lo), 1 - (x - lo)), (max(min_spans, lo + 1), x - lo)):
        span = length if t - length > num else t - num - 1
        r = t - span
        covered = 0.0
        for f in range(t):
            c = max(0, min(f, r - 1) - max(0, f - length + 1) + 1)
            covered += 1 - math.comb(r - c, num) / math.comb(r, num)
        expected += prob * covered / t
    return expected


@pytest.mark.parametrize("t,p", [(100, 0.65), (49, 0.65), (100, 0.05)])
def test_mask_fraction_matches_the_fairseq_formula(t, p):
    gen = torch.Generator().manual_seed(0)
    mask = compute_mask_spans((4000, t), mask_prob=p, mask_length=10, min_spans=2,
                              require_same_masks=False, generator=gen)
    expected = _fairseq_expected_fraction(t, p, 10, 2)
    got = mask.float().mean().item()
    assert abs(got - expected) < 0.01, (got, expected)
    if p == 0.05:  # int(0.5 + u) <= 1 span: the minimum of 2 spans decides, 10..20 frames masked
        counts = mask.sum(1)
        assert counts.min() >= 10 and counts.max() <= 20


def test_mask_spans_have_the_span_length_and_respect_padding():
    gen = torch.Generator().manual_seed(1)
    valid = torch.tensor([200, 150, 90, 200, 61, 120])
    mask = compute_mask_spans((6, 200), mask_prob=0.65, mask_length=10, min_spans=2, valid_frames=valid,
                              require_same_masks=False, generator=gen)
    for row, sz in zip(mask, valid.tolist()):
        assert not row[sz:].any()  # padded frames are never masked
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, row.int().numpy(), 0])))[::2]
        assert len(runs) > 0 and runs.min() >= 10  # whole spans of mask_length (overlaps merge)
    same = compute_mask_spans((6, 200), mask_prob=0.65, mask_length=10, min_spans=2, valid_frames=valid,
                              require_same_masks=True, generator=torch.Generator().manual_seed(1))
    counts = same.sum(1)
    assert (counts == counts[0]).all() and counts[0] > 0
    assert (same & ~mask).sum() == 0  # the trim keeps a subset of the same draw
    assert counts[0] == mask.sum(1).min()
    for row, sz in zip(same, valid.tolist()):
        assert not row[sz:].any()


def test_negatives_are_uniform_over_other_masked_frames():
    gen = torch.Generator().manual_seed(2)
    neg = sample_negatives(5, 4000, 3, generator=gen)  # (B=3, M=5, K=4000)
    assert neg.shape == (3, 5, 4000) and neg.min() >= 0 and neg.max() <= 4
    assert not (neg == torch.arange(5)[None, :, None]).any()
    freq = torch.nn.functional.one_hot(neg, 5).float().mean(2)  # (3, 5, 5)
    off_diag = freq[:, ~torch.eye(5, dtype=torch.bool)]
    assert torch.allclose(off_diag, torch.full_like(off_diag, 0.25), atol=0.03)


def test_cross_sample_negatives_are_uniform_over_the_batch_never_the_frame():
    gen = torch.Generator().manual_seed(3)
    neg = sample_cross_negatives(5, 6000, 3, generator=gen)  # (B=3, M=5, K=6000) into 15 flat frames
    assert neg.shape == (3, 5, 6000) and neg.min() >= 0 and neg.max() <= 14
    own = torch.arange(15).view(3, 5, 1)
    assert not (neg == own).any()  # clip b's frame m is b*5+m: never drawn for itself, in any clip
    freq = torch.nn.functional.one_hot(neg, 15).float().mean(2).view(15, 15)
    off_diag = freq[~torch.eye(15, dtype=torch.bool)]
    assert torch.allclose(off_diag, torch.full_like(off_diag, 1 / 14), atol=0.015)
    other_clip = (neg // 5) != torch.arange(3).view(3, 1, 1)
    assert abs(other_clip.float().mean().item() - 10 / 14) < 0.01  # most come from the other clips


def test_cross_sample_logits_are_cosines_with_other_clips_targets():
    torch.manual_seed(0)
    plain = Wav2Vec2Pretrain(_eval_config()).eval()
    cross = Wav2Vec2Pretrain(_eval_config(cross_sample_negatives=7)).eval()
    cross.load_state_dict(plain.state_dict())
    audio = torch.randn(3, SR) * 0.1
    a = plain.forward_with(audio, generator=torch.Generator().manual_seed(5))
    b = cross.forward_with(audio, generator=torch.Generator().manual_seed(5))
    k = plain.config.num_negatives
    assert a["cross_negatives"] is None and b["logits"].shape[-1] == 1 + k + 7
    # the clip's own negatives are drawn first: the same columns, to the bit
    assert torch.equal(b["logits"][..., : 1 + k], a["logits"]) and torch.equal(b["negatives"], a["negatives"])
    pn = torch.nn.functional.normalize(b["predictions"], dim=-1)
    tn = torch.nn.functional.normalize(b["targets"], dim=-1).flatten(0, 1)
    idx = b["cross_negatives"]
    want = (pn[:, :, None, :] * tn[idx]).sum(-1) / cross.config.logit_temp
    same_code = (b["codes"].flatten(0, 1)[idx] == b["codes"][:, :, None, :]).all(-1)
    got = b["logits"][..., 1 + k:]
    assert torch.equal(torch.isinf(got), same_code)
    assert torch.allclose(got[~same_code], want[~same_code], atol=1e-5)
    # the loss is the cross-entropy over every column, positive first
    ce = (torch.logsumexp(b["logits"], -1) - b["logits"][..., 0]).mean()
    assert torch.allclose(b["loss_contrastive_sum"] / idx.shape[0] / idx.shape[1], ce, atol=1e-6)
    assert b["loss_contrastive_sum"] > a["loss_contrastive_sum"]  # more negatives: a harder task at init


# ------------------------------------------------------------------ schedule


def test_gumbel_temperature_schedule():
    config = Wav2Vec2Config.base()
    assert gumbel_temperature(config, 0) == 2.0
    assert gumbel_temperature(config, 1000) == pytest.approx(2 * 0.999995**1000)  # 1.99003...
    assert gumbel_temperature(config, 1000) == pytest.approx(1.990025, abs=1e-6)
    assert gumbel_temperature(config, 277_258) == pytest.approx(0.5, abs=1e-4)  # 2*d^n = 0.5 here
    assert gumbel_temperature(config, 10_000_000) == 0.5
    model = Wav2Vec2Pretrain(Wav2Vec2Config.tiny())
    model.set_step(1000)
    _, metrics = model({"audio": torch.randn(2, 1, 1, SR) * 0.1, "lengths": torch.tensor([SR, SR])})
    assert metrics["temperature"].item() == pytest.approx(1.990025, abs=1e-6)


# ------------------------------------------------------------------ forward seam, padding, embed


def test_forward_seam_with_padding():
    torch.manual_seed(0)
    model = Wav2Vec2Pretrain(Wav2Vec2Config.tiny()).train()
    lengths = torch.tensor([SR, 12000, 8000])
    audio = torch.randn(3, SR) * 0.1 * (torch.arange(SR)[None, :] < lengths[:, None])
    loss, metrics = model({"audio": audio[:, None, None], "lengths": lengths})
    assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    for key in ("contrastive_acc", "code_perplexity", "prob_perplexity", "temperature", "loss_contrastive",
                "loss_diversity", "loss_features", "num_masked"):
        assert metrics[key].dim() == 0 and not metrics[key].requires_grad and torch.isfinite(metrics[key])
    # at initialisation the contrastive loss is close to log(1 + K) (chance among 21 candidates)
    assert abs(metrics["loss_contrastive"].item() - math.log(21)) < 0.6
    out = model.forward_with(audio, lengths, generator=torch.Generator().manual_seed(0))
    frames = frame_lengths(model.config, lengths)
    pad = torch.arange(out["mask"].shape[1])[None, :] >= frames[:, None]
    assert not (out["mask"] & pad).any()
    assert (out["mask"].sum(1) == out["mask"].sum(1)[0]).all()
    with pytest.raises(ValueError, match="single-crop"):
        model({"audio": torch.zeros(2, 2, 1, SR), "lengths": torch.tensor([SR, SR])})
    # a clip that is all padding leaves no frame to mask: a clear error, not a silent NaN
    with pytest.raises(ValueError, match="longer crops"):
        model({"audio": torch.zeros(2, 1, 1, SR), "lengths": torch.tensor([SR, 300])})


def test_embed_layers_pooling_and_padding_invariance():
    """Layer-norm encoder: a padded clip's valid frames equal the unpadded clip's, at every layer."""
    torch.manual_seed(0)
    model = Wav2Vec2Pretrain(_eval_config(extractor_mode="layer_norm")).eval()
    clip = torch.randn(1, 9600) * 0.1
    padded = torch.cat([clip, torch.zeros(1, SR - 9600)], dim=1)
    other = torch.randn(1, SR) * 0.1
    with torch.no_grad():
        alone = model.embed(clip)
        both = model.embed(torch.cat([padded, other]), torch.tensor([9600, SR]))
    t = alone["frames"].shape[1]
    assert t == 29 and both["frames"].shape == (2, 49, 64) and both["frame_lengths"].tolist() == [29, 49]
    assert len(both["layers"]) == model.config.num_layers + 1
    assert torch.equal(both["layers"][-1], both["frames"])  # post-LN: the last layer is the output
    for a, b in zip(alone["layers"], both["layers"]):
        assert torch.allclose(a[0], b[0, :t], atol=1e-5)
    assert torch.allclose(alone["pooled"][0], both["pooled"][0], atol=1e-5)
    assert torch.allclose(both["pooled"][1], both["frames"][1].mean(0), atol=1e-6)
    assert both["pooled"].shape == (2, 64)


def test_feature_gradient_is_scaled_by_feature_grad_mult():
    torch.manual_seed(0)
    model = Wav2Vec2Pretrain(_eval_config(feature_grad_mult=1.0)).eval()
    audio = torch.randn(2, SR) * 0.1

    def grads(mult: float) -> tuple[torch.Tensor, torch.Tensor]:
        model.config.feature_grad_mult = mult
        model.zero_grad()
        model.forward_with(audio, generator=torch.Generator().manual_seed(5))["loss"].backward()
        return (model.feature_extractor.convs[0].weight.grad.clone(), model.post_extract_proj.weight.grad.clone())

    conv_full, proj_full = grads(1.0)
    conv_scaled, proj_scaled = grads(0.1)
    assert conv_full.abs().sum() > 0
    # sums with cancellation: compare against the gradient's scale, not element by element
    scale = conv_full.abs().max()
    assert (conv_scaled - 0.1 * conv_full).abs().max() < 1e-4 * 0.1 * scale
    assert (proj_scaled - proj_full).abs().max() < 1e-4 * proj_full.abs().max()


def test_bf16_autocast_forward_backward_finite_and_close():
    torch.manual_seed(0)
    model = Wav2Vec2Pretrain(_eval_config()).eval()
    audio = torch.randn(2, SR) * 0.1
    ref = model.forward_with(audio, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_with(audio, generator=torch.Generator().manual_seed(4))
        emb = model.embed(audio)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(torch.isfinite(v) for v in out["metrics"].values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(emb["pooled"]).all()
    assert abs(out["loss"].item() - ref["loss"].item()) < 0.1 * ref["loss"].item()
    assert out["logits"].dtype == torch.float32  # the cosine logits stay float32 under autocast


# ------------------------------------------------------------------ training on rendered notes


def test_a_few_steps_lower_every_loss_term_on_rendered_notes():
    torch.manual_seed(0)
    # 1.2 s notes of piano, violin, trumpet, flute x 2 pitches
    audio = torch.from_numpy(rendered_notes((0, 40, 56, 73), (57, 64), seconds=1.2, sample_rate=SR))
    assert audio.shape == (8, int(1.2 * SR)) and audio.abs().max() > 0.4
    model = Wav2Vec2Pretrain(Wav2Vec2Config.tiny())
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():  # the same mask and negatives every time
            out = model.forward_with(audio, generator=torch.Generator().manual_seed(123))
        model.train()
        return {k: out["metrics"][k].item() for k in ("loss_contrastive", "loss_diversity", "loss_features")}

    before = evaluate()
    batch = {"audio": audio[:, None, None], "lengths": torch.full((8,), audio.shape[1])}
    for step in range(25):
        model.set_step(step)
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    # the contrastive loss moves slowest (it chases quantized targets that move too); the same
    # test passes for seeds 0, 1, 2 with these margins
    assert after["loss_contrastive"] < 0.95 * before["loss_contrastive"], (before, after)
    assert after["loss_diversity"] < 0.7 * before["loss_diversity"], (before, after)
    assert after["loss_features"] < 0.5 * before["loss_features"], (before, after)


def test_masked_group_norm_is_each_clip_alone_forward_and_backward():
    """The first conv layer's norm over a padded batch: each row's values and gradients equal a
    GroupNorm of its valid frames alone, and padded samples get no gradient (downstream, as in
    the model, nothing reads padded frames); a batch without padding takes the fused group norm."""
    from models.wav2vec2 import _masked_instance_norm

    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(8, 8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(4, 8, 50) * 3 + 2).requires_grad_(True)
    valid = torch.tensor([50, 31, 7, 2])
    weights = torch.randn(4, 8, 50) * (torch.arange(50)[None, :] < valid[:, None])[:, None]
    (_masked_instance_norm(x, valid, norm) * weights).sum().backward()
    for b, n in enumerate(valid.tolist()):
        xb = x.detach()[b : b + 1, :, :n].clone().requires_grad_(True)
        ref = norm(xb)
        (ref * weights[b : b + 1, :, :n]).sum().backward()
        with torch.no_grad():
            got = _masked_instance_norm(x[b : b + 1], valid[b : b + 1], norm)[..., :n] if n == 50 else \
                _masked_instance_norm(x, valid, norm)[b : b + 1, :, :n]
        assert torch.allclose(got, ref, atol=1e-4), b
        assert torch.allclose(x.grad[b, :, :n], xb.grad[0], atol=1e-4), b
        assert torch.count_nonzero(x.grad[b, :, n:]) == 0
    full = torch.randn(3, 8, 40)
    assert torch.allclose(_masked_instance_norm(full, torch.tensor([40, 40, 40]), norm), norm(full), atol=1e-6)
