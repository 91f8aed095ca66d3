"""The reduced quickstart (``quickstart.py --tiny``) end to end: demo shards, both methods'
pretraining (side by side, one process each), probes of each checkpoint and its baselines, the
one printed table and its margins."""

from __future__ import annotations

import json
import os

import pytest

import quickstart

TASKS = ["nsynth/pitch", "nsynth/instrument_family_str", "mtat/tags"]


def _rows(path: str) -> tuple[dict, dict]:
    res = json.load(open(path))
    return res, {(r["encoder"], r["task"]): r for r in res["rows"]}


def test_quickstart_tiny_both_methods_one_table(tmp_path, capsys) -> None:
    out, demo = str(tmp_path / "qs"), str(tmp_path / "demo")
    assert quickstart.main(["--tiny", "--workers", "2", "--out", out, "--demo", demo]) == 0
    printed = capsys.readouterr().out
    q = json.load(open(os.path.join(out, "quickstart.json")))
    assert list(q["methods"]) == ["clmr", "wav2vec2"]
    for model, label in (("clmr", "CLMR"), ("wav2vec2", "wav2vec2")):
        res, rows = _rows(os.path.join(out, model, "eval", "results.json"))
        m = q["methods"][model]
        # pretraining ran the planned steps and wrote the checkpoint the probes used; each method ran in its own process
        assert m["pretrain_summary"]["step"] == 12 and res["encoders"]["pretrained"]["step"] == 12
        assert os.path.exists(m["pretrain_summary"]["checkpoint"]) and os.path.exists(os.path.join(out, model, "log.txt"))
        # two cores: each method pretrains on one; the last method's probes get both
        assert m["cores"] == {"pretrain": 1, "evaluate": 2 if model == "wav2vec2" else 1}
        # every encoder x task, scored on every test clip; log-mel scored once, with the first method
        encoders = ["pretrained", "random init", "supervised"] + (["log-mel"] if model == "clmr" else [])
        assert set(rows) == {(e, t) for e in encoders for t in TASKS}
        n_test = {d: res["datasets"][d]["num_samples"]["test"] for d in ("nsynth", "mtat")}
        for (e, t), r in rows.items():
            assert r["test"]["n"] == n_test[t.split("/")[0]], (model, e, t)
            assert r["n_train"] == res["datasets"][t.split("/")[0]]["num_samples"]["train"]
        # the supervised baseline got the pretraining's crops (12 steps x 16 clips x views), split by clip counts
        views = 2 if model == "clmr" else 1
        train_clips = {d: res["datasets"][d]["num_samples"]["train"] for d in ("nsynth", "mtat")}
        sup = res["encoders"]["supervised"]["supervised_steps"]  # the last dataset trained (mtat)
        assert sup == max(1, round(12 * 16 * views * train_clips["mtat"] / sum(train_clips.values()) / 16))
        # the one table holds this method's rows under its name, with the numbers of its results.json
        for e in ("pretrained", "random init", "supervised"):
            acc = rows[(e, "nsynth/pitch")]["test"]["accuracy"]
            assert f"| {label} {e} | {100 * acc:.1f} |" in q["table_markdown"]
        # margin = pretrained - random init, per column
        mg = q["margins"][model]
        assert mg["mtat/tags/pr_auc"] == pytest.approx(rows[("pretrained", "mtat/tags")]["test"]["pr_auc"]
                                                      - rows[("random init", "mtat/tags")]["test"]["pr_auc"])
        sign = f"{100 * mg['nsynth/pitch/accuracy']:+.1f}"
        assert f"{label} pretrained - random init: {sign} / " in printed
    # wav2vec2 probes pick a layer on valid; its supervised baseline is scored on the pooled output it trained on
    _, w2v = _rows(os.path.join(out, "wav2vec2", "eval", "results.json"))
    assert all("layer" in w2v[(e, t)] for e in ("pretrained", "random init") for t in TASKS)
    # the table printed is the one saved; log-mel is its last row
    table = open(os.path.join(out, "results.md")).read().strip()
    assert table == q["table_markdown"] and table in printed
    assert table.splitlines()[-1].startswith("| log-mel |") and table.count("| log-mel |") == 1


def test_quickstart_one_method_runs_in_process(tmp_path, capsys) -> None:
    out, demo = str(tmp_path / "qs"), str(tmp_path / "demo")
    assert quickstart.main(["--tiny", "--workers", "2", "--model", "clmr", "--out", out, "--demo", demo]) == 0
    q = json.load(open(os.path.join(out, "quickstart.json")))
    assert list(q["methods"]) == ["clmr"] and q["methods"]["clmr"]["cores"] == {"pretrain": 2, "evaluate": 2}
    assert not os.path.exists(os.path.join(out, "clmr", "log.txt"))  # no child process
    printed = capsys.readouterr().out
    assert "| CLMR pretrained |" in printed
    # the machine the table was measured on: same seed, same table holds on the same kind of CPU
    import torch

    mc = q["machine"]
    assert mc["kernels"] == torch.backends.cpu.get_cpu_capability() and mc["cores"] == os.cpu_count()
    assert mc["torch"] == torch.__version__ and f"machine: {mc['cpu']}, {mc['cores']} cores" in printed


@pytest.mark.parametrize("argv, message", [
    (["--model", "clmr,byol"], "pick from clmr, wav2vec2, cpc"),
    (["--jobs", "-1"], "--jobs >= 0"),
])
def test_quickstart_bad_flags_are_one_line_errors(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        quickstart.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_failing_method_is_reported_with_its_log(tmp_path, capsys) -> None:
    """A method whose process fails: the run stops with exit 1, naming the method and its log, and
    showing the log's end (here: a demo train manifest overwritten with junk after the build)."""
    out, demo = str(tmp_path / "qs"), str(tmp_path / "demo")
    plan = quickstart.tiny_plan(("clmr", "wav2vec2"))
    quickstart.ensure_demo(demo, plan)
    with open(os.path.join(demo, "nsynth", "train.manifest.json"), "w") as f:
        f.write("not json")
    assert quickstart.main(["--tiny", "--workers", "2", "--out", out, "--demo", demo]) == 1
    err = capsys.readouterr().err
    assert "stopped with exit code" in err  # whichever of the two processes exits first is the one named
    assert any(f"{m} stopped" in err and os.path.join(out, m, "log.txt") in err for m in ("clmr", "wav2vec2"))
    assert "train.manifest.json" in err  # the child's own error, from the end of its log


def test_an_interrupted_quickstart_continues_where_it_stopped(tmp_path, capsys, monkeypatch) -> None:
    """Ctrl-C during pretraining: exit 130 with a checkpoint; the same command again resumes it and
    prints the uninterrupted run's table. A run with another seed in that folder, or a folder with
    checkpoints but no plan, is one line naming the folder."""
    import signal

    import torch

    from training.log import RunLogger

    demo = str(tmp_path / "demo")
    args = ["--tiny", "--workers", "2", "--model", "clmr", "--demo", demo]
    threads = torch.get_num_threads()
    try:
        assert quickstart.main([*args, "--out", str(tmp_path / "whole")]) == 0
        whole = json.load(open(tmp_path / "whole" / "quickstart.json"))
        log_step = RunLogger.log_step

        def ctrl_c_after_step_5(self, step, *a, **k):
            log_step(self, step, *a, **k)
            if self.tag == "train" and step == 5:
                os.kill(os.getpid(), signal.SIGINT)  # train's handler: checkpoint at the end of step 6

        monkeypatch.setattr(RunLogger, "log_step", ctrl_c_after_step_5)
        out = tmp_path / "cut"
        assert quickstart.main([*args, "--out", str(out)]) == 130
        assert os.listdir(out / "clmr" / "pretrain" / "checkpoints") == ["ckpt-00000006.pt"]
        assert not (out / "clmr" / "eval").exists()  # nothing half-trained was probed
        assert "run the same command again to continue" in capsys.readouterr().err
        monkeypatch.setattr(RunLogger, "log_step", log_step)

        assert quickstart.main([*args, "--out", str(out)]) == 0
        cut = json.load(open(out / "quickstart.json"))
        assert cut["methods"]["clmr"]["pretrain_summary"]["resumed_from"].endswith("ckpt-00000006.pt")
        assert cut["table_markdown"] == whole["table_markdown"] and cut["margins"] == whole["margins"]
        assert f"resumed from {out}" in capsys.readouterr().out

        assert quickstart.main([*args, "--out", str(out)]) == 0  # finished: reused, not rerun
        assert "clmr: done in an earlier run" in capsys.readouterr().out
        assert json.load(open(out / "quickstart.json"))["table_markdown"] == whole["table_markdown"]

        assert quickstart.main([*args, "--seed", "1", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"--out {out} holds a run of another plan (seed 0 -> 1)" in err and "Traceback" not in err
        os.remove(out / quickstart.PLAN_FILE)
        assert quickstart.main([*args, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"--out {out} holds an earlier run (clmr) without its plan.json" in err and "Traceback" not in err
    finally:
        torch.set_num_threads(threads)


def test_sigterm_to_the_side_by_side_run_stops_and_checkpoints_every_method(tmp_path) -> None:
    """A scheduler's SIGTERM to quickstart.py while both methods pretrain in their processes:
    exit 130 saying how to continue, each method checkpointed, no process left running."""
    import signal
    import subprocess
    import sys
    import time

    out, demo = tmp_path / "qs", tmp_path / "demo"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, os.path.join(root, "quickstart.py"), "--tiny", "--steps", "400", "--out", str(out),
                             "--demo", str(demo)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
    logs = [out / m / "pretrain" / "metrics.jsonl" for m in ("clmr", "wav2vec2")]
    deadline = time.time() + 240
    while time.time() < deadline and not all(p.exists() and p.stat().st_size > 0 for p in logs):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "run the same command again to continue" in err and "Traceback" not in err
    for m in ("clmr", "wav2vec2"):
        ckpts = os.listdir(out / m / "pretrain" / "checkpoints")
        assert len(ckpts) == 1 and ckpts[0] != "ckpt-00000400.pt", (m, ckpts)  # stopped early, with a checkpoint
        assert not (out / m / "method.json").exists()
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(out).encode() in f.read():
                    left.append(pid)
        except OSError:
            pass
    assert not left


def test_clmr_pretrains_its_own_step_count_and_steps_sets_every_method(tmp_path, monkeypatch) -> None:
    plan = quickstart.Plan()
    cfgs = {m: quickstart.pretrain_config(plan, m, str(tmp_path / "demo"), str(tmp_path / m), 1) for m in ("clmr", "wav2vec2")}
    assert (cfgs["clmr"].train.steps, cfgs["clmr"].checkpoint.every) == (800, 200)  # a checkpoint every quarter
    assert (cfgs["wav2vec2"].train.steps, cfgs["wav2vec2"].checkpoint.every) == (600, 150)
    seen = {}

    def stop(plan, out, demo):  # the plan main() built from the flags, then an interruption
        seen["plan"] = plan
        raise KeyboardInterrupt

    monkeypatch.setattr(quickstart, "run", stop)
    assert quickstart.main(["--steps", "50", "--out", str(tmp_path / "o")]) == 130
    assert {m: seen["plan"].steps_for(m) for m in ("clmr", "wav2vec2", "cpc")} == {"clmr": 50, "wav2vec2": 50, "cpc": 50}
