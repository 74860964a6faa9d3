"""Graceful stops: SIGTERM (preemption) and Ctrl-C (SIGINT) ask training to stop at the next step
boundary with a checkpoint (ARCHITECTURE §4; issues 7 and 15).

The worker installs the handlers; adapters poll `RunContext.stop_requested` between steps, write a
checkpoint and return; the worker exits 128 + the signal number (143 for SIGTERM, 130 for SIGINT).
A second SIGTERM (Slurm and torchrun may both send one) changes nothing: the checkpoint being
written is not interrupted. A second Ctrl-C is a person who wants out now: it raises
KeyboardInterrupt at once.

Nothing is logged inside a handler: a signal can land while the logger holds its lock (loguru then
reports "Could not acquire internal lock"), so the handler only records; the message is logged by
the first poll of `requested`, from ordinary code.
"""

from __future__ import annotations

import signal
import time

from loguru import logger

EXIT_PREEMPTED = 128 + signal.SIGTERM  # 143: what a scheduler expects from a job stopped by SIGTERM
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130: what a shell expects after Ctrl-C


class StopFlag:
    def __init__(self) -> None:
        self.requested_at: float | None = None
        self.signum: int | None = None  # the signal that asked first; None for a peer's request
        self.signals = 0
        self._pending_notes: list[str] = []

    @property
    def requested(self) -> bool:
        self._flush_notes()
        return self.requested_at is not None

    @property
    def exit_code(self) -> int:
        """128 + the signal that stopped the run (SIGTERM when a peer rank stopped this one)."""
        return 128 + (self.signum or signal.SIGTERM)

    @property
    def reason(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "SIGTERM"

    def _flush_notes(self) -> None:
        while self._pending_notes:
            logger.warning(self._pending_notes.pop(0))

    def _handle(self, signum: int, frame: object) -> None:
        # signal context: record only (no logging, no I/O); `requested` logs on the next poll
        self.signals += 1
        name = signal.Signals(signum).name
        if self.requested_at is None:
            self.requested_at, self.signum = time.time(), signum
            again = " (Ctrl-C again stops at once, without a checkpoint)" if signum == signal.SIGINT else ""
            self._pending_notes.append(f"{name} received: stopping at the next step boundary after a "
                                       f"checkpoint{again}")
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            self._pending_notes.append(f"{name} received again: already stopping")

    def request(self, why: str) -> None:
        """Stop without a signal of our own: e.g. another rank was preempted and every rank stopped
        at the same step boundary, so this one reports `preempted` too."""
        if self.requested_at is None:
            self.requested_at = time.time()
            logger.warning(f"stopping: {why}")

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)
