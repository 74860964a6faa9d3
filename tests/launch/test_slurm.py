"""Real Slurm jobs on a two-node cluster on this machine: submit, wait, two nodes, preemption."""

import contextlib
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from primus.runs.metrics import read_metrics
from tests.support import TEAM, USER, attempts, primus_env, run_dir_for

from .conftest import HF_EXAMPLE, TOY_EXP, free_port, primus, wait_for

NAMES = [f"work_group={TEAM}", f"user_name={USER}"]  # the example's run directory: WORKSPACE/team/me/EXP


def _submitted_job(stdout: str) -> str:
    m = re.search(r"submitted Slurm job (\d+)", stdout)
    assert m, stdout
    return m.group(1)


def _submit_and_follow(*args: str) -> tuple[subprocess.Popen[str], str]:
    """`primus run ARGS --launcher slurm --wait` in the background, and the id of the job it submitted."""
    proc = subprocess.Popen([sys.executable, "-m", "primus", "run", *args, "--launcher", "slurm", "--wait"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=primus_env())
    first = proc.stdout.readline()  # printed (and flushed) as soon as sbatch answered
    if "submitted Slurm job" not in first:
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"exit {proc.returncode}: {first}{out}{err}")
    return proc, _submitted_job(first)


@contextlib.contextmanager
def _cancelled_at_the_end(job: str):
    """A test that fails while its job runs must not leave the job on the cluster."""
    try:
        yield
    finally:
        subprocess.run(["scancel", job], capture_output=True)


def _preempt(job: str) -> None:
    """What a scheduler does to a job it preempts (and what `scancel --signal=TERM` does by hand)."""
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    subprocess.run(["scancel", "--signal=TERM", job], check=True)  # a second SIGTERM changes nothing


def test_toy_job_runs_and_matches_its_dry_run(slurm, tmp_path: Path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(TOY_EXP.format(ws=tmp_path / "ws"))
    dry = primus("run", str(exp), "--launcher", "slurm", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    r = primus("run", str(exp), "--launcher", "slurm", "--wait")
    assert r.returncode == 0, r.stdout + r.stderr
    run_dir = run_dir_for(tmp_path / "ws", "toy-slurm")
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
    # 1 because training failed, and where: the rank's status and the job's output name the cause
    run_dir = run_dir_for(tmp_path / "ws", "toy-slurm")
    status = json.loads((run_dir / "logs/pre_trainer/rank-0/status.json").read_text())
    assert status["state"] == "failed" and "toy failure at step 3" in status["error"], status
    out = "".join(p.read_text() for p in (run_dir / "slurm").glob("slurm-*.out"))
    assert "toy failure at step 3" in out, out[-3000:]


def test_scancel_sigterm_checkpoints_and_resume_continues(slurm, tmp_path: Path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(TOY_EXP.format(ws=tmp_path / "ws"))
    run_dir = run_dir_for(tmp_path / "ws", "toy-slurm")
    proc, job = _submit_and_follow(str(exp), "train.steps=3000", "step_sleep=0.02")
    with _cancelled_at_the_end(job):
        wait_for(lambda: len(read_metrics(run_dir / "metrics.jsonl")) >= 5, 120, "the job to train")
        _preempt(job)
        _, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-3000:]  # `--wait` returns the job's code: stopped by SIGTERM
    status = json.loads((run_dir / "logs/pre_trainer/rank-0/status.json").read_text())
    assert status["state"] == "preempted"
    stopped = status["step"]
    ckpt = json.loads(next((run_dir / "checkpoints").glob("step-*.json")).read_text())
    assert ckpt["step"] == stopped and 5 <= stopped < 3000
    # requeue by hand, 10 steps past the checkpoint: resume: auto continues from it with the same losses
    target = stopped + 10
    r = primus("run", str(exp), "--launcher", "slurm", "--wait", f"train.steps={target}", "step_sleep=0")
    out = "".join(p.read_text() for p in (run_dir / "slurm").glob("slurm-*.out"))
    assert r.returncode == 0, r.stdout + r.stderr + out[-3000:]
    assert f"toy: resumed from step-{stopped}.json" in out, out[-3000:]
    tries = list(attempts(run_dir / "metrics.jsonl").values())
    assert len(tries) == 2 and tries[1] == list(range(stopped + 1, target + 1)), tries
    full = tmp_path / "full.yaml"
    full.write_text(TOY_EXP.format(ws=tmp_path / "full"))
    assert primus("run", str(full), f"train.steps={target}").returncode == 0
    straight = read_metrics(run_dir_for(tmp_path / "full", "toy-slurm") / "metrics.jsonl")
    resumed = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in straight]


def _hf_args(ws: Path) -> list[str]:
    return [f"workspace={ws}", *NAMES, "train.steps=6", "train.log_interval=1", "train.eval_interval=1000",
            "train.micro_batch_size=2", "train.global_batch_size=4", "checkpoint.interval=1000"]


def test_hf_two_tasks_on_one_node(slurm, tmp_path: Path):
    r = primus("run", str(HF_EXAMPLE), "--launcher", "slurm", "--wait", "--nproc-per-node", "2",
               "--master-port", str(free_port()), *_hf_args(tmp_path / "ws"))
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [row for row in read_metrics(run_dir_for(tmp_path / "ws", "hf-llama3-tiny") / "metrics.jsonl")
            if "loss" in row]
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]


def test_hf_two_nodes_one_task_each(slurm, tmp_path: Path):
    r = primus("run", str(HF_EXAMPLE), "--launcher", "slurm", "--wait", "--nnodes", "2", "--nproc-per-node", "1",
               "--master-port", str(free_port()), *_hf_args(tmp_path / "ws"))
    run_dir = run_dir_for(tmp_path / "ws", "hf-llama3-tiny")
    out = "".join(p.read_text() for p in (run_dir / "slurm").glob("slurm-*.out"))
    assert r.returncode == 0, r.stdout + r.stderr + out
    rows = [row for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    assert {p.parent.name for p in run_dir.glob("logs/pre_trainer/rank-*/primus.log")} == {"rank-0", "rank-1"}


def test_hf_scancel_sigterm_exits_143_checkpoints_and_resume_continues(slurm, tmp_path: Path):
    """Preemption on a real backend, with torchrun inside the job: every rank stops after the same
    step, hf writes its checkpoint (model, optimizer, schedule, data position), the job's code is 143,
    and a requeue continues with the losses of a run that was never stopped."""
    ws, full = tmp_path / "ws", tmp_path / "full"
    # a constant learning rate: the schedule then does not depend on train.steps, which differs between
    # the job that is stopped (many steps) and the requeue (a few past the checkpoint)
    same = ["--nproc-per-node", "2", *NAMES, "train.log_interval=1", "train.eval_interval=1000",
            "train.micro_batch_size=2", "train.global_batch_size=4", "checkpoint.interval=1000",
            "train.lr_schedule=constant", "train.warmup_steps=0"]
    run_dir = run_dir_for(ws, "hf-llama3-tiny")
    proc, job = _submit_and_follow(str(HF_EXAMPLE), f"workspace={ws}", *same, "train.steps=100000",
                                   "--master-port", str(free_port()))
    with _cancelled_at_the_end(job):
        wait_for(lambda: len(read_metrics(run_dir / "metrics.jsonl")) >= 3, 300, "the job to train")
        _preempt(job)
        _, err = proc.communicate(timeout=300)
    out = "".join(p.read_text() for p in (run_dir / "slurm").glob("slurm-*.out"))
    assert proc.returncode == 143, err[-2000:] + out[-4000:]
    statuses = [json.loads((run_dir / f"logs/pre_trainer/rank-{r}/status.json").read_text()) for r in (0, 1)]
    assert [s["state"] for s in statuses] == ["preempted", "preempted"], statuses
    stopped = statuses[0]["step"]
    assert statuses[1]["step"] == stopped and 3 <= stopped < 100000, statuses
    assert (run_dir / "checkpoints" / f"checkpoint-{stopped}" / "trainer_state.json").is_file()
    # requeue by hand, 3 steps past the checkpoint
    target = stopped + 3
    r = primus("run", str(HF_EXAMPLE), "--launcher", "slurm", "--wait", f"workspace={ws}", *same,
               f"train.steps={target}", "--master-port", str(free_port()))
    log = (run_dir / "logs/pre_trainer/rank-0/primus.log").read_text()
    assert r.returncode == 0, r.stdout + r.stderr + log[-3000:]
    assert re.search(rf"resumed from \S+checkpoint-{stopped} at step {stopped}\b", log), log[-3000:]
    tries = list(attempts(run_dir / "metrics.jsonl").values())
    assert len(tries) == 2 and tries[1] == list(range(stopped + 1, target + 1)), tries
    straight = primus("run", str(HF_EXAMPLE), f"workspace={full}", *same, f"train.steps={target}",
                      "--master-port", str(free_port()))
    assert straight.returncode == 0, straight.stderr[-3000:]
    resumed = [(row["step"], row["loss"]) for row in read_metrics(run_dir / "metrics.jsonl")]
    never_stopped = [(row["step"], row["loss"]) for row in read_metrics(run_dir_for(full, "hf-llama3-tiny") /
                                                                          "metrics.jsonl")]
    assert resumed == never_stopped


def test_sigkill_of_one_rank_ends_the_job(tmp_path: Path):
    """Local torchrun: SIGKILL one worker mid-run; the job ends with 1 and torchrun's report of that
    worker's death, nothing is left behind."""
    import os
    import time

    ws = tmp_path / "ws"
    args = [*_hf_args(ws), "train.steps=2000"]
    proc = subprocess.Popen([sys.executable, "-m", "primus", "run", str(HF_EXAMPLE), "--nproc-per-node", "2",
                             "--master-port", str(free_port()), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=primus_env())
    run_dir = run_dir_for(ws, "hf-llama3-tiny")
    status1 = run_dir / "logs/pre_trainer/rank-1/status.json"
    wait_for(lambda: status1.exists() and (json.loads(status1.read_text()).get("step") or 0) >= 3, 300,
             "rank 1 to train a few steps")
    victim = json.loads(status1.read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and time.time() - t0 < 60, err[-3000:]
    assert f"Signal 9 (SIGKILL) received by PID {victim}" in err, err[-3000:]  # the cause, and which rank
    for rank in (0, 1):
        pid = json.loads((run_dir / f"logs/pre_trainer/rank-{rank}/status.json").read_text())["pid"]
        state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
        assert state in ("", "Z"), f"rank {rank} still alive: {state}"
    last = json.loads(status1.read_text())
    assert last["rank"] == 1 and last["step"] >= 3 and last["state"] == "running"  # where rank 1 died


def test_preflight_through_slurm_on_two_nodes(slurm, tmp_path: Path):
    r = primus("preflight", str(HF_EXAMPLE), "--launcher", "slurm", "--wait", "--nnodes", "2",
               "--master-port", str(free_port()), f"workspace={tmp_path}/ws", *NAMES, "train.global_batch_size=16")
    run_dir = run_dir_for(tmp_path / "ws", "hf-llama3-tiny")
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
