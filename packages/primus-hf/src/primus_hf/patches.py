"""The hf backend's patches (ARCHITECTURE §5): Primus feature flags, applied through core's registry.

Each is data plus a function that returns its undo; `primus patches --backend hf` lists them and
docs/backends/hf.md is generated from this list. Functions import what they change inside their
bodies, so loading this module stays light.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from primus.patches.registry import Patch, PatchContext, Undo, replace_attr

BACKEND = "hf"


# --------------------------------------------------------------------------- checkpoints and saving


def _auto_continue(ctx: PatchContext) -> Undo:
    """resume_point() falls back to the newest complete checkpoint in the checkpoint directory."""
    from primus_hf.adapter import HFAdapter, complete_checkpoints

    explicit_only = HFAdapter.resume_point

    def resume_point(self: HFAdapter) -> Path | None:
        explicit = explicit_only(self)
        if explicit is not None:
            return explicit
        found = complete_checkpoints(self.checkpoint_dir)
        return found[-1] if found else None

    return replace_attr(HFAdapter, "resume_point", resume_point)


def _skip_last_saving(ctx: PatchContext) -> Undo:
    from loguru import logger

    from primus_hf.adapter import HFAdapter

    def save_final_model(self: HFAdapter) -> None:
        logger.info("final model not saved (disable_last_saving)")

    return replace_attr(HFAdapter, "save_final_model", save_final_model)


# --------------------------------------------------------------------------- experiment trackers


def _tracker(open_sink: Callable[[PatchContext, Path], tuple[Callable[[dict[str, Any]], None], Callable[[], None]]]
             ) -> Callable[[PatchContext], Undo | None]:
    """Mirror every train and eval record of rank 0 into a tracker that logs offline into the run dir."""

    def apply(ctx: PatchContext) -> Undo | None:
        metrics = ctx.state["metrics"]
        if not metrics.is_writer:
            return None
        log, close = open_sink(ctx, Path(ctx.state["run_dir"]))
        train_step, eval_step = metrics.train_step, metrics.eval_step

        def mirrored_train_step(step: int, **kw: Any) -> dict[str, Any]:
            record = train_step(step, **kw)
            log(record)
            return record

        def mirrored_eval_step(step: int, **kw: Any) -> dict[str, Any]:
            record = eval_step(step, **kw)
            log(record)
            return record

        undo_train = replace_attr(metrics, "train_step", mirrored_train_step)
        undo_eval = replace_attr(metrics, "eval_step", mirrored_eval_step)

        def undo() -> None:
            undo_eval()
            undo_train()
            close()

        return undo

    return apply


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}


def _tensorboard(ctx: PatchContext, run_dir: Path) -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(record: dict[str, Any]) -> None:
        for key, value in _numbers(record).items():
            writer.add_scalar(key, value, record["step"])

    return log, writer.close


def _wandb(ctx: PatchContext, run_dir: Path) -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")  # `wandb sync` uploads later; training never waits on it
    run = wandb.init(dir=str(run_dir), project=os.environ.get("WANDB_PROJECT", "primus"), name=run_dir.name,
                     config=ctx.config, mode=os.environ["WANDB_MODE"])

    def log(record: dict[str, Any]) -> None:
        run.log(_numbers(record), step=record["step"])

    return log, run.finish


def _mlflow(ctx: PatchContext, run_dir: Path) -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
    import mlflow

    if "MLFLOW_TRACKING_URI" not in os.environ:
        mlflow.set_tracking_uri((run_dir / "mlruns").as_uri())
    mlflow.start_run(run_name=run_dir.name)

    def log(record: dict[str, Any]) -> None:
        mlflow.log_metrics(_numbers(record), step=record["step"])

    return log, mlflow.end_run


def _tracker_on(key: str) -> Callable[[PatchContext], bool]:
    return lambda ctx: not ctx.config.get(key, True)


TRACKER_NEEDS = ("metrics", "run_dir")  # the adapter passes both at before_train


PATCHES: list[Patch] = [
    Patch(id="hf.auto_continue_train", backend=BACKEND, kind="feature", phase="setup",
          target="primus_hf.adapter.HFAdapter.resume_point", enabled_by="auto_continue_train",
          enabled_by_default=False, apply=_auto_continue,
          description="Resume from the newest complete checkpoint in the checkpoint dir (checkpoint.resume: auto)."),
    Patch(id="hf.disable_last_saving", backend=BACKEND, kind="feature", phase="before_train",
          target="primus_hf.adapter.HFAdapter.save_final_model", enabled_by="disable_last_saving",
          enabled_by_default=False, apply=_skip_last_saving,
          description="Skip saving the final model to <run dir>/model."),
    Patch(id="hf.tensorboard", backend=BACKEND, kind="feature", phase="before_train",
          target="primus.runs.metrics.MetricsWriter.train_step", predicate=_tracker_on("disable_tensorboard"),
          predicate_doc="`disable_tensorboard: false`", apply=_tracker(_tensorboard), needs=TRACKER_NEEDS,
          description="Mirror train/eval metrics to TensorBoard under <run dir>/tensorboard (rank 0)."),
    Patch(id="hf.wandb", backend=BACKEND, kind="feature", phase="before_train",
          target="primus.runs.metrics.MetricsWriter.train_step", predicate=_tracker_on("disable_wandb"),
          predicate_doc="`disable_wandb: false`", apply=_tracker(_wandb), needs=TRACKER_NEEDS,
          description="Mirror train/eval metrics to Weights & Biases, offline under <run dir>/wandb (rank 0)."),
    Patch(id="hf.mlflow", backend=BACKEND, kind="feature", phase="before_train",
          target="primus.runs.metrics.MetricsWriter.train_step", predicate=_tracker_on("disable_mlflow"),
          predicate_doc="`disable_mlflow: false`", apply=_tracker(_mlflow), needs=TRACKER_NEEDS,
          description="Mirror train/eval metrics to MLflow, a file store under <run dir>/mlruns (rank 0)."),
]
