"""The reduced quickstart (``quickstart.py --tiny``) end to end: demo shards, pretraining, probes of
the checkpoint and the three baselines, the printed table."""

from __future__ import annotations

import json
import os

import quickstart


def test_quickstart_tiny(tmp_path, capsys) -> None:
    out, demo = str(tmp_path / "qs"), str(tmp_path / "demo")
    assert quickstart.main(["--tiny", "--out", out, "--demo", demo]) == 0
    printed = capsys.readouterr().out
    res = json.load(open(os.path.join(out, "eval", "results.json")))
    q = json.load(open(os.path.join(out, "quickstart.json")))
    # pretraining ran the planned steps and wrote the checkpoint the probes used
    assert q["pretrain_summary"]["step"] == 12
    assert res["encoders"]["pretrained"]["step"] == 12
    assert os.path.exists(q["pretrain_summary"]["checkpoint"])
    # every encoder x task, scored on every test clip
    tasks = ["nsynth/pitch", "nsynth/instrument_family_str", "mtat/tags"]
    encoders = ["pretrained", "random init", "supervised", "log-mel"]
    rows = {(r["encoder"], r["task"]): r for r in res["rows"]}
    assert set(rows) == {(e, t) for e in encoders for t in tasks}
    n_test = {d: res["datasets"][d]["num_samples"]["test"] for d in ("nsynth", "mtat")}
    for (e, t), r in rows.items():
        assert r["test"]["n"] == n_test[t.split("/")[0]]
        assert r["n_train"] == res["datasets"][t.split("/")[0]]["num_samples"]["train"]
        assert 0.0 <= r["test"].get("accuracy", r["test"].get("roc_auc")) <= 1.0
    # the supervised baseline got the pretraining's crops (12 steps x 16 clips x 2 views), split by clip counts
    train_clips = {d: res["datasets"][d]["num_samples"]["train"] for d in ("nsynth", "mtat")}
    sup = res["encoders"]["supervised"]["supervised_steps"]  # the last dataset trained (mtat)
    assert sup == max(1, round(12 * 16 * 2 * train_clips["mtat"] / sum(train_clips.values()) / 16))
    # the table printed is the one saved, with the numbers of results.json
    table = open(os.path.join(out, "eval", "results.md")).read().strip()
    assert table in printed
    acc = rows[("log-mel", "nsynth/pitch")]["test"]["accuracy"]
    assert f"| log-mel | {100 * acc:.1f} |" in table


def test_quickstart_tiny_wav2vec2_scores_every_layer(tmp_path, capsys) -> None:
    """``--model wav2vec2``: probes pick the best layer on valid, and the supervised baseline (whose heads
    train on the pooled last layer) is scored on that same pooled output, clip for clip."""
    out, demo = str(tmp_path / "qs"), str(tmp_path / "demo")
    assert quickstart.main(["--tiny", "--model", "wav2vec2", "--out", out, "--demo", demo]) == 0
    res = json.load(open(os.path.join(out, "eval", "results.json")))
    q = json.load(open(os.path.join(out, "quickstart.json")))
    assert q["pretrain_summary"]["step"] == 12
    rows = {(r["encoder"], r["task"]): r for r in res["rows"]}
    n_test = {d: res["datasets"][d]["num_samples"]["test"] for d in ("nsynth", "mtat")}
    for e in ("pretrained", "random init", "supervised", "log-mel"):
        for t in ("nsynth/pitch", "nsynth/instrument_family_str", "mtat/tags"):
            assert rows[(e, t)]["test"]["n"] == n_test[t.split("/")[0]], (e, t)
