"""``--layer concat``: CLMR's every SampleCNN block's time-averaged output side by side; wav2vec2's
conv features and every transformer layer's mean over valid frames side by side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
SR = 16000


def _encoder(layer, preset: str = "clmr_tiny"):
    from eval_tools.encoders import preset_config, random_encoder

    return random_encoder(preset_config(preset), sample_rate=SR, seed=3, layer=layer)


def test_concat_is_every_block_pooled_and_ends_with_the_last_layer() -> None:
    rng = np.random.default_rng(0)
    last, concat = _encoder(-1), _encoder("concat")
    n = last.window
    clips = [rng.standard_normal(n * k + 5).astype(np.float32) * 0.1 for k in (1, 2, 3)]  # 1-3 crops, a short tail
    e_last, e_cat = last.embed_clips(clips), concat.embed_clips(clips)
    cfg = concat.model.config
    assert e_cat.shape == (3, cfg.first_channels + sum(cfg.channels) + cfg.last_channels)
    np.testing.assert_allclose(e_cat[:, -cfg.last_channels:], e_last, rtol=1e-5, atol=1e-6)
    # the first slice is the strided first convolution's map averaged over time, crop by crop
    with torch.no_grad():
        crops = torch.from_numpy(clips[1][: 2 * n].reshape(2, 1, n))
        first = concat.model.encoder.blocks[0](crops).mean(dim=-1).mean(dim=0).numpy()
    np.testing.assert_allclose(e_cat[1, : cfg.first_channels], first, rtol=1e-5, atol=1e-6)
    assert concat.cache_id != last.cache_id


def test_clmr_layer_other_than_last_or_concat_is_a_user_error() -> None:
    import evaluate

    with pytest.raises(UserError, match="concat"):
        _encoder(2)
    assert evaluate._layer("concat") == "concat"


def test_supervised_heads_read_the_last_layer_when_the_probe_reads_concat() -> None:
    """The supervised baseline trains heads on embed()['pooled'] (64 wide), not on the 272 concat values."""
    from eval_tools.finetune import supervised_model
    from eval_tools.probe import Task

    enc = _encoder("concat")
    model = supervised_model(enc, [Task(name="pitch", kind="class", names=["60", "61", "62"])])
    assert model.heads["pitch"].in_features == enc.model.config.last_channels
    audio = torch.from_numpy(np.random.default_rng(1).standard_normal((2, enc.window)).astype(np.float32))
    assert model.logits(audio)["pitch"].shape == (2, 3)


def test_wav2vec2_concat_is_the_conv_features_then_every_layer_each_pooled_over_valid_frames() -> None:
    rng = np.random.default_rng(0)
    every, concat = _encoder("all", "wav2vec2_tiny"), _encoder("concat", "wav2vec2_tiny")
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 9000, 4321)]  # padded in one batch
    e_all, e_cat = every.embed_clips(clips), concat.embed_clips(clips)  # (3, L+1, D), (3, C + (L+1) D)
    cfg = concat.model.config
    c, n_layers, d = cfg.conv_layers[-1][0], cfg.num_layers + 1, cfg.embed_dim
    assert e_all.shape == (3, n_layers, d) and e_cat.shape == (3, c + n_layers * d)
    np.testing.assert_allclose(e_cat[:, c:], e_all.reshape(3, -1), rtol=1e-4, atol=1e-5)
    # the first C values: the layer-normed conv features of the clip alone, averaged over its frames
    with torch.no_grad():
        alone = concat.model.embed(torch.from_numpy(clips[2])[None])
    np.testing.assert_allclose(e_cat[2, :c], alone["features"][0].mean(dim=0).numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(e_cat[:, :c] - e_cat[:, :c].mean(axis=0)).max() > 1e-3  # the clips differ there
    assert concat.cache_id not in (every.cache_id, _encoder(-1, "wav2vec2_tiny").cache_id)


def test_wav2vec2_layer_out_of_range_names_concat_and_all() -> None:
    with pytest.raises(UserError, match="'all'.*'concat'"):
        _encoder(7, "wav2vec2_tiny")


def test_meanstd_pool_is_each_block_mean_then_its_std_over_time() -> None:
    rng = np.random.default_rng(2)
    mean, stats = _encoder("concat"), _encoder("concat")
    stats.pool = "meanstd"
    n = mean.window
    clip = rng.standard_normal(n).astype(np.float32) * 0.1  # one crop: no averaging over crops
    e_mean, e_stats = mean.embed_clips([clip]), stats.embed_clips([clip])
    assert e_stats.shape[1] == 2 * e_mean.shape[1] and stats.cache_id != mean.cache_id
    with torch.no_grad():
        maps = stats.model.encoder.block_features(torch.from_numpy(clip).view(1, 1, n))
    c0 = maps[0].shape[1]
    np.testing.assert_allclose(e_stats[0, :c0], e_mean[0, :c0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(e_stats[0, c0 : 2 * c0], maps[0].std(dim=-1, unbiased=False)[0].numpy(), rtol=1e-4, atol=1e-6)
    w2v = _encoder(-1, "wav2vec2_tiny")
    w2v.pool = "meanstd"
    x = w2v.embed_clips([clip])
    with torch.no_grad():
        frames = w2v.model.embed(torch.from_numpy(clip)[None])["frames"][0]
    np.testing.assert_allclose(x[0], torch.cat([frames.mean(0), frames.std(0, unbiased=False)]).numpy(), rtol=1e-4, atol=1e-5)


def test_meanstd_pool_with_a_paper_protocol_is_refused() -> None:
    import evaluate

    with pytest.raises(UserError, match="--pool meanstd"):
        evaluate.EvalOptions(data=["x"], out="y", preset="clmr_tiny", pool="meanstd", protocol="clmr")
