"""fp16 on TorchTitan: FSDP2 would cast the parameters to fp16 and TorchTitan has no loss scaler,
so small gradients vanish and large ones overflow without a word. Refused before any process
starts, wherever fp16 was written (issue 18)."""

from __future__ import annotations

from pathlib import Path

from primus.config.resolve import resolve
from tests.support import assert_config_error, config_error

from .conftest import run_primus, write_experiment


def test_fp16_is_refused_naming_bf16_and_nothing_is_written(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path)
    result = run_primus("run", str(experiment), "train.precision=fp16", "--dry-run", timeout=60)
    assert_config_error(result, "command line: train.precision=fp16", "loss scaling", "bf16")
    assert not (tmp_path / "ws").exists()


def test_fp16_written_natively_is_refused_too(tmp_path: Path) -> None:
    experiment = write_experiment(tmp_path)
    err = config_error(resolve, experiment, ["overrides.training.mixed_precision_param=float16"], world_size=1)
    assert "training.mixed_precision_param" in err and "bf16" in err
    resolve(experiment, ["train.precision=bf16"], world_size=1)  # bf16 stays accepted
