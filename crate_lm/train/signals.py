"""Stop signals: SIGTERM (preemption, ``scancel``, torchrun's shutdown), SIGUSR1 (SLURM's
warning before the time limit) and SIGINT (Ctrl-C) ask the run to stop; they never kill it.

The handler only records the request; the training loop agrees on it across ranks at the next
step and ends with a complete checkpoint. A second Ctrl-C interrupts at once. DataLoader
workers ignore these signals (``crate_lm.data.loader``), so a signal sent to the whole process
group, as launchers and SLURM send it, reaches only the trainer's handler.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """Installs the handlers; ``signum`` is the first stop signal received (0: none)."""

    def __init__(self) -> None:
        self.signum = 0

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.signum = self.signum or signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
