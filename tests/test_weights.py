"""Weights in and out (eval_tools/weights.py, issue 15): export round trips, the HF parity of
``--format hf``, CLMR's released key layout, local HF folders as encoders, warm starts, bad input.

Every model is tiny and random-init; HF folders are written with ``save_pretrained`` into
``tmp_path``; nothing is downloaded (``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import evaluate
import train_config as tc
from eval_tools import weights
from eval_tools.encoders import encoder_from_checkpoint
from pipeline.errors import UserError
from tests import evaldata

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _checkpoint(path, preset: str, seed: int = 3, **model) -> str:
    """A train.py checkpoint (docs/architecture.md §5) around a seeded model with non-trivial BatchNorm statistics."""
    cfg = tc.preset(preset)
    cfg.data.sample_rate = 16000
    for k, v in model.items():
        setattr(cfg.model, k, v)
    _, model_cls = tc.model_classes(cfg.arch)
    torch.manual_seed(seed)
    m = model_cls(cfg.model)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 2.0)
    torch.save({"format": "musicssl-ckpt/1", "step": 11, "model_name": cfg.arch, "model": m.state_dict(),
                "config": tc.to_dict(cfg)}, str(path))
    return str(path)


def _clips(n: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(0.3 * rng.standard_normal(int(s))).astype(np.float32) for s in rng.integers(4000, 9000, n)]


# ------------------------------------------------------------------------------------------------
# export -> load_export


@pytest.mark.parametrize("preset", ["clmr_tiny", "wav2vec2_tiny", "cpc_tiny"])
def test_export_round_trip_gives_the_checkpoints_embeddings(tmp_path, preset):
    ckpt = _checkpoint(tmp_path / "ckpt-00000011.pt", preset)
    out = str(tmp_path / "export")
    r = weights.export(ckpt, out)
    assert sorted(r["files"]) == ["README.md", "config.json", "model.safetensors"]
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        assert f.read(2) not in (b"PK",)  # safetensors: an 8-byte header length, never a zip/pickle
    info = json.load(open(os.path.join(out, "config.json")))
    cfg = tc.preset(preset)
    assert info["format"] == "musicssl-export/1" and info["arch"] == cfg.arch and info["sample_rate"] == 16000
    assert info["input_samples"] == cfg.crop_samples and info["source"]["step"] == 11
    assert info["model"]["config_class"] == type(cfg.model).__name__
    from safetensors.torch import load_file

    keys = set(load_file(os.path.join(out, "model.safetensors")))
    assert not any(weights._training_only(cfg.arch, k) for k in keys)  # no projection head / quantizer
    clips = _clips()
    ref = encoder_from_checkpoint(ckpt).embed_clips(clips)
    got = weights.load_export(out).embed_clips(clips)
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-6
    via_spec = weights.open_encoder(f"export:{out}").embed_clips(clips[:1])
    assert np.abs(via_spec - ref[:1]).max() <= 1e-6
    card = open(os.path.join(out, "README.md")).read()
    assert "step 11" in card and "16000 Hz" in card and preset in card


def test_export_card_and_config_carry_scores_and_vocabularies(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt-00000011.pt", "clmr_tiny")
    sha = encoder_from_checkpoint(ckpt).ident
    results = {"encoders": {"pretrained": {"ident": sha}, "log-mel": {"ident": "x"}}, "protocol": {"name": "musicssl"},
               "rows": [{"encoder": "pretrained", "task": "toy/pitch", "fraction": 1.0, "protocol": "musicssl",
                         "test": {"accuracy": 0.875, "n": 24}},
                        {"encoder": "log-mel", "task": "toy/pitch", "fraction": 1.0, "test": {"accuracy": 0.5, "n": 24}}]}
    res_path = tmp_path / "results.json"
    res_path.write_text(json.dumps(results))
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "model.json").write_text(json.dumps({"format": "musicssl-model/1", "tasks": [
        {"name": "pitch", "kind": "class", "names": [48, 55, 62, 69]}]}))
    out = str(tmp_path / "export")
    weights.export(ckpt, out, heads=str(heads), results=str(res_path))
    info = json.load(open(os.path.join(out, "config.json")))
    assert info["heads"] == {"pitch": {"kind": "class", "names": [48, 55, 62, 69]}}
    card = open(os.path.join(out, "README.md")).read()
    assert "| toy/pitch | musicssl | 1 | 0.875 |" in card and "0.500" not in card
    with pytest.raises(UserError, match="no row of this checkpoint"):
        weights.export(_checkpoint(tmp_path / "other.pt", "clmr_tiny", seed=9), out, results=str(res_path))


def test_export_cli_and_hf_format_refused_for_other_architectures(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", "clmr_tiny")
    assert evaluate.main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "e")]) == 0
    assert "exported clmr encoder (step 11" in capsys.readouterr().out
    assert evaluate.main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "h"), "--format", "hf"]) == 2
    err = capsys.readouterr().err
    assert "--format hf" in err and "clmr" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# --format hf parity


def test_hf_export_loads_with_automodel_and_matches_our_embeddings(tmp_path):
    ckpt = _checkpoint(tmp_path / "ckpt.pt", "wav2vec2_tiny")
    out = str(tmp_path / "hf")
    weights.export(ckpt, out, fmt="hf")
    hf = transformers.AutoModel.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "Wav2Vec2Model"
    assert json.load(open(os.path.join(out, "preprocessor_config.json")))["sampling_rate"] == 16000
    ours = encoder_from_checkpoint(ckpt, layer="all")
    clips = _clips(3)
    mine = ours.embed_clips(clips)  # (N, L+1, D)
    for i, c in enumerate(clips):
        with torch.no_grad():
            o = hf(torch.from_numpy(c)[None], output_hidden_states=True)
        last = o.last_hidden_state[0].mean(0).numpy()
        # layer -1 of ours is the last layer's output, HF's last_hidden_state (post-LN: the same tensor)
        assert np.abs(last - mine[i, -1]).max() <= 1e-4, np.abs(last - mine[i, -1]).max()
        for j, h in enumerate(o.hidden_states):
            assert np.abs(h[0].mean(0).numpy() - mine[i, j]).max() <= 1e-4


# ------------------------------------------------------------------------------------------------
# CLMR's released checkpoints


class _OriginalSampleCNN(nn.Module):
    """CLMR's SampleCNN as Spijkervet/CLMR clmr/models/sample_cnn.py @ 09d32de lays it out
    (rewritten here from its description): ``sequential`` = [strided conv k3 s3 + BN + ReLU] +
    9 x [conv k=3 p1 + BN + ReLU + MaxPool(3)] over widths 128,128,256 x6,512 + [conv 512->512 + BN
    + ReLU]; the forward flattens the (B, 512, 1) map before ``fc``."""

    WIDTHS = [(128, 128), (128, 128), (128, 256)] + [(256, 256)] * 5 + [(256, 512)]

    def __init__(self, out_dim: int = 50):
        super().__init__()
        seq = [nn.Sequential(nn.Conv1d(1, 128, 3, stride=3), nn.BatchNorm1d(128), nn.ReLU())]
        seq += [nn.Sequential(nn.Conv1d(a, b, 3, padding=1), nn.BatchNorm1d(b), nn.ReLU(), nn.MaxPool1d(3, stride=3))
                for a, b in self.WIDTHS]
        seq.append(nn.Sequential(nn.Conv1d(512, 512, 3, padding=1), nn.BatchNorm1d(512), nn.ReLU()))
        self.sequential = nn.Sequential(*seq)
        self.fc = nn.Linear(512, out_dim)

    def features(self, x):  # (B, 1, 59049) -> (B, 512): what SimCLR takes, fc being its identity
        out = self.sequential(x)
        return out.reshape(x.shape[0], out.size(1) * out.size(2))


@pytest.fixture(scope="module")
def original_clmr():
    torch.manual_seed(0)
    m = _OriginalSampleCNN().eval()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.uniform_(-0.05, 0.05)
            mod.running_var.uniform_(0.5, 1.5)
    return m


def _lightning_file(path, model) -> str:
    """A Lightning .ckpt as CLMR's ContrastiveLearning saves it: the encoder twice, the projector,
    hyper-parameters as a Python object (argparse.Namespace, which weights_only refuses)."""
    enc = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}  # SimCLR: fc = Identity
    sd = {f"encoder.{k}": v for k, v in enc.items()} | {f"model.encoder.{k}": v for k, v in enc.items()}
    sd |= {"model.projector.0.weight": torch.randn(512, 512), "model.projector.2.weight": torch.randn(64, 512)}
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.2.0", "state_dict": sd,
                "hyper_parameters": argparse.Namespace(batch_size=48, temperature=0.5)}, str(path))
    return str(path)


def test_clmr_lightning_and_plain_files_map_onto_our_samplecnn(tmp_path, original_clmr):
    x = torch.randn(2, 59049) * 0.2
    with torch.no_grad():
        ref = original_clmr.features(x[:, None]).numpy()
    clips = [c.numpy() for c in x]
    lightning = _lightning_file(tmp_path / "clmr.ckpt", original_clmr)
    plain = str(tmp_path / "clmr.pt")
    torch.save(original_clmr.state_dict(), plain)  # sequential.N..., fc.*
    prefixed = str(tmp_path / "clmr_enc.pt")
    torch.save({f"encoder.{k}": v for k, v in original_clmr.state_dict().items()}, prefixed)
    for spec in (f"clmr:{lightning}", lightning, plain, prefixed):  # explicit and auto-detected
        enc = weights.open_encoder(spec, sample_rate=22050)
        assert enc.arch == "clmr" and enc.window == 59049
        got = enc.embed_clips(clips)
        assert np.abs(got - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    model, cfg, ignored = weights.read_clmr(lightning)
    assert cfg.model.channels == (128, 128, 256, 256, 256, 256, 256, 256, 512) and cfg.model.input_samples == 59049
    assert ignored == ["model.projector.0.weight", "model.projector.2.weight"]
    assert sum(p.numel() for p in model.encoder.parameters()) == 2_368_512  # the paper's encoder


def test_clmr_bad_files_name_the_keys(tmp_path, original_clmr):
    sd = dict(original_clmr.state_dict())
    odd = str(tmp_path / "odd.pt")
    torch.save(sd | {"decoder.weight": torch.zeros(3)}, odd)
    with pytest.raises(UserError, match=r"unexpected keys for a CLMR SampleCNN: decoder\.weight"):
        weights.read_clmr(odd)
    missing = str(tmp_path / "missing.pt")
    torch.save({k: v for k, v in sd.items() if k != "sequential.10.1.running_var"}, missing)
    with pytest.raises(UserError, match=r"missing keys: encoder\.blocks\.10\.1\.running_var"):
        weights.read_clmr(missing)
    cut = str(tmp_path / "cut.ckpt")
    data = open(_lightning_file(tmp_path / "whole.ckpt", original_clmr), "rb").read()
    open(cut, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cut\.ckpt: truncated or not a CLMR checkpoint"):
        weights.read_clmr(cut)
    junk = str(tmp_path / "junk.pt")
    torch.save({"weight": torch.zeros(2)}, junk)
    with pytest.raises(UserError, match="is not a musicssl-ckpt/1 checkpoint .*; nor is it CLMR's SampleCNN weights"):
        weights.open_encoder(junk)


def test_a_hostile_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = str(tmp_path / "evil.ckpt")
    torch.save({"state_dict": {"encoder.sequential.0.0.weight": torch.zeros(1)}, "x": Boom()}, evil)
    with pytest.raises(UserError):
        weights.open_encoder(evil)
    with pytest.raises(UserError):
        weights.read_clmr(evil)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# local HF folders


def _hf_folder(path, kind: str = "wav2vec2", *, seed: int = 0, normalize: bool = False, sr: int = 16000, **cfg) -> str:
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 conv_dim=(32, 32, 32), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), num_conv_pos_embeddings=16,
                 num_conv_pos_embedding_groups=2) | cfg
    torch.manual_seed(seed)
    if kind == "hubert":
        model = transformers.HubertModel(transformers.HubertConfig(**small))
    else:
        model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**small))
    model.save_pretrained(str(path), safe_serialization=True)
    transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=sr, do_normalize=normalize).save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_hf_folder_is_an_encoder_with_every_layer(tmp_path, kind):
    folder = _hf_folder(tmp_path / kind, kind, normalize=kind == "hubert")
    enc = weights.hf_encoder(folder, layer="all")
    assert enc.sample_rate == 16000 and enc.arch == f"hf-{kind}" and enc.min_samples == 10 + 2 * 5 + 2 * 10
    clips = _clips(3)
    together = enc.embed_clips(clips)  # batched with padding
    assert together.shape == (3, 3, 32)
    hf = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(folder)
    for i, c in enumerate(clips):
        x = fe(c, sampling_rate=16000, return_tensors="pt").input_values  # the folder's own preprocessing
        with torch.no_grad():
            hs = hf(x, output_hidden_states=True).hidden_states
        ref = np.stack([h[0].mean(0).numpy() for h in hs])
        assert np.abs(together[i] - ref).max() <= 1e-4
    last = weights.hf_encoder(folder).embed_clips(clips)  # layer -1: the last hidden state
    assert np.abs(last - together[:, -1]).max() <= 1e-5
    with pytest.raises(UserError, match="hidden states 0..2"):
        weights.hf_encoder(folder, layer=5)


def test_hf_folder_errors(tmp_path):
    with pytest.raises(UserError, match="download it first"):
        weights.hf_encoder("m-a-p/MERT-v1-95M")
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model_type": "wav2vec2"}))
    with pytest.raises(UserError, match="no weights there"):
        weights.hf_encoder(str(empty))
    folder = _hf_folder(tmp_path / "w", sr=16000)
    os.remove(os.path.join(folder, "preprocessor_config.json"))
    with pytest.raises(UserError, match="pass --sample-rate"):
        weights.hf_encoder(folder)
    assert weights.hf_encoder(folder, sample_rate=24000).sample_rate == 24000
    # a pickle where safetensors is expected
    fake = tmp_path / "fake"
    fake.mkdir()
    torch.save({"a": torch.zeros(1)}, str(fake / "model.safetensors"))
    with pytest.raises(UserError, match="is a pickle"):
        weights.read_safetensors(str(fake / "model.safetensors"), flag="export:")
    (fake / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(UserError, match="truncated or not a safetensors file"):
        weights.read_safetensors(str(fake / "model.safetensors"), flag="export:")


# ------------------------------------------------------------------------------------------------
# probe with external baselines, end to end


def test_probe_table_holds_ours_random_logmel_and_external_encoders(tmp_path):
    data = evaldata.write_toy(str(tmp_path / "toy"), sizes=(24, 12, 12))
    ckpt = _checkpoint(tmp_path / "ckpt-00000011.pt", "clmr_tiny")
    exported = str(tmp_path / "exp")
    weights.export(ckpt, exported)
    hf = _hf_folder(tmp_path / "hfw2v", sr=16000)
    out = str(tmp_path / "eval")
    rc = evaluate.main(["probe", "--data", data, "--checkpoint", ckpt, "--out", out, "--no-progress",
                        "--baselines", f"random,logmel,hf:{hf},export:{exported}", "--max-epochs", "30", "--patience", "5",
                        "--calib-crops", "16"])
    assert rc == 0
    res = json.load(open(os.path.join(out, "results.json")))
    rows = {(r["encoder"], r["task"]): r for r in res["rows"]}
    encs = {e for e, _ in rows}
    assert encs == {"pretrained", "random init", "log-mel", "hf:hfw2v", "export:exp"}
    # the export is the checkpoint: the same embeddings, so the same probe and scores
    assert rows[("export:exp", "toy/pitch")]["test"] == rows[("pretrained", "toy/pitch")]["test"]
    assert rows[("hf:hfw2v", "toy/pitch")]["dim"] == 32 and res["encoders"]["hf:hfw2v"]["model_type"] == "wav2vec2"
    md = open(os.path.join(out, "results.md")).read()
    assert "| hf:hfw2v |" in md and "| export:exp |" in md
    # --hf-model as the encoder itself, per-layer probing
    out2 = str(tmp_path / "eval2")
    assert evaluate.main(["probe", "--data", data, "--hf-model", hf, "--out", out2, "--no-progress", "--baselines", "",
                          "--layer", "all", "--max-epochs", "10", "--tasks", "pitch"]) == 0
    res2 = json.load(open(os.path.join(out2, "results.json")))
    (row,) = res2["rows"]
    assert [f["layer"] for f in row["per_layer"]] == [0, 1, 2] and row["layer"] in (0, 1, 2)
    with pytest.raises(UserError, match="pass --preset"):
        evaluate.run_evaluation(evaluate.EvalOptions(data=[data], out=out2, checkpoint=f"hf:{hf}", baselines=["random"],
                                                     progress=False))


# ------------------------------------------------------------------------------------------------
# warm start


def test_warm_start_from_hf_export_and_checkpoint(tmp_path):
    import train
    from training.distributed import Dist

    cpu = Dist(rank=0, world=1, device=torch.device("cpu"))
    ckpt = _checkpoint(tmp_path / "ckpt.pt", "wav2vec2_tiny", seed=4)
    src = torch.load(ckpt, weights_only=True)["model"]
    hf_dir = str(tmp_path / "hf")
    weights.export(ckpt, hf_dir, fmt="hf")
    exp_dir = str(tmp_path / "exp")
    weights.export(ckpt, exp_dir)
    for source in (hf_dir, exp_dir, ckpt):
        cfg = tc.apply_overrides(tc.preset("wav2vec2_tiny"), [f"--train.init_from={source}", "--train.seed=99"])
        raw, *_ = train.build_model(cfg, cpu)
        got = raw.state_dict()
        for k, v in src.items():
            if weights._training_only("wav2vec2", k) and source != ckpt:
                continue  # exports carry no quantizer: the fresh init stays
            assert torch.equal(got[k], v), (source, k)
    # an architecture mismatch and a shape mismatch are ConfigErrors naming the problem
    clmr = _checkpoint(tmp_path / "clmr.pt", "clmr_tiny")
    narrow = ["--model.embed_dim=48", "--model.ffn_dim=96"]
    refused = [
        (clmr, [], "holds a clmr model, this run trains wav2vec2"),
        (hf_dir, narrow, r"differs from this run's: hidden_size 64 vs 48"),
        # same shapes, another layout (pre-LN): refused by the config check, not loaded silently
        (hf_dir, ["--model.layer_norm_first=true"], "do_stable_layer_norm False vs True"),
        (exp_dir, narrow, r"other shapes: .*\(64,\) vs \(48,\)"),
    ]
    for source, extra, message in refused:
        cfg = tc.apply_overrides(tc.preset("wav2vec2_tiny"), [f"--train.init_from={source}", *extra])
        with pytest.raises(train.ConfigError, match=message):
            train.build_model(cfg, cpu)


_REMOTE_CODE = '''
from transformers import Wav2Vec2Config, Wav2Vec2Model


class ToyMERTConfig(Wav2Vec2Config):
    model_type = "toy_mert"


class ToyMERTModel(Wav2Vec2Model):
    config_class = ToyMERTConfig
'''


def test_a_folder_shipping_its_own_code_needs_trust_remote_code(tmp_path):
    """A MERT-style folder: config.json's auto_map names classes in a .py file of the folder."""
    folder = _hf_folder(tmp_path / "mert", normalize=True, sr=24000)
    (tmp_path / "mert" / "modeling_toy_mert.py").write_text(_REMOTE_CODE)
    cfg = json.load(open(os.path.join(folder, "config.json")))
    cfg |= {"model_type": "toy_mert", "architectures": ["ToyMERTModel"],
            "auto_map": {"AutoConfig": "modeling_toy_mert.ToyMERTConfig", "AutoModel": "modeling_toy_mert.ToyMERTModel"}}
    (tmp_path / "mert" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="--trust-remote-code"):
        weights.hf_encoder(folder)
    enc = weights.hf_encoder(folder, trust_remote_code=True, layer=1)
    assert enc.arch == "hf-toy_mert" and enc.sample_rate == 24000 and type(enc.model.model).__name__ == "ToyMERTModel"
    assert enc.embed(_clips(2)).shape == (2, 32)


def test_probe_save_models_and_predict_with_an_hf_encoder(tmp_path):
    from eval_tools.heads import load_model

    data = evaldata.write_toy(str(tmp_path / "toy"), sizes=(16, 8, 8))
    hf = _hf_folder(tmp_path / "hfw2v", sr=16000)
    out = str(tmp_path / "eval")
    assert evaluate.main(["probe", "--data", data, "--hf-model", hf, "--out", out, "--no-progress", "--baselines", "",
                          "--max-epochs", "5", "--tasks", "pitch", "--save-models"]) == 0
    saved = os.path.join(out, "models", "toy-hf-hfw2v")
    model = load_model(saved)
    assert model.encoder.arch == "hf-wav2vec2" and os.path.isfile(os.path.join(saved, "encoder_hf", "model.safetensors"))
    clips = _clips(2)
    ref = weights.hf_encoder(hf).embed(clips)
    assert np.abs(model.encoder.embed(clips) - ref).max() <= 1e-6
    probs = model.predict(clips)["pitch"]
    assert probs.shape == (2, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_finetune_an_hf_encoder_saves_its_tuned_weights(tmp_path):
    from eval_tools.heads import load_model

    data = evaldata.write_toy(str(tmp_path / "toy"), sizes=(16, 8, 8))
    hf = _hf_folder(tmp_path / "hfw2v", sr=16000)
    out = str(tmp_path / "ft")
    assert evaluate.main(["finetune", "--data", data, "--hf-model", hf, "--steps", "3", "--eval-every", "3", "--batch-size", "4",
                          "--workers", "0", "--out", out, "--no-progress", "--tasks", "pitch", "--encoder-lr", "1e-2"]) == 0
    tuned = load_model(os.path.join(out, "models", "pitch")).encoder
    clips = _clips(2)
    before = weights.hf_encoder(hf).embed(clips)
    assert np.abs(tuned.embed(clips) - before).max() > 1e-4  # the saved encoder is the fine-tuned one


def test_an_export_with_unknown_or_missing_tensors_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    out = str(tmp_path / "exp")
    weights.export(_checkpoint(tmp_path / "ckpt.pt", "clmr_tiny"), out)
    path = os.path.join(out, "model.safetensors")
    tensors = load_file(path)
    save_file(tensors | {"encoder.extra.weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match=r"exp/model.safetensors does not fit a clmr model .*unexpected keys: encoder\.extra\.weight"):
        weights.load_export(out)
    save_file({k: v for k, v in tensors.items() if k != "encoder.blocks.0.0.weight"}, path)
    with pytest.raises(UserError, match=r"missing keys: encoder\.blocks\.0\.0\.weight"):
        weights.load_export(out)
    info = json.load(open(os.path.join(out, "config.json")))
    (tmp_path / "exp" / "config.json").write_text(json.dumps(info | {"format": "something/2"}))
    with pytest.raises(UserError, match="is not a musicssl-export/1 export"):
        weights.load_export(out)
