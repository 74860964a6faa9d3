"""The run directory `<workspace>/<work_group>/<user_name>/<exp_name>/` (ARCHITECTURE §4.5).

It holds `config.yaml` (the resolved experiment, which workers read back), `env.json` (what
Primus set), `versions.json`, `logs/`, `checkpoints/` and `metrics.jsonl`. It is created only
after the whole config validated, so bad input leaves nothing behind.
"""

from __future__ import annotations

import platform as _platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from primus import __version__
from primus.config.resolve import ResolvedExperiment, ResolvedModule
from primus.runs.files import write_json, write_yaml

CONFIG_FILE = "config.yaml"


def versions(frameworks: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": _platform.python_version(), "primus-core": __version__}
    for dist in ["torch", "jax", *frameworks]:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            if dist in frameworks:
                out[dist] = None
    return out


def create_run_dir(resolved: ResolvedExperiment, env_set: dict[str, str], platform: str, *,
                   attempt: int = 1) -> Path:
    """Write what this attempt runs: config.yaml (with its attempt number), env.json, versions.json,
    and shape.json (what the checkpoints depend on, checked by the next attempt)."""
    from primus.runs.resume import SHAPE_FILE, run_shape

    run_dir = resolved.run_dir.resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    e = resolved.experiment
    write_yaml(run_dir / CONFIG_FILE, {
        "attempt": attempt,
        "experiment": e.model_dump(mode="json", exclude={"modules"}),
        "experiment_file": str(Path(resolved.file).resolve()),
        "argv": sys.argv,
        "platform": platform,
        "modules": {name: m.to_dict() for name, m in resolved.modules.items()},
    })
    write_json(run_dir / SHAPE_FILE, {name: run_shape(m) for name, m in resolved.modules.items()})
    write_json(run_dir / "env.json", env_set)
    write_json(run_dir / "versions.json",
               versions([b.spec.framework for b in resolved.backends.values()]))
    return run_dir


def read_module(run_dir: Path, module: str) -> tuple[ResolvedModule, dict[str, Any]]:
    data = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    return ResolvedModule.from_dict(data["modules"][module]), data
