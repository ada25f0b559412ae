"""Lifecycle callbacks: what watches a run, kept out of the training loop.

The trainer calls ``on_fit_start`` once, ``on_step`` after each optimizer step, ``on_record``
for every record it emits (metrics, validation, events), ``on_loop_end`` when the loop is left
for the final save and report, and ``on_fit_end`` once, also when the run fails. Records reach the sinks on rank 0 only. Monitors add their
fields to a log record in ``on_log``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from crate_lm.train.trainer import StepResult, Trainer


class Callback:
    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_step(self, trainer: Trainer, result: StepResult) -> None: ...

    def on_log(self, trainer: Trainer, record: dict) -> None:
        """Add this monitor's fields to the interval's log record (and start a new window)."""

    def on_record(self, record: dict) -> None: ...

    def on_loop_end(self, trainer: Trainer) -> None: ...

    def on_fit_end(self, trainer: Trainer, status: str) -> None: ...


def json_safe(record: dict) -> dict:
    """Non-finite numbers (a skipped step's loss or norm) are written as null: JSON has no NaN."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class LossWindow(Callback):
    """Mean training loss over the applied steps of the interval, the last lr and gradient norm."""

    def __init__(self) -> None:
        self.total, self.n, self.last = 0.0, 0, None

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        self.last = result
        if result.applied:
            self.total += result.loss
            self.n += 1

    def on_log(self, trainer: Trainer, record: dict) -> None:
        record["loss"] = self.total / self.n if self.n else None  # every step of the window was skipped
        if self.last is not None:
            record["lr"] = self.last.lr
            record["grad_norm"] = self.last.grad_norm
        self.total, self.n = 0.0, 0


class SpeedMonitor(Callback):
    """tokens/s and MFU over the time spent in training steps alone (data wait included;
    evaluation, checkpoints and logging excluded)."""

    def __init__(self, flops_per_token: float, peak_flops: float) -> None:
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.tokens, self.seconds = 0, 0.0

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        self.tokens += result.tokens
        self.seconds += result.seconds

    def on_log(self, trainer: Trainer, record: dict) -> None:
        tokens_per_s = self.tokens / max(self.seconds, 1e-9)
        record["tokens_per_s"] = tokens_per_s
        record["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops if self.peak_flops else None
        record["memory_gb"] = memory_gb()
        record["tokens_seen"] = trainer.state.tokens_seen
        self.tokens, self.seconds = 0, 0.0


class ProgressBar(Callback):
    """A tqdm bar on rank 0; events worth a line (skips, spikes, checkpoints) are written above it."""

    def __init__(self, total: int) -> None:
        self.total, self.bar = total, None

    def on_fit_start(self, trainer: Trainer) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=self.total, initial=trainer.state.step, desc="train", unit="step")

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        self.bar.update(1)
        if result.applied:
            self.bar.set_postfix(loss=f"{result.loss:.3f}")

    def on_record(self, record: dict) -> None:
        from tqdm import tqdm

        event, step = record.get("event"), record.get("step")
        if event == "skipped_nonfinite":
            tqdm.write(f"step {step}: non-finite loss or gradient norm; update skipped")
        elif event == "loss_spike":
            tqdm.write(f"step {step}: loss spike {record['loss']:.4g} (recent mean {record['mean']:.4g})")

    def on_loop_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        self.on_loop_end(trainer)


class MetricsFile(Callback):
    """Appends every record to ``metrics.jsonl`` in the run folder."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / "metrics.jsonl"

    def on_record(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")


class Wandb(Callback):
    """Weights & Biases logging; the run id is kept in the run folder (``wandb_run_id``), so a
    restarted or resumed run continues the same wandb run."""

    def __init__(self, cfg, out_dir: Path) -> None:
        import wandb

        from crate_lm.config import to_dict
        from crate_lm.fsutil import atomic_write_bytes

        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        if not id_file.is_file():
            atomic_write_bytes(id_file, run_id.encode())
        os.environ.setdefault("WANDB_DIR", str(out_dir))
        self.run = wandb.init(
            mode=cfg.logging.wandb,
            project=cfg.logging.project,
            name=cfg.logging.run_name or out_dir.name,
            id=run_id,
            config=to_dict(cfg),
            dir=str(out_dir),
            resume="allow",
        )

    def on_record(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.run.log(values, step=record.get("step"))

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        self.run.finish(exit_code=0 if status in ("done", "stopped") else 1)


class LossCurve(Callback):
    """``loss_curve.png`` from metrics.jsonl at the end of every fit (also a stopped one)."""

    def __init__(self, out_dir: Path) -> None:
        self.metrics, self.png = out_dir / "metrics.jsonl", out_dir / "loss_curve.png"

    def on_fit_end(self, trainer: Trainer, status: str) -> None:
        if self.metrics.is_file():
            plot_loss_curve(self.metrics, self.png)


def plot_loss_curve(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("loss") is not None:
            train.append((record["step"], record["loss"]))
        if "val_loss" in record:
            val.append((record["step"], record["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(".loss_curve.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out_png)
