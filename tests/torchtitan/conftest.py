"""Helpers for the torchtitan backend tests: run the real `primus` CLI on tiny experiments."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from tests.support import (
    CORPUS,
    EXAMPLES,
    ROOT,
    TOKENIZER,
    assert_ok,
    corpus_data,
    experiment_template,
    free_port,
    read_jsonl,
    run_primus,
)

# the torchtitan tests import these from here
__all__ = ["CORPUS", "EXAMPLES", "ROOT", "TOKENIZER", "assert_ok", "corpus_data", "free_port", "run_primus"]

# Tiny Llama 3 (2 layers, hidden 64, core's llama3_tiny preset), seq 64: a run takes seconds.
EXPERIMENT = experiment_template("torchtitan", """\
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
""")


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


def run_dir(experiment: Path, name: str = "exp") -> Path:
    return experiment.parent / "ws" / "team" / "me" / name


def read_metrics(experiment: Path, name: str = "exp") -> list[dict[str, Any]]:
    return read_jsonl(run_dir(experiment, name) / "metrics.jsonl")


