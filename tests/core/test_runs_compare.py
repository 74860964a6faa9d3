"""`primus runs` and `primus compare [--plot]` read run directories of any backend (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import assert_config_error, run_primus


def _two_runs(toy_exp) -> tuple[Path, Path, Path]:
    exp, ws = toy_exp
    assert run_primus("run", str(exp)).returncode == 0
    assert run_primus("run", str(exp), "exp_name=slower", "train.lr=0.01").returncode == 0
    return ws, ws / "team/me/toy", ws / "team/me/slower"


def test_runs_lists_a_workspace_newest_first(toy_exp):
    ws, first, second = _two_runs(toy_exp)
    r = run_primus("runs", str(ws), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["exp"] for row in rows] == ["slower", "toy"]
    assert all(row["backend"] == "toy" and row["state"] == "done" and row["step"] == row["steps"] == 12
               and row["model"] == "llama3_tiny" and row["last_loss"] is not None for row in rows)
    table = run_primus("runs", str(ws)).stdout
    assert table.splitlines()[0].split()[:4] == ["exp", "backend", "model", "state"] and "12/12" in table


def test_runs_without_an_argument_lists_primus_workspace(toy_exp, tmp_path):
    exp, ws = toy_exp
    assert run_primus("run", str(exp)).returncode == 0
    rows = json.loads(run_primus("runs", "--json", env={"PRIMUS_WORKSPACE": str(ws)}, cwd=tmp_path).stdout)
    assert [row["exp"] for row in rows] == ["toy"]


def test_a_run_whose_process_died_is_not_shown_running(toy_exp):
    ws, first, _ = _two_runs(toy_exp)
    status = first / "logs/pre_trainer/rank-0/status.json"
    status.write_text(json.dumps({**json.loads(status.read_text()), "state": "running"}))
    rows = {row["exp"]: row for row in json.loads(run_primus("runs", str(ws), "--json").stdout)}
    assert rows["toy"]["state"] == "died"


def test_compare_side_by_side_and_a_real_png(toy_exp, tmp_path):
    _, first, second = _two_runs(toy_exp)
    out = tmp_path / "cmp.png"
    r = run_primus("compare", str(first), str(second), "--plot", str(out))
    assert r.returncode == 0, r.stderr
    assert "final loss" in r.stdout and "slower" in r.stdout
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    rows = json.loads(run_primus("compare", str(first), str(second), "--json").stdout)
    assert rows[0]["best_loss"] <= rows[0]["last_loss"] and rows[0]["tokens_per_s"] > 0


def test_plot_without_matplotlib_says_how_to_get_it(toy_exp, tmp_path):
    _, first, _ = _two_runs(toy_exp)
    blocker = tmp_path / "no_mpl" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    r = run_primus("compare", str(first), "--plot", str(tmp_path / "x.png"),
                   env={"PYTHONPATH": str(blocker.parent)})
    assert_config_error(r, "--plot needs matplotlib", "pip install 'primus-core[plot]'")
    assert not (tmp_path / "x.png").exists()


def test_compare_refuses_what_is_not_a_run(tmp_path):
    assert_config_error(run_primus("compare", str(tmp_path)), "is not a run directory")
    assert_config_error(run_primus("runs", str(tmp_path / "nope")), "does not exist")
