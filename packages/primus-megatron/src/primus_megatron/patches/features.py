"""Feature patches: upstream Primus's Megatron flags that make sense without Primus-Turbo.

`build_args` patches fix up the native arguments before the trainer reads them (they change the
config dict in place and restore it on undo); `before_train` patches change the trainer's hooks.
"""

from __future__ import annotations

from typing import Any

from loguru import logger

from primus.patches.registry import Patch, PatchContext, Undo, replace_attr
from primus_megatron import FRAMEWORK_RANGE


def set_args(ctx: PatchContext, changes: dict[str, Any], why: str) -> Undo | None:
    """Apply `changes` to the native config, log them, and return the undo."""
    changes = {k: v for k, v in changes.items() if ctx.config.get(k) != v}
    if not changes:
        return None
    before = {k: ctx.config.get(k) for k in changes}
    ctx.config.update(changes)
    logger.info(f"{why}: " + ", ".join(f"{k}={v!r} (was {before[k]!r})" for k, v in changes.items()))
    return lambda: ctx.config.update(before)


def _cpu_arguments(ctx: PatchContext) -> Undo | None:
    # On CPU: gloo and fp32 math; the fp16/bf16 wrappers check torch.cuda tensor types and do not run
    # here. No overlap (primus_megatron.fast_path decides the same for the dry run). The distributed optimizer runs (megatron.cpu.distopt_param_types; gloo has the
    # reduce-scatter and all-gather it needs), and torch FSDP2 too (megatron.cpu.fsdp2_device_mesh).
    return set_args(ctx, {"distributed_backend": "gloo", "bf16": False, "fp16": False,
                           "overlap_grad_reduce": False, "overlap_param_gather": False}, "CPU run")


def _sequence_parallel_off_at_tp1(ctx: PatchContext) -> Undo | None:
    return set_args(ctx, {"sequence_parallel": False}, "sequence_parallel needs tensor parallel > 1")


def _moe_layer_freq_expression(ctx: PatchContext) -> Undo | None:
    from primus_megatron.translate import moe_layer_pattern

    pattern = moe_layer_pattern(ctx.config["moe_layer_freq"], int(ctx.config["num_layers"]))
    return set_args(ctx, {"moe_layer_freq": pattern}, "moe_layer_freq expression")


_LEVELS = {"TRACE": 5, "DEBUG": 10, "INFO": 20, "SUCCESS": 25, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


def _logging_level_from_sink(ctx: PatchContext) -> Undo | None:
    # Megatron-LM sets the `megatron.core` logger's level from --logging-level; upstream Primus
    # derives it from the console's level so megatron's messages follow the same filter
    import logging

    level = ctx.config.get("logging_level")
    if level is None:
        sink = str(ctx.config.get("sink_level") or ctx.config.get("stderr_sink_level") or "INFO").upper()
        level = _LEVELS.get(sink, logging.INFO)
    undo_args = set_args(ctx, {"logging_level": int(level)}, "logging_level from stderr_sink_level")
    megatron_logger = logging.getLogger("megatron.core")
    before = megatron_logger.level
    megatron_logger.setLevel(int(level))

    def undo() -> None:
        megatron_logger.setLevel(before)
        if undo_args:
            undo_args()

    return undo


def _dataloader_mp_context(ctx: PatchContext) -> Undo | None:
    return set_args(ctx, {"multiprocessing_context": ctx.config["dataloader_mp_context"]},
                     "dataloader_mp_context")


def _auto_continue_train(ctx: PatchContext) -> Undo | None:
    # Continue from the newest complete checkpoint in the save directory, with its optimizer and
    # RNG state (a continuation, not a finetune). No checkpoint yet: start from scratch.
    # `checkpoint_dir` (state) is read only when `save` is unset, so it is not among the patch's needs.
    from primus_megatron.checkpoint import latest_checkpoint

    save_dir = ctx.config.get("save") or ctx.state.get("checkpoint_dir")
    if not save_dir or latest_checkpoint(save_dir) is None:
        logger.info(f"auto_continue_train: no checkpoint in {save_dir}; starting from step 0")
        return None
    return set_args(ctx, {"load": str(save_dir), "finetune": False}, "auto_continue_train")


def _disable_last_saving(ctx: PatchContext) -> Undo:
    from primus_megatron.trainer import PretrainLoop

    return replace_attr(PretrainLoop, "save_last_checkpoint", lambda self: None)


def _recompute_method_for_layer_ids(ctx: PatchContext) -> Undo | None:
    # megatron-core validates full recompute by its method and count; the listed layers replace
    # both, so fill them in only to pass that validation
    from primus_megatron.translate import recompute_layer_ids

    ids = recompute_layer_ids(ctx.config["recompute_layer_ids"])
    changes: dict[str, Any] = {"recompute_layer_ids": ids}
    if ctx.config.get("recompute_method") is None:
        changes["recompute_method"] = "block"
    if ctx.config.get("recompute_num_layers") is None:
        changes["recompute_num_layers"] = len(ids)
    return set_args(ctx, changes, "recompute_layer_ids")


def _recompute_listed_layers(ctx: PatchContext) -> Undo:
    """Full recompute of the listed layers of each stage only: a layer whose activations are
    dropped runs its forward again in backward; the others keep theirs."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.transformer_block import TransformerBlock

    ids = set(ctx.config["recompute_layer_ids"])
    counts = ctx.state.setdefault("recompute_counts", {"checkpointed": 0, "kept": 0})

    def checkpointed_forward(self: Any, hidden_states: Any, attention_mask: Any, context: Any, context_mask: Any,
                             rotary_pos_emb: Any, attention_bias: Any, packed_seq_params: Any,
                             use_inner_quantization_context: bool, padding_mask: Any = None) -> Any:
        for index in range(self.num_layers_per_pipeline_rank):
            layer = self._get_layer(index)

            def run(hidden: Any, mask: Any, ctx_: Any, ctx_mask: Any, rope: Any, pad: Any = None,
                    layer: Any = layer) -> Any:
                return layer(hidden_states=hidden, attention_mask=mask, context=ctx_, context_mask=ctx_mask,
                             rotary_pos_emb=rope, attention_bias=attention_bias, inference_context=None,
                             packed_seq_params=packed_seq_params, padding_mask=pad)

            args = (hidden_states, attention_mask, context, context_mask, rotary_pos_emb, padding_mask)
            if index in ids:
                counts["checkpointed"] += 1
                hidden_states, context = tensor_parallel.checkpoint(run, self.config.distribute_saved_activations,
                                                                    *args)
            else:
                counts["kept"] += 1
                hidden_states, context = run(*args)
        return hidden_states

    undo = replace_attr(TransformerBlock, "_checkpointed_forward", checkpointed_forward)

    def undo_and_report() -> None:
        undo()
        logger.info(f"recompute_layer_ids {sorted(ids)}: {counts['checkpointed']} layer forwards checkpointed "
                    f"(recomputed in backward), {counts['kept']} kept their activations")

    return undo_and_report


def _gpu_memory() -> str:
    """One line on this rank's GPU memory, without a subprocess: in use on its device (the driver's
    free/total for the device torch uses, whatever the visibility mask) and this process's peak
    reserved by torch's allocator."""
    import torch

    device = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(device)
    used, peak, gib = total - free, torch.cuda.max_memory_reserved(device), 1024**3
    return (f"device {device}: {used / gib:.2f} of {total / gib:.2f} GiB in use ({100 * used / max(total, 1):.1f}%), "
            f"this rank's peak reserved {peak / gib:.2f} GiB")


def _report_rocm_memory(ctx: PatchContext) -> Undo:
    loop = ctx.state["loop"]
    every = bool(ctx.config.get("use_rocm_mem_info"))
    iterations = set(ctx.config.get("use_rocm_mem_info_iters") or [])
    train_step = loop.train_step

    def train_step_and_report(step: int) -> Any:
        report = train_step(step)
        if every or step in iterations:
            logger.info(f"GPU memory after step {step}: {_gpu_memory()}")
        return report

    return replace_attr(loop, "train_step", train_step_and_report)


def _rocm_memory_notice(ctx: PatchContext) -> None:
    logger.warning(f"use_rocm_mem_info: reports GPU memory only; nothing to report on {ctx.platform}")


def _force_load_balancing_notice(ctx: PatchContext) -> None:
    logger.warning("moe_router_force_load_balancing: the MoE router's logits are random, so every expert gets "
                   "about the same tokens; for benchmarking the experts' cost only, the model does not learn routing")


def _define_missing_te_gemm(ctx: PatchContext) -> Undo:
    # megatron-core 0.16's MoE router tests `te_general_gemm is not None`, but never defines the name
    # when TransformerEngine is absent: the first MoE forward dies with a NameError.
    from megatron.core.transformer.moe import moe_utils

    return replace_attr(moe_utils, "te_general_gemm", None)


def _transformer_engine_missing(ctx: PatchContext) -> bool:
    from primus_megatron.fast_path import transformer_engine_installed

    return not transformer_engine_installed()


def _tp_of(ctx: PatchContext) -> int:
    return int(ctx.config.get("tensor_model_parallel_size") or 1)


FEATURE_PATCHES: list[Patch] = [
    Patch(id="megatron.moe.te_gemm_undefined", backend="megatron", phase="setup", kind="platform",
          versions=FRAMEWORK_RANGE, target="megatron.core.transformer.moe.moe_utils",
          predicate=_transformer_engine_missing,
          predicate_doc="TransformerEngine is not installed",
          description="Defines moe_utils.te_general_gemm = None so the MoE router falls back to torch matmul.",
          apply=_define_missing_te_gemm),
    Patch(id="megatron.args.cpu", backend="megatron", phase="build_args", kind="platform",
          platforms=frozenset({"cpu"}), target="primus_megatron.trainer", check_target=False,
          description="CPU: gloo backend and fp32 (bf16/fp16 need CUDA); no overlapped grad reduce or param gather.",
          apply=_cpu_arguments),
    Patch(id="megatron.args.sequence_parallel_tp1", backend="megatron", phase="build_args", kind="feature",
          target="primus_megatron.trainer", check_target=False, enabled_by="sequence_parallel",
          enabled_by_default=False, predicate=lambda ctx: _tp_of(ctx) == 1,
          predicate_doc="tensor_model_parallel_size is 1",
          description="Turns sequence parallel off at tensor parallel 1, where it has nothing to split.",
          apply=_sequence_parallel_off_at_tp1),
    Patch(id="megatron.args.moe_layer_freq_expression", backend="megatron", phase="build_args", kind="feature",
          target="primus_megatron.trainer", check_target=False, enabled_by="moe_layer_freq", enabled_by_default=False,
          predicate=lambda ctx: isinstance(ctx.config.get("moe_layer_freq"), str),
          predicate_doc="moe_layer_freq is a string",
          description='Reads a moe_layer_freq expression such as "([0]*1+[1]*3)" into its per-layer list.',
          notes="list literals, + and * only; the pattern must have one entry per layer", apply=_moe_layer_freq_expression),
    Patch(id="megatron.args.logging_level", backend="megatron", phase="build_args", kind="platform",
          target="primus_megatron.trainer", check_target=False,
          description="The megatron.core logger's level: logging_level, else the module's stderr_sink_level.",
          apply=_logging_level_from_sink),
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
    Patch(id="megatron.args.recompute_layer_ids", backend="megatron", phase="build_args", kind="feature",
          target="primus_megatron.trainer", check_target=False, enabled_by="recompute_layer_ids",
          enabled_by_default=False,
          description="Recomputes only the listed layers of each pipeline stage (with recompute_granularity: full).",
          notes="ids count the layers of one stage (of one model chunk with a virtual pipeline), from 0; a list "
                "or a string like \"0,1\"",
          apply=_recompute_method_for_layer_ids),
    Patch(id="megatron.transformer.recompute_layer_ids", backend="megatron", phase="setup", kind="feature",
          versions=FRAMEWORK_RANGE, target="megatron.core.transformer.transformer_block.TransformerBlock."
          "_checkpointed_forward", enabled_by="recompute_layer_ids", enabled_by_default=False,
          description="The full-recompute forward checkpoints the listed layers and runs the others as usual.",
          notes="logs how many layer forwards were checkpointed at the end of the run",
          apply=_recompute_listed_layers),
    Patch(id="megatron.rocm_mem_info", backend="megatron", phase="before_train", kind="feature",
          platforms=frozenset({"rocm", "cuda"}), target="primus_megatron.trainer.PretrainLoop.train_step",
          enabled_by="use_rocm_mem_info", enabled_by_default=False,
          description="Logs this rank's GPU memory (torch.cuda.mem_get_info, max_memory_reserved) after every step.", needs=("loop",),
          notes="without it, after the steps in use_rocm_mem_info_iters",
          apply=_report_rocm_memory),
    Patch(id="megatron.rocm_mem_info_iters", backend="megatron", phase="before_train", kind="feature",
          platforms=frozenset({"rocm", "cuda"}), target="primus_megatron.trainer.PretrainLoop.train_step",
          enabled_by="use_rocm_mem_info_iters", enabled_by_default=False,
          predicate=lambda ctx: not ctx.config.get("use_rocm_mem_info"), predicate_doc="use_rocm_mem_info is off",
          description="Logs this rank's GPU memory (torch.cuda.mem_get_info, max_memory_reserved) after the listed steps.", needs=("loop",),
          apply=_report_rocm_memory),
    Patch(id="megatron.rocm_mem_info.unavailable", backend="megatron", phase="before_train", kind="feature",
          platforms=frozenset({"cpu"}), target="primus_megatron.trainer", check_target=False,
          enabled_by="use_rocm_mem_info", enabled_by_default=False,
          description="A notice that use_rocm_mem_info has nothing to report on CPU.",
          apply=_rocm_memory_notice),
    Patch(id="megatron.moe.force_load_balancing", backend="megatron", phase="build_args", kind="feature",
          versions=FRAMEWORK_RANGE, target="megatron.core.transformer.moe.router.TopKRouter",
          enabled_by="moe_router_force_load_balancing", enabled_by_default=False,
          description="Routes tokens with random logits, so the experts get balanced load (for benchmarking).",
          notes="megatron-core 0.16 has it natively (TransformerConfig.moe_router_force_load_balancing); the "
                "trainer passes it through and this patch warns that routing is no longer learned",
          apply=_force_load_balancing_notice),
    Patch(id="megatron.disable_last_saving", backend="megatron", phase="before_train", kind="feature",
          target="primus_megatron.trainer.PretrainLoop.save_last_checkpoint", enabled_by="disable_last_saving",
          enabled_by_default=False,
          description="Skips the checkpoint after the last step (interval checkpoints are still written).",
          apply=_disable_last_saving),
]
