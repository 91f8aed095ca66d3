"""train_config and train.py's pieces that need no data: presets, overrides, config files,
schedules, optimizer presets, checkpoint files and RNG state round trips."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import train
import train_config as tc
from training import checkpoint
from training.step import build_optimizer, lr_factor


@pytest.mark.parametrize("name", list(tc.PRESETS))
def test_every_preset_round_trips_through_print_config_and_dict(name):
    cfg = tc.preset(name)
    # --print-config's lines, fed back as overrides, rebuild the same config
    lines = [line for line in tc.describe(cfg) if not line.startswith("#")]
    assert tc.apply_overrides(tc.preset(name), lines) == cfg
    # the checkpoint's plain dict rebuilds it too (tuples come back as tuples)
    assert tc.from_dict(tc.to_dict(cfg)) == cfg
    assert cfg.crop_samples > 0 and cfg.views == (2 if cfg.arch == "clmr" else 1)


def test_overrides_parse_by_type_and_revalidate():
    cfg = tc.apply_overrides(tc.preset("wav2vec2_tiny"), [
        "--optim.betas=0.8,0.95", "--train.compile=true", "--logging.wandb_entity=team",
        "--data.weights=none", "--data.manifests=a.json,b.json", "--train.steps=1_000",
        '--model.conv_layers=[[16,10,5],[16,3,2]]', "--augment.enabled=false",
    ])
    assert cfg.optim.betas == (0.8, 0.95) and cfg.train.compile is True
    assert cfg.logging.wandb_entity == "team" and cfg.data.weights is None
    assert cfg.data.manifests == ["a.json", "b.json"] and cfg.train.steps == 1000
    assert cfg.model.conv_layers == ((16, 10, 5), (16, 3, 2)) and cfg.augment.enabled is False
    # each section's __post_init__ runs again on the new values
    with pytest.raises(ValueError, match="--data.weights has 1 entries for 2 manifests"):
        tc.apply_overrides(cfg, ["--data.weights=1"])
    with pytest.raises(ValueError, match=r"--train.compile=maybe: expected true or false"):
        tc.apply_overrides(cfg, ["--train.compile=maybe"])
    with pytest.raises(ValueError, match=r"--train.steps=1.5: expected an integer"):
        tc.apply_overrides(cfg, ["--train.steps=1.5"])
    with pytest.raises(ValueError, match="--optim is a section"):
        tc.apply_overrides(cfg, ["--optim=adam"])
    with pytest.raises(ValueError, match="--arch cannot be overridden"):
        tc.apply_overrides(cfg, ["--arch=clmr"])
    with pytest.raises(ValueError, match=r"unknown config key --model.channel \(did you mean --model.channels\?\); "
                                         r"keys in section 'model': channels, first_channels"):
        tc.apply_overrides(tc.preset("clmr_tiny"), ["--model.channel=3"])


def test_print_config_and_help_list_every_section(capsys):
    assert train.main(["--config", "cpc_tiny", "--optim.lr=0.01", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "--optim.lr=0.01\n" in out and "--model.input_samples=2400\n" in out
    for section in ("data", "augment", "model", "optim", "train", "logging", "checkpoint"):
        assert f"--{section}." in out
    with pytest.raises(SystemExit) as exc:
        train.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in tc.PRESETS) and "torchrun" in out


def test_lr_schedules():
    f = lr_factor
    assert [f(s, schedule="constant", warmup=0, total=10, final=0.0) for s in (0, 9)] == [1.0, 1.0]
    # linear warmup over 4 steps, then linear decay to 10 % at the last step (index total - 1 .. total)
    lin = [f(s, schedule="warmup_linear", warmup=4, total=14, final=0.1) for s in range(15)]
    assert lin[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lin[4] == pytest.approx(1.0) and lin[9] == pytest.approx(0.55) and lin[14] == pytest.approx(0.1)
    cos = [f(s, schedule="warmup_cosine", warmup=2, total=12, final=0.0) for s in range(13)]
    assert cos[1] == pytest.approx(1.0) and cos[7] == pytest.approx(0.5) and cos[12] == pytest.approx(0.0)


def test_optimizer_presets_and_schedule_wiring():
    model = torch.nn.Linear(4, 4)
    cfg = tc.preset("wav2vec2_musicnet")
    opt, sched = build_optimizer(cfg.optim, model, cfg.train.steps)
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert (g["betas"], g["eps"], g["weight_decay"], g["initial_lr"]) == ((0.9, 0.98), 1e-6, 0.01, 5e-4)
    assert g["lr"] == pytest.approx(5e-4 / 32_000)  # first of 32k warmup steps
    for _ in range(3):
        opt.step()
        sched.step()
    assert g["lr"] == pytest.approx(5e-4 * 4 / 32_000)
    opt, _ = build_optimizer(tc.preset("clmr_mtat").optim, model, 1000)
    g = opt.param_groups[0]
    assert type(opt) is torch.optim.Adam and g["lr"] == 3e-4 and g["betas"] == (0.9, 0.999)


def test_checkpoint_files_rotate_atomically_and_load_weights_only(tmp_path):
    folder = str(tmp_path / "ckpts")
    os.makedirs(folder)
    open(os.path.join(folder, "notes.txt"), "w").close()
    assert checkpoint.find_resume("auto", folder) is None
    for step in (5, 10, 15, 20):
        state = {"format": checkpoint.FORMAT, "step": step, "w": torch.full((3,), float(step))}
        url = checkpoint.save(folder, state, keep=2)
    assert sorted(os.listdir(folder)) == ["ckpt-00000015.pt", "ckpt-00000020.pt", "notes.txt"]  # no temp files
    assert checkpoint.find_resume("auto", folder) == url and url.endswith("ckpt-00000020.pt")
    assert checkpoint.find_resume("none", folder) is None
    assert torch.equal(checkpoint.load(url)["w"], torch.full((3,), 20.0))
    torch.save({"format": "something-else"}, os.path.join(folder, "other.pt"))
    with pytest.raises(ValueError, match="not a musicssl-ckpt/1 checkpoint"):
        checkpoint.load(os.path.join(folder, "other.pt"))


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = checkpoint.rng_state(torch.device("cpu"))
    expected = (torch.rand(3), np.random.standard_normal(3), np.random.rand(2), random.random())
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    checkpoint.set_rng_state(torch.load(path, weights_only=True), torch.device("cpu"))
    again = (torch.rand(3), np.random.standard_normal(3), np.random.rand(2), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and np.array_equal(expected[2], again[2])
    assert expected[3] == again[3]


@pytest.mark.parametrize("fmt", ["json", "yaml", "toml"])
def test_print_config_writes_a_file_that_config_reads_back(tmp_path, capsys, fmt):
    # None (data.crop_samples), tuples of tuples (conv_layers), bools, floats in e-notation
    flags = ["--optim.lr=3e-05", "--train.compile=true", "--data.manifests=a.json,b.json", "--logging.wandb_entity=team",
             "--data.sample_rate=none", "--model.conv_layers=[[16,10,5],[16,3,2]]"]
    path = str(tmp_path / f"run.{fmt}")
    assert train.main(["--config", "wav2vec2_tiny", *flags, "--print-config", path]) == 0
    assert f"wrote {path} ({fmt})" in capsys.readouterr().out
    expected = tc.apply_overrides(tc.preset("wav2vec2_tiny"), flags)
    assert tc.load_file(path) == expected
    # --config FILE, then overrides on top, prints what the file and the flags say
    assert train.main(["--config", path, "--train.steps=7", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed == tc.dumps(tc.apply_overrides(expected, ["--train.steps=7"]), "flags")
    assert "--optim.lr=3e-05\n" in printed and "--data.sample_rate=None\n" in printed
    assert train.main(["--config", "cpc_tiny", "--print-config", "--format", fmt]) == 0
    assert capsys.readouterr().out == tc.dumps(tc.preset("cpc_tiny"), fmt)


def test_config_files_are_typed_partial_and_checked(tmp_path):
    def load(text: str, name: str = "c.yaml"):
        path = tmp_path / name
        path.write_text(text)
        return tc.load_file(str(path))

    cfg = load("preset: clmr_tiny\noptim:\n  lr: 0.002\ntrain:\n  compile: true\n")
    assert cfg.optim.lr == 0.002 and cfg.train.compile is True and cfg.model == tc.preset("clmr_tiny").model
    # a YAML/JSON bool is never a number, nor a number a bool
    with pytest.raises(ValueError, match="--train.steps=true: expected an integer"):
        load("preset: clmr_tiny\ntrain:\n  steps: true\n")
    with pytest.raises(ValueError, match="--train.compile=1: expected true or false"):
        load('{"preset": "clmr_tiny", "train": {"compile": 1}}', "c.json")
    with pytest.raises(ValueError, match="--logging.run_name=true: expected a string"):
        load('preset = "clmr_tiny"\n[logging]\nrun_name = true\n', "c.toml")
    with pytest.raises(ValueError, match=r"unknown config key --optim.lrr \(did you mean --optim.lr\?\)"):
        load("preset: clmr_tiny\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ValueError, match="needs a top-level `preset` key"):
        load("optim:\n  lr: 0.1\n")
    with pytest.raises(ValueError, match=r"--config .*c.json: not valid JSON"):
        load("{not json", "c.json")
    with pytest.raises(ValueError, match="arch 'cpc' does not match preset 'clmr_tiny'"):
        load("preset: clmr_tiny\narch: cpc\n")
    # the command line's own bools: never from a number
    with pytest.raises(ValueError, match="--train.compile=2: expected true or false"):
        tc.apply_overrides(tc.preset("clmr_tiny"), ["--train.compile=2"])
    assert train.main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_loader_knobs_reach_the_loader_config():
    cfg = tc.apply_overrides(tc.preset("clmr_tiny"), [
        "--data.shuffle_buffer_mb=24.5", "--data.shuffle_buffer=none", "--data.cache_dir=/tmp/shard-cache",
        "--data.cache_limit_gb=7", "--data.io_timeout_s=12", "--data.io_retries=0", "--data.check_shards=false",
        "--data.valid_manifests=v1.json,v2.json",
    ])
    lc = cfg.data.loader_config(batch_size=4, views=2, crop_samples=729, sample_rate=8000, seed=5, cuda=False)
    assert (lc.shuffle_buffer_mb, lc.shuffle_buffer, lc.cache_dir, lc.cache_limit_gb) == (24.5, None, "/tmp/shard-cache", 7.0)
    assert (lc.io_timeout_s, lc.io_retries, lc.check_shards) == (12.0, 0, False)
    assert lc.manifests == cfg.data.manifests and lc.num_workers == cfg.data.num_workers
    # the validation stream: the held-out manifests, unweighted, read in the main process
    vc = cfg.data.loader_config(batch_size=4, views=2, crop_samples=729, sample_rate=8000, seed=5, cuda=False, valid=True)
    assert (vc.manifests, vc.weights, vc.num_workers, vc.cache_dir) == (["v1.json", "v2.json"], None, 0, "/tmp/shard-cache")
    # the default budget is bytes: no sample cap unless a preset sets one
    assert tc.DataConfig(manifests=["a.json"]).shuffle_buffer is None
    assert tc.DataConfig(manifests=["a.json"]).shuffle_buffer_mb == 128.0
    for bad, message in [("--data.shuffle_buffer_mb=0", "--data.shuffle_buffer_mb must be > 0"),
                         ("--data.io_retries=-1", "--data.io_retries must be >= 0"),
                         ("--data.cache_dir=s3://bucket/cache", "--data.cache_dir must be a local folder"),
                         ("--data.io_timeout_s=0", "--data.io_timeout_s must be > 0")]:
        with pytest.raises(ValueError, match=message):
            tc.apply_overrides(cfg, [bad])


def test_dist_timeout_reaches_init_process_group(monkeypatch):
    import datetime

    from training import distributed

    seen = {}

    class Joined(Exception):
        pass

    def fake_init(**kwargs):
        seen.update(kwargs)
        raise Joined

    monkeypatch.setattr(distributed.dist, "init_process_group", fake_init)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    cfg = tc.apply_overrides(tc.preset("clmr_tiny"), ["--train.dist_timeout_s=42.5"])
    with pytest.raises(Joined):
        train.train(cfg)  # joining the job is the first thing a run does
    assert seen["timeout"] == datetime.timedelta(seconds=42.5) and seen["backend"] == "gloo"
    assert tc.preset("clmr_mtat").train.dist_timeout_s == 1800.0
    with pytest.raises(ValueError, match="--train.dist_timeout_s must be > 0 seconds"):
        tc.apply_overrides(cfg, ["--train.dist_timeout_s=0"])
