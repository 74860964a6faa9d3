"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, each written offline into the run
directory (upstream Primus's `disable_tensorboard`, `disable_wandb`, `disable_mlflow` set to false).

Only global rank 0 writes: every rank knows the step's loss (the trainer all-reduces it), so one
writer is enough. Scalar names follow Megatron-LM's (`lm loss`, `learning-rate`, `grad-norm`,
`lm loss validation`) so existing dashboards keep working. Each tracker's package is optional
(`pip install 'primus-megatron[trackers]'`); the translator refuses a run that enables one whose
package is missing, before anything starts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

PACKAGES = {"disable_tensorboard": "tensorboard", "disable_wandb": "wandb", "disable_mlflow": "mlflow"}


class Tracker(Protocol):
    where: str  # for the log: the directory or store it writes to

    def log(self, step: int, values: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _flat_params(config: Mapping[str, Any]) -> dict[str, str]:
    """The native config as short strings (trackers keep hyper-parameters as text)."""
    return {k: str(v)[:250] for k, v in sorted(config.items()) if not isinstance(v, dict)}


class TensorBoardTracker:
    def __init__(self, config: Mapping[str, Any], run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(config.get("tensorboard_dir") or run_dir / "tensorboard")
        self.writer = SummaryWriter(log_dir=str(self.dir), max_queue=int(config.get("tensorboard_queue_size") or 1000))
        self.where = str(self.dir)
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in _flat_params(config).items()))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, config: Mapping[str, Any], run_dir: Path) -> None:
        import wandb

        self.dir = Path(config.get("wandb_save_dir") or run_dir)  # wandb adds its own wandb/ below
        self.dir.mkdir(parents=True, exist_ok=True)
        self.where = str(self.dir / "wandb")
        # offline unless the user's WANDB_MODE says otherwise: a cluster node often cannot reach the
        # service, and `wandb sync <run dir>/wandb/offline-run-*` uploads later
        self.run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(self.dir),
                              project=config.get("wandb_project") or "primus",
                              name=config.get("wandb_exp_name") or run_dir.name,
                              entity=config.get("wandb_entity"), config=_flat_params(config))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, config: Mapping[str, Any], run_dir: Path) -> None:
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow's file store is in maintenance mode and refuses to open unless allowed; it is
            # still the one backend that needs no server and no database package
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlflow").resolve().as_uri()
        self.where = uri
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        name = config.get("mlflow_experiment_name") or run_dir.name
        found = self.client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=config.get("mlflow_run_name") or None).info.run_id
        params = [mlflow.entities.Param(k, v) for k, v in _flat_params(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, values: Mapping[str, float]) -> None:
        import mlflow

        stamp = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(name, float(v), stamp, step) for name, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS: dict[str, type] = {
    "disable_tensorboard": TensorBoardTracker,
    "disable_wandb": WandbTracker,
    "disable_mlflow": MlflowTracker,
}


def step_values(report: Any) -> dict[str, float]:
    values = {"lm loss": report.loss, "learning-rate": report.lr}
    if report.grad_norm is not None:
        values["grad-norm"] = float(report.grad_norm)
    if report.step_time_s > 0:
        values["throughput/tokens-per-second"] = report.tokens / report.step_time_s
    return values
