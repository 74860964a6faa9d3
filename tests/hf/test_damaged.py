"""Damaged input found late, in the worker (issue 15): a truncated newest checkpoint and a corpus
line that is not JSON. Each is one line naming the file, never a traceback; with
`checkpoint.on_damaged: previous` the run resumes from the checkpoint before the damaged one and
reaches an uninterrupted run's losses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support import attempts

from .conftest import CORPUS, TOKENIZER, assert_ok, run_dir, run_primus, train_records, write_experiment

STEPS = 6


def _experiment(directory: Path, name: str) -> Path:
    return write_experiment(directory, name=name, steps=STEPS, micro=2, global_batch=8,
                            checkpoint="{interval: 3, resume: auto, keep_last: 2}")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    base = tmp_path_factory.mktemp("uninterrupted")
    assert_ok(run_primus("run", str(_experiment(base, "a")), f"workspace={base / 'ws'}"))
    return train_records(run_dir(base / "ws", "a") / "metrics.jsonl")


def test_the_neutral_field_reaches_the_native_key(tmp_path: Path):
    from primus.config.resolve import resolve

    module = resolve(write_experiment(tmp_path, checkpoint="{on_damaged: previous}"), world_size=1).modules["pre_trainer"]
    assert module.native["on_damaged_checkpoint"] == "previous"
    assert not [n for n in module.notices if "on_damaged" in n], module.notices  # honoured, not "ignored"
    default = resolve(write_experiment(tmp_path, name="d"), world_size=1).modules["pre_trainer"]
    assert default.native["on_damaged_checkpoint"] == "fail"


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_fails_naming_it_or_resumes_from_the_previous(
        tmp_path: Path, workspace: Path, uninterrupted: list[dict]):
    """Checkpoints 3 and 5, model.pt of 5 cut in half. fail (the default): exit 2, one line naming
    checkpoint-5 and both ways out, nothing trained. previous: one warning, training resumes after
    step 3 with the uninterrupted run's losses, and checkpoint-5 is kept aside, not deleted."""
    exp = _experiment(tmp_path, "d")
    assert_ok(run_primus("run", str(exp), f"workspace={workspace}", "exit_at_step=5"))
    run = run_dir(workspace, "d")
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-5"]
    model = checkpoints / "checkpoint-5" / "model.pt"
    damaged = model.read_bytes()[: model.stat().st_size // 2]
    model.write_bytes(damaged)

    failed = run_primus("run", str(exp), f"workspace={workspace}")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr, failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("primus: error:")]
    assert len(errors) == 1, failed.stderr
    assert f"checkpoint {checkpoints / 'checkpoint-5'} cannot be loaded: model.pt is truncated" in errors[0]
    assert "checkpoint.on_damaged=previous" in errors[0] and "or delete" in errors[0]
    assert attempts(run / "metrics.jsonl") == {1: [1, 2, 3, 4, 5]}  # nothing trained
    assert model.read_bytes() == damaged  # left as it was

    resumed = run_primus("run", str(exp), f"workspace={workspace}", "checkpoint.on_damaged=previous")
    assert_ok(resumed)
    warnings = [line for line in resumed.stderr.splitlines() if "cannot be loaded" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "checkpoint-5" in warnings[0], resumed.stderr
    assert f"resumed from {checkpoints / 'checkpoint-3'} at step 3" in resumed.stderr
    steps = attempts(run / "metrics.jsonl")
    assert steps[max(steps)] == [4, 5, 6]  # the new attempt starts after checkpoint-3, not at step 1
    newest = [r for r in train_records(run / "metrics.jsonl") if r["attempt"] == max(steps)]
    assert [r["loss"] for r in newest] == [r["loss"] for r in uninterrupted[3:]]  # bit for bit
    assert newest[-1]["lr"] == uninterrupted[-1]["lr"]
    # never deleted: set aside under a name that neither rotation nor resume picks up
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "checkpoint-5.damaged", "checkpoint-6"]
    assert (checkpoints / "checkpoint-5.damaged" / "model.pt").read_bytes() == damaged


def test_a_corpus_line_that_is_not_json_is_named_by_file_and_line(tmp_path: Path, workspace: Path):
    """Core's check reads the first record only; the loader reads every line through
    primus.runs.corpus, so line 3 is reported as `corpus.jsonl:3`, exit 2, no traceback."""
    lines = CORPUS.read_text().splitlines()[:40]
    lines[2] = "{not json"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    exp = write_experiment(tmp_path, steps=2, data=json.dumps({"path": str(corpus), "tokenizer": str(TOKENIZER)}))
    result = run_primus("run", str(exp), f"workspace={workspace}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("primus: error:")]
    assert len(errors) == 1, result.stderr
    assert f"{corpus}:3: " in errors[0] and "is not a JSON line" in errors[0], errors[0]
    assert not run_dir(workspace).exists()  # a late configuration error leaves no run directory
