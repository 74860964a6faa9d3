"""Helpers for the hf backend tests: run the real `primus` CLI, write tiny experiments, read metrics."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    CORPUS,
    EXAMPLES,
    ROOT,
    TOKENIZER,
    assert_ok,
    corpus_data,
    free_port,
    read_jsonl,
    run_primus,
)

# the hf tests import these from here
__all__ = ["CORPUS", "EXAMPLES", "ROOT", "TOKENIZER", "assert_ok", "corpus_data", "free_port", "read_jsonl",
           "run_primus"]

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


def write_experiment(directory: Path, *, name: str = "exp", workspace: Path | None = None,
                     model: str = "llama3_tiny.yaml", steps: int = 12, micro: int = 4, global_batch: int = 4,
                     data: str = "{mock: true}", checkpoint: str = "{}", overrides: str = "{}") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(textwrap.dedent(EXPERIMENT).format(
        exp_name=name, workspace=workspace or directory / "ws", model=model, steps=steps, micro=micro,
        global_batch=global_batch, data=data, checkpoint=checkpoint, overrides=overrides).lstrip())
    return path


def run_dir(workspace: Path, name: str = "exp") -> Path:
    return workspace / "team" / "me" / name


def train_records(path: Path) -> list[dict[str, Any]]:
    return [r for r in read_jsonl(path) if "loss" in r]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return tmp_path / "ws"
