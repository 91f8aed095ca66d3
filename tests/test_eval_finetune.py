"""Fine-tuning is training: the supervised model on the models seam, streamed batches (bounded
memory whatever the split size), one run per task, the label fraction, best valid weights kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import evaluate
from models.supervised import Supervised, SupervisedConfig, TaskHead
from tests import evaldata, shardgen

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Mean(torch.nn.Module):
    """A stand-in encoder: pooled = the mean and max of the valid samples."""

    def embed(self, audio, lengths):
        valid = torch.arange(audio.shape[1])[None] < lengths[:, None]
        mean = (audio * valid).sum(1) / valid.sum(1)
        return {"pooled": torch.stack([mean, audio.masked_fill(~valid, -9).amax(1)], 1)}


def test_supervised_forward_is_the_sum_of_task_losses_over_labelled_rows() -> None:
    torch.manual_seed(0)
    cfg = SupervisedConfig(tasks=(TaskHead(name="c", kind="class", classes=3), TaskHead(name="t", kind="multi_hot", classes=2)))
    model = Supervised(_Mean(), cfg, dim=2)
    audio = torch.randn(4, 1, 1, 50)
    lengths = torch.tensor([50, 30, 20, 50])
    y = torch.tensor([2, -1, 0, 1])  # row 1 has no class label
    tags = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([True, True, False, True])  # row 2 is outside the label fraction
    loss, metrics = model({"audio": audio, "lengths": lengths, "labels": {"c": y, "t": tags, "t__mask": mask}})
    logits = model.logits(audio[:, 0, 0], lengths)
    ce = F.cross_entropy(logits["c"][[0, 2, 3]], y[[0, 2, 3]])
    bce = F.binary_cross_entropy_with_logits(logits["t"][mask], tags[mask])
    assert loss.item() == pytest.approx((ce + bce).item(), rel=1e-6)
    assert metrics["loss_c"].item() == pytest.approx(ce.item(), rel=1e-6)
    acc = (logits["c"].argmax(-1)[[0, 2, 3]] == y[[0, 2, 3]]).float().mean()
    assert metrics["acc_c"].item() == pytest.approx(acc.item())
    # padding changes nothing: the encoder pools valid samples only
    audio2 = audio.clone()
    audio2[1, ..., 30:] = 5.0
    assert torch.allclose(model({"audio": audio2, "lengths": lengths, "labels": {"c": y, "t": tags, "t__mask": mask}})[0], loss)
    loss.backward()  # a graph even when one task has no label in the batch
    assert model({"audio": audio, "lengths": lengths, "labels": {"c": torch.full((4,), -1), "t": tags, "t__mask": mask}})[0].requires_grad


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> str:
    return evaldata.write_toy(str(tmp_path_factory.mktemp("ftdata") / "toy"), sizes=(48, 12, 12))


def test_one_run_per_task_by_default_and_joint_on_request(toy, tmp_path) -> None:
    common = ["finetune", "--data", toy, "--preset", "cpc_tiny", "--tasks", "pitch,tags", "--steps", "4", "--eval-every", "2",
              "--batch-size", "8", "--workers", "0", "--no-progress"]
    assert evaluate.main([*common, "--out", str(tmp_path / "per")]) == 0
    res = json.load(open(tmp_path / "per" / "results.json"))
    assert sorted(res["models"]) == ["pitch", "tags"] and [r["run"] for r in res["rows"]] == ["pitch", "tags"]
    for task in ("pitch", "tags"):
        doc = json.load(open(tmp_path / "per" / "models" / task / "model.json"))
        assert [t["name"] for t in doc["tasks"]] == [task]
        ft = res["finetune"][task]
        assert ft["steps"] == 4 and [h["step"] for h in ft["history"]] == [2, 4]
        assert ft["best_step"] == max(ft["history"], key=lambda h: h["valid"])["step"]  # first of the best
    assert evaluate.main([*common, "--joint", "--out", str(tmp_path / "joint")]) == 0
    res = json.load(open(tmp_path / "joint" / "results.json"))
    assert list(res["models"]) == ["joint"] and {r["run"] for r in res["rows"]} == {"joint"}


def test_label_fraction_masks_the_other_rows(toy, tmp_path) -> None:
    from eval_tools.data import Dataset
    from eval_tools.encoders import preset_config, random_encoder
    from eval_tools.finetune import FinetuneConfig, finetune, label_subsets
    from eval_tools.runner import make_tasks

    ds = Dataset.from_dir(toy)
    tasks = make_tasks(ds, ["pitch"])
    subsets = label_subsets(ds, tasks, 0.25, seed=0)
    assert len(subsets["pitch"]) == 12  # 3 of each of the 4 pitches, as the probes' subset
    enc = random_encoder(preset_config("cpc_tiny"), sample_rate=16000, seed=0)
    out = finetune(enc, ds, tasks, FinetuneConfig(steps=6, eval_every=6, batch_size=8, num_workers=0), fraction=0.25,
                   run_dir=str(tmp_path / "run"), progress=False)
    assert out["labelled_rows"] == {"pitch": 12}
    assert 0 < out["labels_seen"]["pitch"] < 6 * 8  # only rows of the subset reach the loss


_RSS_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from eval_tools.data import Dataset
from eval_tools.encoders import preset_config, random_encoder
from eval_tools.finetune import FinetuneConfig, finetune
from eval_tools.runner import make_tasks
ds = Dataset.from_dir(sys.argv[1])
enc = random_encoder(preset_config("cpc_tiny"), sample_rate=16000, seed=0)
cfg = FinetuneConfig(steps=8, eval_every=8, batch_size=8, num_workers=0, shuffle_buffer=32)
out = finetune(enc, ds, make_tasks(ds, ["pitch"]), cfg, run_dir=sys.argv[2], progress=False)
# VmHWM is this process image's own peak; ru_maxrss would also count the parent's RSS at fork
# (Linux keeps the pre-exec peak), i.e. pytest's
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_kb": hwm, "steps": out["steps"]}))
"""


def _toy_split(folder: str, n_train: int, seconds: float) -> str:
    rng = np.random.default_rng(1)
    for split, n in (("train", n_train), ("valid", 8), ("test", 8)):
        clips = [evaldata.toy_clip(rng, i, split, seconds=seconds) for i in range(n)]
        shardgen.write_split(folder, clips, [max(1, n // 4)] * 3 + [n - 3 * max(1, n // 4)], split=split, dataset="toy",
                             labels=evaldata.SPEC)
    return folder


def test_finetune_peak_memory_does_not_grow_with_the_training_split(tmp_path) -> None:
    """100 vs 400 training clips of 4 s: holding the clips (the old ClipBank) would add 300 x 4 s x
    16 kHz x 4 B = 77 MB to the peak; streaming (a 32-sample shuffle buffer) adds nothing that grows
    with the split."""
    peaks = {}
    for n in (100, 400):
        folder = _toy_split(str(tmp_path / f"n{n}"), n, 4.0)
        res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, folder, str(tmp_path / f"run{n}")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["steps"] == 8
        peaks[n] = out["peak_kb"] / 1024
    assert peaks[400] - peaks[100] < 20, peaks  # MB; the held clips alone would be 77 MB
