"""The torchtitan backend's patch layer: every change Primus makes to TorchTitan or torch, as data.

Core applies these by phase (ARCHITECTURE §5); each `apply` imports what it changes inside its
body and returns the undo. Three groups:

- CPU platform patches: what TorchTitan 0.3 needs to train without a GPU (tests, development).
  Each one answers one obstacle listed in shared/notes/cpu-frameworks.md.
- Platform patches for AMD GPUs: the peak-FLOPs table MFU is computed against.
- Feature patches: upstream Primus switches (`primus_turbo.enable_embedding_autocast`) and
  logging routed into Primus's logger.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

from primus.patches.registry import Patch, PatchContext, Undo, replace_attr
from primus.runs.logs import InterceptHandler
from primus_torchtitan import FRAMEWORK_RANGE

BACKEND = "torchtitan"
CPU = frozenset({"cpu"})
GPUS = frozenset({"rocm", "cuda"})



def _chain(*undos: Undo | None) -> Undo:
    def undo() -> None:
        for u in reversed(undos):
            if u is not None:
                u()

    return undo


# ----------------------------------------------------------------------------- CPU: before import

TRITON_KERNELS = "torchtitan.distributed.minimal_async_ep.kernels"


def _stub_triton_kernels(ctx: PatchContext) -> Undo:
    # The expert-parallel kernel module imports triton at top level, and the common MoE code
    # imports it. Stubbing triton itself would make torch believe triton works, so only this one
    # module is replaced; its names import fine and fail with a clear message when called.
    stub = types.ModuleType(TRITON_KERNELS)
    stub.__doc__ = "Primus CPU stub: the triton expert-parallel kernels are unavailable without a GPU."

    def _unavailable(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)

        def kernel(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"{TRITON_KERNELS}.{name} needs triton and a GPU (stubbed by Primus on CPU)")

        return kernel

    stub.__getattr__ = _unavailable  # type: ignore[method-assign]
    previous = sys.modules.get(TRITON_KERNELS)
    sys.modules[TRITON_KERNELS] = stub

    def undo() -> None:
        if previous is None:
            sys.modules.pop(TRITON_KERNELS, None)
        else:
            sys.modules[TRITON_KERNELS] = previous

    return undo


def _force_cpu_device(ctx: PatchContext) -> Undo:
    # torchtitan.tools.utils decides its device once, at import: with no accelerator it falls back
    # to "cuda". Import it while torch's detection answers "cpu", then restore torch's function.
    import torch._utils

    original = torch._utils._get_available_device_type
    undo_detect = replace_attr(torch._utils, "_get_available_device_type", lambda: original() or "cpu")
    try:
        import torchtitan.tools.utils as tt_utils
    finally:
        undo_detect()
    if tt_utils.device_type != "cpu" and original() is None:
        # imported earlier (without the patch): fix the module-level choice in place
        tt_utils.device_type, tt_utils.device_module = "cpu", torch.cpu
    return lambda: None


class _CpuMemoryStats:
    """What torchtitan's DeviceMemoryMonitor asks of a device module, answered for host memory."""

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        import platform

        return platform.processor() or platform.machine() or "cpu"

    @staticmethod
    def get_device_properties(device: Any = None) -> Any:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return types.SimpleNamespace(total_memory=total, name="cpu")

    @staticmethod
    def memory_stats(device: Any = None) -> dict[str, int]:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak,
                "num_alloc_retries": 0, "num_ooms": 0}

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None


def _cpu_device_api(ctx: PatchContext) -> Undo:
    # torch.cpu lacks the memory and name calls torchtitan's metrics make, and its
    # current_device() returns the string "cpu", which dist.barrier(device_ids=[...]) rejects.
    import torch

    undos = [replace_attr(torch.cpu, name, getattr(_CpuMemoryStats, name))
             for name in ("get_device_name", "get_device_properties", "memory_stats",
                          "reset_peak_memory_stats", "empty_cache")
             if not hasattr(torch.cpu, name)]
    undos.append(replace_attr(torch.cpu, "current_device", lambda: 0))
    original_barrier = torch.distributed.barrier

    def barrier(group: Any = None, async_op: bool = False, device_ids: Any = None) -> Any:
        # gloo has no per-device barrier; a plain barrier synchronises the same ranks
        return original_barrier(group=group, async_op=async_op)

    undos.append(replace_attr(torch.distributed, "barrier", barrier))
    return _chain(*undos)


def _dist_set_timeout(ctx: PatchContext) -> Undo:
    # torch 2.13 has no public torch.distributed.set_timeout; the private setter does the same job.
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    def set_timeout(timeout: Any, group: Any = None) -> None:
        c10d._set_pg_timeout(timeout, group)

    return replace_attr(dist, "set_timeout", set_timeout)


def _gloo_sum_reduction(ctx: PatchContext) -> Undo:
    # TorchTitan sets FSDP's gradient divide factor to 1, which makes FSDP reduce with PREMUL_SUM;
    # gloo rejects that op. Forcing plain sum reductions gives the same gradients.
    from torch.distributed.fsdp import FSDPModule

    original = FSDPModule.set_gradient_divide_factor

    def set_gradient_divide_factor(self: Any, factor: float) -> None:
        original(self, factor)
        self.set_force_sum_reduction_for_comms(True)

    return replace_attr(FSDPModule, "set_gradient_divide_factor", set_gradient_divide_factor)


# ----------------------------------------------------------------------------- CPU: after import


def _eager_masked_attention(ctx: PatchContext) -> Undo:
    # FlexAttention has no backward on CPU. The same attention, computed eagerly from the dense
    # form of the same BlockMask (block-causal over document positions), trains identically.
    import torch
    from torch.nn.attention.flex_attention import AuxOutput, create_mask
    from torchtitan.models.common.attention import FlexAttention

    def eager_attention(q: Any, k: Any, v: Any, *, score_mod: Any, block_mask: Any, scale: Any,
                        enable_gqa: bool, return_aux: Any, kernel_options: dict) -> Any:
        batch, heads, q_len, head_dim = q.shape
        kv_len = k.shape[-2]
        if k.shape[1] != heads:  # grouped-query attention: repeat key/value heads
            k = k.repeat_interleave(heads // k.shape[1], dim=1)
            v = v.repeat_interleave(heads // v.shape[1], dim=1)
        scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else head_dim ** -0.5)
        if score_mod is not None:
            raise NotImplementedError("score_mod is not supported by Primus's CPU attention")
        if block_mask is not None:
            mask_batch = block_mask.kv_num_blocks.shape[0]
            mask = create_mask(block_mask.mask_mod, mask_batch, None, q_len, kv_len, device=q.device)
            scores = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(scores.float(), dim=-1)
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return out, AuxOutput(lse=lse if return_aux is not None and return_aux.lse else None)

    return replace_attr(FlexAttention, "compiled_flex_attn", staticmethod(eager_attention))


def _eager_block_mask(ctx: PatchContext) -> Undo:
    # TorchTitan compiles create_block_mask; on CPU that inductor compile costs about 10 s per
    # process for a mask the eager attention above only turns dense again.
    import torchtitan.models.common.attention as attention
    from torch.nn.attention.flex_attention import create_block_mask

    return replace_attr(attention, "_compiled_create_block_mask", create_block_mask)


def _grouped_experts_in_input_dtype(ctx: PatchContext) -> Undo:
    # TorchTitan's routed experts cast tokens and weights to bf16 for torch._grouped_mm whatever
    # the training precision (the GPU kernels are bf16-only). On CPU the grouped matmul runs in
    # fp32 too: computed in the tokens' dtype, an fp32 run matches transformers' experts exactly
    # (bf16 moves a tiny model's loss by about 1e-3), and a bf16 run is unchanged.
    import spmd_types as spmd
    import torch
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor
    from torchtitan.distributed.spmd_types import spmd_mesh_size
    from torchtitan.distributed.utils import get_spmd_backend
    from torchtitan.models.common.moe import GroupedExperts

    def forward(self: Any, x_RD: Any, num_tokens_per_expert_E: Any) -> Any:
        w1, w2, w3 = (w.to_local() if isinstance(w, DTensor) else w for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD))
        offsets = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        if get_spmd_backend() == "spmd_types" and spmd.is_type_checking() and spmd_mesh_size("ep") == 1:
            for axis in ("dp", "cp"):  # as TorchTitan's forward does before its grouped matmuls
                spmd.mutate_type(offsets, axis, src=spmd.P, dst=spmd.V)
        dtype = x_RD.dtype
        h = F.silu(self._grouped_mm(A=x_RD, B_t=w1.to(dtype).transpose(-2, -1), offs=offsets))
        h = h * self._grouped_mm(A=x_RD, B_t=w3.to(dtype).transpose(-2, -1), offs=offsets)
        return self._grouped_mm(A=h, B_t=w2.to(dtype).transpose(-2, -1), offs=offsets)

    return replace_attr(GroupedExperts, "forward", forward)


def _cpu_spmd_backend(ctx: PatchContext) -> Undo | None:
    # With FSDP or TP on CPU TorchTitan's default SPMD backend fails at start, and full_dtensor
    # trains but reports about twice the loss; partial_dtensor trains correctly.
    config = ctx.state["titan_config"]
    if ctx.config_value("parallelism.spmd_backend") is not None:
        return None
    old = config.parallelism.spmd_backend
    config.parallelism.spmd_backend = "partial_dtensor"

    def undo() -> None:
        config.parallelism.spmd_backend = old

    return undo


def _multi_process(ctx: PatchContext) -> bool:
    # the context's world size, so `primus run --dry-run` (which passes no run state) decides alike
    return ctx.world_size > 1


# ----------------------------------------------------------------------------- AMD GPUs

#: bf16 dense peak per GPU (shared/notes/rocm-env.md). TorchTitan's own table knows MI300X/MI325X
#: as 1300 TFLOP/s and has no MI350X; upstream Primus uses these values.
AMD_PEAK_FLOPS = {"MI355X": 2500e12, "MI350X": 2300e12, "MI325X": 1307e12, "MI300X": 1307e12}


def amd_peak_flops(device_name: str) -> float | None:
    for product, flops in AMD_PEAK_FLOPS.items():
        if product in device_name:
            return flops
    return None


def _amd_peak_flops(ctx: PatchContext) -> Undo:
    import torchtitan.tools.utils as tt_utils

    original = tt_utils.get_peak_flops

    def get_peak_flops(device_name: str) -> float:
        return amd_peak_flops(device_name) or original(device_name)

    return replace_attr(tt_utils, "get_peak_flops", get_peak_flops)


# ----------------------------------------------------------------------------- features


def _embedding_autocast_on(ctx: PatchContext) -> bool:
    return bool(ctx.config_value("primus_turbo.enable_embedding_autocast", True))


def _embedding_autocast(ctx: PatchContext) -> Undo:
    # Under autocast an embedding lookup keeps the weight's dtype (fp32), so the first block runs
    # in fp32 until a matmul casts. Upstream Primus casts the embedding output to the AMP dtype.
    # A forward hook, not a new forward: TorchTitan wraps module forwards for SPMD redistribution.
    from torchtitan.models.common.embedding import Embedding

    original_init = Embedding.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.register_forward_hook(cast_to_autocast_dtype)

    return replace_attr(Embedding, "__init__", __init__)


def cast_to_autocast_dtype(module: Any, inputs: Any, out: Any) -> Any:
    import torch

    device = out.device.type
    if torch.is_autocast_enabled(device) and out.is_floating_point():
        dtype = torch.get_autocast_dtype(device)
        if out.dtype != dtype:
            return out.to(dtype)
    return None


def _log_final_step(ctx: PatchContext) -> Undo | None:
    # TorchTitan logs step 1 and every `metrics.log_freq`-th step: a run whose step count is not a
    # multiple of it ends without a metrics line for its last step, so metrics.jsonl, `primus runs`
    # and the summary line report an earlier loss as the final one. Log the final step as well
    # (PrimusMetricsLogger already divides TorchTitan's interval time by the steps it covers).
    from torchtitan.components.metrics import MetricsProcessor

    final = ctx.config_value("training.steps")
    if not isinstance(final, int) or final <= 0:
        return None
    original = MetricsProcessor.should_log

    def should_log(self: Any, step: int) -> bool:
        return step == final or original(self, step)

    return replace_attr(MetricsProcessor, "should_log", should_log)


def _route_logging(ctx: PatchContext) -> Undo:
    # TorchTitan logs through the stdlib logger "torchtitan..." (and init_logger() adds its own
    # stream handler); routing it into loguru puts its lines in Primus's sinks and log files.
    import torchtitan.tools.logging as tt_logging

    titan_logger = tt_logging.logger
    handler = InterceptHandler(framework="torchtitan")
    saved = (list(titan_logger.handlers), titan_logger.propagate, titan_logger.level)
    titan_logger.handlers = [handler]
    titan_logger.propagate = False
    titan_logger.setLevel(logging.INFO)
    undo_init = replace_attr(tt_logging, "init_logger", lambda *a, **k: None)

    def undo() -> None:
        undo_init()
        titan_logger.handlers, titan_logger.propagate = saved[0], saved[1]
        titan_logger.setLevel(saved[2])

    return undo


PATCHES: list[Patch] = [
    Patch(
        id="torchtitan.cpu.stub_triton_kernels", backend=BACKEND, target=TRITON_KERNELS,
        phase="before_import", versions=FRAMEWORK_RANGE, platforms=CPU, check_target=False,
        description="Replace the expert-parallel triton kernel module (imported at top level) with a "
                    "stub, so torchtitan imports without triton; triton itself stays absent.",
        apply=_stub_triton_kernels),
    Patch(
        id="torchtitan.cpu.device_type", backend=BACKEND, target="torchtitan.tools.utils.device_type",
        phase="before_import", versions=FRAMEWORK_RANGE, platforms=CPU, check_target=False,
        description="Make torchtitan's import-time device detection answer `cpu` instead of falling "
                    "back to `cuda`.",
        apply=_force_cpu_device),
    Patch(
        id="torchtitan.cpu.device_api", backend=BACKEND, target="torch.cpu", phase="before_import",
        versions=FRAMEWORK_RANGE, platforms=CPU,
        description="Give `torch.cpu` the memory-stats and device-name calls torchtitan's metrics make, "
                    "an integer `current_device()`, and a barrier that ignores `device_ids` under gloo.",
        apply=_cpu_device_api),
    Patch(
        id="torchtitan.cpu.dist_set_timeout", backend=BACKEND, target="torch.distributed.set_timeout",
        phase="before_import", versions=FRAMEWORK_RANGE, platforms=CPU, check_target=False,
        description="Provide `torch.distributed.set_timeout` (missing in torch 2.13) through the private "
                    "`_set_pg_timeout`.",
        apply=_dist_set_timeout),
    Patch(
        id="torchtitan.cpu.gloo_sum_reduction", backend=BACKEND,
        target="torch.distributed.fsdp.FSDPModule.set_gradient_divide_factor", phase="before_import",
        versions=FRAMEWORK_RANGE, platforms=CPU,
        description="Force plain SUM reductions in FSDP2, since gloo rejects the PREMUL_SUM op that a "
                    "divide factor of 1 selects.",
        apply=_gloo_sum_reduction),
    Patch(
        id="torchtitan.cpu.eager_attention", backend=BACKEND,
        target="torchtitan.models.common.attention.FlexAttention.compiled_flex_attn", phase="setup",
        versions=FRAMEWORK_RANGE, platforms=CPU,
        description="Compute FlexAttention eagerly from the dense form of the same block mask: "
                    "FlexAttention has no backward on CPU.",
        apply=_eager_masked_attention),
    Patch(
        id="torchtitan.cpu.eager_block_mask", backend=BACKEND,
        target="torchtitan.models.common.attention._compiled_create_block_mask", phase="setup",
        versions=FRAMEWORK_RANGE, platforms=CPU,
        description="Build FlexAttention block masks eagerly: the compiled mask builder spends about "
                    "10 s per process in inductor on CPU.",
        apply=_eager_block_mask),
    Patch(
        id="torchtitan.cpu.grouped_experts_dtype", backend=BACKEND,
        target="torchtitan.models.common.moe.GroupedExperts.forward", phase="setup", versions=FRAMEWORK_RANGE,
        platforms=CPU,
        description="Run the routed experts' grouped matmuls in the tokens' dtype on CPU instead of always "
                    "bf16: fp32 MoE models (DeepSeek, Llama 4) then match transformers to 1e-6.",
        apply=_grouped_experts_in_input_dtype),
    Patch(
        id="torchtitan.cpu.spmd_backend", backend=BACKEND,
        target="torchtitan.config.configs.ParallelismConfig", phase="build_args", versions=FRAMEWORK_RANGE,
        platforms=CPU, predicate=_multi_process, predicate_doc="more than one process", needs=("titan_config",),
        description="Use `parallelism.spmd_backend: partial_dtensor` for FSDP/TP on CPU unless set: the "
                    "default fails at start and `full_dtensor` misreports the loss.",
        apply=_cpu_spmd_backend),
    Patch(
        id="torchtitan.amd_peak_flops", backend=BACKEND, target="torchtitan.tools.utils.get_peak_flops",
        phase="setup", versions=FRAMEWORK_RANGE, platforms=frozenset({"rocm"}),
        description="Peak bf16 FLOP/s of AMD Instinct GPUs for MFU: MI300X/MI325X 1307T, MI350X 2300T, "
                    "MI355X 2500T.",
        apply=_amd_peak_flops),
    Patch(
        id="torchtitan.embedding_autocast", backend=BACKEND,
        target="torchtitan.models.common.embedding.Embedding.__init__", phase="setup", versions=FRAMEWORK_RANGE,
        kind="feature", predicate=_embedding_autocast_on,
        predicate_doc="`primus_turbo.enable_embedding_autocast` (default on)",
        description="Cast embedding outputs to the autocast dtype under mixed precision "
                    "(upstream `primus_turbo.enable_embedding_autocast`).",
        apply=_embedding_autocast),
    Patch(
        id="torchtitan.log_final_step", backend=BACKEND,
        target="torchtitan.components.metrics.MetricsProcessor.should_log", phase="setup",
        versions=FRAMEWORK_RANGE, kind="feature",
        description="Log the final training step too, not only step 1 and every `metrics.log_freq`-th: "
                    "metrics.jsonl and the run summary then end at the run's last loss.",
        apply=_log_final_step),
    Patch(
        id="torchtitan.route_logging", backend=BACKEND, target="torchtitan.tools.logging.logger",
        phase="setup", versions=FRAMEWORK_RANGE, kind="feature",
        description="Route torchtitan's stdlib logger into Primus's loguru sinks (stderr and the "
                    "per-rank log files).",
        apply=_route_logging),
]
