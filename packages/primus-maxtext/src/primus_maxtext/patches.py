"""Patches of the maxtext backend (ARCHITECTURE §5).

MaxText trains on CPU as released, so there are no platform patches. One feature patch connects
MaxText's per-step metrics to Primus's common `metrics.jsonl` and progress line: MaxText already
gathers loss, learning rate, grad norm and step time into `MetricLogger.write_metrics`, once per
step after the step finished, so wrapping that method reports them without copying its loop.
"""

from __future__ import annotations

from typing import Any

from primus.patches.registry import Patch, PatchContext, Undo, replace_attr
from primus_maxtext import FRAMEWORK_RANGE

METRIC_LOGGER = "maxtext.common.metric_logger.MetricLogger"


def _scalar(scalars: dict[str, Any], key: str) -> float | None:
    value = scalars.get(key)
    return None if value is None else float(value)


def report_metrics_to_primus(ctx: PatchContext) -> Undo:
    from maxtext.common.metric_logger import MetricLogger

    metrics = ctx.state["metrics"]  # primus.runs.metrics.MetricsWriter, shared by the adapter
    original = MetricLogger.write_metrics

    def write_metrics(self: Any, step_metrics: dict[str, Any], step: int, metric_type: str = "train") -> None:
        original(self, step_metrics, step, metric_type)
        scalars = (step_metrics or {}).get("scalar", {})
        done = int(step) + 1  # MaxText counts steps from 0; Primus reports completed steps from 1
        config = self.config
        if metric_type == "train" and "learning/loss" in scalars:
            ctx.state["last_step"] = done  # the adapter tells a finished run from one MaxText stopped early
            interval = max(int(config.log_period), 1)
            if done % interval and done != int(config.steps) and int(step) != self.start_step:
                return
            metrics.train_step(
                done,
                loss=_scalar(scalars, "learning/loss"),
                lr=_scalar(scalars, "learning/current_learning_rate"),
                # the norm before clipping, as the other backends report it
                grad_norm=_scalar(scalars, "learning/raw_grad_norm") or _scalar(scalars, "learning/grad_norm"),
                tokens=int(config.global_batch_size_to_train_on * config.max_target_length),
                step_time_s=_scalar(scalars, "perf/step_time_seconds") or 0.0,
            )
        elif metric_type == "eval" and "eval/avg_loss" in scalars:
            metrics.eval_step(done, loss=_scalar(scalars, "eval/avg_loss"))

    return replace_attr(MetricLogger, "write_metrics", write_metrics)


PATCHES: list[Patch] = [
    Patch(
        id="maxtext.metrics_to_primus",
        backend="maxtext",
        target=f"{METRIC_LOGGER}.write_metrics",
        phase="setup",
        description="MaxText's per-step loss, lr, grad norm and step time also go to Primus's metrics.jsonl "
                    "and progress line (every log_period steps, the first and the last).",
        apply=report_metrics_to_primus,
        versions=FRAMEWORK_RANGE,
        kind="feature",
        needs=("metrics",),
    ),
]
