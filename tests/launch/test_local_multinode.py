"""Two "nodes" on this machine: two `primus run --nnodes 2 --node-rank 0/1` train one job together."""

import os
import subprocess
import sys
from pathlib import Path

from primus.runs.metrics import read_metrics

from .conftest import HF_EXAMPLE, free_port


def test_two_local_nodes_train_one_job(tmp_path: Path):
    port = free_port()
    ws = tmp_path / "ws"
    common = [sys.executable, "-m", "primus", "run", str(HF_EXAMPLE), "--nnodes", "2", "--nproc-per-node", "1",
              "--master-addr", "127.0.0.1", "--master-port", str(port), f"workspace={ws}", "train.steps=5",
              "train.log_interval=1", "train.eval_interval=1000", "train.micro_batch_size=2",
              "train.global_batch_size=4", "checkpoint.interval=1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([*common, "--node-rank", str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    rows = [r for r in read_metrics(ws / "amd/root/hf-llama3-tiny/metrics.jsonl") if "loss" in r]
    assert len(rows) == 5 and rows[-1]["loss"] < rows[0]["loss"]


def test_preflight_names_failing_nodes(tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "primus", "preflight", str(HF_EXAMPLE), "--nproc-per-node", "2",
                        "--master-port", str(free_port()), f"workspace={tmp_path}/ws", "train.global_batch_size=16"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PRIMUS_PREFLIGHT_MIN_FREE_GB": "1000000"})
    assert r.returncode != 0
    import json
    import socket

    report = json.loads((tmp_path / "ws/amd/root/hf-llama3-tiny/preflight.json").read_text())
    assert report["world_size"] == 2 and all(rank["collective"]["ok"] for rank in report["ranks"])
    assert "GB free in the workspace" in report["failing_nodes"][socket.gethostname()][0]


def test_max_restarts_resume_from_the_newest_checkpoint(tmp_path: Path):
    """A worker that fails once is restarted by torchrun and continues from the newest checkpoint."""
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"exp_name: restart\nworkspace: {tmp_path}/ws\nmodules:\n  pre_trainer:\n"
                   "    framework: toy\n    train: {steps: 12, lr: 0.1}\n    checkpoint: {interval: 3, resume: auto}\n")
    r = subprocess.run([sys.executable, "-m", "primus", "run", str(exp), "--nproc-per-node", "2", "--master-port",
                        str(free_port()), "--max-restarts", "1", "fail_once_at_step=7", "step_sleep=0.2"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    import re

    resumed = [int(m) for m in re.findall(r"toy: resumed from step-(\d+)\.json", r.stdout + r.stderr)]
    # the newest checkpoint: step 6 (interval) or later, written when torchrun stopped the surviving
    # rank with SIGTERM after the other failed at step 7
    assert resumed and 6 <= resumed[0] < 12
    steps = [row["step"] for row in read_metrics(tmp_path / "ws/amd/root/restart/metrics.jsonl")]
    # the restarted attempt logged every step from the checkpoint to the end
    assert steps[-(12 - resumed[0]):] == list(range(resumed[0] + 1, 13))
