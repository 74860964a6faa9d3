"""Preemption: SIGTERM asks training to stop at the next step boundary (ARCHITECTURE §4, issue 7).

The worker installs the handler; adapters poll `RunContext.stop_requested` between steps, write a
checkpoint and return. A second SIGTERM (Slurm and torchrun may both send one) changes nothing:
the checkpoint already being written is not interrupted.
"""

from __future__ import annotations

import signal
import time

from loguru import logger

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a scheduler expects from a job stopped by SIGTERM


class StopFlag:
    def __init__(self) -> None:
        self.requested_at: float | None = None
        self.signals = 0

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _handle(self, signum: int, frame: object) -> None:
        self.signals += 1
        if self.requested_at is None:
            self.requested_at = time.time()
            logger.warning(f"{signal.Signals(signum).name} received: stopping at the next step boundary "
                           "after a checkpoint")
        else:
            logger.warning(f"{signal.Signals(signum).name} received again: already stopping")

    def request(self, why: str) -> None:
        """Stop without a signal of our own: e.g. another rank was preempted and every rank stopped
        at the same step boundary, so this one reports `preempted` too."""
        if self.requested_at is None:
            self.requested_at = time.time()
            logger.warning(f"stopping: {why}")

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
