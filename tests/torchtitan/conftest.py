"""Helpers for the torchtitan backend tests: run the real `primus` CLI on tiny experiments."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CORPUS = EXAMPLES / "data" / "corpus.jsonl"
TOKENIZER = EXAMPLES / "data" / "tokenizer"
RUN_TIMEOUT = 300

# Tiny Llama 3 (2 layers, hidden 64, core's llama3_tiny preset), seq 64: a run takes seconds.
EXPERIMENT = """
work_group: team
user_name: me
exp_name: {name}
workspace: {workspace}
modules:
  pre_trainer:
    framework: torchtitan
    config: pre_trainer.yaml
    model: llama3_tiny.yaml
    train: {{steps: {steps}, lr: 1.0e-2, warmup_steps: 2, micro_batch_size: 4, seq_length: 64, seed: 1234,
             log_interval: 1}}
    parallel: {parallel}
    data: {data}
    checkpoint: {checkpoint}
    overrides:
      activation_checkpoint: {{mode: none}}
      optimizer: {{implementation: foreach}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_primus(*args: str, timeout: int = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "primus", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def write_experiment(directory: Path, *, name: str = "exp", steps: int = 8, data: str = "{mock: true}",
                     checkpoint: str = "{}", parallel: str = "{}") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(textwrap.dedent(EXPERIMENT).format(
        name=name, workspace=directory / "ws", steps=steps, data=data, checkpoint=checkpoint,
        parallel=parallel).lstrip())
    return path


def line_of(path: Path, text: str) -> int:
    """The 1-based line of `path` holding `text` (where an error about it must point)."""
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def corpus_data() -> str:
    return json.dumps({"path": str(CORPUS), "text_key": "text", "tokenizer": str(TOKENIZER)})


def run_dir(experiment: Path, name: str = "exp") -> Path:
    return experiment.parent / "ws" / "team" / "me" / name


def read_metrics(experiment: Path, name: str = "exp") -> list[dict[str, Any]]:
    path = run_dir(experiment, name) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
