"""Shared helpers for core tests: run the real `primus` CLI in a subprocess, write experiment files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import run_primus, write_yaml

__all__ = ["run_primus"]  # tests in this folder import it from here

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def write(tmp_path: Path):
    """write("name.yaml", text) -> Path, dedented, under tmp_path."""

    def _write(name: str, text: str) -> Path:
        return write_yaml(tmp_path / name, text)

    return _write


TOY_EXP = """
work_group: team
user_name: me
exp_name: toy
workspace: {workspace}
modules:
  pre_trainer:
    framework: toy
    config: pre_trainer.yaml
    model: llama3_tiny.yaml
    train: {{steps: 12, lr: 0.1}}
    overrides:
      batch: 16
"""


@pytest.fixture
def toy_exp(tmp_path: Path, write):
    workspace = tmp_path / "ws"
    return write("exp.yaml", TOY_EXP.format(workspace=workspace)), workspace
