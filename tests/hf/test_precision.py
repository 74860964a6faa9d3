"""fp16 on the hf loop: DDP and single-process runs scale the loss (torch.amp.GradScaler), FSDP2's
mixed precision has no scaler, so fp16 with parallel.fsdp is refused before any process starts
(issue 18)."""

from __future__ import annotations

from pathlib import Path

from primus.config.resolve import resolve
from tests.support import assert_config_error

from .conftest import run_primus, write_experiment


def test_fp16_under_fsdp_is_refused_naming_bf16_and_nothing_is_written(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path, global_batch=8)
    result = run_primus("run", str(experiment), "train.precision=fp16", "parallel.fsdp=true", "--nproc-per-node",
                        "2", "--dry-run", timeout=60)
    assert_config_error(result, "command line: train.precision=fp16", "no loss scaling", "bf16")
    assert not (tmp_path / "ws").exists()
    # fp16 without FSDP keeps its scaler, bf16 under FSDP needs none: both resolve
    resolve(experiment, ["train.precision=fp16"], world_size=2)
    resolve(experiment, ["train.precision=bf16", "parallel.fsdp=true"], world_size=2)
