"""Exact resume and data parallelism: one job, trained four ways, must agree.

A: one process, 6 steps, global batch 8 = micro 2 x accumulation 4, uninterrupted.
B: the same, stopped after step 3 (exit_at_step), then the same command again (resume: auto).
C: two processes under torchrun, global batch 8 = micro 2 x 2 ranks x accumulation 2, once with DDP
   over gloo and once with FSDP (parallel.fsdp; FSDP2 runs on gloo too), the FSDP one stopped after
   step 3 and resumed on two processes (each rank writes its DCP shards and reads back its own), and
   once stopped as one process and resumed under FSDP (rank 0 reads model.pt and broadcasts).
B must match A exactly; C reads the same samples per step, so it matches A up to summation order.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import CORPUS, TOKENIZER, assert_late_error, primus_env

from .conftest import assert_ok, free_port, run_dir, run_primus, train_records, write_experiment

pytestmark = pytest.mark.slow

STEPS = 6


def _experiment(directory: Path, name: str, overrides: str = "{}") -> Path:
    return write_experiment(directory, name=name, steps=STEPS, micro=2, global_batch=8,
                            checkpoint="{interval: 3, resume: auto, keep_last: 1}", overrides=overrides)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    base = tmp_path_factory.mktemp("uninterrupted")
    assert_ok(run_primus("run", str(_experiment(base, "a")), f"workspace={base / 'ws'}"))
    return train_records(run_dir(base / "ws", "a") / "metrics.jsonl")


def test_a_stopped_and_resumed_run_reaches_the_same_losses(tmp_path: Path, workspace: Path, uninterrupted):
    exp = _experiment(tmp_path, "b", overrides="{exit_at_step: 3}")
    first = run_primus("run", str(exp), f"workspace={workspace}")
    assert_ok(first)
    checkpoints = run_dir(workspace, "b") / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3"]
    assert not (run_dir(workspace, "b") / "model").exists()  # a stopped run is not finished

    second = run_primus("run", str(exp), f"workspace={workspace}")
    assert_ok(second)
    assert "resumed from" in second.stderr and "checkpoint-3" in second.stderr
    resumed = train_records(run_dir(workspace, "b") / "metrics.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted]  # bit for bit
    assert resumed[-1]["lr"] == uninterrupted[-1]["lr"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-6"]  # keep_last: 1
    assert (run_dir(workspace, "b") / "model" / "config.json").is_file()


@pytest.mark.parametrize("sharding", ["ddp", "fsdp", "fsdp-after-one-process"])
def test_two_ranks_agree_with_one_process(tmp_path: Path, workspace: Path, uninterrupted, sharding: str):
    exp = _experiment(tmp_path, "c")
    fsdp = sharding.startswith("fsdp")
    # FSDP: stopped after step 3, then resumed on 2 processes; the last case stops a one-process run
    # (a whole model.pt) and resumes it under FSDP (rank 0 reads it and broadcasts the shards)
    ranks = {"ddp": [2], "fsdp": [2, 2], "fsdp-after-one-process": [1, 2]}[sharding]
    for attempt, nproc in enumerate(ranks):
        stop = ["exit_at_step=3"] if attempt == 0 and len(ranks) == 2 else []
        launch = ["--nproc-per-node", "2", "--master-port", str(free_port())] if nproc == 2 else []
        result = run_primus("run", str(exp), *launch, f"workspace={workspace}", f"parallel.fsdp={fsdp}", *stop)
        assert_ok(result)
    records = train_records(run_dir(workspace, "c") / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in uninterrupted], abs=2e-4)
    assert records[-1]["loss"] < records[0]["loss"]

    logs = run_dir(workspace, "c") / "logs" / "pre_trainer"
    if fsdp:  # each rank wrote its own shards
        shards = sorted(p.name for p in (run_dir(workspace, "c") / "checkpoints" / "checkpoint-6" / "shards").iterdir())
        assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], shards
        read = [(logs / f"rank-{r}" / "primus.log").read_text() for r in (0, 1)]
    if sharding == "fsdp":  # and read back the ones it holds
        for log in read:
            assert "checkpoint-3: this rank read the shards it holds" in log, log[-3000:]
        # a shard cut short is named in one line (here by a one-process eval, which reads every shard)
        shard = run_dir(workspace, "c") / "checkpoints" / "checkpoint-6" / "shards" / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[:1000])
        damaged = run_primus("eval", str(exp), f"workspace={workspace}", "--checkpoint", "latest", "--data",
                             str(CORPUS), f"data.tokenizer={TOKENIZER}", "parallel.fsdp=true")
        assert_late_error(damaged, "checkpoint-6 cannot be loaded: shards/__1_0.distcp is truncated (1000 of")
    if sharding == "fsdp-after-one-process":  # only rank 0 read the whole model.pt and optimizer.pt
        assert "checkpoint-3: read by this rank and broadcast" in read[0], read[0][-3000:]
        assert "checkpoint-3: received by broadcast from rank 0" in read[1], read[1][-3000:]
    checksums = [re.findall(r"parameter checksum (\S+)", (logs / f"rank-{r}" / "primus.log").read_text())
                 for r in (0, 1)]
    assert checksums[1] and checksums[0][-1] == checksums[1][-1], checksums  # both ranks end with the same weights


class _Payload:
    """Pickles to a call that creates a marker file: what a planted checkpoint file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_in_a_checkpoint_never_runs(tmp_path: Path, workspace: Path):
    import pickle

    exp = _experiment(tmp_path, "p", overrides="{exit_at_step: 3}")
    assert_ok(run_primus("run", str(exp), f"workspace={workspace}"))
    marker = tmp_path / "PWNED"
    rng_file = run_dir(workspace, "p") / "checkpoints" / "checkpoint-3" / "rng_state_0.pt"
    assert rng_file.is_file()
    rng_file.write_bytes(pickle.dumps(_Payload(marker)))
    resumed = run_primus("run", str(exp), f"workspace={workspace}")
    assert not marker.exists()
    assert resumed.returncode == 1  # refused to unpickle: a training failure, reported, never executed


def test_sigterm_to_the_launcher_under_torchrun_is_a_graceful_143(tmp_path: Path, workspace: Path):
    """torchrun alone turned SIGTERM into a traceback and exit 1; Primus's entry forwards it to the
    ranks, which checkpoint after the same step, and the command exits 143."""
    import json
    import signal
    import subprocess
    import sys
    import time

    exp = write_experiment(tmp_path, name="t", steps=400, micro=2, global_batch=4,
                           checkpoint="{interval: 1000, resume: auto}")
    # two ranks agree on the stop flag every log interval (2 here), not every step
    proc = subprocess.Popen([sys.executable, "-m", "primus", "run", str(exp), f"workspace={workspace}",
                             "train.log_interval=2", "--nproc-per-node", "2", "--master-port", str(free_port())],
                            env=primus_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = run_dir(workspace, "t") / "metrics.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err
    statuses = [json.loads((run_dir(workspace, "t") / f"logs/pre_trainer/rank-{r}/status.json").read_text())
                for r in (0, 1)]
    assert {s["state"] for s in statuses} == {"preempted"} and statuses[0]["step"] == statuses[1]["step"]
    assert statuses[0]["step"] % 2 == 0, statuses  # stopped at a step that logs
    assert (run_dir(workspace, "t") / "checkpoints" / f"checkpoint-{statuses[0]['step']}").is_dir()
