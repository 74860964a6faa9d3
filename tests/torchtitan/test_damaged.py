"""Damaged or hostile input found in the worker (issue 15): a truncated newest checkpoint, a
checkpoint file that would unpickle code, a corpus line that is not JSON."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from tests.support import attempts

from .conftest import CORPUS, TOKENIZER, assert_ok, read_metrics, run_dir, run_primus, write_experiment

STEPS = 8
CHECKPOINTS = "{interval: 4, resume: auto}"


def _losses(experiment: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(experiment) if "loss" in m]


class _Payload:
    """Pickles to a call that creates a marker file: what a planted checkpoint file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 steps, checkpoints 4 and 8; returns the experiment (its run holds both checkpoints)."""
    experiment = write_experiment(tmp_path_factory.mktemp("whole"), steps=STEPS, checkpoint=CHECKPOINTS)
    assert_ok(run_primus("run", str(experiment)))
    return experiment


def test_the_neutral_field_reaches_the_native_key(tmp_path: Path) -> None:
    from primus.config.resolve import resolve

    experiment = write_experiment(tmp_path, checkpoint="{on_damaged: previous}")
    module = resolve(experiment, world_size=1).modules["pre_trainer"]
    assert module.native["checkpoint"]["on_damaged"] == "previous"
    assert not [n for n in module.notices if "on_damaged" in n], module.notices  # honoured, not "ignored"
    default = resolve(write_experiment(tmp_path, name="d"), world_size=1).modules["pre_trainer"]
    assert default.native["checkpoint"]["on_damaged"] == "fail"


def test_a_truncated_newest_checkpoint_fails_naming_it_or_resumes_from_the_previous(
        tmp_path: Path, uninterrupted: Path) -> None:
    """Checkpoints 4 and 6, the data file of 6 cut in half. fail (the default): exit 2, one line
    naming step-6 and the file; previous: one warning, training resumes after step 4 with the
    uninterrupted run's losses, and step-6 is set aside, never deleted."""
    experiment = write_experiment(tmp_path, steps=STEPS, checkpoint=CHECKPOINTS)
    assert_ok(run_primus("run", str(experiment), "training.exit_at_step=6"))
    checkpoints = run_dir(experiment) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-4", "step-6"]
    data = checkpoints / "step-6" / "__0_0.distcp"
    damaged = data.read_bytes()[: data.stat().st_size // 2]
    data.write_bytes(damaged)

    failed = run_primus("run", str(experiment))
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr, failed.stderr[-3000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("primus: error:")]
    assert len(errors) == 1, failed.stderr
    assert f"checkpoint {checkpoints / 'step-6'} cannot be loaded: __0_0.distcp is truncated" in errors[0]
    assert "checkpoint.on_damaged=previous" in errors[0] and "or delete" in errors[0]
    assert attempts(run_dir(experiment) / "metrics.jsonl") == {1: [1, 2, 3, 4, 5, 6]}  # nothing trained
    assert data.read_bytes() == damaged

    resumed = run_primus("run", str(experiment), "checkpoint.on_damaged=previous")
    assert_ok(resumed)
    warnings = [line for line in resumed.stderr.splitlines() if "cannot be loaded" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0] and "step-6" in warnings[0], resumed.stderr
    assert "resumed from step-4" in warnings[0]
    steps = attempts(run_dir(experiment) / "metrics.jsonl")
    assert steps[max(steps)] == [5, 6, 7, 8]  # the new attempt starts after step-4, not at step 1
    newest = [m["loss"] for m in read_metrics(experiment) if "loss" in m and m["attempt"] == max(steps)]
    assert newest == _losses(uninterrupted)[4:]  # bit for bit
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-4", "step-8", "step_6.damaged"]
    assert (checkpoints / "step_6.damaged" / "__0_0.distcp").read_bytes() == damaged


def test_a_planted_pickle_in_checkpoint_metadata_never_runs(tmp_path: Path, uninterrupted: Path) -> None:
    """DCP reads `.metadata` with pickle.load; Primus reads it with an unpickler that knows only
    DCP's metadata classes, so the resume fails (exit 1, status failed) and nothing executes."""
    marker = tmp_path / "PWNED"
    metadata = run_dir(uninterrupted) / "checkpoints" / f"step-{STEPS}" / ".metadata"
    metadata.write_bytes(pickle.dumps(_Payload(marker)))
    result = run_primus("run", str(uninterrupted), f"train.steps={STEPS + 2}")
    assert not marker.exists()
    assert result.returncode == 1, result.stderr[-3000:]
    assert "names pathlib.Path.touch, which is not checkpoint data; refused to load it" in result.stderr
    status = json.loads((run_dir(uninterrupted) / "logs/pre_trainer/rank-0/status.json").read_text())
    assert status["state"] == "failed"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_values_and_dataloader_state_are_read_without_unpickling_code(tmp_path: Path) -> None:
    """The two other places DCP and TorchTitan unpickle: a non-tensor value (torch.load
    weights_only=False in DCP's default planner) and the dataloader's pickled state bytes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from primus.runs.dcp import SafePlanner, SafeReader, UnsafeCheckpoint
    from primus_torchtitan.checkpoint import load_safely

    marker = tmp_path / "PWNED"
    folder = tmp_path / "step-1"
    dcp.save({"value": _Payload(marker)}, checkpoint_id=str(folder), no_dist=True)
    with pytest.raises(CheckpointException, match="Weights only load failed"):
        dcp.load({"value": 0}, storage_reader=SafeReader(str(folder)), planner=SafePlanner(), no_dist=True)
    assert not marker.exists()
    dcp.load({"value": 0}, checkpoint_id=str(folder), no_dist=True)  # what DCP alone does
    assert marker.exists()  # so the check above can fail
    marker.unlink()

    class Loader:
        seen = None

        def load_state_dict(self, state):
            Loader.seen = pickle.loads(state["dp_rank_0"])  # as TorchTitan's ParallelAwareDataloader does

    class Checkpointer:
        def dcp_load(self, *args, **kwargs):
            raise AssertionError("not reached")

    loader = Loader()
    load_safely(Checkpointer(), loader)
    with pytest.raises(UnsafeCheckpoint):
        loader.load_state_dict({"dp_rank_0": pickle.dumps(_Payload(marker)), "world_size": 1})
    assert not marker.exists()
    loader.load_state_dict({"dp_rank_0": pickle.dumps({"sample_idx": 32, "buffer": [1, 2]}), "world_size": 1})
    assert Loader.seen == {"sample_idx": 32, "buffer": [1, 2]}


def test_a_corpus_line_that_is_not_json_is_named_by_file_and_line(tmp_path: Path) -> None:
    """TorchTitan's JSON loader would fail with a traceback and no line; Primus reads the corpus
    once with core's reader before TorchTitan does: exit 2, `corpus.jsonl:3`, no traceback."""
    lines = CORPUS.read_text().splitlines()[:40]
    lines[2] = "{not json"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n")
    experiment = write_experiment(tmp_path, steps=2, data=json.dumps({"path": str(corpus), "tokenizer": str(TOKENIZER)}))
    result = run_primus("run", str(experiment))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("primus: error:")]
    assert len(errors) == 1, result.stderr
    assert f"{corpus}:3: " in errors[0] and "is not a JSON line" in errors[0], errors[0]
    assert not run_dir(experiment).exists()  # a late configuration error leaves no run directory
