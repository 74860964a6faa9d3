"""What megatron would only find out on a GPU node, refused or settled before it (issue 18): layouts
the layer spec this trainer builds cannot do, and where the converted corpus goes."""

from __future__ import annotations

from pathlib import Path

import pytest
from mg_helpers import EXAMPLE, free_port, run_primus

from tests.support import assert_config_error

REFUSED = {
    # the local spec's attention (megatron-core's DotProductAttention, Primus's SDPAttention) is one rank's
    "context parallel without TransformerEngine's attention": (
        ["parallel.context=2", "--nproc-per-node", "2", "--master-port", str(free_port())],
        ["command line: parallel.context=2", "context_parallel_size 2", "does not split the sequence"]),
    # this machine has neither grouped_gemm nor TransformerEngine
    "grouped GEMM experts without the grouped_gemm package": (
        ["model=mixtral_tiny.yaml", "moe_grouped_gemm=true"],
        ["command line: moe_grouped_gemm=true", "grouped_gemm package is not installed", "moe_grouped_gemm: false"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_layout_the_layer_spec_cannot_build_is_refused(case: str, tmp_path: Path) -> None:
    args, needles = REFUSED[case]
    workspace = tmp_path / "ws"
    result = run_primus("run", str(EXAMPLE), f"workspace={workspace}", *args, "--dry-run", timeout=60)
    assert_config_error(result, *needles)
    assert not workspace.exists()
