"""Two real processes under torchrun (gloo): equal step counts, disjoint ranks, one collective per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests import shardgen

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import itertools, json, sys
import torch, torch.distributed as dist
from pipeline.loader import LoaderConfig, StreamingLoader

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = LoaderConfig(manifests=[sys.argv[1]], batch_size=4, crop_samples=1000, num_workers=2, shuffle_buffer=8)
ld = StreamingLoader(cfg, rank=rank, world_size=world)
spe = torch.tensor([ld.steps_per_epoch, -ld.steps_per_epoch])
dist.all_reduce(spe, op=dist.ReduceOp.MAX)
assert spe[0] == -spe[1] == ld.steps_per_epoch, "ranks disagree on steps_per_epoch"
keys, steps = [], 0
for batch in itertools.islice(ld, 2 * ld.steps_per_epoch):
    total = batch["audio"].sum()
    dist.all_reduce(total)  # what DDP does every step: an uneven stream would hang here
    keys.append(batch["keys"])
    steps += 1
gathered = [None] * world
dist.all_gather_object(gathered, {"rank": rank, "steps": steps, "spe": ld.steps_per_epoch, "keys": keys})
if rank == 0:
    with open(sys.argv[2], "w") as f:
        json.dump(gathered, f)
dist.destroy_process_group()
'''


def test_torchrun_two_ranks_gloo(tmp_path):
    clips = shardgen.make_clips(33, sample_rate=8000, seed=31)
    man = shardgen.write_split(str(tmp_path / "d"), clips, [13, 11, 9])
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out.json"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script), man, str(out)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["rank"] for r in res] == [0, 1]
    spe = res[0]["spe"]
    assert spe == 33 // 8 and all(r["steps"] == 2 * spe for r in res)
    for e in range(2):
        per_rank = [[k for b in r["keys"][e * spe : (e + 1) * spe] for k in b] for r in res]
        flat = per_rank[0] + per_rank[1]
        assert len(flat) == len(set(flat)) == 32  # one sample of 33 sits out each epoch
        assert set(flat) <= {c["key"] for c in clips}
