"""Helpers for the maxtext backend tests: run the real `primus` CLI on tiny experiments, read metrics."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from tests.support import primus_env

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CORPUS = EXAMPLES / "data" / "corpus.jsonl"
TOKENIZER = EXAMPLES / "data" / "tokenizer"
RUN_TIMEOUT = 420

# A tiny Llama 3 (2 layers, hidden 64), seq 64, a few steps. Most of a run's time is importing JAX and
# MaxText and compiling the step, so tests keep the number of runs small rather than the steps.
EXPERIMENT = """
work_group: team
user_name: me
exp_name: {exp_name}
workspace: {workspace}
modules:
  pre_trainer:
    framework: maxtext
    model: llama3_tiny.yaml
    train: {train}
    parallel: {parallel}
    data: {data}
    checkpoint: {checkpoint}
    overrides: {overrides}
"""

DEFAULT_OVERRIDES = {"attention": "dot_product"}
DEFAULT_TRAIN = {"lr": 3.0e-3, "micro_batch_size": 4, "seq_length": 64, "seed": 1234, "log_interval": 1}
# the experiment's line numbers, for tests of located errors
TRAIN_LINE, PARALLEL_LINE, DATA_LINE, OVERRIDES_LINE = 9, 10, 11, 13


def run_primus(*args: str, timeout: int = RUN_TIMEOUT, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "primus", *args], capture_output=True, text=True,
                          timeout=timeout, env=primus_env({"JAX_PLATFORMS": "cpu", **(env or {})}), cwd=cwd)


def write_experiment(directory: Path, *, name: str = "exp", workspace: Path | None = None, steps: int = 4,
                     parallel: str = "{}", data: str = "{mock: true}", checkpoint: str = "{}",
                     overrides: dict[str, Any] | None = None, train: dict[str, Any] | None = None) -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(textwrap.dedent(EXPERIMENT).format(
        exp_name=name, workspace=workspace or directory / "ws", parallel=parallel, data=data,
        train=json.dumps({"steps": steps, **DEFAULT_TRAIN, **(train or {})}),
        checkpoint=checkpoint, overrides=json.dumps({**DEFAULT_OVERRIDES, **(overrides or {})})).lstrip())
    return path


def run_dir(workspace: Path, name: str = "exp") -> Path:
    return workspace / "team" / "me" / name


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    path = directory / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def losses(directory: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(directory) if "loss" in m}


def assert_trained(result: subprocess.CompletedProcess[str], directory: Path, steps: int) -> dict[int, float]:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    seen = losses(directory)
    assert sorted(seen) == list(range(1, steps + 1)), seen
    assert seen[steps] < seen[1], f"loss did not fall: {seen}"
    return seen


def corpus_data(**extra: Any) -> str:
    return json.dumps({"path": str(CORPUS), "text_key": "text", "tokenizer": str(TOKENIZER), **extra})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
