"""Bad input: exit 2 before any process starts, one line naming the problem, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_primus, write_experiment

CASES = {
    "unknown native key": (["training.stepz=4"], "did you mean 'training.steps'"),
    "unknown key in overrides section": (["overrides.parallelism.tensor_parallel=2"],
                                         "did you mean 'parallelism.tensor_parallel_degree'"),
    "flavor that does not exist": (["overrides.model.flavor=9B"], "flavor '9B' does not exist"),
    "degrees do not multiply to world size": (
        ["parallelism.data_parallel_shard_degree=1", "parallelism.tensor_parallel_degree=1",
         "--nproc-per-node", "2"], "multiply to 1, not the world size 2"),
    "neutral degrees do not divide world size": (["parallel.tensor=3", "--nproc-per-node", "2"],
                                                 "does not divide the world size 2"),
    "unsupported model family": (["model=mixtral_tiny.yaml"], "not supported by the torchtitan backend"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    args, expected = CASES[case]
    experiment = write_experiment(tmp_path)
    result = run_primus("run", str(experiment), *args, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "ws").exists()
