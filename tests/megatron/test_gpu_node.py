"""What megatron would only find out on a GPU node, refused or settled before it (issue 18): layouts
the layer spec this trainer builds cannot do, and where the converted corpus goes."""

from __future__ import annotations

from pathlib import Path

import pytest
from mg_helpers import EXAMPLE, REPO, free_port, run_dir, run_primus, train_losses

from tests import support
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


def _run(workspace: Path, home: Path, *args: str, nproc: int = 1):
    launch = ["--nproc-per-node", str(nproc), "--master-port", str(free_port())] if nproc > 1 else []
    # HOME is a fresh folder and PRIMUS_CACHE_DIR unset: what a run writes outside its workspace shows
    return support.run_primus("run", str(EXAMPLE), f"workspace={workspace}", "train.steps=6", *args, *launch,
                              env={"HOME": str(home), "PRIMUS_CACHE_DIR": ""}, cwd=REPO)


def test_a_corpus_is_converted_in_the_workspace_not_under_home(tmp_path: Path) -> None:
    # on a cluster ~/.cache is often node-local: the other nodes would convert again, or not find it
    workspace, home = tmp_path / "ws", tmp_path / "home"
    home.mkdir()
    data = [f"data.path={support.CORPUS}", f"data.tokenizer={support.TOKENIZER}", "data.mock=false"]
    support.assert_ok(_run(workspace, home, *data, "train.steps=2", "disable_last_saving=true"))
    assert len(list((workspace / ".cache" / "megatron").glob("corpus-*.idx"))) == 1
    assert list((workspace / ".cache" / "megatron" / "index-cache").iterdir())  # GPTDataset's sample index
    assert not list(home.rglob("*")), list(home.rglob("*"))


def test_a_fully_parallel_save_at_dp2_resumes_to_the_same_losses(tmp_path: Path) -> None:
    # ckpt_fully_parallel_save (the default): the replicated weights are split over the two
    # data-parallel ranks instead of all written by rank 0 (before: 1.67 MB vs 1.0 MB of shards)
    from test_training import REFERENCE

    workspace, home = tmp_path / "ws", tmp_path / "home"
    home.mkdir()
    support.assert_ok(_run(workspace, home, "parallel.data=2", "exit_interval=3", nproc=2))
    saved = run_dir(workspace) / "checkpoints" / "iter_0000003"
    written = [sum(f.stat().st_size for f in saved.glob(f"__{rank}_*.distcp")) for rank in (0, 1)]
    assert min(written) > 0.85 * max(written), written
    # resumed on one process (the per-rank optimizer state reshards), losses as if never stopped
    support.assert_ok(_run(workspace, home, "disable_last_saving=true"))
    assert support.attempts(run_dir(workspace) / "metrics.jsonl")[2] == [4, 5, 6]
    assert train_losses(workspace) == pytest.approx(REFERENCE, abs=1e-4)
    assert not list(home.rglob("*")), list(home.rglob("*"))
