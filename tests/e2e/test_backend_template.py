"""The backend template (examples/backend-template) works as a third party's package would.

It is pip-installed into the running environment (a regular install, no core change), trains the
example, writes a checkpoint, resumes from it to the losses of a run never stopped, trains under
torchrun with DDP, and core explains its derived key and locates its check() errors. The package
is uninstalled afterwards unless it was installed before, so `primus backends` elsewhere is unchanged.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from primus.runs.metrics import TRAIN_KEYS  # the keys every backend's metrics.jsonl lines carry
from tests.support import ROOT, assert_config_error, assert_ok, free_port, read_metrics, run_primus

TEMPLATE = ROOT / "examples" / "backend-template" / "primus-tinytorch"
EXAMPLE = str(ROOT / "examples" / "backend-template" / "tinytorch_tiny.yaml")

pytestmark = pytest.mark.slow


def _installed() -> bool:
    try:
        metadata.distribution("primus-tinytorch")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def tinytorch():
    """Install the template (not editable) for this module's tests, as a user would."""
    was_installed = _installed()
    pip = [sys.executable, "-m", "pip"]
    r = subprocess.run([*pip, "install", "--no-index", "--no-deps", "--no-build-isolation", str(TEMPLATE)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    yield
    if not was_installed:
        subprocess.run([*pip, "uninstall", "-y", "primus-tinytorch"], capture_output=True, timeout=120)


def metrics_of(workspace: Path) -> list[dict]:
    (path,) = workspace.glob("*/*/*/metrics.jsonl")  # <workspace>/<work_group>/<user_name>/<exp_name>/
    return read_metrics(path)


def test_template_trains_checkpoints_and_resumes_to_the_same_losses(tinytorch, tmp_path: Path):
    # A constant schedule after warmup: a decaying one depends on the total steps, so an 8-step run
    # continued to 12 could not match a 12-step run; with it, steps 9..12 must match exactly.
    constant = "train.lr_schedule=constant"
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"

    assert_ok(run_primus("run", EXAMPLE, f"workspace={resumed}", "train.steps=8", constant, cwd=tmp_path))
    first = metrics_of(resumed)
    assert [rec["step"] for rec in first] == list(range(1, 9))
    assert all(set(rec) >= set(TRAIN_KEYS) for rec in first), first[0]
    assert first[-1]["loss"] < first[0]["loss"] - 0.1, [rec["loss"] for rec in first]
    (checkpoints,) = resumed.glob("*/*/*/checkpoints")
    assert (checkpoints / "step-00000008.pt").is_file()
    assert not list(checkpoints.glob(".tmp-*"))  # written under a temporary name, then renamed

    r = run_primus("run", EXAMPLE, f"workspace={resumed}", "train.steps=12", constant, cwd=tmp_path)
    assert_ok(r)
    assert "resumed from" in r.stderr
    second = metrics_of(resumed)[len(first):]  # the second attempt's lines follow the first's
    assert [rec["step"] for rec in second] == [9, 10, 11, 12]
    assert {rec["attempt"] for rec in second} == {2}

    assert_ok(run_primus("run", EXAMPLE, f"workspace={fresh}", "train.steps=12", constant, cwd=tmp_path))
    whole = metrics_of(fresh)
    assert [rec["step"] for rec in whole] == list(range(1, 13))
    for a, b in zip(second, whole[8:], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
    # checkpoint.keep_last: 2 in the example: steps 10 (interval) and 12 (the end) remain
    assert sorted(p.name for p in checkpoints.glob("step-*.pt")) == ["step-00000010.pt", "step-00000012.pt"]


def test_ddp_under_torchrun_with_gloo(tinytorch, tmp_path: Path):
    assert_ok(run_primus("run", EXAMPLE, f"workspace={tmp_path}", "train.steps=4", "--nproc-per-node", "2",
                         "--master-port", str(free_port()), cwd=tmp_path))
    records = metrics_of(tmp_path)
    assert [rec["step"] for rec in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] < records[0]["loss"]


def test_explain_names_the_keys_a_derived_value_came_from(tinytorch, tmp_path: Path):
    r = run_primus("config", "show", EXAMPLE, "--explain", "grad_accum_steps", cwd=tmp_path)
    assert_ok(r)
    assert "grad_accum_steps = 2" in r.stdout, r.stdout  # global 8 = micro 4 x 1 process x 2
    assert "derived from" in r.stdout and "train.global_batch_size" in r.stdout, r.stdout
    r = run_primus("config", "show", EXAMPLE, "--nproc-per-node", "2", "--explain", "grad_accum_steps", cwd=tmp_path)
    assert_ok(r)
    assert "grad_accum_steps = 1" in r.stdout, r.stdout


def test_check_errors_are_located_by_core(tinytorch, tmp_path: Path):
    """The template's check() raises with a key only; core places it (here: on the command line)."""
    assert_config_error(run_primus("config", "validate", EXAMPLE, "train.warmup_steps=20", cwd=tmp_path),
                        "command line: train.warmup_steps=20", "leaves no step after warmup")
    assert_config_error(run_primus("config", "validate", EXAMPLE, "grad_accum_steps=4", cwd=tmp_path),
                        "command line: grad_accum_steps=4", "derived from the batch sizes")
