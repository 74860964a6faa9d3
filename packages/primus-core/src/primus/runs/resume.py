"""What a run directory already holds, checked before a new attempt touches it (issue 15).

A run directory remembers what shaped its checkpoints (`shape.json`: the backend, the model, the
tokenizer and the corpus). A new attempt that would resume from those checkpoints with a different
model or tokenizer is refused before anything loads (exit 2, config.yaml untouched), naming what
changed and the two ways out. `checkpoint.resume: never` beside existing checkpoints is refused
too (their rotation would delete the new checkpoints, and a later `resume: auto` would pick up the
old ones). A run that already finished says so and exits 0 without loading a framework. A changed
step count is allowed and announced.

A lock (`.primus.lock`, flock) keeps a second run out of a directory in use; it is held by the
process that launches (and kept across the exec into torchrun), so it lasts as long as the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from primus.config.yamlfile import flatten
from primus.errors import ConfigError

if TYPE_CHECKING:
    from primus.config.resolve import ResolvedModule

SHAPE_FILE = "shape.json"
LOCK_FILE = ".primus.lock"
LEDGER_FILE = "checkpoints.json"  # which attempt wrote each checkpoint (record_checkpoints)
_HASH_LIMIT = 16 * 1024 * 1024  # tokenizer files are a few MB; hash at most this much of one


def _file_digest(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            return hashlib.sha256(f.read(_HASH_LIMIT)).hexdigest()[:16]
    except OSError:
        return None


def run_shape(m: ResolvedModule) -> dict[str, Any]:
    """What a module's checkpoints depend on, independent of the parallel layout."""
    if m.model is not None:
        spec = flatten(m.model.model_dump(exclude_none=True))
        model: dict[str, Any] = {"model." + ".".join(path): value for path, value in spec.items()}
    else:  # a native model file or inline keys: the values the model layer set
        model = {f"model.{'.'.join(p)}": v for p, v in flatten(m.native).items()
                 if (src := m.sources.get(p)) is not None and src.layer.startswith("model")}
    data = m.module.data
    tokenizer = None
    if data.tokenizer:
        tokenizer = _file_digest(Path(data.tokenizer) / "tokenizer.json") or str(data.tokenizer)
    return {"backend": m.framework, **model, "tokenizer": tokenizer,
            "data": None if data.mock or not data.path else str(data.path)}


def _checkpoints_present(directory: Path) -> bool:
    try:
        return any(not p.name.startswith(".") for p in directory.iterdir())
    except OSError:
        return False


def _resume_wanted(m: ResolvedModule) -> bool:
    resume = m.module.checkpoint.resume
    return resume not in ("never", False)


@dataclass
class ResumeCheck:
    notices: list[str]
    complete: str | None = None  # a message when the run already finished: nothing to do


def check_resume(m: ResolvedModule, run_dir: Path) -> ResumeCheck:
    """Refuse an attempt that would resume foreign checkpoints; say what a resume will change."""
    checkpoints = checkpoint_dir(m, run_dir)
    notices: list[str] = []
    if not _checkpoints_present(checkpoints):
        return ResumeCheck(notices)
    where = f"modules.{m.name}"
    ways_out = "give the run a new exp_name=..., or set checkpoint.resume=never and delete the old checkpoints"
    if not _resume_wanted(m):
        raise ConfigError(f"checkpoint.resume is never, but {checkpoints} holds checkpoints of an earlier attempt "
                          "(they would be rotated against the new ones and resumed by a later run)",
                          key=f"{where}.checkpoint.resume", fix="give the run a new exp_name=..., or delete them")
    old_shape = (_read_json(run_dir / SHAPE_FILE) or {}).get(m.name)
    if isinstance(old_shape, dict):
        new_shape = run_shape(m)
        changed = [k for k in sorted(set(old_shape) | set(new_shape)) if old_shape.get(k) != new_shape.get(k)]
        if changed:
            shown = ", ".join(f"{k} {old_shape.get(k)!r} -> {new_shape.get(k)!r}" for k in changed[:4])
            more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
            raise ConfigError(f"the checkpoints in {checkpoints} were made with another configuration ({shown}{more}); "
                              "resuming would load them into a different model", key=where, fix=ways_out)
    old_config = _read_yaml(run_dir / "config.yaml")
    old_module = ((old_config or {}).get("modules") or {}).get(m.name) or {}
    old_steps = _steps_of(old_module)
    new_steps = m.total_steps
    status = _read_json(run_dir / "logs" / m.name / "rank-0" / "status.json") or {}
    if status.get("state") == "done" and old_steps == new_steps and status.get("step") == new_steps:
        return ResumeCheck(notices, complete=f"{m.name} already finished all {new_steps} steps in {run_dir}; "
                                             "raise train.steps to train further, or give exp_name=... for a new run")
    if old_steps and new_steps and old_steps != new_steps:
        step = newest_checkpoint_step(checkpoints)
        start = f"from step {step + 1} (the newest checkpoint is step {step})" if step is not None else \
            "from the step this run resumes at"
        notices.append(f"train.steps changed from {old_steps} to {new_steps}: the learning-rate schedule is "
                       f"recomputed for {new_steps} steps and applies {start}")
    return ResumeCheck(notices)


def checkpoint_steps(directory: Path) -> list[int]:
    """The steps of a checkpoint folder's entries, ascending, read off their names as every backend
    writes them (`step-40`, `iter_0000040`, `40`); partial saves (dot-files) are not counted."""
    import re

    steps = set()
    try:
        entries = list(directory.iterdir())
    except OSError:
        return []
    for entry in entries:
        match = re.fullmatch(r"(?:step[-_]?|iter_?)?(\d+)(?:\.json)?", entry.name)
        if match and not entry.name.startswith("."):
            steps.add(int(match.group(1)))
    return sorted(steps)


def newest_checkpoint_step(directory: Path) -> int | None:
    """The highest step among a checkpoint folder's entries (`checkpoint_steps`)."""
    steps = checkpoint_steps(directory)
    return steps[-1] if steps else None


def checkpoint_dir(m: ResolvedModule, run_dir: Path) -> Path:
    return Path(m.module.checkpoint.dir) if m.module.checkpoint.dir else run_dir / "checkpoints"


def record_checkpoints(run_dir: Path, module: str, checkpoints: Path, attempt: int) -> dict[int, int]:
    """Record which attempt wrote each checkpoint on disk, in `<run dir>/checkpoints.json`.

    Every checkpoint not yet in the ledger is this attempt's; steps no longer on disk (rotated,
    moved aside as damaged) leave it. Called by global rank 0 when an attempt ends, and before the
    next attempt starts, so checkpoints of an attempt that crashed are still attributed to it.
    Checkpoints never need the ledger to load: it is for people and tools (`primus runs`).
    Returns {step: attempt}."""
    from primus.runs.files import write_atomic

    path = run_dir / LEDGER_FILE
    ledger = _read_json(path)
    ledger = ledger if isinstance(ledger, dict) else {}
    entry = ledger.get(module) if isinstance(ledger.get(module), dict) else {}
    known = entry.get("steps") if isinstance(entry.get("steps"), dict) else {}
    on_disk = checkpoint_steps(checkpoints)
    steps = {step: known.get(str(step)) if isinstance(known.get(str(step)), int) else attempt for step in on_disk}
    if steps or known:
        ledger[module] = {"dir": str(checkpoints), "steps": {str(k): v for k, v in steps.items()}}
        write_atomic(path, json.dumps(ledger, indent=1, sort_keys=True) + "\n")
    return steps


def _steps_of(module: dict[str, Any]) -> int | None:
    key = module.get("steps_key")
    native = module.get("native") or {}
    value = native.get(key) if key else None
    if value is None:
        value = ((module.get("module") or {}).get("train") or {}).get("steps")
    return value if isinstance(value, int) else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def refuse_damaged(path: Path, reason: str, *, older: Path | None, on_damaged: str | None) -> None:
    """The decision every backend makes about a damaged newest checkpoint (`checkpoint.on_damaged`):
    raise unless the run asked for `previous` and an older checkpoint exists; the caller then moves
    the damaged one aside and resumes from `older`."""
    if on_damaged != "previous":
        raise ConfigError(f"checkpoint {path} cannot be loaded: {reason}",
                          fix="set checkpoint.on_damaged=previous to resume from the checkpoint before it, or delete it")
    if older is None:
        raise ConfigError(f"checkpoint {path} cannot be loaded: {reason}; there is no older checkpoint to resume "
                          "from", fix="delete it to train from the start")


def next_attempt(run_dir: Path) -> int:
    """The number of the attempt about to start (1 for a new run directory)."""
    old = _read_yaml(run_dir / "config.yaml")
    previous = old.get("attempt") if isinstance(old, dict) else None
    return (previous if isinstance(previous, int) and previous > 0 else 0) + 1


# --------------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive flock on `<run dir>/.primus.lock`, naming its holder for whoever is refused."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
            os.close(fd)
            try:
                who = json.loads(holder)
                shown = f"pid {who.get('pid')} on {who.get('host')} since {who.get('started')}"
            except ValueError:
                shown = "another run"
            raise ConfigError(f"run directory {self.path.parent} is in use by {shown}", key="exp_name",
                              fix="wait for that run to end, or give this one another exp_name=...") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                 "argv": sys.argv}).encode())
        # kept open across the exec into torchrun: the lock lasts as long as the job
        os.set_inheritable(fd, True)
        self.fd = fd
