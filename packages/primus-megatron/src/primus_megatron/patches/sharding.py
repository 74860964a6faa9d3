"""Patches for sharded data parallelism: megatron-core's distributed optimizer and its torch FSDP2
wrapper (`use_distributed_optimizer`, `use_torch_fsdp2`).

Both train and resume on CPU (gloo has the reduce-scatter and all-gather they need) and on GPUs.
Without Apex or TransformerEngine the distributed optimizer wraps torch's Adam, and megatron-core
0.16 resumes that path wrongly; FSDP2's wrapper misses a keyword and mis-matches DTensor shards in
checkpoints. Each fix below says which; the two device fixes for CPU live in cpu.py.
"""

from __future__ import annotations

from typing import Any

from primus.patches.registry import Patch, PatchContext, Undo, replace_attr
from primus_megatron import FRAMEWORK_RANGE
from primus_megatron.patches.features import set_args


def _fsdp2_plain_optimizer(ctx: PatchContext) -> Undo | None:
    # Under torch FSDP2 the parameters, grads and optimizer states are already DTensor shards; the
    # distributed optimizer needs megatron-core's DDP grad buffers, which FSDP2 has none of.
    return set_args(ctx, {"use_distributed_optimizer": False, "overlap_param_gather": False},
                     "use_torch_fsdp2 shards the optimizer state itself")


def _torch_adam_in_distributed_optimizer(ctx: PatchContext) -> bool:
    # megatron-core's distrib_optimizer uses TransformerEngine's or Apex's FusedAdam when it can
    # import one (HAVE_APEX_OR_TE); asked without importing megatron, as `primus patches` must stay light
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is None and importlib.util.find_spec("apex") is None


def _distopt_torch_adam_state(ctx: PatchContext) -> Undo:
    # Without Apex/TE the distributed optimizer wraps torch's Adam, whose per-parameter state holds a
    # `step` tensor. megatron-core 0.16 gets that path wrong three times when a checkpoint is loaded:
    # - `state_dict()` asserts one common step, so building the sharded state dict of a fresh optimizer
    #   (empty state) fails: allocate the states first, as megatron does for its fsdp_dtensor format;
    # - the param-state loaders copy every key of the live state from the checkpoint, `step` included,
    #   which dp_reshardable stores as a non-persistent object (the live, dummy step) and
    #   fully_reshardable not at all (KeyError): keep the live step there;
    # - `load_state_dict` hands one and the same step tensor to every parameter, so each Adam step adds
    #   one per parameter to it: give each parameter its own copy of the checkpoint's step.
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original_sharded = DistributedOptimizer.sharded_state_dict
    original_load = DistributedOptimizer.load_state_dict
    original_set = DistributedOptimizer._set_main_param_and_optimizer_states

    def sharded_state_dict(self: Any, model_sharded_state_dict: Any = None, is_loading: bool = False,
                           *args: Any, **kwargs: Any) -> Any:
        if is_loading and len(self.optimizer.state) == 0:
            self._init_optimizer_states_with_dummy_values()
        return original_sharded(self, model_sharded_state_dict if model_sharded_state_dict is not None else {},
                                is_loading, *args, **kwargs)

    def set_states(self: Any, model_param: Any, tensors: dict[str, Any]) -> None:
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        original_set(self, model_param, tensors)

    def load_state_dict(self: Any, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("optimizer", {}).get("param_groups", [])
        steps = {group["step"] for group in groups if "step" in group}
        original_load(self, state_dict)
        if len(steps) == 1:
            step = float(next(iter(steps)))
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(step, dtype=torch.float32)

    undos = [replace_attr(DistributedOptimizer, "sharded_state_dict", sharded_state_dict),
             replace_attr(DistributedOptimizer, "_set_main_param_and_optimizer_states", set_states),
             replace_attr(DistributedOptimizer, "load_state_dict", load_state_dict)]
    return lambda: [u() for u in reversed(undos)]


def _fsdp2_finish_grad_sync(ctx: PatchContext) -> Undo:
    # finalize_model_grads calls finish_grad_sync(force_all_reduce=...), a keyword the FSDP2 wrapper's
    # base class does not take. FSDP2 reduce-scatters the grads in its own backward hooks.
    from megatron.core.distributed.torch_fully_sharded_data_parallel import TorchFullyShardedDataParallel

    def finish_grad_sync(self: Any, force_all_reduce: bool = False) -> None:
        return None

    return replace_attr(TorchFullyShardedDataParallel, "finish_grad_sync", finish_grad_sync)


def _fsdp2_optimizer_param_identity(ctx: PatchContext) -> Undo:
    # The optimizer's sharded state dict finds each parameter's ShardedTensor by the identity of its
    # local shard: the model side holds `DTensor._local_tensor`, the optimizer side `DTensor.to_local()`,
    # which (torch 2.13) is a new alias object on every call, so nothing matches ("Param id 0 does not
    # match any model sharded param"). Both sides use the local tensor itself here.
    from megatron.core.dist_checkpointing import optimizer as ckpt_optimizer
    from torch.distributed.tensor import DTensor

    def to_local_if_dtensor(tensor: Any) -> Any:
        return tensor._local_tensor if isinstance(tensor, DTensor) else tensor

    return replace_attr(ckpt_optimizer, "to_local_if_dtensor", to_local_if_dtensor)


def _redistribute_optimizer_state(torch_optimizer: Any) -> None:
    from torch.distributed.tensor import DTensor

    for group in torch_optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, DTensor):
                continue
            state = torch_optimizer.state.get(param, {})
            for key, value in list(state.items()):
                if isinstance(value, DTensor) or getattr(value, "shape", None) != param._local_tensor.shape:
                    continue  # already a DTensor, or a scalar such as Adam's step
                state[key] = DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                                shape=param.shape, stride=param.stride())


def _fsdp2_optimizer_state_load(ctx: PatchContext) -> Undo:
    # A checkpoint gives back each FSDP2 parameter's optimizer state as its plain local shard; the next
    # Adam step then mixes DTensor and Tensor ("aten.lerp_.Scalar got mixed torch.Tensor and DTensor").
    # After loading, the shards become DTensors again, laid out like their parameters.
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

    undos = []
    for cls in (FP32Optimizer, Float16OptimizerWithFloat16Params):
        def load_state_dict(self: Any, state_dict: Any, _original: Any = cls.load_state_dict) -> Any:
            result = _original(self, state_dict)
            _redistribute_optimizer_state(self.optimizer)
            return result

        undos.append(replace_attr(cls, "load_state_dict", load_state_dict))
    return lambda: [u() for u in reversed(undos)]


def _fsdp2_fix(name: str, target: str, description: str, apply: Any) -> Patch:
    """One of megatron-core 0.16's FSDP2-wrapper fixes: all apply at setup, with use_torch_fsdp2 on."""
    return Patch(id=f"megatron.fsdp2.{name}", backend="megatron", phase="setup", kind="platform",
                 versions=FRAMEWORK_RANGE, target=target, enabled_by="use_torch_fsdp2", enabled_by_default=False,
                 description=description, apply=apply)


SHARDING_PATCHES: list[Patch] = [
    Patch(id="megatron.distopt.torch_adam_state", backend="megatron", phase="setup", kind="platform",
          versions=FRAMEWORK_RANGE, target="megatron.core.optimizer.distrib_optimizer.DistributedOptimizer",
          enabled_by="use_distributed_optimizer", predicate=_torch_adam_in_distributed_optimizer,
          predicate_doc="neither Apex nor TransformerEngine is installed (torch Adam)",
          description="The distributed optimizer over torch Adam resumes from a checkpoint with its real step "
                      "count (one step tensor per parameter) instead of failing or counting steps wrongly.",
          apply=_distopt_torch_adam_state),
    _fsdp2_fix("finish_grad_sync",
               "megatron.core.distributed.torch_fully_sharded_data_parallel.TorchFullyShardedDataParallel",
               "The FSDP2 wrapper's finish_grad_sync takes the force_all_reduce keyword that finalize_model_grads "
               "passes.", _fsdp2_finish_grad_sync),
    _fsdp2_fix("optimizer_param_identity", "megatron.core.dist_checkpointing.optimizer.to_local_if_dtensor",
               "Optimizer checkpoints under FSDP2 match each DTensor parameter to its ShardedTensor by its local "
               "shard.", _fsdp2_optimizer_param_identity),
    _fsdp2_fix("optimizer_state_load", "megatron.core.optimizer.optimizer.FP32Optimizer.load_state_dict",
               "Optimizer states loaded under FSDP2 become DTensors again, sharded like their parameters.",
               _fsdp2_optimizer_state_load),
    Patch(id="megatron.args.fsdp2_plain_optimizer", backend="megatron", phase="build_args", kind="feature",
          target="primus_megatron.trainer", check_target=False, enabled_by="use_torch_fsdp2",
          enabled_by_default=False,
          description="With torch FSDP2 the optimizer is megatron-core's plain one over the DTensor shards "
                      "(the distributed optimizer needs megatron-core's DDP buffers).",
          apply=_fsdp2_plain_optimizer),
]
