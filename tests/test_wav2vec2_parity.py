"""wav2vec2 parity with HF transformers' Wav2Vec2ForPreTraining (random weights, nothing downloaded).

Both models are built from the same tiny config; our weights are copied into HF by
``models.wav2vec2.hf_state_dict`` and both get the same mask and negative indices. HF's logits are
recomputed here from its projected states with the plain formula (cosine / 0.1 against the positive
and the gathered negatives, -inf where a negative equals the positive).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from models.wav2vec2 import (  # noqa: E402
    Wav2Vec2Config,
    Wav2Vec2Pretrain,
    hf_negative_indices,
    to_hf,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _no_dropout(config: Wav2Vec2Config, **overrides) -> Wav2Vec2Config:
    return dataclasses.replace(
        config, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, dropout_input=0.0,
        dropout_features=0.0, layerdrop=0.0, **overrides,
    )


def _hf_logits(out, mask: torch.Tensor, hf_neg: torch.Tensor, temp: float) -> torch.Tensor:
    """HF's contrastive logits at the masked frames, (N, 1+K), by the direct formula."""
    pred = out.projected_states  # (B, T, F)
    target = out.projected_quantized_states  # (B, T, F)
    b, t, f = target.shape
    negs = target.reshape(b * t, f)[hf_neg.reshape(-1)].view(b, t, -1, f)  # (B, T, K, F)
    cands = torch.cat([target[:, :, None], negs], dim=2)  # (B, T, 1+K, F)
    logits = F.cosine_similarity(pred[:, :, None].float(), cands.float(), dim=-1) / temp
    same = (negs == target[:, :, None]).all(-1)
    logits[:, :, 1:] = logits[:, :, 1:].masked_fill(same, float("-inf"))
    return logits[mask]


CASES = {
    # BASE layout (post-LN, group norm), full-length clips
    "post_ln": dict(),
    # pre-LN + layer-norm encoder, 2x2 codes so negatives often equal the positive (-inf path),
    # and padded clips (attention mask, lengths)
    "pre_ln_padded_few_codes": dict(layer_norm_first=True, extractor_mode="layer_norm", latent_vars=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_eval_mode_logits_loss_and_perplexity_match_hf(case):
    torch.manual_seed(0)
    config = _no_dropout(Wav2Vec2Config.tiny(), **CASES[case])
    ours = Wav2Vec2Pretrain(config).eval()
    hf = to_hf(ours).eval()
    audio = torch.randn(3, 16000) * 0.3
    lengths = torch.tensor([16000, 12000, 9000]) if "padded" in case else None
    if lengths is not None:
        audio = audio * (torch.arange(16000)[None, :] < lengths[:, None])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mine = ours.forward_with(audio, lengths, generator=gen)
        mask, neg = mine["mask"], mine["negatives"]
        hf_neg = hf_negative_indices(mask, neg)
        attn = None if lengths is None else (torch.arange(16000)[None, :] < lengths[:, None]).long()
        theirs = hf(audio, attention_mask=attn, mask_time_indices=mask, sampled_negative_indices=hf_neg)

    n = int(mask.sum())
    assert n == mine["metrics"]["num_masked"].item() and n >= 2 * 3
    ref = _hf_logits(theirs, mask, hf_neg, config.logit_temp)  # (N, 1+K)
    got = mine["logits"].reshape(n, -1)
    inf_ref, inf_got = torch.isinf(ref), torch.isinf(got)
    assert torch.equal(inf_ref, inf_got)
    if "few_codes" in case:
        assert inf_got.sum() > 0.2 * inf_got.numel()  # the -inf path is really exercised
    assert torch.allclose(got[~inf_got], ref[~inf_ref], atol=1e-4, rtol=0)
    # HF's loss: summed cross-entropy over masked frames; ours is per masked frame
    assert abs(mine["loss_contrastive_sum"].item() - theirs.contrastive_loss.item()) / n < 1e-4
    assert abs(mine["metrics"]["loss_contrastive"].item() - theirs.contrastive_loss.item() / n) < 1e-4
    # eval mode: HF's perplexity is the hard (argmax) code perplexity over masked frames
    assert abs(mine["code_perplexity"].item() - theirs.codevector_perplexity.item()) < 1e-4
    gv = config.latent_vars * config.latent_groups
    hf_div = theirs.diversity_loss.item() / n
    assert abs((gv - mine["code_perplexity"].item()) / gv - hf_div) < 1e-5
    # the predictions and targets themselves, at masked frames
    assert torch.allclose(mine["predictions"].reshape(n, -1), theirs.projected_states[mask], atol=1e-5)
    assert torch.allclose(mine["targets"].reshape(n, -1), theirs.projected_quantized_states[mask], atol=1e-5)


def test_train_mode_soft_perplexity_and_diversity_match_hf():
    """In training HF's diversity term uses the soft (noise-free) perplexity, like fairseq's."""
    torch.manual_seed(0)
    config = _no_dropout(Wav2Vec2Config.tiny())
    ours = Wav2Vec2Pretrain(config).train()
    hf = to_hf(ours).train()
    audio = torch.randn(2, 16000) * 0.3
    mine = ours.forward_with(audio, generator=torch.Generator().manual_seed(3))
    mask, neg = mine["mask"], mine["negatives"]
    theirs = hf(audio, mask_time_indices=mask, sampled_negative_indices=hf_negative_indices(mask, neg))
    n = int(mask.sum())
    assert abs(mine["prob_perplexity"].item() - theirs.codevector_perplexity.item()) < 1e-4
    assert abs(mine["diversity"].item() - theirs.diversity_loss.item() / n) < 1e-5
    # the Gumbel draw differs, but the predictions (context network) do not depend on it
    assert torch.allclose(mine["predictions"].reshape(n, -1), theirs.projected_states[mask], atol=1e-5)


def test_base_preset_has_hf_base_parameter_count():
    """Our BASE preset and HF's default (facebook/wav2vec2-base layout) have the same parameters."""
    ours = sum(p.numel() for p in Wav2Vec2Pretrain(Wav2Vec2Config.base()).parameters())
    hf_cfg = transformers.Wav2Vec2Config()
    with torch.device("meta"):
        hf = transformers.Wav2Vec2ForPreTraining(hf_cfg)
    theirs = sum(p.numel() for p in hf.parameters())
    assert ours == theirs == 95_044_608


def test_contrastive_gradients_match_hf():
    """Backward through our (B, M, M) logits gather equals HF's gathered-negatives formulation.

    Eval mode (no dropout, argmax codes), feature_grad_mult = 1 (HF has no gradient scaling); the
    gradients of HF's summed contrastive loss and of ours agree for every parameter, by the name map.
    """
    from models.wav2vec2 import hf_state_dict

    torch.manual_seed(0)
    config = _no_dropout(Wav2Vec2Config.tiny(), feature_grad_mult=1.0)
    ours = Wav2Vec2Pretrain(config).eval()
    hf = to_hf(ours).eval()
    audio = torch.randn(2, 16000) * 0.3
    mine = ours.forward_with(audio, generator=torch.Generator().manual_seed(7))
    mask, neg = mine["mask"], mine["negatives"]
    theirs = hf(audio, mask_time_indices=mask, sampled_negative_indices=hf_negative_indices(mask, neg))
    mine["loss_contrastive_sum"].backward()
    theirs.contrastive_loss.backward()
    ours_grads = {k: v.grad for k, v in ours.named_parameters()}
    # express our gradients under HF names with the same map the weights use
    for name, p in ours.named_parameters():
        p.data = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
    mapped = hf_state_dict(ours)
    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, g in mapped.items():
        ref = hf_params[name].grad
        if ref is None:  # HF's masked_spec_embed etc. with no gradient path
            assert g.abs().max() == 0, name
            continue
        scale = ref.abs().max().clamp_min(1e-6)
        assert (g - ref).abs().max() <= 1e-4 * scale + 1e-6, name
        checked += 1
    assert checked >= 30 and any(v is not None and v.abs().sum() > 0 for v in ours_grads.values())
