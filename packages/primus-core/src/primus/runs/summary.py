"""What a run directory says about its run, for `primus runs` and `primus compare` (issue 15).

Everything is read from files every backend writes the same way: config.yaml, metrics.jsonl (read
as one history: the newest attempt per step) and the per-rank status.json. No framework is
imported, so listing a workspace is fast and works for runs of any backend.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from primus.config.rules import get_path
from primus.runs.metrics import read_metrics
from primus.runs.resume import LOCK_FILE


@dataclass
class RunSummary:
    run_dir: str
    exp: str
    module: str
    backend: str
    model: str
    state: str
    step: int | None
    steps: int | None
    last_loss: float | None
    best_loss: float | None
    eval_loss: float | None
    tokens_per_s: float | None  # median over the history
    step_time_s: float | None  # median over the history
    started: str | None
    duration_s: float | None
    attempts: int
    world_size: int
    layout: str
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("history")
        return out


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _lock_held(run_dir: Path) -> bool:
    """Whether a live process holds the run directory (a 'running' status of a dead run is stale)."""
    import fcntl
    import os

    path = run_dir / LOCK_FILE
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases a lock we took
    return False


def _model_name(module: dict[str, Any]) -> str:
    model_file = module.get("model_file")
    if model_file:
        return Path(model_file).stem
    native = module.get("native") or {}
    if native.get("hf_path"):
        return Path(str(native["hf_path"])).name
    spec = module.get("model") or {}
    return f"{spec.get('family', '?')} (inline)" if spec else "-"


def _layout(module: dict[str, Any], world: int) -> str:
    parallel = (module.get("module") or {}).get("parallel") or {}
    parts = [f"{k[0].upper()}P{v}" for k, v in parallel.items() if isinstance(v, int) and v > 1 and k != "data"]
    if parallel.get("fsdp"):
        parts.append("FSDP")
    return f"world {world}" + (f" ({', '.join(parts)})" if parts else "")


def summarize(run_dir: Path) -> list[RunSummary]:
    """One summary per module of the run directory (most have one). Raises OSError/ValueError when
    the directory is not a run directory."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    if not isinstance(config, dict) or not isinstance(config.get("modules"), dict):
        raise ValueError(f"{run_dir} has no run config")
    history_all = read_metrics(run_dir / "metrics.jsonl")
    exp = ((config.get("experiment") or {}).get("exp_name")) or run_dir.name
    out = []
    for name, module in config["modules"].items():
        train = [r for r in history_all if "loss" in r and (r.get("module") in (None, name))]
        evals = [r for r in history_all if "eval_loss" in r]
        losses = [r["loss"] for r in train if isinstance(r.get("loss"), (int, float))]
        status_path = run_dir / "logs" / name / "rank-0" / "status.json"
        try:
            status = json.loads(status_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            status = {}
        state = status.get("state") or ("created" if not train else "unknown")
        if state in ("running", "starting") and not _lock_held(run_dir):
            state = "died"  # the status says running but nobody holds the run directory
        times = [t for t in (_parse_time(r.get("time")) for r in read_metrics(run_dir / "metrics.jsonl",
                                                                               all_attempts=True)) if t]
        native = module.get("native") or {}
        steps_key = module.get("steps_key")
        # a nested step key (TorchTitan's training.steps) walks the sections
        steps = get_path(native, steps_key) if steps_key else ((module.get("module") or {}).get("train") or {}).get("steps")
        world = int(module.get("world_size") or 1)
        tokens = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), (int, float))]
        step_times = [r["step_time_s"] for r in train if isinstance(r.get("step_time_s"), (int, float))]
        out.append(RunSummary(
            run_dir=str(run_dir), exp=exp, module=name, backend=module.get("framework", "?"),
            model=_model_name(module), state=state,
            step=train[-1]["step"] if train else status.get("step"),
            steps=steps if isinstance(steps, int) else None,
            last_loss=losses[-1] if losses else None, best_loss=min(losses) if losses else None,
            eval_loss=next((r["eval_loss"] for r in reversed(evals) if r.get("eval_loss") is not None), None),
            tokens_per_s=statistics.median(tokens) if tokens else None,
            step_time_s=statistics.median(step_times) if step_times else None,
            started=min(times).isoformat(timespec="seconds") if times else None,
            duration_s=(max(times) - min(times)).total_seconds() if len(times) > 1 else None,
            attempts=int(config.get("attempt") or 1), world_size=world, layout=_layout(module, world),
            history=train + evals,
        ))
    return out


def find_runs(workspace: Path) -> list[Path]:
    """Run directories under a workspace (`<workspace>/<group>/<user>/<exp>`), or the workspace
    itself when it is one; newest first by their config's modification time."""
    if (workspace / "config.yaml").is_file():
        return [workspace]
    found = [p.parent for p in workspace.glob("*/*/*/config.yaml") if p.is_file()]
    return sorted(found, key=lambda p: (p / "config.yaml").stat().st_mtime, reverse=True)
