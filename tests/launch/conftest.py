"""A real two-node Slurm cluster on this machine (tests/launch/slurm_cluster.sh), and helpers."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import TEAM, USER, free_port, run_primus

__all__ = ["free_port"]  # tests in this folder import it from here

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
HF_EXAMPLE = ROOT / "examples" / "hf" / "llama3_tiny.yaml"
# named, so that its run directory is WORKSPACE/team/me/toy-slurm whatever the defaults
TOY_EXP = f"work_group: {TEAM}\nuser_name: {USER}\n" + """
exp_name: toy-slurm
workspace: {ws}
modules:
  pre_trainer:
    framework: toy
    train: {{steps: 30, lr: 0.1}}
    checkpoint: {{interval: 1000, resume: auto}}
"""


def primus(*args: str, env: dict[str, str] | None = None, timeout: int = 600, cwd: Path | None = None):
    return run_primus(*args, env=env, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def slurm():
    if os.geteuid() != 0:
        pytest.fail("the Slurm tests install and start Slurm and need root (CI runs as root)")
    subprocess.run(["bash", str(HERE / "slurm_cluster.sh"), "start"], check=True, timeout=600)
    yield
    subprocess.run(["bash", str(HERE / "slurm_cluster.sh"), "stop"], timeout=60)


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    for part in out.split():
        if part.startswith("JobState="):
            return part.split("=", 1)[1]
    return "UNKNOWN"


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")
