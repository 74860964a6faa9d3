"""Issue 15, the run directory's side: one run at a time, no foreign checkpoints resumed, a finished
run left alone, Ctrl-C as graceful as SIGTERM, readable files, attempts in the metrics stream.

All with the real toy backend package, through the real CLI.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from primus.runs.metrics import read_metrics
from tests.support import assert_config_error, primus_env, run_primus


def _run_dir(ws: Path) -> Path:
    return ws / "team" / "me" / "toy"


def _start(exp: Path, *items: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "primus", "run", str(exp), *items],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=primus_env())


def _wait_for_steps(run_dir: Path, n: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and len(read_metrics(run_dir / "metrics.jsonl")) < n:
        time.sleep(0.05)


def test_a_second_run_of_the_same_directory_is_refused(toy_exp):
    exp, ws = toy_exp
    first = _start(exp, "train.steps=400", "step_sleep=0.02")
    try:
        _wait_for_steps(_run_dir(ws), 2)
        err = assert_config_error(run_primus("run", str(exp)), "is in use by pid", "exp_name")
        assert str(first.pid) in err
    finally:
        first.terminate()
        first.communicate(timeout=60)


def test_resuming_with_another_model_is_refused_and_leaves_config_alone(toy_exp, write):
    exp, ws = toy_exp
    assert run_primus("run", str(exp), "save_interval=4").returncode == 0
    config = (_run_dir(ws) / "config.yaml").read_bytes()
    write("models/wide.yaml", "family: llama\nvocab_size: 512\nhidden_size: 128\nnum_layers: 2\nnum_heads: 4\n"
          "ffn_hidden_size: 172\nmax_position_embeddings: 256\n")
    err = assert_config_error(run_primus("run", str(exp), "model=models/wide.yaml", "train.steps=20",
                                         cwd=exp.parent),
                              "made with another configuration", "model.hidden_size 64 -> 128", "exp_name=")
    assert "checkpoint.resume=never" in err
    assert (_run_dir(ws) / "config.yaml").read_bytes() == config


def test_resume_never_beside_old_checkpoints_is_refused(toy_exp):
    exp, ws = toy_exp
    assert run_primus("run", str(exp), "save_interval=4").returncode == 0
    before = sorted(p.name for p in (_run_dir(ws) / "checkpoints").iterdir())
    assert_config_error(run_primus("run", str(exp), "checkpoint.resume=never"), "checkpoint.resume is never",
                        "holds checkpoints of an earlier attempt")
    assert sorted(p.name for p in (_run_dir(ws) / "checkpoints").iterdir()) == before


def test_a_finished_run_says_so_and_trains_nothing(toy_exp):
    exp, ws = toy_exp
    assert run_primus("run", str(exp), "save_interval=12").returncode == 0
    lines = (_run_dir(ws) / "metrics.jsonl").read_text()
    again = run_primus("run", str(exp))
    assert again.returncode == 0, again.stderr
    assert "already finished all 12 steps" in again.stdout
    assert (_run_dir(ws) / "metrics.jsonl").read_text() == lines
    more = run_primus("run", str(exp), "train.steps=16")
    assert more.returncode == 0, more.stderr
    assert "train.steps changed from 12 to 16" in more.stderr
    assert "applies from step 13 (the newest checkpoint is step 12)" in more.stderr
    rows = read_metrics(_run_dir(ws) / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert {r["attempt"] for r in rows if r["step"] > 12} == {2}  # "already finished" was no attempt


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(toy_exp):
    exp, ws = toy_exp
    run_dir = _run_dir(ws)
    proc = _start(exp, "train.steps=400", "step_sleep=0.02")
    _wait_for_steps(run_dir, 5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Logging error" not in err and "Traceback" not in err
    status = json.loads((run_dir / "logs/pre_trainer/rank-0/status.json").read_text())
    assert status["state"] == "interrupted"
    checkpoints = sorted(run_dir.glob("checkpoints/step-*.json"))
    assert len(checkpoints) == 1 and json.loads(checkpoints[0].read_text())["step"] == status["step"]


def test_run_files_are_readable_by_the_group_under_the_users_umask(toy_exp):
    exp, ws = toy_exp
    previous = os.umask(0o022)  # inherited by the run
    try:
        assert run_primus("run", str(exp)).returncode == 0
    finally:
        os.umask(previous)
    for name in ("config.yaml", "env.json", "versions.json", "shape.json"):
        mode = stat.S_IMODE((_run_dir(ws) / name).stat().st_mode)
        assert mode & 0o044 == 0o044, (name, oct(mode))


def test_an_unwritable_workspace_is_one_line_and_leaves_nothing(toy_exp, tmp_path):
    """A workspace that cannot hold the run directory (read-only, no permission, or as here a path
    through a file, which fails the same way for root too) is one line, exit 2, nothing left."""
    exp, _ = toy_exp
    a_file = tmp_path / "plain-file"
    a_file.write_text("x")
    assert_config_error(run_primus("run", str(exp), f"workspace={a_file}/ws"), "cannot write the run directory",
                        "workspace=")
    assert a_file.read_text() == "x"


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_the_run(toy_exp, tmp_path):
    exp, ws = toy_exp
    a_file = tmp_path / "ckpt"
    a_file.write_text("not a folder")
    assert_config_error(run_primus("run", str(exp), f"checkpoint.dir={a_file}"),
                        "command line: checkpoint.dir=", "is a file, not a folder")
    assert not ws.exists()


def test_a_disk_error_in_training_is_one_line_and_a_failed_status(toy_exp, monkeypatch, capsys):
    import errno

    from primus_toy.adapter import ToyAdapter

    from primus.runs.worker import run_worker

    exp, ws = toy_exp
    assert run_primus("run", str(exp), "train.steps=1").returncode == 0

    def full_disk(self):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.ctx.checkpoint_dir / "step-2.json"))

    monkeypatch.setattr(ToyAdapter, "run", full_disk)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert run_worker(_run_dir(ws), "pre_trainer") == 1
    finally:
        from loguru import logger

        logger.remove()
        for signum, handler in handlers.items():  # the worker installed its own in this process
            signal.signal(signum, handler)
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("primus: error:"))
    assert "No space left on device" in line and "step-2.json" in line and "free space" in line
    assert "Traceback" not in err
    status = json.loads((_run_dir(ws) / "logs/pre_trainer/rank-0/status.json").read_text())
    assert status["state"] == "failed" and "No space left" in status["error"]


def test_sigterm_during_the_last_step_reports_done(toy_exp):
    """A stop that arrives when every step is done changes nothing: the run finished (exit 0)."""
    exp, ws = toy_exp
    proc = _start(exp, "train.steps=3", "step_sleep=1.0")
    _wait_for_steps(_run_dir(ws), 2)
    time.sleep(0.3)  # step 3 is sleeping
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    status = json.loads((_run_dir(ws) / "logs/pre_trainer/rank-0/status.json").read_text())
    assert (proc.returncode, status["state"], status["step"]) == (0, "done", 3), err
