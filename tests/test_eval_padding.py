"""Issue 12's padding bug: a clip is padded only up to the model's receptive field, and padded
samples change nothing (wav2vec2 attention keys, group-norm statistics, pooling; CPC's convs).

Clips are real notes rendered from the GM soundfont (tests/notes.py), at 16 kHz.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.notes import rendered_note

pytestmark = pytest.mark.usefixtures("one_thread")
SR = 16000


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _padded(notes: tuple) -> tuple[list[np.ndarray], torch.Tensor, torch.Tensor]:
    """Rendered notes ``(program, pitch, seconds)``, zero-padded into one batch with their lengths."""
    clips = [rendered_note(p, k, seconds=s, sample_rate=SR) for p, k, s in notes]
    batch = torch.zeros(len(clips), max(len(c) for c in clips))
    for i, c in enumerate(clips):
        batch[i, : len(c)] = torch.from_numpy(c)
    return clips, batch, torch.tensor([len(c) for c in clips])


def _encoder(preset: str, *, crop: int | None = None, layer: int | str = -1):
    from eval_tools.encoders import preset_config, random_encoder

    overrides = [f"data.crop_samples={crop}"] if crop else []
    return random_encoder(preset_config(preset, overrides), sample_rate=SR, seed=3, layer=layer)


@pytest.mark.parametrize("layer", [-1, 1, "all"])
def test_short_clip_embedding_does_not_depend_on_training_crop(layer) -> None:
    """A 1 s note: the same random-init wav2vec2_tiny weights, trained crop 16,000 vs 250,000
    samples (the wav2vec2_musicnet preset's). Before the fix the long crop padded the note to
    15.6 s of mostly silence that attention and pooling saw: 185 % relative L2 difference."""
    note = rendered_note(0, 60, seconds=1.0, sample_rate=SR)
    short = _encoder("wav2vec2_tiny", crop=16000, layer=layer)
    long = _encoder("wav2vec2_tiny", crop=250_000, layer=layer)
    assert long.crop_samples == 250_000
    a, b = short.embed_clips([note]), long.embed_clips([note])
    assert a.shape == b.shape
    assert _rel(b, a) < 1e-5


def test_wav2vec2_embed_padded_rows_equal_clips_alone() -> None:
    """Padded rows of one batch give each clip's own embedding: every layer's mean over valid
    frames and the pooled output (group norm statistics, attention keys and pooling ignore padding)."""
    enc = _encoder("wav2vec2_tiny")
    model = enc.model.eval()
    clips, batch, lengths = _padded(((0, 60, 1.0), (40, 67, 0.45), (73, 48, 0.7)))
    with torch.no_grad():
        out = model.embed(batch, lengths)
        for i, c in enumerate(clips):
            alone = model.embed(torch.from_numpy(c)[None])
            n = int(out["frame_lengths"][i])
            assert n == alone["frames"].shape[1]
            assert _rel(out["pooled"][i].numpy(), alone["pooled"][0].numpy()) < 1e-5
            for got, want in zip(out["layers"], alone["layers"]):
                assert _rel(got[i, :n].numpy(), want[0].numpy()) < 1e-5
        # without lengths the padding is signal: the short clips' embeddings change (so the test can fail)
        unmasked = model.embed(batch)
    assert _rel(unmasked["pooled"][1].numpy(), out["pooled"][1].numpy()) > 0.01


def test_cpc_embed_padded_rows_equal_clips_alone() -> None:
    enc = _encoder("cpc_tiny")
    model = enc.model.eval()
    clips, batch, lengths = _padded(((0, 60, 0.5), (40, 67, 0.21), (73, 48, 0.33)))
    with torch.no_grad():
        out = model.embed(batch, lengths)
        for i, c in enumerate(clips):
            alone = model.embed(torch.from_numpy(c)[None])
            assert int(out["frame_lengths"][i]) == alone["frames"].shape[1]
            assert _rel(out["pooled"][i].numpy(), alone["pooled"][0].numpy()) < 1e-5
            assert _rel(out["encoder_pooled"][i].numpy(), alone["encoder_pooled"][0].numpy()) < 1e-5
        unmasked = model.embed(batch)
    assert _rel(unmasked["pooled"][1].numpy(), out["pooled"][1].numpy()) > 1e-3


def test_clip_shorter_than_receptive_field_is_padded_to_it_only() -> None:
    """200 samples (< wav2vec2's 400-sample receptive field): padded to 400, one frame, finite."""
    enc = _encoder("wav2vec2_tiny", crop=250_000)
    assert enc.min_samples == 400
    tiny = rendered_note(0, 72, seconds=0.0125, sample_rate=SR)
    x = enc.embed_clips([tiny])
    padded = enc.embed_clips([np.pad(tiny, (0, 200))])
    assert np.isfinite(x).all() and _rel(x, padded) < 1e-6
