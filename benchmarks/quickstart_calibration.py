"""One row of docs/quickstart-calibration.md: the quickstart's CLMR pretraining with some settings
changed, then linear probes of the pretrained encoder and its random init (same architecture, seed
and probe) for each probe variant. The supervised and log-mel baselines are left out: they do not
depend on the pretraining settings.

    OMP_NUM_THREADS=1 nice -n 15 /usr/bin/time -v python benchmarks/quickstart_calibration.py --tag B \\
        --set augment.filter_p=0 --set augment.reverb_p=0 --variants=-1:bn,concat:bn

Variants are ``LAYER:BN[:POOL]``: LAYER -1 (the last block) or concat (every block's pooled output), BN
``bn`` (BatchNorm statistics recalibrated on clean crops) or ``nobn``, POOL ``mean`` (the default)
or ``meanstd`` (each block's mean and standard deviation over time; the quickstart's CLMR probe). Prints one ``RESULT {json}``
line per variant (valid and test scores, CPU seconds, load average), then one JSON line with
``ratios`` for the last variant: ``pretrained_vs_random_<task>_<metric>`` on the test split (> 1:
pretraining helped). The demo folder is built if missing (``--demo-clips``/``--demo-clip-seconds``)
and reused after; run folders go to ``runs/calibration/TAG``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _plan_defaults():
    import quickstart

    return quickstart.Plan()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tag", required=True, help="run name (runs/calibration/TAG)")
    d = _plan_defaults()  # the quickstart's own settings: a row without flags is today's quickstart
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch", type=int, default=d.batch_size)
    p.add_argument("--temp", type=float, default=d.temperature, help="NT-Xent temperature")
    p.add_argument("--blocks", type=int, default=d.clmr_blocks, help="SampleCNN blocks (crop = 3 ** (blocks + 1) samples)")
    p.add_argument("--seed", type=int, default=0, help="pretraining, random init and probe seed")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="train.py override (repeatable)")
    p.add_argument("--demo", default="demo_shards")
    p.add_argument("--demo-clips", type=int, default=d.demo_clips)
    p.add_argument("--demo-clip-seconds", type=float, default=d.demo_clip_seconds)
    p.add_argument("--checkpoint", help="probe this checkpoint instead of pretraining")
    p.add_argument("--variants", default="-1:bn,concat:bn,concat:bn:meanstd",
                   help="comma-separated LAYER:BN[:POOL] probes (see the docstring)")
    a = p.parse_args(argv)

    import torch

    import evaluate
    import quickstart
    import train
    import train_config

    torch.set_num_threads(1)
    plan = quickstart.Plan(steps=a.steps, batch_size=a.batch, temperature=a.temp, clmr_blocks=a.blocks, workers=1,
                           seed=a.seed, demo_clips=a.demo_clips, demo_clip_seconds=a.demo_clip_seconds)
    quickstart.ensure_demo(a.demo, plan)
    out = os.path.join("runs", "calibration", a.tag)
    t0 = time.process_time()
    ckpt = a.checkpoint
    if ckpt is None:
        cfg = train_config.apply_overrides(quickstart.pretrain_config(plan, "clmr", a.demo, os.path.join(out, "pretrain"), 1), a.set)
        ckpt = train.train(cfg)["checkpoint"]
    cpu_pretrain = time.process_time() - t0
    ratios: dict[str, float] = {}
    for variant in a.variants.split(","):
        layer_text, bn, *rest = variant.split(":")
        pool = rest[0] if rest else "mean"
        layer = layer_text if layer_text == "concat" else int(layer_text)
        t1 = time.process_time()
        opts = evaluate.EvalOptions(
            data=[f"{a.demo}/nsynth", f"{a.demo}/mtat"], out=os.path.join(out, f"eval-{layer_text}-{bn}" + ("" if pool == "mean" else f"-{pool}")), checkpoint=ckpt,
            baselines=["random"], tasks=["pitch", "instrument_family_str", "tags"], probe="linear",
            max_epochs=plan.probe_epochs, patience=plan.probe_patience, calib_crops=plan.calib_crops, recalibrate_bn=bn == "bn",
            layer=layer, pool=pool, wandb_mode="disabled", workers=1, progress=False, seed=a.seed)
        r = evaluate.run_evaluation(opts)
        res = {f"{row['encoder']}|{row['task'].split('/')[1]}": {
            "valid": {m: round(v, 4) for m, v in row["valid"].items() if m not in ("n", "loss")},
            "test": {m: round(v, 4) for m, v in row["test"].items() if m != "n"}} for row in r["rows"]}
        print("RESULT", json.dumps({"tag": a.tag, "variant": variant, "args": vars(a), "cpu_pretrain_s": round(cpu_pretrain, 1),
                                    "cpu_eval_s": round(time.process_time() - t1, 1), "load": os.getloadavg(), "res": res}),
              flush=True)
        ratios = {f"pretrained_vs_random_{k.split('|')[1]}_{m}": round(v / max(res[k.replace('pretrained', 'random init')]["test"][m], 1e-9), 3)
                  for k in res if k.startswith("pretrained|") for m, v in res[k]["test"].items()}
    print(json.dumps({"benchmark": "quickstart_calibration", "tag": a.tag, "variant": variant, "ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
