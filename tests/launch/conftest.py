"""A real two-node Slurm cluster on this machine (tests/launch/slurm_cluster.sh), and helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types
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


# ------------------------------------------------------------------ a simulated GPU node (issue 18)

GFX_VERSION = {"gfx942": 90402, "gfx950": 90500, "gfx90a": 90010}
VISIBILITY_VARS = ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS",
                   "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "PRIMUS_PLATFORM", "PRIMUS_GFX_ARCH")


@pytest.fixture
def fake_node(tmp_path: Path, monkeypatch):
    """fake_node(kind="rocm"|"cuda"|"cpu", gpus=8, arch="gfx942"): point platform detection at a fake
    sysfs/procfs tree (KFD topology with one CPU node and `gpus` GPU nodes, or NVIDIA's
    /proc/driver/nvidia/gpus) and hide the vendor tools; the visibility variables of the test's own
    shell are removed (tests pass their own environ)."""
    from primus.platform import detect

    def make(kind: str = "rocm", gpus: int = 8, arch: str = "gfx942") -> Path:
        root = tmp_path / f"fake-{kind}-{gpus}-{arch}"
        kfd = root / "sys/class/kfd/kfd/topology/nodes"
        nvidia = root / "proc/driver/nvidia/gpus"
        dev_kfd = root / "dev/kfd"
        (kfd / "0").mkdir(parents=True, exist_ok=True)
        (kfd / "0" / "properties").write_text("cpu_cores_count 64\nsimd_count 0\ngfx_target_version 0\n")
        if kind == "rocm":
            dev_kfd.parent.mkdir(parents=True, exist_ok=True)
            dev_kfd.write_text("")
            for i in range(gpus):
                (kfd / str(i + 1)).mkdir(exist_ok=True)
                (kfd / str(i + 1) / "properties").write_text(
                    f"cpu_cores_count 0\nsimd_count 304\ngfx_target_version {GFX_VERSION[arch]}\n"
                    f"unique_id {1000 + i}\n")
        if kind == "cuda":
            for i in range(gpus):
                bus = nvidia / f"0000:{i + 1:02x}:00.0"
                bus.mkdir(parents=True, exist_ok=True)
                (bus / "information").write_text(f"Model: NVIDIA H100\nGPU UUID: GPU-{i:08d}-aaaa-bbbb-cccc-000000000000\n")
        monkeypatch.setattr(detect, "KFD_NODES", kfd)
        monkeypatch.setattr(detect, "DEV_KFD", dev_kfd)
        monkeypatch.setattr(detect, "NVIDIA_GPUS", nvidia)
        return root

    # no rocminfo, no nvidia-smi (detection's own view of PATH only)
    monkeypatch.setattr(detect, "shutil", types.SimpleNamespace(which=lambda name, *a, **k: None))
    for var in VISIBILITY_VARS:
        monkeypatch.delenv(var, raising=False)
    return make


def stub_tool(bin_dir: Path, name: str, body: str) -> Path:
    """An executable `name` in bin_dir running the Python `body` (sys and json imported; LOG is the
    call log bin_dir/NAME.calls.jsonl, one JSON argv per line)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = bin_dir / f"{name}.calls.jsonl"
    script = bin_dir / name
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\nLOG = {str(log)!r}\n"
                      "open(LOG, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n" + body + "\n")
    script.chmod(0o755)
    return script
