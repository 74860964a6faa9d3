"""Patches of the maxtext backend (ARCHITECTURE §5).

MaxText trains on CPU as released, so there are no platform patches. One feature patch connects
MaxText's per-step metrics to Primus's common `metrics.jsonl` and progress line: MaxText already
gathers loss, learning rate, grad norm and step time into `MetricLogger.write_metrics`, once per
step after the step finished, so wrapping that method reports them without copying its loop.

Two model patches give MaxText's Llama 4 block values it hard-codes (Llama 4 Maverick's and the tiny
preset's): the Llama 3 RoPE scaling (MaxText fixes Llama 3.1's factor 8, Scout has 16) and the
attention temperature's floor scale and scale. Both apply to every Llama 4 model using the feature
(the values may equal MaxText's) and read them from the module's `ModelSpec` (state `model_spec`).
"""

from __future__ import annotations

from typing import Any

from primus.patches.registry import Patch, PatchContext, Undo, replace_attr
from primus_maxtext import FRAMEWORK_RANGE
from primus_maxtext.posttrain import SFT_PATCHES

METRIC_LOGGER = "maxtext.common.metric_logger.MetricLogger"
LLAMA_ROPE = "maxtext.layers.embeddings.LLaMARotaryEmbedding"


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


def _llama4_rope_scaled(ctx: PatchContext) -> bool:
    return ctx.config_value("decoder_block") == "llama4" and bool(ctx.config_value("rope_use_scale"))


def llama3_rope_scaling(ctx: PatchContext) -> Undo:
    """Llama 3 RoPE frequency scaling with the model's factor, original length and band factors."""
    import jax.numpy as jnp
    from maxtext.layers.embeddings import LLaMARotaryEmbedding

    s = ctx.state["model_spec"].rope_scaling
    factor, low, high = float(s.factor), float(s.low_freq_factor or 1.0), float(s.high_freq_factor or 4.0)
    original = float(s.original_max_positions or 8192)

    def scaled(self: Any, freq: Any) -> Any:
        wavelen = 2 * jnp.pi / freq
        # the band between the two wavelengths blends the scaled and the original frequency (empty when
        # low == high, where the denominator would be 0)
        smooth = (original / wavelen - low) / (high - low) if high != low else jnp.zeros_like(freq)
        blended = (1 - smooth) * freq / factor + smooth * freq
        return jnp.where(wavelen < original / high, freq, jnp.where(wavelen > original / low, freq / factor, blended))

    return replace_attr(LLaMARotaryEmbedding, "_apply_scaling_factor", scaled)


def _llama4_temperature(ctx: PatchContext) -> bool:
    return ctx.config_value("decoder_block") == "llama4" and bool(ctx.config_value("temperature_tuning"))


def llama4_attention_temperature(ctx: PatchContext) -> Undo:
    """The attention MaxText's Llama 4 layer builds, with the model's temperature floor scale and scale."""
    from maxtext.models import llama4

    spec = ctx.state["model_spec"]
    original = llama4.Attention

    def attention(*args: Any, **kwargs: Any) -> Any:
        kwargs.update(temperature_tuning_floor_scale=float(spec.attn_floor_scale),
                      temperature_tuning_scale=float(spec.attn_scale))
        return original(*args, **kwargs)

    return replace_attr(llama4, "Attention", attention)


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
    *(Patch(id=f"maxtext.{name}", backend="maxtext", target=target, phase="setup", description=description,
            apply=apply, versions=FRAMEWORK_RANGE, kind="feature", predicate=predicate, predicate_doc=when,
            needs=("model_spec",))
      for name, target, apply, predicate, when, description in (
          ("llama4_rope_scaling", f"{LLAMA_ROPE}._apply_scaling_factor", llama3_rope_scaling, _llama4_rope_scaled,
           "decoder_block llama4 with rope_use_scale (a llama4 model with rope_scaling)",
           "Llama 4's Llama 3 RoPE scaling with the model's values (MaxText fixes Llama 3.1's factor 8, low 1, "
           "high 4, 8192; Llama 4 Scout has factor 16, high 1)."),
          ("llama4_attention_temperature", "maxtext.models.llama4.Attention", llama4_attention_temperature,
           _llama4_temperature, "decoder_block llama4 with temperature_tuning (a llama4 model with "
           "attn_temperature_tuning)", "Llama 4's attention temperature tuning with the model's attn_floor_scale "
           "and attn_scale (MaxText's Llama 4 layer passes 8192 and 0.1)."))),
]

# post_trainer modules: core's rows in place of MaxText's data pipeline (primus_maxtext.posttrain)
PATCHES += SFT_PATCHES
