"""Bad input: exit 2 before any process starts, one line naming the problem and where it was
written (`command line: key=value`, or the experiment file's line), nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from primus.config.resolve import resolve
from primus.errors import ConfigError

from .conftest import line_of, run_primus, write_experiment

CASES = {
    "unknown native key": (["training.stepz=4"], "command line: training.stepz=4: ",
                           "did you mean 'training.steps'"),
    "unknown key in overrides section": (["overrides.parallelism.tensor_parallel=2"],
                                         "command line: overrides.parallelism.tensor_parallel=2: ",
                                         "did you mean 'parallelism.tensor_parallel_degree'"),
    "flavor that does not exist": (["overrides.model.flavor=9B"], "command line: overrides.model.flavor=9B: ",
                                   "flavor '9B' does not exist"),
    "degrees do not multiply to world size": (
        ["parallelism.data_parallel_shard_degree=1", "parallelism.tensor_parallel_degree=1", "--nproc-per-node", "2"],
        "command line: parallelism.data_parallel_shard_degree=1: ", "multiply to 1, not the world size 2"),
    "neutral degrees do not divide world size": (["parallel.tensor=3", "--nproc-per-node", "2"],
                                                 "command line: parallel.tensor=3: ",
                                                 "does not divide the world size 2"),
    "unsupported model family": (["model=mixtral_tiny.yaml"], "command line: model=mixtral_tiny.yaml: ",
                                 "not supported by the torchtitan backend"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    args, where, expected = CASES[case]
    experiment = write_experiment(tmp_path)
    result = run_primus("run", str(experiment), *args, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"primus: error: {where}") and expected in lines[0], result.stderr
    assert not (tmp_path / "ws").exists()


def _error(experiment: Path, *items: str, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as caught:
        resolve(experiment, list(items), world_size=world_size)
    return str(caught.value)


# the same bad value twice: given on the command line, then written in the experiment file
# (case: command-line item, the experiment it is given to, the same value in the file, its line's text)
LOCATED = {
    "corpus that does not exist": (
        "data.path=/nope.jsonl", {"data": "{}"}, {"data": "{path: /nope.jsonl}"}, "path: /nope.jsonl",
        "corpus /nope.jsonl does not exist", 1),
    "tensor size that does not divide the world": (
        "parallel.tensor=3", {}, {"parallel": "{tensor: 3}"}, "tensor: 3", "does not divide the world size 2", 2),
    "native tensor degree that does not divide the world": (
        "parallelism.tensor_parallel_degree=3", {}, {"parallel": "{tensor: 3}"}, "tensor: 3",
        "does not divide the world size 2", 2),
}


@pytest.mark.parametrize("case", list(LOCATED))
def test_a_bad_value_names_the_command_line_item_or_the_file_line(tmp_path: Path, case: str) -> None:
    item, given_to, written, text, message, world_size = LOCATED[case]
    error = _error(write_experiment(tmp_path, **given_to), item, world_size=world_size)
    assert error.startswith(f"command line: {item}: ") and message in error, error

    (tmp_path / "file").mkdir()
    in_file = write_experiment(tmp_path / "file", **written)
    error = _error(in_file, world_size=world_size)
    assert error.startswith(f"{in_file}:{line_of(in_file, text)}: ") and message in error, error


def test_data_degrees_against_the_world_are_located_where_written(tmp_path: Path) -> None:
    """TorchTitan's own layout rule (replicate x shard x the rest = world) names the degree the
    user wrote, not the `parallelism` section."""
    experiment = write_experiment(tmp_path)
    error = _error(experiment, "parallelism.data_parallel_replicate_degree=3", world_size=2)
    assert error.startswith("command line: parallelism.data_parallel_replicate_degree=3: ")
    assert "does not divide the 2 data-parallel ranks" in error

    text = experiment.read_text().replace("    overrides:\n", "    overrides:\n      parallelism: {data_parallel_shard_degree: 1}\n")
    experiment.write_text(text)
    error = _error(experiment, world_size=2)
    line = line_of(experiment, "data_parallel_shard_degree: 1")
    assert error.startswith(f"{experiment}:{line}: modules.pre_trainer.overrides.parallelism.data_parallel_shard_degree: ")
    assert "multiply to 1, not the world size 2" in error


def test_a_derived_min_lr_factor_out_of_range_names_train_min_lr(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path)
    error = _error(experiment, "train.min_lr=0.5")
    assert error.startswith("command line: train.min_lr=0.5: ") and "outside [0, 1]" in error, error

    experiment.write_text(experiment.read_text().replace("lr: 1.0e-2,", "lr: 1.0e-2, min_lr: 0.5,"))
    error = _error(experiment)
    line = line_of(experiment, "min_lr: 0.5")
    assert error.startswith(f"{experiment}:{line}: lr_scheduler.min_lr_factor (derived from train.min_lr, optimizer.lr)")
