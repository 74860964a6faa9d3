"""Rendezvous across nodes (issue 15): nodes with node-local workspaces meet; a node that never
comes ends the job within PRIMUS_RDZV_TIMEOUT with one line, not a silent wait and a traceback."""

import subprocess
import sys
from pathlib import Path

from primus.runs.metrics import read_metrics
from tests.support import primus_env

from .conftest import HF_EXAMPLE, free_port

SMALL = ["train.steps=3", "train.log_interval=1", "train.eval_interval=1000", "train.micro_batch_size=2",
         "train.global_batch_size=4", "checkpoint.interval=1000"]


def _node(rank: int, port: int, workspace: Path, *extra: str, env: dict[str, str] | None = None):
    return subprocess.Popen([sys.executable, "-m", "primus", "run", str(HF_EXAMPLE), "--nnodes", "2",
                             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                             "--node-rank", str(rank), f"workspace={workspace}", *SMALL, *extra],
                            env=primus_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_nodes_with_node_local_workspaces_train_one_job(tmp_path: Path):
    port = free_port()
    nodes = [_node(r, port, tmp_path / f"node{r}-local") for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    rows = read_metrics(tmp_path / "node0-local/amd/root/hf-llama3-tiny/metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]


def test_a_node_that_never_comes_ends_the_job_with_one_line(tmp_path: Path):
    alone = _node(0, free_port(), tmp_path / "ws", env={"PRIMUS_RDZV_TIMEOUT": "5"})
    _, err = alone.communicate(timeout=180)
    assert alone.returncode == 1, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("primus: error:")]
    assert len(lines) == 1 and "did not all join the rendezvous" in lines[0] and "join_timeout=5" in lines[0]
