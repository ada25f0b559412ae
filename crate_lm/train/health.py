"""Is training healthy? Non-finite steps and loss spikes, and when to call it diverged.

A non-finite step (loss or gradient norm) is skipped by the optimizer, so the weights stay as
they were. A loss spike is caught while the loss is still finite: a step whose loss lies more
than ``spike_sigmas`` standard deviations above the mean of the last ``spike_window`` healthy
steps (the deviation floored at 1% of the mean, so a flat curve does not flag noise). Spikes
are logged and kept out of the history, so a run that keeps spiking is compared with the curve
it left. ``max_bad_steps`` non-finite steps or ``max_spike_steps`` spikes in a row: diverged.

A checkpoint saved while neither streak is running (and whose weights are finite) is *sound*:
the one to go back to after a divergence.
"""

from __future__ import annotations

import math
from collections import deque

from crate_lm.config import TrainConfig


class HealthMonitor:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.spike_window)
        self.bad_steps = 0
        self.spike_steps = 0

    @property
    def min_history(self) -> int:
        return max(2, self.cfg.spike_window // 2)

    def observe(self, step: int, loss: float, applied: bool) -> dict | None:
        """Account for one optimizer step; returns an event record for a skipped step or a spike."""
        if not applied or not math.isfinite(loss):
            self.bad_steps += 1
            return {"step": step, "event": "skipped_nonfinite", "loss": loss}
        self.bad_steps = 0
        if self.cfg.spike_sigmas > 0 and len(self.losses) >= self.min_history:
            mean = sum(self.losses) / len(self.losses)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
            threshold = mean + self.cfg.spike_sigmas * max(std, 0.01 * abs(mean))
            if loss > threshold:
                self.spike_steps += 1
                return {"step": step, "event": "loss_spike", "loss": loss, "mean": mean, "threshold": threshold}
        self.spike_steps = 0
        self.losses.append(loss)
        return None

    @property
    def sound(self) -> bool:
        return self.bad_steps == 0 and self.spike_steps == 0

    def diverged(self) -> str | None:
        """Why the run should stop, or None."""
        if self.bad_steps >= self.cfg.max_bad_steps:
            return f"{self.bad_steps} non-finite steps in a row"
        if self.spike_steps >= self.cfg.max_spike_steps:
            return f"{self.spike_steps} loss spikes in a row (each > {self.cfg.spike_sigmas:g} sigma above the recent mean)"
        return None

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "bad_steps": self.bad_steps, "spike_steps": self.spike_steps}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.losses.extend(state.get("losses", [])[-self.cfg.spike_window :])
        self.bad_steps = state.get("bad_steps", 0)
        self.spike_steps = state.get("spike_steps", 0)
