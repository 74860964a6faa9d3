"""The common metrics stream and the rank-0 progress line (ARCHITECTURE §4.7).

Every backend calls `MetricsWriter.train_step` once per logged step; `metrics.jsonl` then has the
same keys on every backend: step, loss, lr, grad_norm, tokens_per_s, step_time_s, time (UTC, ISO
8601) and attempt. Validation passes add lines with step, eval_loss, eval_ppl, time and attempt.

The file is only appended. Each `primus run` of a run directory is a new attempt (its number is
recorded in config.yaml); a resumed attempt repeats the steps after its checkpoint, so readers
(`read_metrics`, `primus runs`, `primus compare`) keep, for each step, the line of the newest
attempt that reached it, and drop an older attempt's lines from the step where a newer one began.
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

if TYPE_CHECKING:
    from primus.runs.flops import ThroughputModel

TRAIN_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "time", "attempt")
#: added to each training line when the module's model is a ModelSpec (primus.runs.flops)
THROUGHPUT_KEYS = ("tflops", "mfu")


def utc_now() -> str:
    from datetime import datetime

    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _num(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
    """Appends one JSON line per logged step (rank 0 only) and prints the progress line."""

    def __init__(self, path: Path, *, total_steps: int, rank: int = 0, module: str = "",
                 status_path: Path | None = None, attempt: int = 1, throughput: ThroughputModel | None = None) -> None:
        self.path = path
        self.throughput = throughput  # tokens/s -> tflops, mfu (primus.runs.flops); None: not reported
        self.attempt = attempt
        self.status_path = status_path
        self.last_step: int | None = None
        self._state = "starting"
        self._status_written = float("-inf")
        self.total_steps = total_steps
        self.rank = rank
        self.module = module
        self._started = time.monotonic()
        self._created = time.monotonic()
        self._first_step: int | None = None
        self._tokens_per_s: list[float] = []
        self.last_loss: float | None = None
        self.last_eval_loss: float | None = None

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def _append(self, record: dict[str, Any]) -> None:
        if not self.is_writer:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def set_status(self, state: str, **extra: Any) -> None:
        """Every rank keeps `logs/<module>/rank-<r>/status.json`: state, last step, pid, time.

        After a crash it says which rank stopped where.
        """
        import os

        from primus.runs.files import write_json

        changed = state != self._state
        self._state = state
        now = time.monotonic()
        # a state change is written at once; progress within a state at most every half second
        if self.status_path is None or (not changed and not extra and now - self._status_written < 0.5):
            return
        self._status_written = now
        write_json(self.status_path, {"rank": self.rank, "state": state, "step": self.last_step,
                                      "pid": os.getpid(), "time": time.time(), **extra}, durable=False)

    def train_step(self, step: int, *, loss: float, lr: float | None, grad_norm: float | None,
                   tokens: int, step_time_s: float, **extra: Any) -> dict[str, Any]:
        """Record one logged step. `tokens` is what the whole job processed in that step."""
        self.last_step = int(step)
        if self.status_path is not None:
            self.set_status(self._state)
        step_time = max(float(step_time_s), 1e-9)
        record = {
            "step": int(step),
            "loss": _num(loss),
            "lr": _num(lr),
            "grad_norm": _num(grad_norm),
            "tokens_per_s": round(tokens / step_time, 3),
            "step_time_s": round(step_time, 6),
            "time": utc_now(),
            "attempt": self.attempt,
            **{k: _num(v) if isinstance(v, (int, float)) else v for k, v in extra.items()},
        }
        if self.throughput is not None:  # core's one formula wins over a framework's own figure
            record.update(self.throughput.figures(record["tokens_per_s"]))
        self._append(record)
        self.last_loss = record["loss"]
        self._tokens_per_s.append(record["tokens_per_s"])
        if self.is_writer:
            if self._first_step is None:
                self._first_step, self._started = step, time.monotonic() - step_time
            done = step - self._first_step + 1
            elapsed = time.monotonic() - self._started
            eta = elapsed / max(done, 1) * (self.total_steps - step)
            parts = [f"step {step}/{self.total_steps}", f"loss {record['loss']:.4f}" if record["loss"] is not None
                     else "loss nan"]
            if record["lr"] is not None:
                parts.append(f"lr {record['lr']:.2e}")
            if record["grad_norm"] is not None:
                parts.append(f"grad {record['grad_norm']:.3f}")
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
            if record.get("mfu") is not None:
                parts.append(f"{record['tflops']:,.1f} TFLOP/s, MFU {100 * record['mfu']:.1f}%")
            parts.append(f"ETA {_eta(eta)}")
            logger.info(" | ".join(parts))
        return record

    def eval_step(self, step: int, *, loss: float) -> dict[str, Any]:
        value = _num(loss)
        ppl = math.exp(min(value, 50.0)) if value is not None else None
        record = {"step": int(step), "eval_loss": value, "eval_ppl": ppl, "time": utc_now(), "attempt": self.attempt}
        self.last_eval_loss = value
        self._append(record)
        if self.is_writer and value is not None:
            logger.info(f"eval at step {step} | loss {value:.4f} | ppl {ppl:.2f}")
        return record


    def summary_line(self, *, checkpoints: Path, run_dir: Path) -> str:
        """The one line a finished run ends with: steps, losses, speed, wall time, where things are."""
        import statistics

        parts = [f"{self.module or 'run'} finished: step {self.last_step}/{self.total_steps}"]
        if self.last_loss is not None:
            parts.append(f"final loss {self.last_loss:.4f}")
        if self.last_eval_loss is not None:
            parts.append(f"eval loss {self.last_eval_loss:.4f}")
        if self._tokens_per_s:
            parts.append(f"{statistics.median(self._tokens_per_s):,.0f} tok/s (median)")
        parts.append(f"wall {_eta(time.monotonic() - self._created)}")
        has_checkpoints = checkpoints.is_dir() and any(not p.name.startswith(".") for p in checkpoints.iterdir())
        parts.append(f"checkpoints {checkpoints}" if has_checkpoints else "no checkpoint saved")
        exports = run_dir / "hf"
        if exports.is_dir():
            parts.append(f"export {exports}")
        parts.append(f"run {run_dir}")
        return " | ".join(parts)


def read_metrics(path: Path, *, all_attempts: bool = False) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl as one consistent history (see the module docstring).

    Training lines and eval lines are kept apart (a step can have both). With `all_attempts`, every
    line in file order. A line that is not JSON (a write cut by a crash) is skipped.
    """
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    if all_attempts:
        return records
    # where each attempt began: a line of attempt a at step s is superseded when a later attempt
    # began at or before s (it retrained that step from a checkpoint)
    first_step: dict[int, int] = {}
    for r in records:
        a = int(r.get("attempt") or 1)
        first_step[a] = min(first_step.get(a, r["step"]), r["step"])
    kept: dict[tuple[int, str], dict[str, Any]] = {}
    for r in records:
        a = int(r.get("attempt") or 1)
        if any(b > a and start <= r["step"] for b, start in first_step.items()):
            continue
        kind = "eval" if "eval_loss" in r else "train"
        kept[(r["step"], kind)] = r  # within one attempt, the later line wins
    return [kept[k] for k in sorted(kept)]
