"""Tracker patches: upstream's `disable_tensorboard`, `disable_wandb`, `disable_mlflow` (all true by
default). Set one to false and global rank 0 also sends the step's loss, learning rate, grad norm,
throughput and validation loss to that tracker, offline into the run directory (trackers.py)."""

from __future__ import annotations

from pathlib import Path

from loguru import logger

from primus.patches.registry import Patch, PatchContext, Undo
from primus_megatron.trackers import TRACKERS, step_values


def _open_tracker(flag: str):  # noqa: ANN202 - returns a patch's apply
    def apply(ctx: PatchContext) -> Undo | None:
        if ctx.state["rank"] != 0:
            return None
        loop = ctx.state["loop"]
        tracker = TRACKERS[flag](ctx.config, Path(ctx.state["run_dir"]))
        logger.info(f"{flag}: false: logging to {tracker.where}")
        on_step, on_eval = loop.on_step, loop.on_eval

        def step(report):  # noqa: ANN001, ANN202
            on_step(report)
            tracker.log(report.step, step_values(report))

        def evaluate(step: int, loss: float) -> None:
            on_eval(step, loss)
            tracker.log(step, {"lm loss validation": loss})

        loop.on_step, loop.on_eval = step, evaluate

        def undo() -> None:
            loop.on_step, loop.on_eval = on_step, on_eval
            tracker.close()

        return undo

    return apply


_WHERE = {
    "disable_tensorboard": ("TensorBoard", "`<run dir>/tensorboard`, or `tensorboard_dir`"),
    "disable_wandb": ("Weights & Biases", "`<run dir>/wandb` (offline unless WANDB_MODE is set; `wandb sync` "
                      "uploads), or `<wandb_save_dir>/wandb`; `wandb_project`, `wandb_exp_name`, `wandb_entity`"),
    "disable_mlflow": ("MLflow", "a file store in `<run dir>/mlflow` unless MLFLOW_TRACKING_URI is set; "
                       "`mlflow_experiment_name`, `mlflow_run_name`"),
}

TRACKER_PATCHES: list[Patch] = [
    Patch(id=f"megatron.trackers.{flag.removeprefix('disable_')}", backend="megatron", phase="before_train",
          kind="feature", target="primus_megatron.trainer.PretrainLoop", disabled_by=flag,
          description=f"Logs the training metrics to {name} from rank 0 (set {flag}: false).",
          notes=f"writes to {where}; needs `primus-megatron[trackers]`", apply=_open_tracker(flag),
          needs=("loop", "run_dir", "rank"))
    for flag, (name, where) in _WHERE.items()
]
