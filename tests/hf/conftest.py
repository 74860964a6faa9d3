"""Helpers for the hf backend tests: run the real `primus` CLI, write tiny experiments, read metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CORPUS = EXAMPLES / "data" / "corpus.jsonl"
TOKENIZER = EXAMPLES / "data" / "tokenizer"
RUN_TIMEOUT = 300

# A tiny Llama (2 layers, hidden 64), a few steps, seq 64: each run takes seconds on one CPU thread.
EXPERIMENT = """
work_group: team
user_name: me
exp_name: {exp_name}
workspace: {workspace}
modules:
  pre_trainer:
    framework: hf
    config: pre_trainer.yaml
    model: {model}
    train: {{steps: {steps}, lr: 3.0e-3, warmup_steps: 2, lr_schedule: cosine, micro_batch_size: {micro},
             global_batch_size: {global_batch}, seq_length: 64, seed: 1234, log_interval: 1}}
    data: {data}
    checkpoint: {checkpoint}
    overrides: {overrides}
"""


def run_primus(*args: str, timeout: int = RUN_TIMEOUT, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run([sys.executable, "-m", "primus", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


def write_experiment(directory: Path, *, name: str = "exp", workspace: Path | None = None,
                     model: str = "llama3_tiny.yaml", steps: int = 12, micro: int = 4, global_batch: int = 4,
                     data: str = "{mock: true}", checkpoint: str = "{}", overrides: str = "{}") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(textwrap.dedent(EXPERIMENT).format(
        exp_name=name, workspace=workspace or directory / "ws", model=model, steps=steps, micro=micro,
        global_batch=global_batch, data=data, checkpoint=checkpoint, overrides=overrides).lstrip())
    return path


def corpus_data(**extra: Any) -> str:
    fields = {"path": str(CORPUS), "text_key": "text", "tokenizer": str(TOKENIZER), **extra}
    return json.dumps(fields)


def run_dir(workspace: Path, name: str = "exp") -> Path:
    return workspace / "team" / "me" / name


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_records(path: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(path) if "loss" in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr[-6000:]}"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return tmp_path / "ws"
