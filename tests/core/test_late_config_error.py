"""A configuration error that only the worker can see (the backend refuses at run time): exit 2 with
the one line that names it, and the run directory goes again when this command created it."""

from __future__ import annotations

import os
from pathlib import Path

from primus.runs.metrics import read_metrics
from tests.support import run_primus

# Loaded by the `primus` subprocess through PYTHONPATH: the toy adapter raises ConfigError when it
# starts, after the run directory was made and the worker took over, as a backend's own late check does.
LATE_ERROR = '''
import os

if os.environ.get("PRIMUS_TEST_LATE_ERROR"):
    import primus_toy.adapter as _adapter
    from primus.errors import ConfigError

    def _run(self):
        import time

        if os.environ.get("RANK") == "0":  # another rank fails first, as on a real cluster
            time.sleep(float(os.environ.get("PRIMUS_TEST_LATE_ERROR_RANK0_DELAY", "0")))
        raise ConfigError("the toy cannot train this at run time", key="toy.late", fix="unset PRIMUS_TEST_LATE_ERROR")

    _adapter.ToyAdapter.run = _run
'''
LINE = ("primus: error: toy.late: the toy cannot train this at run time (unset PRIMUS_TEST_LATE_ERROR)")


def _late_env(tmp_path: Path) -> dict[str, str]:
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(LATE_ERROR)
    path = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "PRIMUS_TEST_LATE_ERROR": "1"}


def test_late_config_error_exits_2_and_removes_the_run_directory_it_made(toy_exp, tmp_path: Path):
    exp, ws = toy_exp
    run_dir = ws / "team" / "me" / "toy"
    r = run_primus("run", str(exp), env=_late_env(tmp_path))
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-3000:])
    assert LINE in r.stderr.splitlines() and "Traceback" not in r.stderr, r.stderr
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())  # config.yaml, logs, lock: all gone


def test_late_config_error_keeps_a_run_directory_that_was_there(toy_exp, tmp_path: Path):
    exp, ws = toy_exp
    run_dir = ws / "team" / "me" / "toy"
    first = run_primus("run", str(exp), "train.steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    before = (run_dir / "metrics.jsonl").read_text()
    r = run_primus("run", str(exp), "train.steps=6", env=_late_env(tmp_path))  # a resume the toy refuses late
    assert r.returncode == 2 and LINE in r.stderr.splitlines(), (r.returncode, r.stderr[-3000:])
    assert (run_dir / "metrics.jsonl").read_text() == before  # the earlier run's record is untouched
    assert [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]
