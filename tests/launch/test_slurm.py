"""Real Slurm jobs on a two-node cluster on this machine: submit, wait, two nodes, preemption."""

import json
import re
import signal
import subprocess
from pathlib import Path

from primus.runs.metrics import read_metrics

from .conftest import HF_EXAMPLE, TOY_EXP, free_port, job_state, primus, wait_for


def _submitted_job(stdout: str) -> str:
    m = re.search(r"submitted Slurm job (\d+)", stdout)
    assert m, stdout
    return m.group(1)


def test_toy_job_runs_and_matches_its_dry_run(slurm, tmp_path: Path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(TOY_EXP.format(ws=tmp_path / "ws"))
    dry = primus("run", str(exp), "--launcher", "slurm", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    r = primus("run", str(exp), "--launcher", "slurm", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = tmp_path / "ws/amd/root/toy-slurm"
    script = (run_dir / "slurm/job.sbatch").read_text()
    shown = "\n".join(line[4:] for line in dry.stdout.splitlines() if line.startswith("    "))
    assert script.strip() == shown.strip()  # --dry-run printed exactly what was submitted
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert len(rows) == 30 and rows[-1]["loss"] < rows[0]["loss"]
    assert list((run_dir / "slurm").glob("slurm-*.out"))


def test_failing_job_returns_its_exit_code(slurm, tmp_path: Path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(TOY_EXP.format(ws=tmp_path / "ws"))
    r = primus("run", str(exp), "--launcher", "slurm", "--wait", "fail_at_step=3")
    assert r.returncode == 1, r.stdout + r.stderr


def test_scancel_sigterm_checkpoints_and_resume_continues(slurm, tmp_path: Path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(TOY_EXP.format(ws=tmp_path / "ws"))
    run_dir = tmp_path / "ws/amd/root/toy-slurm"
    r = primus("run", str(exp), "--launcher", "slurm", "train.steps=3000", "step_sleep=0.02")
    assert r.returncode == 0, r.stderr
    job = _submitted_job(r.stdout)
    wait_for(lambda: len(read_metrics(run_dir / "metrics.jsonl")) >= 5, 120, "the job to train")
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)  # a second SIGTERM changes nothing
    wait_for(lambda: job_state(job) not in ("RUNNING", "PENDING", "COMPLETING"), 120, "the job to end")
    status = json.loads((run_dir / "logs/pre_trainer/rank-0/status.json").read_text())
    assert status["state"] == "preempted"
    ckpt = json.loads(next((run_dir / "checkpoints").glob("step-*.json")).read_text())
    assert ckpt["step"] == status["step"]
    # requeue by hand: resume: auto continues from the checkpoint with the same losses
    r = primus("run", str(exp), "--launcher", "slurm", "--wait", "train.steps=40", "step_sleep=0")
    if ckpt["step"] < 40:
        assert r.returncode == 0, r.stdout + r.stderr
        resumed = read_metrics(run_dir / "metrics.jsonl")
        full = tmp_path / "full.yaml"
        full.write_text(TOY_EXP.format(ws=tmp_path / "full"))
        assert primus("run", str(full), "train.steps=40").returncode == 0
        straight = read_metrics(tmp_path / "full/amd/root/toy-slurm/metrics.jsonl")
        assert resumed[-1]["step"] == 40 and resumed[-1]["loss"] == straight[-1]["loss"]


def _hf_args(ws: Path) -> list[str]:
    return [f"workspace={ws}", "train.steps=6", "train.log_interval=1", "train.eval_interval=1000",
            "train.micro_batch_size=2", "train.global_batch_size=4", "checkpoint.interval=1000"]


def test_hf_two_tasks_on_one_node(slurm, tmp_path: Path):
    r = primus("run", str(HF_EXAMPLE), "--launcher", "slurm", "--wait", "--nproc-per-node", "2",
               "--master-port", str(free_port()), *_hf_args(tmp_path / "ws"))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [row for row in read_metrics(tmp_path / "ws/amd/root/hf-llama3-tiny/metrics.jsonl") if "loss" in row]
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]


def test_hf_two_nodes_one_task_each(slurm, tmp_path: Path):
    r = primus("run", str(HF_EXAMPLE), "--launcher", "slurm", "--wait", "--nnodes", "2", "--nproc-per-node", "1",
               "--master-port", str(free_port()), *_hf_args(tmp_path / "ws"))
    run_dir = tmp_path / "ws/amd/root/hf-llama3-tiny"
    out = "".join(p.read_text() for p in (run_dir / "slurm").glob("slurm-*.out"))
    assert r.returncode == 0, r.stdout + r.stderr + out
    rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    assert {p.parent.name for p in run_dir.glob("logs/pre_trainer/rank-*/primus.log")} == {"rank-0", "rank-1"}


def test_sigkill_of_one_rank_ends_the_job(tmp_path: Path):
    """Local torchrun: SIGKILL one worker mid-run; the job ends non-zero, nothing is left behind."""
    import os
    import sys
    import time

    ws = tmp_path / "ws"
    args = [*_hf_args(ws), "train.steps=2000"]
    proc = subprocess.Popen([sys.executable, "-m", "primus", "run", str(HF_EXAMPLE), "--nproc-per-node", "2",
                             "--master-port", str(free_port()), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    run_dir = ws / "amd/root/hf-llama3-tiny"
    status1 = run_dir / "logs/pre_trainer/rank-1/status.json"
    wait_for(lambda: status1.exists() and (json.loads(status1.read_text()).get("step") or 0) >= 3, 300,
             "rank 1 to train a few steps")
    victim = json.loads(status1.read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60
    for rank in (0, 1):
        pid = json.loads((run_dir / f"logs/pre_trainer/rank-{rank}/status.json").read_text())["pid"]
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
        assert state in ("", "Z"), f"rank {rank} still alive: {state}"
    last = json.loads(status1.read_text())
    assert last["rank"] == 1 and last["step"] >= 3 and last["state"] == "running"  # where rank 1 died


def test_preflight_through_slurm_on_two_nodes(slurm, tmp_path: Path):
    r = primus("preflight", str(HF_EXAMPLE), "--launcher", "slurm", "--wait", "--nnodes", "2",
               "--master-port", str(free_port()), f"workspace={tmp_path}/ws", "train.global_batch_size=16")
    run_dir = tmp_path / "ws/amd/root/hf-llama3-tiny"
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((run_dir / "preflight.json").read_text())
    assert report["world_size"] == 2 and report["failing_nodes"] == {}
    assert all(rank["collective"]["ok"] for rank in report["ranks"])
    assert "all checks passed" in (run_dir / "preflight.md").read_text()


def test_megatron_two_tasks_tensor_parallel(slurm, tmp_path: Path):
    import pytest

    pytest.importorskip("primus_megatron")
    example = HF_EXAMPLE.parents[1] / "megatron" / "llama3_tiny-pretrain.yaml"
    r = primus("run", str(example), "--launcher", "slurm", "--wait", "--nproc-per-node", "2",
               "--master-port", str(free_port()), f"workspace={tmp_path}/ws", "train.steps=6",
               "parallel.tensor=2", "disable_last_saving=true")
    run_dir = next((tmp_path / "ws").glob("*/*/*"))
    out = "".join(p.read_text() for p in (run_dir / "slurm").glob("slurm-*.out"))
    assert r.returncode == 0, r.stdout + r.stderr + out[-3000:]
    rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
