"""Training an encoder with labels: fine-tuning a pretrained encoder, and the supervised baseline.

Both train ``models.supervised.Supervised`` (the encoder's pooled output, one linear head per task;
cross-entropy for ``class`` tasks, binary cross-entropy for ``multi_hot`` ones, summed) on batches
streamed from the training shards by ``pipeline.loader.StreamingLoader``: random crops of the
encoder's training crop length (shorter clips whole, padded with ``lengths``), shuffled through
the loader's bounded buffer, so memory does not grow with the split (tests/test_eval_finetune.py:
the peak RSS of a 4x larger training split). The encoder has its own learning rate (fine-tuning:
small; 0 freezes it; the supervised baseline trains a random init with one rate for all). Every
``eval_every`` steps the whole valid clips are scored (crops or windows averaged, as in probing)
and the best weights are kept; the test split is scored once, at the end, with them.

``--label-fraction`` < 1 keeps, per task, the stable class-balanced subset of the training labels
that probes use; finding it reads the training split's sample JSON once (audio bytes are passed
over, not decoded); the other rows' labels are masked out of that task's loss.

Defaults are sized for NSynth (289,205 training notes): 20,000 steps of 32 crops, about 2.2
epochs, the valid split scored every 1,000 steps.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from eval_tools.data import Dataset
from eval_tools.encoders import Encoder
from eval_tools.probe import Task, score, valid_rows
from eval_tools.read import ReadReport, iter_split
from eval_tools.subset import label_fraction_subset
from models.supervised import Supervised, SupervisedConfig, TaskHead
from pipeline.errors import UserError


@dataclass(kw_only=True)
class FinetuneConfig:
    steps: int = 20_000
    seconds: float | None = None  # stop after this wall-clock budget too (None = steps only)
    batch_size: int = 32
    head_lr: float = 1e-3
    encoder_lr: float = 1e-4
    weight_decay: float = 0.0
    eval_every: int = 1_000
    crop_samples: int | None = None  # None = the encoder's training crop length
    num_workers: int = 4  # loader worker processes (0 = decode in this process)
    shuffle_buffer: int = 256  # samples (compressed bytes) each loader worker holds for shuffling: the memory bound
    min_read: float = 0.99  # refuse a valid/test split that read less of its samples (0: score on whatever was read)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("--steps, --batch-size and --eval-every must be >= 1")
        if self.head_lr <= 0 or self.encoder_lr < 0:
            raise ValueError("--head-lr must be > 0 and --encoder-lr >= 0 (0 freezes the encoder)")
        if self.num_workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.num_workers}")


def label_subsets(ds: Dataset, tasks: list[Task], fraction: float, seed: int) -> dict[str, set[str]]:
    """Per task, the training keys whose labels are kept at ``fraction`` (one pass over the JSON)."""
    from pipeline.shards import LabelEncoder

    labels_of = LabelEncoder(ds.spec)
    keys: list[str] = []
    ys: dict[str, list] = {t.name: [] for t in tasks}
    report = ReadReport(source=ds.manifests["train"])
    for clip in iter_split(ds.manifests["train"], report, sample_rate=None, decode=False):
        keys.append(clip.key)
        lab = labels_of.encode(clip.meta)
        for t in tasks:
            ys[t.name].append(lab[t.name])
    out = {}
    for t in tasks:
        y = np.stack([np.asarray(v) for v in ys[t.name]])
        rows = valid_rows(t, y)
        sub = label_fraction_subset([keys[i] for i in rows], y[rows], fraction, kind=t.kind, seed=seed)
        out[t.name] = {keys[rows[i]] for i in sub}
    return out


def supervised_model(enc: Encoder, tasks: list[Task]) -> Supervised:
    """``enc.model`` with one head per task (the encoder is shared with ``enc``, not copied)."""
    heads = tuple(TaskHead(name=t.name, kind=t.kind, classes=len(t.names)) for t in tasks)
    # the heads read embed()["pooled"] (the last layer), whatever features the encoder probes
    # (CLMR's layer="concat" is wider)
    dim = dataclasses.replace(enc, layer=-1).dim
    model = Supervised(enc.model, SupervisedConfig(tasks=heads, takes_lengths=enc.arch != "clmr"), dim=dim)
    return model.to(enc.device)


def _loader(enc: Encoder, ds: Dataset, cfg: FinetuneConfig, crop: int):
    from pipeline.loader import LoaderConfig, StreamingLoader

    lc = LoaderConfig(manifests=[ds.manifests["train"]], batch_size=cfg.batch_size, mode="single", crop_samples=crop,
                      variable_length=True, pad_to="longest", short_policy="pad", sample_rate=enc.sample_rate, mono=True,
                      num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                      pin_memory=enc.device.type == "cuda")
    return StreamingLoader(lc)


def _prepare(batch: dict, enc: Encoder, tasks: list[Task], subsets: dict[str, set[str]] | None) -> dict:
    """On the device: at least ``min_samples`` wide, ``lengths`` at least ``min_samples`` (shorter
    clips' padding counts as signal, as in extraction), labels outside the fraction masked."""
    audio, lengths = batch["audio"], batch["lengths"]
    if audio.shape[-1] < enc.min_samples:
        audio = nn.functional.pad(audio, (0, enc.min_samples - audio.shape[-1]))
    labels = dict(batch["labels"])
    if subsets is not None:
        for t in tasks:
            keep = torch.tensor([k in subsets[t.name] for k in batch["keys"]], device=audio.device)
            if t.kind == "class":
                labels[t.name] = torch.where(keep, labels[t.name], -1)
            else:
                labels[f"{t.name}__mask"] = keep
    return {"audio": audio, "lengths": lengths.clamp_min(enc.min_samples), "labels": labels}


def _step(model: Supervised, opt: torch.optim.Optimizer, batch: dict, enc: Encoder) -> torch.Tensor:
    with torch.autocast(device_type=enc.device.type, dtype=torch.bfloat16, enabled=enc.precision == "bf16"):
        loss, _ = model(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def evaluate_heads(enc: Encoder, heads: nn.ModuleDict, ds: Dataset, split: str, tasks: list[Task], min_read: float = 0.0
                   ) -> dict[str, dict]:
    """Score the heads on whole clips (the clip embedding is the encoder's piece average)."""
    from eval_tools.extract import extract

    # the heads were trained on embed()["pooled"] (the last layer): score them on that, whatever
    # layer choice the encoder carries for probing (wav2vec2's layer="all" gives (N, L, D))
    emb = extract(dataclasses.replace(enc, layer=-1), ds, split, cache_dir=None, progress=False, min_read=min_read)
    heads.eval()
    out = {}
    with torch.no_grad():
        x = torch.as_tensor(emb.x, dtype=torch.float32, device=enc.device)
        for t in tasks:
            lg = heads[t.name](x).float()
            probs = (lg.softmax(-1) if t.kind == "class" else lg.sigmoid()).cpu().numpy()
            out[t.name] = score(t, emb.labels[t.name], probs)
    return out


def _mean_primary(res: dict[str, dict], tasks: list[Task]) -> float:
    vals = [res[t.name][t.primary] for t in tasks]
    return float(np.nanmean(vals)) if np.isfinite(vals).any() else -1.0


def finetune(enc: Encoder, ds: Dataset, tasks: list[Task], cfg: FinetuneConfig, *, fraction: float = 1.0,
             progress: bool = True) -> dict:
    """Train ``enc.model`` (in place) with one linear head per task; returns the run's summary.

    The encoder ends with the weights of the best valid evaluation; the summary holds the heads
    (``heads``, an ``nn.ModuleDict``) and their valid/test scores."""
    from tqdm import tqdm

    from pipeline.loader import DevicePrefetcher

    if enc.model is None:
        raise UserError("fine-tuning needs a neural encoder (--checkpoint or --preset), not log-mel statistics")
    crop = int(cfg.crop_samples or enc.crop_samples or enc.window)
    torch.manual_seed(cfg.seed)
    subsets = label_subsets(ds, tasks, fraction, cfg.seed) if fraction < 1.0 else None
    model = supervised_model(enc, tasks)
    groups = [{"params": model.heads.parameters(), "lr": cfg.head_lr}]
    if cfg.encoder_lr > 0:
        groups.append({"params": model.encoder.parameters(), "lr": cfg.encoder_lr})
    else:
        model.encoder.requires_grad_(False)
    opt = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    loader = _loader(enc, ds, cfg, crop)
    best = (-np.inf, None, 0)
    history = []
    seen = {t.name: 0 for t in tasks}
    t0 = time.perf_counter()
    eval_seconds, step = 0.0, 0
    bar = tqdm(total=cfg.steps, desc=f"train {enc.name}", unit="step", disable=not progress, leave=False)
    stream = iter(DevicePrefetcher(loader, enc.device))
    try:
        while step < cfg.steps:
            batch = _prepare(next(stream), enc, tasks, subsets)
            model.train()
            model.encoder.train(cfg.encoder_lr > 0)
            try:
                loss = _step(model, opt, batch, enc)
            except torch.OutOfMemoryError:
                raise UserError(f"out of memory on {enc.device} fine-tuning {cfg.batch_size} crops of up to "
                                f"{batch['audio'].shape[-1]} samples; lower --batch-size (or --supervised-batch-size)") from None
            for t in tasks:  # labelled rows the loss saw (one host sync a step, as loss.item() would)
                y, mask = batch["labels"][t.name], batch["labels"].get(f"{t.name}__mask")
                seen[t.name] += int((y >= 0).sum()) if t.kind == "class" else int(mask.sum()) if mask is not None else len(y)
            step += 1
            bar.update(1)
            out_of_time = cfg.seconds is not None and time.perf_counter() - t0 >= cfg.seconds
            if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
                t_eval = time.perf_counter()
                valid = evaluate_heads(enc, model.heads, ds, "valid", tasks, cfg.min_read)
                eval_seconds += time.perf_counter() - t_eval
                m = _mean_primary(valid, tasks)
                history.append({"step": step, "loss": float(loss), "valid": m})
                bar.set_postfix(loss=f"{float(loss):.3f}", valid=f"{m:.3f}")
                if m > best[0]:
                    best = (m, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, step)
            if out_of_time:
                break
    finally:
        close = getattr(stream, "close", None)
        if close:
            close()
        bar.close()
    train_seconds = time.perf_counter() - t0
    model.load_state_dict(best[1])
    model.encoder.requires_grad_(True)
    model.eval()
    return {
        "heads": model.heads, "steps": step, "best_step": best[2], "train_seconds": train_seconds,
        "loop_seconds": train_seconds - eval_seconds, "history": history, "crop_samples": crop,
        "labelled_rows": {k: len(v) for k, v in subsets.items()} if subsets is not None else None,
        "labels_seen": seen, "loader": loader.stats(),
        "valid": evaluate_heads(enc, model.heads, ds, "valid", tasks, cfg.min_read),
        "test": evaluate_heads(enc, model.heads, ds, "test", tasks, cfg.min_read),
    }


def as_saved_heads(heads: nn.ModuleDict, tasks: list[Task]) -> list:
    """The fine-tuned linear heads as eval_tools/heads.py ``Head`` objects (no standardisation)."""
    from eval_tools.heads import Head
    from eval_tools.probe import Probe, ProbeConfig

    out = []
    for t in tasks:
        lin = heads[t.name]
        probe = Probe(dim=lin.in_features, n_out=lin.out_features, cfg=ProbeConfig(probe="linear"),
                      mean=np.zeros(lin.in_features), std=np.ones(lin.in_features))
        probe.net.load_state_dict({k: v.detach().cpu() for k, v in lin.state_dict().items()})
        out.append(Head(task=t, probe=probe.eval()))
    return out


__all__ = ["FinetuneConfig", "finetune", "evaluate_heads", "as_saved_heads", "label_subsets", "supervised_model"]
