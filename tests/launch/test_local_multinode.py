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
