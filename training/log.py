"""What a run reports, behind one object: :class:`RunLogger`.

Rank 0 appends every step to ``<out_dir>/metrics.jsonl`` (and a row of its own for each validation,
``valid/...``, and online probe, ``probe/...``), prints a progress line every
``logging.every`` steps and sends the same scalars (and audio examples) to W&B; every rank calls
:meth:`RunLogger.log_step`, because the loader's skipped-sample counters are summed over ranks on
those steps. The logger also owns the run's counters (non-finite steps, clips seen), which the
checkpoint keeps as ``"counters"`` (:meth:`RunLogger.state_dict`).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from pipeline import fsio

if TYPE_CHECKING:
    from train_config import LoggingConfig
    from training.distributed import Dist
    from training.step import StepResult

# loader.stats() keys that count samples not used (each replaced by another sample of the stream)
SAMPLE_SKIP_KEYS = ("skipped_corrupt", "skipped_short", "skipped_truncated")


def fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def fmt(x: Any, spec: str) -> str:
    """``format(x, spec)``, or "n/a" for None and non-finite floats."""
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def numbers(stats: Any) -> dict[str, int | float]:
    """Numeric entries of a stats dict (nested dicts flattened with '/')."""
    out: dict[str, int | float] = {}
    if isinstance(stats, dict):
        for k, v in stats.items():
            if isinstance(v, dict):
                out.update({f"{k}/{kk}": vv for kk, vv in numbers(v).items()})
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[str(k)] = v
    return out


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop metrics.jsonl records after ``last_step`` (steps a killed run logged past its checkpoint)."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by kill -9
            if record["step"] <= last_step:
                keep.append(json.dumps(record) + "\n")
    fsio.write_bytes_atomic(path, "".join(keep).encode())


class _Window:
    """Sums over the steps since the last progress line (or since the start, for the summary)."""

    def __init__(self) -> None:
        self.steps, self.time, self.wait, self.clips, self.loss, self.finite = 0, 0.0, 0.0, 0, 0.0, 0

    def add(self, r: StepResult, clips: int) -> None:
        self.steps += 1
        self.time += r.time_s
        self.wait += r.wait_s
        self.clips += clips
        if not r.skipped:
            self.loss += r.loss
            self.finite += 1

    @property
    def mean_loss(self) -> float | None:
        return self.loss / self.finite if self.finite else None  # None: every step was skipped


class RunLogger:
    """Console, metrics.jsonl, W&B and audio examples of one run (see the module docstring).

    ``audio_seconds``: seconds of audio one clip stands for (views x crop / rate), for audio-h/s.
    ``tag``: what its own console lines start with (``[train]``, ``[finetune]``); ``console=False``
    keeps the progress lines off the console (metrics.jsonl and W&B still get them).
    """

    def __init__(self, cfg: LoggingConfig, env: Dist, *, out_dir: str, total_steps: int, run_name: str,
                 config: dict[str, Any], audio_seconds: float, steps_per_epoch: int = 0, tag: str = "train",
                 console: bool = True):
        self.cfg, self.env, self.out_dir, self.total_steps, self.tag = cfg, env, out_dir, total_steps, tag
        self.console = console
        self.run_name, self.config, self.audio_seconds, self.steps_per_epoch = run_name, config, audio_seconds, steps_per_epoch
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.nonfinite_total, self.clips = 0, 0  # the run's counters, kept in checkpoints
        self.samples_skipped = 0  # over all ranks, as of the last log step
        self.first_loss: float | None = None
        self.last_loss = float("nan")
        self.audio_logged = 0
        self.last_eval: dict[str, float] = {}  # the latest valid/ and probe/ values (rank 0)
        self.wandb: Any = None
        self.run_id: str | None = None
        self._window, self._totals = _Window(), _Window()
        self._start_step, self._t_start = 0, time.perf_counter()

    # --- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {"nonfinite_total": self.nonfinite_total, "clips": self.clips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.nonfinite_total, self.clips = int(state.get("nonfinite_total", 0)), int(state.get("clips", 0))

    # --- start and end ---------------------------------------------------------------------

    def start(self, *, step: int, resumed: bool, run_id: str | None) -> str:
        """Cut metrics.jsonl back to ``step`` (resumed) or set an old one aside, start W&B (rank 0).
        Returns the W&B run id, the same on every rank (a new one unless resuming)."""
        if self.env.master:
            os.makedirs(self.out_dir, exist_ok=True)
            if resumed:
                truncate_metrics(self.metrics_path, step)
            elif os.path.exists(self.metrics_path):
                os.replace(self.metrics_path, self.metrics_path + ".old")  # a fresh run starts a fresh file
        self.run_id = run_id or self.env.broadcast_object(secrets.token_hex(4))
        if self.env.master:
            self.wandb = init_wandb(self.cfg, run_id=self.run_id, out_dir=self.out_dir, name=self.run_name,
                                    config=self.config, tag=self.tag)
        self._start_step, self._t_start = step, time.perf_counter()
        if self.env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.env.device)
        return self.run_id

    def finish(self, ok: bool) -> None:
        if self.wandb is not None:
            self.wandb.finish(exit_code=0 if ok else 1)

    # --- every step ------------------------------------------------------------------------

    def log_step(self, step: int, r: StepResult, *, clips: int, data_counters: Callable[[], dict]) -> None:
        """Record optimizer step ``step`` (1-based); on log steps also the summed data counters."""
        self.clips += clips
        self.nonfinite_total += int(r.skipped)
        self._window.add(r, clips)
        self._totals.add(r, clips)
        if not r.skipped:
            self.first_loss = r.loss if self.first_loss is None else self.first_loss
            self.last_loss = r.loss
        log_now = step % self.cfg.every == 0 or step == self.total_steps or r.stop
        data = self._summed(numbers(data_counters())) if log_now else {}
        if log_now:
            self.samples_skipped = int(sum(data.get(k, 0) for k in SAMPLE_SKIP_KEYS))
        if not self.env.master:
            return
        record = {
            "step": step, "loss": r.loss if math.isfinite(r.loss) else None, "lr": r.lr,
            "grad_norm": r.grad_norm if math.isfinite(r.grad_norm) else None,
            "skipped": r.skipped, "time_s": round(r.time_s, 6), "wait_s": round(r.wait_s, 6), **r.metrics,
        }
        if log_now:
            record |= {"samples_skipped": self.samples_skipped, **{f"data/{k}": v for k, v in data.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if log_now:
            self._progress(step, r, data)

    def _summed(self, stats: dict[str, int | float]) -> dict[str, int | float]:
        """The counters summed over ranks (every rank calls this on the same steps)."""
        if self.env.world == 1:
            return stats
        names = sorted(stats)
        t = self.env.all_reduce_(torch.tensor([stats[k] for k in names], dtype=torch.float64, device=self.env.device))
        return {k: int(v) if float(v).is_integer() else v for k, v in zip(names, t.tolist())}

    def _progress(self, step: int, r: StepResult, data: dict[str, int | float]) -> None:
        w = self._window
        span = max(w.time, 1e-9)
        clips_s = w.clips / span
        record = {
            **({"train/loss": w.mean_loss} if w.mean_loss is not None else {}),
            "train/lr": r.lr, "train/grad_norm": r.grad_norm,
            **{f"model/{k}": v for k, v in r.metrics.items()},
            "perf/steps_per_s": w.steps / span, "perf/clips_per_s": clips_s,
            "perf/audio_hours_per_s": clips_s * self.audio_seconds / 3600,
            "perf/data_wait_fraction": w.wait / span,
            "train/nonfinite_skipped": self.nonfinite_total, "train/samples_skipped": self.samples_skipped,
            "train/epoch": step / self.steps_per_epoch if self.steps_per_epoch else 0,
            **{f"data/{k}": v for k, v in data.items()},
        }
        if self.env.device.type == "cuda":
            record["perf/gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.env.device)
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        self._window = _Window()
        if not self.console:
            return
        done = step - self._start_step
        eta = (self.total_steps - step) * (time.perf_counter() - self._t_start) / max(1, done)
        extras = "".join(f" | {k} {v:.3g}" for k, v in r.metrics.items())
        print(f"step {step}/{self.total_steps} | loss {fmt(w.mean_loss, '.4f')} | lr {r.lr:.2e} | "
              f"gnorm {r.grad_norm:.3g}{extras} | {clips_s:.1f} clips/s | "
              f"wait {100 * record['perf/data_wait_fraction']:.1f}% | skipped {self.samples_skipped} samples, "
              f"{self.nonfinite_total} non-finite steps | eta {fmt_duration(eta)}", flush=True)

    # --- validation and online probe --------------------------------------------------------

    def log_eval(self, step: int, record: dict[str, float]) -> None:
        """A validation (``valid/...``) or online-probe (``probe/...``) result at optimizer step
        ``step`` (pretraining's validation and probe, a fine-tune's valid scoring): its own
        metrics.jsonl row ``{"step", <keys>}``, W&B, one console line (rank 0, unless ``console`` is off)."""
        if not self.env.master:
            return
        self.last_eval.update(record)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **record}) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        if not self.console:
            return
        kind = next(iter(record)).split("/", 1)[0]
        shown = " | ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in record.items() if not k.endswith(("/clips", "/seconds")))
        took = (f" | {record[kind + '/clips']} clips in {record.get(kind + '/seconds', 0):.1f} s"
                if kind + "/clips" in record else "")
        print(f"{kind} step {step}/{self.total_steps} | {shown}{took}", flush=True)

    # --- audio examples --------------------------------------------------------------------

    def audio_due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based, about to run) logs audio examples."""
        every = self.cfg.audio_every
        return self.wandb is not None and every > 0 and (step % every == 0 or step == self._start_step)

    def audio(self, step: int, clean: torch.Tensor, augmented: torch.Tensor, params: dict[str, torch.Tensor],
              keys: list[str], sample_rate: int, no_params: str) -> None:
        self.audio_logged += log_audio_examples(self.wandb, step, clean, augmented, params, keys, sample_rate,
                                                self.cfg.audio_examples, self.out_dir, no_params)

    # --- the end ---------------------------------------------------------------------------

    def totals(self) -> dict[str, Any]:
        """Run-level figures for the summary."""
        t = self._totals
        span = max(t.time, 1e-9)
        return {
            "first_loss": self.first_loss, "last_loss": self.last_loss, "nonfinite_skipped": self.nonfinite_total,
            "samples_skipped": self.samples_skipped, "wall_s": time.perf_counter() - self._t_start,
            "steps_per_s": t.steps / span, "clips_per_s": t.clips / span,
            "audio_hours_per_s": t.clips * self.audio_seconds / 3600 / span, "data_wait_fraction": t.wait / span,
            "audio_examples_logged": self.audio_logged, "metrics": self.metrics_path, "wandb_run_id": self.run_id,
            "last_eval": dict(self.last_eval),
            "wandb_dir": self.wandb.dir if self.wandb is not None else None,
        }


# --------------------------------------------------------------------------------------------
# Weights & Biases (rank 0 only; imported when used)


def init_wandb(cfg: LoggingConfig, *, run_id: str, out_dir: str, name: str, config: dict[str, Any], tag: str = "train") -> Any:
    """Start or continue W&B run ``run_id``; None when disabled. Offline when no API key is set."""
    mode = cfg.wandb_mode
    if mode == "auto":
        env_mode = os.environ.get("WANDB_MODE", "").lower()
        if env_mode in ("online", "offline", "disabled"):
            mode = env_mode
        elif env_mode == "dryrun":
            mode = "offline"
        elif os.environ.get("WANDB_API_KEY"):
            mode = "online"
        else:
            mode = "offline"
            print(f"[{tag}] W&B: WANDB_API_KEY is not set, logging offline under "
                  f"{os.path.join(out_dir, 'wandb')} (upload later with `wandb sync <run folder>`)")
    if mode == "disabled":
        print(f"[{tag}] W&B: disabled" + (" (--logging.wandb_mode=disabled)" if tag == "train" else ""))
        return None
    import wandb

    def start(mode: str) -> Any:
        return wandb.init(
            project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.run_name or name, id=run_id,
            resume="allow", dir=out_dir, mode=mode, config=config, settings=wandb.Settings(console="off", quiet=True),
        )

    try:
        run = start(mode)
    except Exception as exc:  # noqa: BLE001 - no network or a bad key must not cost the training run
        if mode != "online":
            raise
        print(f"[{tag}] W&B: online start failed ({exc}); logging offline instead (`wandb sync` it later)")
        mode = "offline"
        run = start(mode)
    print(f"[{tag}] W&B: {mode} run {run_id} ({run.dir})")
    return run


def log_audio_examples(run: Any, step: int, clean: torch.Tensor, augmented: torch.Tensor,
                       params: dict[str, torch.Tensor], keys: list[str], sample_rate: int, n: int,
                       out_dir: str, no_params: str = "no augmentation") -> int:
    """Log ``n`` clips (every view, clean and augmented) to W&B and as WAVs + params.json on disk.

    W&B gets one ``wandb.Audio`` panel per augmented view (caption = its parameters) and a table of
    clean/augmented pairs with the parameters; ``<out_dir>/examples/step-<step>/`` gets the
    augmented views via ``pipeline.augment.write_examples``. ``no_params`` is the caption of a view
    without recorded parameters. Returns the number of views logged.
    """
    import wandb

    from pipeline.augment import example_params, write_examples

    clean, augmented = clean[:n].float().cpu(), augmented[:n].float().cpu()  # (n, V, C, T)
    n, views = clean.shape[0], clean.shape[1]
    flat_aug = augmented.reshape(n * views, *augmented.shape[2:])  # the (B*V, C, T) the chain saw
    table = wandb.Table(columns=["step", "key", "view", "clean", "augmented", "params"])
    panels: dict[str, Any] = {}
    for i in range(n):
        key = keys[i] if i < len(keys) else str(i)
        for v in range(views):
            # the first n*V rows of the flattened batch are these clips' views, in this order
            row = i * views + v
            p = example_params(params, row) if params else {}
            applied = [k[: -len(".apply")] for k, t in params.items() if k.endswith(".apply") and bool(t[row])]
            p = {name: p.get(name, {}) for name in applied}  # transforms without parameters (polarity) too
            caption = f"{key} view {v}: " + (", ".join(
                f"{name}({', '.join(f'{k}={x:.3g}' if isinstance(x, float) else f'{k}={x}' for k, x in q.items())})"
                if q else name for name, q in p.items()) or no_params)
            a_clean = wandb.Audio(clean[i, v].mean(0).numpy(), sample_rate=sample_rate, caption=f"{key} view {v} clean")
            a_aug = wandb.Audio(augmented[i, v].mean(0).numpy(), sample_rate=sample_rate, caption=caption)
            panels[f"examples/clip{i}_view{v}"] = wandb.Audio(augmented[i, v].mean(0).numpy(),
                                                              sample_rate=sample_rate, caption=caption)
            table.add_data(step, key, v, a_clean, a_aug, json.dumps(p))
    run.log({"examples/table": table, **panels}, step=step)
    if params:
        sub = {k: (t if t.dim() == 0 else t[: n * views]) for k, t in params.items()}
        write_examples(flat_aug, sub, os.path.join(out_dir, "examples", f"step-{step:08d}"), sample_rate, n * views)
    return n * views
