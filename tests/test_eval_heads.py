"""Heads that last: probe and fine-tuned heads saved with their encoder and label vocabularies, and
``evaluate.py predict --model DIR`` tagging audio files with them."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf

import evaluate
from tests import evaldata

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    return evaldata.write_toy(str(tmp_path_factory.mktemp("headdata") / "toy"), sizes=(32, 12, 12))


@pytest.fixture(scope="module")
def notes(tmp_path_factory) -> tuple[str, list[int]]:
    """Four held-out toy notes (one per pitch) as WAV files, plus a file that is not audio."""
    folder = tmp_path_factory.mktemp("mine")
    rng = np.random.default_rng(42)
    pitches = []
    for i in range(4):
        c = evaldata.toy_clip(rng, i, "mine")
        sf.write(folder / f"note{i}.wav", c["audio"][0], evaldata.SR)
        pitches.append(c["labels"]["pitch"])
    (folder / "notes.txt.wav").write_bytes(b"not audio")
    return str(folder), pitches


def test_probe_saves_heads_that_predict_reproduces(toy, notes, tmp_path, capsys) -> None:
    out = str(tmp_path / "e")
    res = evaluate.run_evaluation(evaluate.EvalOptions(data=[toy], out=out, baselines=["logmel"], max_epochs=60, patience=10,
                                                       save_models=True, progress=False))
    folder = os.path.join(out, "models", "toy-log-mel")
    doc = json.load(open(os.path.join(folder, "model.json")))
    tasks = {t["name"]: t for t in doc["tasks"]}
    assert tasks["pitch"]["names"] == evaldata.PITCHES and tasks["tags"]["names"] == evaldata.TAGS
    assert tasks["pitch"]["scores"]["test"] == {r["task"]: r for r in res["rows"]}["toy/pitch"]["test"]
    assert doc["view"] == {"kind": "clip", "crop": None} and doc["meta"]["protocol"] == "musicssl"

    # the folder alone rebuilds the heads: the same probabilities as the probe on the test embeddings
    from eval_tools.data import Dataset
    from eval_tools.extract import extract
    from eval_tools.heads import load_model

    model = load_model(folder)
    emb = extract(model.encoder, Dataset.from_dir(toy), "test", progress=False)
    head = {h.task.name: h for h in model.heads}["pitch"]
    acc = float((head.probe.predict(emb.x, "class").argmax(1) == emb.labels["pitch"]).mean())
    assert acc == pytest.approx(tasks["pitch"]["scores"]["test"]["accuracy"])

    folder_in, pitches = notes
    js = str(tmp_path / "pred.json")
    assert evaluate.main(["predict", "--model", folder, folder_in, "--top", "2", "--json", js]) == 0
    printed = capsys.readouterr().out
    pred = json.load(open(js))["predictions"]
    assert len(pred) == 4 and "4 of 5 files tagged" in printed and "1 skipped" in printed
    for i, pitch in enumerate(pitches):
        scores = pred[os.path.join(folder_in, f"note{i}.wav")]
        assert sum(scores["pitch"].values()) == pytest.approx(1.0, abs=1e-5)
        assert max(scores["pitch"], key=scores["pitch"].get) == str(pitch)  # log-mel separates the four notes
        assert set(scores["tags"]) == set(evaldata.TAGS) and all(0 <= v <= 1 for v in scores["tags"].values())
    assert f"  pitch: {pitches[0]} " in printed


def test_clmr_protocol_model_averages_crop_outputs(toy, notes, tmp_path) -> None:
    out = str(tmp_path / "c")
    evaluate.run_evaluation(evaluate.EvalOptions(data=[toy], out=out, preset="clmr_tiny", baselines=["random"], tasks=["tags"],
                                                 protocol="clmr", max_epochs=5, save_models=True, progress=False))
    from eval_tools.heads import load_model
    from eval_tools.probe import clip_probabilities

    model = load_model(os.path.join(out, "models", "toy-random_init"))
    assert model.view.kind == "crops" and model.view.crop == 2187
    clip = sf.read(os.path.join(notes[0], "note0.wav"), dtype="float32")[0]
    crops = model.view.segments("x", clip)
    assert len(crops) == 3  # 7200 samples: torch.split gives 4 chunks, the last dropped
    x = model.encoder.embed_clips(crops)
    (head,) = model.heads
    want = clip_probabilities(head.probe, x, "multi_hot", np.zeros(3, dtype=np.int64), 1)
    assert np.allclose(model.predict([clip])["tags"], want, atol=1e-6)


def test_finetune_saves_a_model_predict_can_use(toy, notes, tmp_path, capsys) -> None:
    out = str(tmp_path / "ft")
    assert evaluate.main(["finetune", "--data", toy, "--preset", "cpc_tiny", "--tasks", "pitch", "--steps", "6",
                          "--eval-every", "3", "--batch-size", "8", "--workers", "0", "--out", out, "--no-progress"]) == 0
    folder = os.path.join(out, "models", "pitch")
    assert "predict --model" in capsys.readouterr().out
    assert evaluate.main(["predict", "--model", folder, os.path.join(notes[0], "note1.wav")]) == 0
    printed = capsys.readouterr().out
    assert "note1.wav" in printed and "  pitch: " in printed and "1 of 1 files tagged" in printed
    # the saved encoder is the fine-tuned one: its weights differ from the preset's random init
    import torch

    from eval_tools.encoders import preset_config, random_encoder

    saved = torch.load(os.path.join(folder, "encoder.pt"), weights_only=True)["model"]
    init = random_encoder(preset_config("cpc_tiny"), sample_rate=16000, seed=0).model.state_dict()
    assert any(not torch.equal(saved[k], init[k]) for k in init)


def test_predict_bad_model_folder_is_one_line(tmp_path, notes, capsys) -> None:
    rc = evaluate.main(["predict", "--model", str(tmp_path), notes[0]])
    err = capsys.readouterr().err
    assert rc == 2 and "no model.json there" in err and "Traceback" not in err
