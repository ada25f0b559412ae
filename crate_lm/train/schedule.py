"""The learning-rate schedule: a pure function of the optimizer step and the ``optim`` section.

Nothing about it is restored from a checkpoint: the trainer sets the rate before every
optimizer step from the run's current config, so an ``optim.*`` value changed on resume is
what the resumed steps use. The decay length is fixed when a run first starts (written into
its config.yaml) and kept on resume, so extending ``train.max_steps`` continues the same curve.
"""

from __future__ import annotations

import dataclasses
import math

from crate_lm.config import OptimConfig, RunConfig

WSD_DECAY_FRACTION = 0.2


def default_decay_steps(optim: OptimConfig, max_steps: int) -> int:
    """cosine: from the end of warmup to max_steps; wsd: the last 20% of max_steps."""
    if optim.schedule == "wsd":
        return max(1, round(WSD_DECAY_FRACTION * max_steps))
    return max(1, max_steps - optim.warmup_steps)


def resolve_schedule(cfg: RunConfig, saved: RunConfig | None = None) -> RunConfig:
    """``cfg`` with ``optim.decay_steps`` filled in: as given, else the resumed run's (same
    schedule kind), else the default for this run. The result is what config.yaml records."""
    if cfg.optim.decay_steps is not None:
        return cfg
    if saved is not None and saved.optim.schedule == cfg.optim.schedule:
        steps = saved.optim.decay_steps or default_decay_steps(saved.optim, saved.train.max_steps)
    else:
        steps = default_decay_steps(cfg.optim, cfg.train.max_steps)
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, decay_steps=steps))


def learning_rate(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The rate for optimizer step ``step`` (0-based: the number of steps already taken).

    warmup: lr (step + 1) / warmup_steps. Then, with D = decay_steps:
    cosine: min_lr + (lr - min_lr) (1 + cos(pi min(1, (step - warmup) / D))) / 2;
    wsd: lr until max_steps - D, then linear to min_lr over D steps; constant: lr.
    """
    lr, floor = optim.lr, optim.min_lr
    if step < optim.warmup_steps:
        return lr * (step + 1) / optim.warmup_steps
    decay = optim.decay_steps or default_decay_steps(optim, max_steps)
    if optim.schedule == "constant":
        return lr
    if optim.schedule == "wsd":
        progress = min(1.0, max(0.0, (step - (max_steps - decay)) / decay))
        return lr + (floor - lr) * progress
    progress = min(1.0, (step - optim.warmup_steps) / decay)
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer, lr: float) -> None:
    """Write ``lr`` into every param group (DeepSpeed's wrappers share their groups with the base optimizer)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
