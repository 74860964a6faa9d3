"""Where a run goes: the examples name their run directory `${PRIMUS_WORKSPACE:./output}/
${PRIMUS_TEAM:amd}/${PRIMUS_USER:root}/EXP`, so a team's shell settings decide it; tests see those
variables only when they set them (tests/support.py drops them from every `primus` subprocess)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import EXAMPLES, assert_ok, run_primus, train_records

EXAMPLE = EXAMPLES / "hf" / "llama3_tiny.yaml"
SHORT = ["train.steps=2", "train.eval_interval=1000", "checkpoint.interval=1000"]


def test_example_run_goes_where_primus_team_and_user_say(tmp_path: Path):
    ws = tmp_path / "shared"
    r = run_primus("run", str(EXAMPLE), *SHORT, cwd=tmp_path,
                   env={"PRIMUS_TEAM": "llm-team", "PRIMUS_USER": "alice", "PRIMUS_WORKSPACE": str(ws)})
    assert_ok(r)
    run_dir = ws / "llm-team" / "alice" / "hf-llama3-tiny"
    assert [rec["step"] for rec in train_records(run_dir / "metrics.jsonl")] == [1, 2]
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in ws.iterdir()) == ["llm-team"]  # no amd/root beside it
    assert not (tmp_path / "output").exists()  # and not the default workspace either


def test_a_shell_s_primus_team_and_user_do_not_reach_a_test(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The developer's own settings must not move the run directories that tests look for."""
    for name, value in (("PRIMUS_TEAM", "leaked"), ("PRIMUS_USER", "leaked"), ("PRIMUS_WORKSPACE", "/leaked")):
        monkeypatch.setenv(name, value)
    r = run_primus("run", str(EXAMPLE), "--dry-run", cwd=tmp_path)
    assert_ok(r)
    assert f"run dir     {tmp_path.resolve()}/output/amd/root/hf-llama3-tiny  (not created: dry run)" in r.stdout, \
        r.stdout
