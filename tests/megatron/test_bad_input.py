"""Bad input: exit 2 before any process starts, one line on stderr, nothing in the workspace."""

from __future__ import annotations

from pathlib import Path

import pytest
from mg_helpers import EXAMPLE, free_port, run_primus

CASES = {
    "unknown native key": (["log_intervall=1"], 1, ["log_intervall", "log_interval"]),
    "tensor does not divide heads": (["tensor_model_parallel_size=3", "train.global_batch_size=6"], 3,
                                     ["tensor_model_parallel_size", "4 attention heads"]),
    "pipeline does not divide layers": (["pipeline_model_parallel_size=2", "num_layers=3"], 2,
                                        ["command line: pipeline_model_parallel_size=2",
                                         "pipeline (2) does not divide the model's 3 layers"]),
    "corpus missing, given on the command line": (["data.mock=false", "data.path=/nope.jsonl"], 1,
                                                  ["command line: data.path=/nope.jsonl: corpus /nope.jsonl"]),
    "sequences longer than the model's positions": (["train.seq_length=4096"], 1,
                                                    ["command line: train.seq_length=4096",
                                                     "max_position_embeddings 256"]),
    "global batch not a multiple": (["train.global_batch_size=5"], 1, ["global_batch_size", "multiple"]),
    "interleaved pipeline with batch_p2p_comm": (
        ["pipeline_model_parallel_size=2", "num_layers=4", "virtual_pipeline_model_parallel_size=2",
         "batch_p2p_comm=true"], 2, ["batch_p2p_comm", "silently wrong"]),
    "moe_layer_freq expression that is code": (["model=mixtral_tiny.yaml", "moe_layer_freq=__import__('os').getcwd()"],
                                               1, ["moe_layer_freq", "not a layer pattern"]),
    "recompute layer id past the stage": (["recompute_granularity=full", "recompute_layer_ids=[0,2]"], 1,
                                          ["recompute_layer_ids", "0 to 1"]),
    "recompute layer ids without full recompute": (["recompute_layer_ids=0,1"], 1,
                                                   ["recompute_granularity: full"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_and_leaves_nothing(case: str, tmp_path: Path) -> None:
    overrides, nproc, expected = CASES[case]
    workspace = tmp_path / "ws"
    launch = ["--nproc-per-node", str(nproc), "--master-port", str(free_port())] if nproc > 1 else []
    result = run_primus("run", str(EXAMPLE), f"workspace={workspace}", *overrides, *launch, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("primus: error:"), result.stderr
    for text in expected:
        assert text in lines[0]
    assert not workspace.exists()
