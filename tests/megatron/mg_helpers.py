"""Helpers for the megatron backend's tests: run `primus` as a user would and read what it wrote.

A plain module (not conftest) so tests import it by name; tests/megatron has no __init__.py because a
package named `megatron` would shadow megatron-core."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests import support
from tests.support import free_port

__all__ = ["free_port"]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "megatron" / "llama3_tiny-pretrain.yaml"
UPSTREAM_EXAMPLE = REPO / "examples" / "megatron" / "llama3.1_8B-pretrain.yaml"
PRIMUS = [sys.executable, "-m", "primus"]


def run_primus(*args: str, timeout: int = 240) -> subprocess.CompletedProcess[str]:
    return support.run_primus(*args, timeout=timeout, cwd=REPO)


def train(workspace: Path, *overrides: str, nproc: int = 1, exp: Path = EXAMPLE) -> subprocess.CompletedProcess[str]:
    launch = ["--nproc-per-node", str(nproc), "--master-port", str(free_port())] if nproc > 1 else []
    return run_primus("run", str(exp), f"workspace={workspace}", "train.steps=6", *overrides, *launch)


def run_dir(workspace: Path) -> Path:
    return workspace / "amd" / "root" / "megatron-llama3-tiny"


def train_losses(workspace: Path) -> dict[int, float]:
    lines = (run_dir(workspace) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_trained(result: subprocess.CompletedProcess[str], workspace: Path, steps: int = 6) -> dict[int, float]:
    assert result.returncode == 0, result.stderr[-3000:]
    losses = train_losses(workspace)
    assert sorted(losses) == list(range(1, steps + 1))
    assert losses[steps] < losses[1] - 0.2, losses  # it learns
    return losses
