"""The paper presets pinned to the originals they cite (train_config.py's comments name file and
commit), and every train.py command in docs/reproduce.md applies to its preset."""

from __future__ import annotations

import os
import re
import shlex

import pytest

import train_config as tc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# CLMR master 423414d: README "Results" (batch 48 / 10,000 epochs on MTAT, 48 / 1,000 on MSD),
# main.py (DataLoader drop_last=True, Trainer(sync_batchnorm=True), no gradient_clip_val),
# contrastive_learning.py (Adam(lr=3e-4), no weight decay), config.yaml (projection_dim 64,
# audio_length 59049, sample_rate 22050, transforms_* probabilities).
CLMR = {
    "train.global_batch_size": 48, "train.grad_accum": 1, "train.sync_batchnorm": True,
    "optim.name": "adam", "optim.lr": 3e-4, "optim.betas": (0.9, 0.999), "optim.weight_decay": 0.0,
    "optim.schedule": "constant", "optim.grad_clip": 0.0,
    "model.projection_dim": 64, "model.encoder_calls": "per_view", "model.temperature": 0.5,
    "model.input_samples": 59049, "data.sample_rate": 22050,
    "augment.enabled": True, "augment.polarity_p": 0.8, "augment.noise_p": 0.01, "augment.gain_p": 0.3,
    "augment.filter_p": 0.8, "augment.delay_p": 0.3, "augment.pitch_p": 0.6, "augment.reverb_p": 0.6,
    "augment.speed_p": 0.0, "augment.reverb_method": "freeverb", "augment.filter_type": "fir",
    "augment.noise_mode": "std_ratio", "augment.delay_halve": True,
}
EXPECTED = {
    # 10,000 epochs x (18,706 // 48 = 389) steps; MSD: 1,000 epochs x ~4,200 steps.
    "clmr_mtat": {**CLMR, "train.steps": 3_890_000},
    "clmr_msd": {**CLMR, "train.steps": 4_200_000},
    # fairseq wav2vec2_base_librispeech.yaml (07dfe9c): max_update 400k, lr 5e-4, adam (0.9, 0.98),
    # eps 1e-6, wd 0.01, 32k warm-up then linear decay, no clip_norm (default 0), max_sample_size 250k,
    # max_tokens 1.4M per GPU (5 crops of 250k) x distributed_world_size 64 = 320 crops an update.
    "wav2vec2_musicnet": {
        "train.steps": 400_000, "train.global_batch_size": 320, "train.grad_accum": 8,
        "optim.name": "adamw", "optim.lr": 5e-4, "optim.betas": (0.9, 0.98), "optim.eps": 1e-6,
        "optim.weight_decay": 0.01, "optim.schedule": "warmup_linear", "optim.warmup_steps": 32_000,
        "optim.final_lr_ratio": 0.0, "optim.grad_clip": 0.0, "data.crop_samples": 250_000,
        "data.sample_rate": 16_000, "augment.enabled": False, "model.layerdrop": 0.05,
    },
    # CLMR v1 config/config_cpc.yaml (c6f4490) and infonce.py (subsample_win 81); 4f984b2's
    # normalise_audio (training-set mean/std); main.py's kaiming-uniform initialize.
    "cpc_mtat": {
        "train.global_batch_size": 48, "optim.name": "adam", "optim.lr": 3e-4, "optim.weight_decay": 0.0,
        "optim.grad_clip": 0.0, "model.prediction_steps": 20, "model.negatives": 15, "model.window": 81,
        "model.init": "kaiming_uniform", "model.input_norm": "dataset", "model.context_dim": 256,
        "model.channels": 512, "model.strides": (5, 3, 2, 2, 2, 2, 2), "model.kernels": (10, 6, 4, 4, 4, 2, 2),
        "model.input_samples": 59049, "data.sample_rate": 22050, "augment.enabled": False,
    },
}


def value(cfg: tc.Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_paper_presets_hold_the_cited_values(name):
    cfg = tc.preset(name)
    got = {k: value(cfg, k) for k in EXPECTED[name]}
    assert got == EXPECTED[name]


def test_the_step_counts_follow_from_epochs_and_the_split():
    assert tc.preset("clmr_mtat").train.steps == 10_000 * (18_706 // 48)
    # v1's 1,550-epoch checkpoint, the documented alternative
    assert tc.apply_overrides(tc.preset("clmr_mtat"), ["--train.steps=602950"]).train.steps == 1_550 * 389
    w = tc.preset("wav2vec2_musicnet")
    crops_per_gpu = 1_400_000 // 250_000  # fairseq's batch_by_size: the batch is full past max_tokens
    assert w.train.global_batch_size == crops_per_gpu * 64
    assert w.train.global_batch_size // (8 * w.train.grad_accum) == crops_per_gpu  # 8 GPUs: fairseq's GPU batch


def reproduce_commands() -> list[tuple[str, list[str]]]:
    """``(preset, [--overrides])`` of every ``train.py --config`` command in docs/reproduce.md."""
    with open(os.path.join(ROOT, "docs", "reproduce.md")) as f:
        text = f.read().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if "train.py --config" not in line:
            continue
        words = shlex.split(line.split("#", 1)[0])
        name = words[words.index("--config") + 1]
        sections = r"--(data|augment|model|optim|train|logging|checkpoint)\."
        out.append((name, [w for w in words if re.match(sections, w)]))
    return out


def test_every_command_in_reproduce_md_applies_to_its_preset():
    commands = reproduce_commands()
    assert {name for name, _ in commands} >= set(EXPECTED)  # each paper preset has its command
    for name, overrides in commands:
        tc.apply_overrides(tc.preset(name), overrides)  # unknown keys or bad values raise
