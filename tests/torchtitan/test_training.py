"""Real training through TorchTitan's Trainer on CPU: one process, FSDP, DDP, TP, resume, local corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import primus_env

from .conftest import assert_ok, corpus_data, free_port, read_metrics, run_dir, run_primus, write_experiment

METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"}
STEPS = 8


def _losses(experiment: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(experiment) if "loss" in m]


def test_one_process_trains_and_resume_matches_uninterrupted(tmp_path: Path) -> None:
    # uninterrupted: 8 steps, checkpoint every 4
    (tmp_path / "whole").mkdir()
    whole = write_experiment(tmp_path / "whole", steps=STEPS, checkpoint="{interval: 4, resume: auto}")
    assert_ok(run_primus("run", str(whole)))
    metrics = read_metrics(whole)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(set(m) >= METRIC_KEYS for m in metrics)
    assert all(m["tokens_per_s"] > 0 and m["step_time_s"] > 0 for m in metrics)
    losses = _losses(whole)
    assert losses[-1] < losses[0] - 0.05, losses
    assert (run_dir(whole) / "checkpoints" / f"step-{STEPS}").is_dir()

    # interrupted after step 3 (between checkpoints' interval), then resumed: same loss at the end
    (tmp_path / "split").mkdir()
    split = write_experiment(tmp_path / "split", steps=STEPS, checkpoint="{interval: 4, resume: auto}")
    assert_ok(run_primus("run", str(split), "training.exit_at_step=3"))
    assert [m["step"] for m in read_metrics(split)] == [1, 2, 3]
    assert_ok(run_primus("run", str(split)))
    resumed = read_metrics(split)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert resumed[-1]["loss"] == pytest.approx(losses[-1], abs=1e-5)


def test_local_corpus_through_torchtitan_dataset_with_validation(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path, steps=6, data=corpus_data())
    # logged every 4th step, TorchTitan's cadence, and the final step (patch torchtitan.log_final_step)
    assert_ok(run_primus("run", str(experiment), "train.eval_interval=3", "train.eval_steps=2",
                         "train.log_interval=4"))
    train = [m for m in read_metrics(experiment) if "loss" in m]
    assert [m["step"] for m in train] == [1, 4, 6] and train[-1]["loss"] < train[0]["loss"] - 0.05, train
    evals = [m for m in read_metrics(experiment) if "eval_loss" in m]
    assert [m["step"] for m in evals][-2:] == [3, 6] and all(m["eval_loss"] > 0 for m in evals)


# each case sets the option it names, and TorchTitan's device mesh must say it was used
TWO_PROCESS_LAYOUTS = {
    "fsdp": (["parallel.fsdp=true"], "dp_replicate=1, dp_shard=2, cp=1, tp=1"),
    "ddp": (["parallel.fsdp=false"], "dp_replicate=2, dp_shard=1, cp=1, tp=1"),
    "tp": (["parallel.tensor=2"], "dp_replicate=1, dp_shard=1, cp=1, tp=2"),
}


@pytest.mark.parametrize("name", list(TWO_PROCESS_LAYOUTS))
def test_two_processes_under_torchrun(tmp_path: Path, name: str) -> None:
    parallel, mesh = TWO_PROCESS_LAYOUTS[name]
    experiment = write_experiment(tmp_path, steps=6)
    result = run_primus("run", str(experiment), *parallel, "--nproc-per-node", "2",
                        "--master-port", str(free_port()))
    assert_ok(result)
    losses = _losses(experiment)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    logs = run_dir(experiment) / "logs" / "pre_trainer"
    assert (logs / "rank-0").is_dir() and (logs / "rank-1").is_dir()
    assert f"Building device mesh with parallelism: pp=1, {mesh}" in (logs / "rank-0" / "primus.log").read_text()


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_continues(tmp_path: Path) -> None:
    import json
    import signal
    import subprocess
    import sys
    import time

    experiment = write_experiment(tmp_path, steps=5000, checkpoint="{interval: 1000, resume: auto}")
    env = primus_env()
    proc = subprocess.Popen([sys.executable, "-m", "primus", "run", str(experiment)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir(experiment) / "metrics.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    status = json.loads((run_dir(experiment) / "logs/pre_trainer/rank-0/status.json").read_text())
    stopped = status["step"]
    assert status["state"] == "preempted" and 3 <= stopped < 5000
    assert (run_dir(experiment) / "checkpoints" / f"step-{stopped}").is_dir()

    assert_ok(run_primus("run", str(experiment), f"train.steps={stopped + 2}"))
    assert [m["step"] for m in read_metrics(experiment)] == list(range(1, stopped + 3))
