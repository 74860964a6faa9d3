"""Shared helpers for core tests: run the real `primus` CLI in a subprocess, write experiment files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def run_primus(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: int = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "primus", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def write(tmp_path: Path):
    """write("name.yaml", text) -> Path, dedented, under tmp_path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
        return path

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
