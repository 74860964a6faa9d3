"""Platform patches that let megatron-core 0.16 train without a GPU (shared/notes/cpu-frameworks.md).

megatron-core assumes CUDA in five places that a CPU run reaches:
1. the tensor-parallel RNG tracker keeps `torch.cuda` generator states;
2. a handful of call sites create tensors with `device='cuda'`, ask `torch.cuda.current_device()`
   or synchronize streams;
3. `clip_grad_by_total_norm_fp32` asserts that every grad is a `torch.cuda.FloatTensor`;
4. the distributed optimizer sorts the parameters it shards by `param.type()`, accepting only
   `torch.cuda.{Float,Half,BFloat16}Tensor`;
5. the torch-FSDP2 wrapper builds its device mesh for the "cuda" device type.
Each fix is scoped to the megatron modules that need it (a module-local `torch` that places
`cuda` tensors on the CPU), never to torch itself, and each apply returns its undo.
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any

from primus.patches.registry import Patch, PatchContext, Undo, replace_attr
from primus_megatron import FRAMEWORK_RANGE

CPU = frozenset({"cpu"})


# --------------------------------------------------------------------------- 1. RNG tracker


def _patch_rng_tracker(ctx: PatchContext) -> Undo:
    import torch
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device: Any = None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
        torch.set_rng_state(new_state)

    def add(self: Any, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self: Any, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        # On CPU the tracked "device" generator is the CPU generator itself, so swap it in and out
        # (the CUDA version also warns when the CPU state moves inside a fork, which is the point here).
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

    undos = [
        replace_attr(mrandom, "_get_cuda_rng_state", get_state),
        replace_attr(mrandom, "_set_cuda_rng_state", set_state),
        replace_attr(mrandom.CudaRNGStatesTracker, "add", add),
        replace_attr(mrandom.CudaRNGStatesTracker, "fork", fork),
    ]
    return lambda: [u() for u in reversed(undos)]


# --------------------------------------------------------------------------- 2. device call sites


def _is_cuda(device: Any) -> bool:
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return getattr(device, "type", None) == "cuda"


class _CpuStream:
    """Stands in for a CUDA stream: work on the CPU is already ordered."""

    def wait_stream(self, other: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> _CpuStream:
        return self

    def synchronize(self) -> None:
        return None

    def wait(self, stream: Any = None) -> None:
        return None

    def __enter__(self) -> _CpuStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _cpu_torch() -> types.ModuleType:
    """A stand-in for the `torch` module, for one megatron module's globals: tensors asked for on
    'cuda' are made on the CPU, and `torch.cuda`'s device/stream calls answer for the CPU."""
    import torch

    def on_cpu(factory: Any) -> Any:
        def make(*args: Any, **kwargs: Any) -> Any:
            if _is_cuda(kwargs.get("device")):
                kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
            return factory(*args, **kwargs)

        return make

    cuda = types.ModuleType("torch.cuda")
    cuda.__getattr__ = lambda name: getattr(torch.cuda, name)  # type: ignore[attr-defined]
    cuda.current_device = lambda: torch.device("cpu")  # type: ignore[attr-defined]
    cuda.synchronize = lambda *a, **k: None  # type: ignore[attr-defined]
    cuda.current_stream = lambda *a, **k: _CpuStream()  # type: ignore[attr-defined]
    cuda.Stream = lambda *a, **k: _CpuStream()  # type: ignore[attr-defined]
    cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[attr-defined]

    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)  # type: ignore[attr-defined]
    for name in ("zeros", "ones", "empty", "full", "tensor", "arange", "randn", "rand", "empty_like", "zeros_like"):
        setattr(proxy, name, on_cpu(getattr(torch, name)))
    proxy.cuda = cuda  # type: ignore[attr-defined]
    return proxy


def _module_torch_on_cpu(module_name: str) -> Any:
    def apply(ctx: PatchContext) -> Undo:
        module = importlib.import_module(module_name)
        return replace_attr(module, "torch", _cpu_torch())

    return apply


# The megatron modules whose CUDA-only call sites a CPU run reaches, with what each one does there.
CUDA_CALL_SITES: dict[str, str] = {
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "puts the RoPE frequencies on the current CUDA device",
    "megatron.core.models.gpt.gpt_model": "builds a position-id tensor on the current CUDA device",
    "megatron.core.utils": "the global memory buffer and local multi-tensor helpers allocate on CUDA",
    "megatron.core.optimizer.optimizer": "loss-scale and found-inf tensors are made on CUDA",
    "megatron.core.optimizer.clip_grads": "grad-norm accumulators are made on CUDA",
    "megatron.core.distributed.param_and_grad_buffer": "grad buffers are allocated on the current CUDA device",
    "megatron.core.distributed.distributed_data_parallel": "creates a CUDA communication stream, synchronizes",
    "megatron.core.pipeline_parallel.schedules": "the token counter of a step is a CUDA tensor",
    "megatron.core.pipeline_parallel.p2p_communication": "shape messages between stages are CUDA tensors",
    "megatron.core.transformer.dot_product_attention": "attention scratch tensors are made on CUDA",
    "megatron.core.transformer.utils": "the default causal attention mask is built on CUDA",
    "megatron.core.transformer.moe.token_dispatcher": "MoE token dispatch creates CUDA streams and tensors",
    "megatron.core.transformer.moe.moe_utils": "MoE routing helpers make CUDA tensors",
    "megatron.core.transformer.moe.router": "the MoE router keeps its token counts on CUDA",
    "megatron.core.tensor_parallel.mappings": "expert-parallel all-gathers and all-to-alls allocate on CUDA",
    "megatron.core.tensor_parallel.layers": "sequence-parallel backward reduce-scatters into a CUDA tensor",
    "megatron.core.transformer.multi_token_prediction": "the MTP loss tracker is a CUDA tensor",
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding": "YaRN RoPE (MLA) frequencies on CUDA",
    "megatron.core.transformer.multi_latent_attention": "MLA builds its rotary tables on CUDA",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "the checkpoint writer synchronizes CUDA "
    "before copying tensors",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "the save's success flags are CUDA tensors",
    "megatron.core.dist_checkpointing.strategies.async_utils": "the writer's liveness flags are CUDA tensors",
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "parallel save/load synchronizes CUDA",
}


# --------------------------------------------------------------------------- 3. grad clipping


def _patch_clip_grad(ctx: PatchContext) -> Undo:
    import torch
    from megatron.core.optimizer import clip_grads, optimizer

    def clip_grad_by_total_norm_fp32(parameters: Any, max_norm: float, total_norm: float,
                                     use_decoupled_grad: bool = False) -> None:
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        coeff = max_norm / (total_norm + 1.0e-6)
        if coeff < 1.0 and grads:
            torch._foreach_mul_(grads, coeff)

    undos = [replace_attr(clip_grads, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32),
             replace_attr(optimizer, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)]
    return lambda: [u() for u in reversed(undos)]


# --------------------------------------------------------------------------- 4. distributed optimizer


def _as_cuda_type_name(tensor: Any) -> str:
    """`tensor.type()` as it would read on a GPU: 'torch.FloatTensor' -> 'torch.cuda.FloatTensor'."""
    import torch

    name = torch.Tensor.type(tensor)
    if name.startswith("torch.") and not name.startswith("torch.cuda."):
        return "torch.cuda." + name.removeprefix("torch.")
    return name


def _patch_distopt_param_types(ctx: PatchContext) -> Undo:
    # DistributedOptimizer._build_model_and_main_param_groups tells fp32 from 16-bit parameters by
    # comparing `model_param.type()` with the torch.cuda type names and raises a TypeError for
    # anything else. For the length of that call only, each CPU parameter answers `type()` with the
    # CUDA name of its dtype (an attribute on the parameter object, removed again afterwards);
    # `type(dtype)` conversions still go to torch.
    import torch
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer.__dict__["_build_model_and_main_param_groups"].__func__

    def cuda_named(param: Any) -> Any:
        def type_(dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
            if dtype is None and not kwargs:
                return _as_cuda_type_name(param)
            return torch.Tensor.type(param, dtype, non_blocking, **kwargs)

        return type_

    def build(cls: Any, gbuf_ranges: Any, param_gbuf_map: Any, opt_group_ranges: Any, config: Any) -> Any:
        params = [p for p in param_gbuf_map if p.device.type == "cpu" and "type" not in vars(p)]
        for p in params:
            p.type = cuda_named(p)
        try:
            return original(cls, gbuf_ranges, param_gbuf_map, opt_group_ranges, config)
        finally:
            for p in params:
                del p.type

    return replace_attr(DistributedOptimizer, "_build_model_and_main_param_groups", classmethod(build))


# --------------------------------------------------------------------------- 5. torch FSDP2


def _patch_fsdp2_device_mesh(ctx: PatchContext) -> Undo:
    # TorchFullyShardedDataParallel calls DeviceMesh.from_group(group, "cuda"); fully_shard then asks
    # torch.cuda for the current device. The module's own `DeviceMesh` name gets a stand-in that
    # builds the same mesh for the CPU (gloo runs FSDP2's all-gather and reduce-scatter on CPU).
    from megatron.core.distributed import torch_fully_sharded_data_parallel as tfsdp
    from torch.distributed.device_mesh import DeviceMesh

    class CpuDeviceMesh:
        @staticmethod
        def from_group(group: Any, device_type: str, *args: Any, **kwargs: Any) -> DeviceMesh:
            if device_type.startswith("cuda"):
                device_type = "cpu"
            return DeviceMesh.from_group(group, device_type, *args, **kwargs)

    return replace_attr(tfsdp, "DeviceMesh", CpuDeviceMesh)


# --------------------------------------------------------------------------- 6. tied embeddings under PP


def _patch_shared_embedding_sync(ctx: PatchContext) -> Undo:
    """With tied embeddings and more than one pipeline stage, the last stage's output layer starts
    as a copy of the first stage's embedding: megatron-core moves the weight to CUDA (`.cuda()`)
    before the all-reduce that copies it. The method runs with `torch.distributed` reported
    uninitialized (so it does everything but that), then the same all-reduce runs on the CPU."""
    import torch
    from megatron.core.models.common.language_module import language_module as lm

    original = lm.LanguageModule.setup_embeddings_and_output_layer

    class _Distributed:
        def __getattr__(self, name: str) -> Any:
            return getattr(torch.distributed, name)

        @staticmethod
        def is_initialized() -> bool:
            return False

    class _Torch:
        distributed = _Distributed()

        def __getattr__(self, name: str) -> Any:
            return getattr(torch, name)

    def setup_embeddings_and_output_layer(self: Any) -> None:
        warned = getattr(lm.LanguageModule, "embedding_warning_printed", False)
        lm.LanguageModule.embedding_warning_printed = True  # its "not initialized" warning is not true here
        saved, lm.torch = lm.torch, _Torch()
        try:
            original(self)
        finally:
            lm.torch = saved
            lm.LanguageModule.embedding_warning_printed = warned
        shared = self.share_embeddings_and_output_weights or getattr(self.config, "mtp_num_layers", 0)
        if (shared and self.config.pipeline_model_parallel_size > 1 and torch.distributed.is_initialized()
                and self._is_in_embd_group()):
            torch.distributed.all_reduce(self.shared_embedding_or_output_weight().data, group=self.embd_group)

    return replace_attr(lm.LanguageModule, "setup_embeddings_and_output_layer", setup_embeddings_and_output_layer)


CPU_PATCHES: list[Patch] = [
    Patch(id="megatron.cpu.rng_tracker", backend="megatron", phase="setup", platforms=CPU,
          versions=FRAMEWORK_RANGE, target="megatron.core.tensor_parallel.random.CudaRNGStatesTracker",
          description="The tensor-parallel RNG tracker keeps CPU generator states instead of torch.cuda ones.",
          apply=_patch_rng_tracker),
    *[
        Patch(id="megatron.cpu.device." + name.removeprefix("megatron.core."), backend="megatron", phase="setup",
              platforms=CPU, versions=FRAMEWORK_RANGE, target=f"{name}.torch",
              description=f"CUDA call sites made CPU-local: {why}.", apply=_module_torch_on_cpu(name))
        for name, why in CUDA_CALL_SITES.items()
    ],
    Patch(id="megatron.cpu.clip_grad", backend="megatron", phase="setup", platforms=CPU,
          versions=FRAMEWORK_RANGE, target="megatron.core.optimizer.optimizer.clip_grad_by_total_norm_fp32",
          description="Grad clipping without the assertion that every grad is a torch.cuda.FloatTensor.",
          apply=_patch_clip_grad),
    Patch(id="megatron.cpu.distopt_param_types", backend="megatron", phase="setup", platforms=CPU,
          versions=FRAMEWORK_RANGE, target="megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups",
          description="The distributed optimizer shards CPU parameters (it accepts only torch.cuda tensor types).",
          apply=_patch_distopt_param_types),
    Patch(id="megatron.cpu.fsdp2_device_mesh", backend="megatron", phase="setup", platforms=CPU,
          versions=FRAMEWORK_RANGE, target="megatron.core.distributed.torch_fully_sharded_data_parallel.DeviceMesh",
          description="Torch FSDP2 builds its data-parallel device mesh for the CPU instead of 'cuda'.",
          apply=_patch_fsdp2_device_mesh),
    Patch(id="megatron.cpu.shared_embedding_sync", backend="megatron", phase="setup", platforms=CPU,
          versions=FRAMEWORK_RANGE,
          target="megatron.core.models.common.language_module.language_module.LanguageModule"
                 ".setup_embeddings_and_output_layer",
          description="Tied embeddings over pipeline stages: the output layer's first copy of the embedding is "
                      "all-reduced on the CPU (megatron-core moves it to CUDA first).",
          apply=_patch_shared_embedding_sync),
]
