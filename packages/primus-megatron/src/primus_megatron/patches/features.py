"""Feature patches: upstream Primus's Megatron flags that make sense without Primus-Turbo.

`build_args` patches fix up the native arguments before the trainer reads them (they change the
config dict in place and restore it on undo); `before_train` patches change the trainer's hooks.
"""

from __future__ import annotations

from typing import Any

from loguru import logger

from primus.patches.registry import Patch, PatchContext, Undo, replace_attr


def _set_args(ctx: PatchContext, changes: dict[str, Any], why: str) -> Undo | None:
    """Apply `changes` to the native config, log them, and return the undo."""
    changes = {k: v for k, v in changes.items() if ctx.config.get(k) != v}
    if not changes:
        return None
    before = {k: ctx.config.get(k) for k in changes}
    ctx.config.update(changes)
    logger.info(f"{why}: " + ", ".join(f"{k}={v!r} (was {before[k]!r})" for k, v in changes.items()))
    return lambda: ctx.config.update(before)


def _cpu_arguments(ctx: PatchContext) -> Undo | None:
    # On CPU: gloo, fp32 math, and the plain (replicated) optimizer; the fp16/bf16 wrappers and the
    # distributed optimizer check torch.cuda tensor types and do not run here.
    return _set_args(ctx, {"distributed_backend": "gloo", "bf16": False, "fp16": False,
                           "use_distributed_optimizer": False, "overlap_grad_reduce": False,
                           "overlap_param_gather": False}, "CPU run")


def _sequence_parallel_off_at_tp1(ctx: PatchContext) -> Undo | None:
    return _set_args(ctx, {"sequence_parallel": False}, "sequence_parallel needs tensor parallel > 1")


def _dataloader_mp_context(ctx: PatchContext) -> Undo | None:
    return _set_args(ctx, {"multiprocessing_context": ctx.config["dataloader_mp_context"]},
                     "dataloader_mp_context")


def _auto_continue_train(ctx: PatchContext) -> Undo | None:
    # Continue from the newest complete checkpoint in the save directory, with its optimizer and
    # RNG state (a continuation, not a finetune). No checkpoint yet: start from scratch.
    from primus_megatron.checkpoint import latest_checkpoint

    save_dir = ctx.config.get("save") or ctx.state.get("checkpoint_dir")
    if not save_dir or latest_checkpoint(save_dir) is None:
        logger.info(f"auto_continue_train: no checkpoint in {save_dir}; starting from step 0")
        return None
    return _set_args(ctx, {"load": str(save_dir), "finetune": False}, "auto_continue_train")


def _disable_last_saving(ctx: PatchContext) -> Undo:
    from primus_megatron.trainer import PretrainLoop

    return replace_attr(PretrainLoop, "save_last_checkpoint", lambda self: None)


def _define_missing_te_gemm(ctx: PatchContext) -> Undo:
    # megatron-core 0.16's MoE router tests `te_general_gemm is not None`, but never defines the name
    # when TransformerEngine is absent: the first MoE forward dies with a NameError.
    from megatron.core.transformer.moe import moe_utils

    return replace_attr(moe_utils, "te_general_gemm", None)


def _transformer_engine_missing(ctx: PatchContext) -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is None


def _tp_of(ctx: PatchContext) -> int:
    return int(ctx.config.get("tensor_model_parallel_size") or 1)


FEATURE_PATCHES: list[Patch] = [
    Patch(id="megatron.moe.te_gemm_undefined", backend="megatron", phase="setup", kind="platform",
          versions=">=0.16,<0.17", target="megatron.core.transformer.moe.moe_utils", predicate=_transformer_engine_missing,
          predicate_doc="TransformerEngine is not installed",
          description="Defines moe_utils.te_general_gemm = None so the MoE router falls back to torch matmul.",
          apply=_define_missing_te_gemm),
    Patch(id="megatron.args.cpu", backend="megatron", phase="build_args", kind="platform",
          platforms=frozenset({"cpu"}), target="primus_megatron.trainer", check_target=False,
          description="CPU: gloo backend, fp32, plain optimizer (bf16 and the distributed optimizer need CUDA).",
          apply=_cpu_arguments),
    Patch(id="megatron.args.sequence_parallel_tp1", backend="megatron", phase="build_args", kind="feature",
          target="primus_megatron.trainer", check_target=False, enabled_by="sequence_parallel",
          enabled_by_default=False, predicate=lambda ctx: _tp_of(ctx) == 1,
          predicate_doc="tensor_model_parallel_size is 1",
          description="Turns sequence parallel off at tensor parallel 1, where it has nothing to split.",
          apply=_sequence_parallel_off_at_tp1),
    Patch(id="megatron.args.dataloader_mp_context", backend="megatron", phase="build_args", kind="feature",
          target="primus_megatron.trainer", check_target=False, enabled_by="dataloader_mp_context",
          enabled_by_default=False,
          description="Primus's dataloader_mp_context becomes the DataLoader's multiprocessing_context.",
          apply=_dataloader_mp_context),
    Patch(id="megatron.auto_continue_train", backend="megatron", phase="build_args", kind="feature",
          target="primus_megatron.trainer", check_target=False, enabled_by="auto_continue_train",
          enabled_by_default=False,
          description="Loads the newest complete checkpoint of the save directory, if there is one.",
          apply=_auto_continue_train),
    Patch(id="megatron.disable_last_saving", backend="megatron", phase="before_train", kind="feature",
          target="primus_megatron.trainer.PretrainLoop.save_last_checkpoint", enabled_by="disable_last_saving",
          enabled_by_default=False,
          description="Skips the checkpoint after the last step (interval checkpoints are still written).",
          apply=_disable_last_saving),
]
