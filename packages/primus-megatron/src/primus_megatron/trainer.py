"""A pretraining loop on megatron.core, read top to bottom.

The megatron-core wheel has no `megatron/training`, so this is ours: process groups, the GPT model
from the layer spec primus_megatron.fast_path decides (TransformerEngine's where installed on a GPU,
else megatron-core's local spec with SDPAttention), megatron-core's DDP and optimizer,
a warmup + cosine/linear schedule, microbatches through `get_forward_backward_func` (which runs the
pipeline schedule when there is more than one stage), loss masking, grad clipping, validation and
distributed checkpoints. `args` are Megatron's argument names (the resolved native config).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from loguru import logger
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from primus.errors import ConfigError
from primus_megatron import checkpoint as ckpt
from primus_megatron.data import build_datasets, microbatches
from primus_megatron.loader import train_loader


@dataclass
class StepReport:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int  # tokens the whole job processed in this step
    step_time_s: float


# ------------------------------------------------------------------------------------------- setup


def init_distributed(args: SimpleNamespace, device: torch.device) -> None:
    """Default process group (gloo on CPU), then Megatron's TP/PP/CP/EP/DP groups."""
    if not torch.distributed.is_initialized():
        timeout = timedelta(minutes=int(args.distributed_timeout_minutes or 10))
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            torch.distributed.init_process_group(args.distributed_backend, timeout=timeout)
        else:  # one process started in-process: a private store, no port needed
            torch.distributed.init_process_group(args.distributed_backend, store=torch.distributed.HashStore(),
                                                 rank=0, world_size=1, timeout=timeout)
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        distributed_timeout_minutes=int(args.distributed_timeout_minutes or 10),
    )


def seed_everything(seed: int) -> None:
    """Same seed on every data-parallel replica; Megatron offsets the tensor-parallel stream per TP rank."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def fast_path(args: SimpleNamespace, device: torch.device) -> Any:
    """The layer spec, attention, precision, fusions and overlap for this device
    (primus_megatron.fast_path.decide, the same decision `--dry-run` prints for the target)."""
    from primus_megatron.fast_path import decide

    platform, arch = "cpu", None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        if torch.version.hip:
            platform, arch = "rocm", str(props.gcnArchName).split(":")[0]
        else:
            platform, arch = "cuda", f"sm{props.major}{props.minor}"
    return decide(vars(args), platform, arch)


def transformer_config(args: SimpleNamespace, device: torch.device) -> TransformerConfig:
    """Megatron's TransformerConfig from the native args, with the fast path's spec, fp8 and fusions
    (fusions on a GPU only: they need GPU kernels)."""
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    on_gpu = device.type == "cuda"
    path = fast_path(args, device)
    kwargs: dict[str, Any] = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=bool(args.swiglu),
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=bool(args.add_bias_linear),
        add_qkv_bias=bool(args.add_qkv_bias),
        qk_layernorm=bool(args.qk_layernorm),
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        apply_residual_connection_post_layernorm=bool(args.apply_residual_connection_post_layernorm),
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=bool(args.sequence_parallel),
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=bool(args.bf16),
        fp16=bool(args.fp16),
        batch_p2p_comm=_batch_p2p_comm(args),
        overlap_p2p_comm=bool(args.overlap_p2p_comm) and args.virtual_pipeline_model_parallel_size is not None,
        deallocate_pipeline_outputs=bool(args.deallocate_pipeline_outputs),
        variable_seq_lengths=bool(args.variable_seq_lengths),
        calculate_per_token_loss=bool(args.calculate_per_token_loss),
        transformer_impl=path.spec,  # FSDP2 reads this
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=path.fusions,
        bias_dropout_fusion=path.fusions,
        masked_softmax_fusion=path.fusions and path.attention == "local",
        persist_layer_norm=False,
        apply_rope_fusion=path.fusions and path.spec == "transformer_engine",
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
    )
    if path.fp8:
        kwargs.update(fp8=path.fp8, fp8_recipe=path.fp8_recipe)
    split = args.decoder_pipeline_manual_split_list
    if split is not None:
        middle = split[1:-1]
        if len(set(middle)) > 1:
            raise ConfigError(f"decoder_pipeline_manual_split_list {split}: megatron-core 0.16 can only vary the "
                              "first and last stage", key="decoder_pipeline_manual_split_list")
        if args.pipeline_model_parallel_size > 1:
            kwargs["num_layers_in_first_pipeline_stage"] = split[0]
            kwargs["num_layers_in_last_pipeline_stage"] = split[-1]
    if args.num_experts:
        kwargs.update(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_layer_freq=1 if args.moe_layer_freq is None else args.moe_layer_freq,
            moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_router_load_balancing_type=args.moe_router_load_balancing_type,
            moe_router_pre_softmax=bool(args.moe_router_pre_softmax),
            moe_token_dispatcher_type=args.moe_token_dispatcher_type,
            moe_grouped_gemm=bool(args.moe_grouped_gemm),
            # megatron-core >= 0.13 has upstream Primus's benchmark switch: random router logits
            moe_router_force_load_balancing=bool(args.moe_router_force_load_balancing),
            # DeepSeek-V3 / Llama 4 routing (megatron-core's own options, same names)
            **{key: getattr(args, key) for key in (
                "moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_bias_update_rate",
                "moe_router_num_groups", "moe_router_group_topk", "moe_router_topk_scaling_factor",
                "moe_apply_probs_on_input")},
        )
    # Llama 4: RoPE-free layers and the q/k L2 norm (megatron-core's options)
    if args.no_rope_freq is not None:
        from primus_megatron.translate import moe_layer_pattern

        kwargs["no_rope_freq"] = moe_layer_pattern(args.no_rope_freq, args.num_layers, key="no_rope_freq")
    kwargs["rotary_interleaved"] = bool(args.rotary_interleaved)
    if args.mtp_num_layers:
        kwargs.update(mtp_num_layers=args.mtp_num_layers, mtp_loss_scaling_factor=args.mtp_loss_scaling_factor)
    if args.multi_latent_attention:
        kwargs.update(q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank, qk_head_dim=args.qk_head_dim,
                      qk_pos_emb_head_dim=args.qk_pos_emb_head_dim, v_head_dim=args.v_head_dim,
                      rotary_base=args.rotary_base, qk_layernorm=True,  # MLA's q_a / kv_a norms
                      rope_type=args.rope_type or "rope", rotary_scaling_factor=args.rotary_scaling_factor,
                      mscale=args.mscale, mscale_all_dim=args.mscale_all_dim, beta_fast=args.beta_fast,
                      beta_slow=args.beta_slow,
                      original_max_position_embeddings=args.original_max_position_embeddings or 4096)
        kwargs.pop("num_query_groups")
        return MLATransformerConfig(**kwargs)
    return TransformerConfig(**kwargs)


def _batch_p2p_comm(args: SimpleNamespace) -> bool:
    from primus_megatron.translate import effective_batch_p2p_comm

    return effective_batch_p2p_comm(vars(args))


def padded_vocab_size(args: SimpleNamespace) -> int:
    """Megatron pads the vocabulary so every tensor-parallel shard of the embedding is equal."""
    multiple = (args.make_vocab_size_divisible_by or 1) * args.tensor_model_parallel_size
    return int(math.ceil(args.vocab_size / multiple) * multiple)


def block_spec(config: TransformerConfig, args: SimpleNamespace, *, vp_stage: int | None,
               use_te: bool = False) -> Any:
    """megatron-core's decoder block spec for this stage, dense or MoE by moe_layer_freq: its TE spec
    (use_te), else its local spec with Primus's SDPAttention (primus_megatron.layers), or with its own
    DotProductAttention when `use_flash_attn: false` (fast_path.decide says which). Patch
    megatron.layers.sdpa_core_attention puts primus_megatron.layers's in place for the models that need
    SDPAttention whatever use_flash_attn says (multi-latent attention, Llama 4)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if use_te or getattr(args, "use_flash_attn", True) is not False:
        from primus_megatron.layers import decoder_block_spec

        return decoder_block_spec(config, args, vp_stage=vp_stage, use_te=use_te)
    return get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=args.normalization,
                                      qk_l2_norm=bool(args.qk_l2_norm), vp_stage=vp_stage)


def build_model(args: SimpleNamespace, config: TransformerConfig, device: torch.device) -> list[torch.nn.Module]:
    """One GPTModel chunk per virtual pipeline stage (one chunk without interleaving)."""
    use_te = fast_path(args, device).spec == "transformer_engine"
    chunks = args.virtual_pipeline_model_parallel_size or 1
    model = []
    for vp_stage in range(chunks):
        vp = vp_stage if chunks > 1 else None
        layer_spec = block_spec(config, args, vp_stage=vp, use_te=use_te)
        mtp = None
        if config.mtp_num_layers:
            from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

            mtp = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=use_te, vp_stage=vp)
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            mtp_block_spec=mtp,
            vocab_size=padded_vocab_size(args),
            max_sequence_length=args.max_position_embeddings or args.seq_length,
            pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type,
            rotary_percent=args.rotary_percent,
            rotary_base=int(args.rotary_base),
            rope_scaling=bool(args.use_rope_scaling),
            rope_scaling_factor=args.rope_scaling_factor,
            vp_stage=vp,
        )
        model.append(gpt.to(device))
    return model


def wrap_ddp(args: SimpleNamespace, config: TransformerConfig, model: list[torch.nn.Module]) -> list[Any]:
    """megatron-core's DDP (grad buffers; sharded optimizer state with the distributed optimizer), or
    with `use_torch_fsdp2` its torch FSDP2 wrapper (each transformer layer, the embedding and the root
    module `fully_shard`ed over the data-parallel group). Overlap of the grad reduce and the param
    gather as the fast path decides (on with a GPU unless written)."""
    path = fast_path(args, next(model[0].parameters()).device)
    ddp_kwargs: dict[str, Any] = dict(
        grad_reduce_in_fp32=not args.grad_reduce_in_bf16,
        overlap_grad_reduce=path.overlap_grad_reduce,
        overlap_param_gather=path.overlap_param_gather,
        use_distributed_optimizer=bool(args.use_distributed_optimizer),
        check_for_nan_in_grad=bool(args.check_for_nan_in_loss_and_grad),
    )
    if args.use_torch_fsdp2:
        from megatron.core.distributed.torch_fully_sharded_data_parallel import TorchFullyShardedDataParallel
        from megatron.core.distributed.torch_fully_sharded_data_parallel_config import (
            TorchFullyShardedDataParallelConfig,
        )

        fsdp_config = TorchFullyShardedDataParallelConfig(**ddp_kwargs)
        return [TorchFullyShardedDataParallel(config=config, ddp_config=fsdp_config, module=chunk,
                                              disable_bucketing=i > 0) for i, chunk in enumerate(model)]
    ddp_config = DistributedDataParallelConfig(**ddp_kwargs)
    return [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=i > 0) for i, chunk in enumerate(model)]


def build_optimizer(args: SimpleNamespace, model: list[Any]) -> tuple[Any, OptimizerParamScheduler]:
    opt_config = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad or 0.0, bf16=bool(args.bf16),
        fp16=bool(args.fp16), params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=bool(args.use_distributed_optimizer),
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    decay_steps = args.lr_decay_iters or args.train_iters
    warmup = min(args.lr_warmup_iters or 0, max(decay_steps - 1, 0))
    wd_start = args.start_weight_decay if args.start_weight_decay is not None else args.weight_decay
    wd_end = args.end_weight_decay if args.end_weight_decay is not None else args.weight_decay
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay_steps, lr_decay_style=args.lr_decay_style,
        start_wd=wd_start, end_wd=wd_end, wd_incr_steps=args.train_iters, wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=bool(args.use_checkpoint_opt_param_scheduler),
        override_opt_param_scheduler=bool(args.override_opt_param_scheduler),
    )
    return optimizer, scheduler


# ------------------------------------------------------------------------------------------- loss


def masked_lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Sum of the per-token losses where the mask is 1, and how many tokens counted.

    Returned in megatron-core's three-value form: the schedule divides by the token count (and by
    the number of microbatches), so each step optimizes the mean over its unmasked tokens.
    """
    mask = loss_mask.view(-1).float()
    total = torch.sum(per_token_loss.view(-1).float() * mask)
    tokens = mask.sum().to(torch.int)
    return total, tokens, {"lm loss": torch.stack([total.detach(), tokens.detach().float()])}


def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: Any) -> tuple[torch.Tensor, Callable]:
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], attention_mask=batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, partial(masked_lm_loss, batch["loss_mask"])


# ------------------------------------------------------------------------------------------- loop


class PretrainLoop:
    """Owns the model, optimizer, data and checkpoints of one run; `train()` runs it."""

    #: which keys of the model's sharded state a checkpoint keeps (None: all); a checkpoint load then leaves the
    #: others as they are (post-training's LoRA keeps the adapters only: the base comes from hf_path again)
    checkpoint_filter: Callable[[str], bool] | None = None

    def __init__(self, args: SimpleNamespace, *, checkpoint_dir: Path, device: torch.device,
                 on_step: Callable[[StepReport], None], on_eval: Callable[[int, float], None],
                 stop_requested: Callable[[], bool] = lambda: False, on_damaged: str = "fail",
                 hf_path: str | None = None, model_spec: Any = None, run_dir: Path | None = None) -> None:
        self.args = args
        self.run_dir = run_dir  # a converted corpus is cached in its workspace (data.default_cache_dir)
        self.hf_path = hf_path  # model: {hf_path: DIR}: the init comes from DIR's safetensors
        self.model_spec = model_spec
        self.on_damaged = on_damaged  # checkpoint.on_damaged: fail | previous
        self.device = device
        self.save_dir = Path(args.save) if args.save else checkpoint_dir
        self.on_step = on_step
        self.on_eval = on_eval
        self.stop_requested = stop_requested
        self.step = 0
        self.stopped_early = False

    # -- setup

    def setup(self) -> None:
        a = self.args
        init_distributed(a, self.device)
        seed_everything(a.seed)
        self.fast_path = fast_path(a, self.device)
        logger.info("fast path: " + "; ".join(f"{key} {value}" for key, value in self.fast_path.lines().items()))
        self.config = transformer_config(a, self.device)
        model = build_model(a, self.config, self.device)
        if self.hf_path and not self._resuming():
            # before the DDP/FSDP wrapper and the optimizer: both take the values the parameters hold
            from primus_megatron.hf_weights import load_and_describe

            logger.info(load_and_describe(model, self.model_spec, self.hf_path))
        model = self.adapt_model(model)
        self.model = wrap_ddp(a, self.config, model)
        self.optimizer, self.scheduler = build_optimizer(a, self.model)
        # megatron-core's schedules find these hooks on the model config
        self.config.no_sync_func = [chunk.no_sync for chunk in self.model]
        if len(self.model) == 1:
            self.config.no_sync_func = self.config.no_sync_func[0]
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.dp_rank = mpu.get_data_parallel_rank()
        self.dp_size = mpu.get_data_parallel_world_size()
        self.microbatches_per_step = a.global_batch_size // (a.micro_batch_size * self.dp_size)
        self.train_data, self.valid_data = self.build_data()
        if a.load:
            self.step = ckpt.load(Path(a.load), self, finetune=bool(a.finetune) and not a.auto_continue_train,
                                  on_damaged=self.on_damaged)
        logger.info(f"model: {sum(p.numel() for c in self.model for p in c.parameters()):,} parameters on this "
                    f"rank; tp {a.tensor_model_parallel_size} pp {a.pipeline_model_parallel_size} dp {self.dp_size}; "
                    f"{self.microbatches_per_step} microbatches per step; starting after step {self.step}")
        logger.info(f"decoder layers on this pipeline rank: {self.layer_ranges()}")

    def adapt_model(self, model: list[torch.nn.Module]) -> list[torch.nn.Module]:
        """The model chunks between the weights' load and the DDP wrapper (post-training adds LoRA here)."""
        return model

    def build_data(self) -> tuple[Any, Any]:
        """(train, valid) datasets: indexable, each item a dict of one sample's tensors (data.microbatches)."""
        return build_datasets(self.args, padded_vocab_size(self.args), run_dir=self.run_dir)

    def _resuming(self) -> bool:
        """Whether setup will load a checkpoint (whose weights replace an init)."""
        load = self.args.load
        return bool(load) and (ckpt.STEP_DIR.match(Path(load).name) is not None or bool(ckpt.checkpoints(load)))

    def layer_ranges(self) -> str:
        """The decoder layers (1-based, as Megatron numbers them) each model chunk of this rank holds."""
        ranges = []
        for chunk in self.model:
            numbers = [layer.layer_number for layer in chunk.module.decoder.layers] if hasattr(
                chunk.module, "decoder") else []
            ranges.append(f"{numbers[0]}-{numbers[-1]}" if numbers else "none")
        return ", ".join(ranges)

    # -- one step

    def _iterators(self, dataset: Any, batch_index: int) -> Any:
        make = partial(microbatches, dataset, batch_index, self.args, self.dp_rank, self.dp_size, self.device)
        workers = self.fast_path.data_workers
        if dataset is self.train_data and workers:
            if getattr(self, "_stream", None) is None:  # from this step on, in the order the steps read
                self._stream = iter(train_loader(dataset, batch_index, self.args, self.dp_rank, self.dp_size,
                                                 workers))
            batches = [{k: v.to(self.device, non_blocking=True) for k, v in next(self._stream).items()}
                       for _ in range(self.microbatches_per_step)]
            make = partial(iter, batches)
        if len(self.model) == 1:
            return make()
        return [make() for _ in self.model]  # each model chunk reads the same microbatches in order

    def _forward_backward(self, dataset: Any, batch_index: int, *, forward_only: bool) -> list[dict]:
        a = self.args
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=self._iterators(dataset, batch_index),
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=self.microbatches_per_step,
            seq_length=a.seq_length,
            micro_batch_size=a.micro_batch_size,
            decoder_seq_length=a.seq_length,
            forward_only=forward_only,
        )

    def _mean_loss(self, losses: list[dict]) -> float:
        """The step's mean loss over every unmasked token of the job, known on every rank.

        Only the last pipeline stage computes losses; its first tensor-parallel rank of each
        data-parallel replica contributes, and one all-reduce over the world sums them.
        """
        local = torch.zeros(2, dtype=torch.float64)
        counts = mpu.is_pipeline_last_stage(ignore_virtual=True) and mpu.get_tensor_model_parallel_rank() == 0
        if counts:
            for item in losses:
                local += item["lm loss"].to(torch.float64).cpu()
        reduce_on = local.to(self.device) if self.args.distributed_backend == "nccl" else local
        torch.distributed.all_reduce(reduce_on)
        total, tokens = reduce_on.tolist()
        return total / max(tokens, 1.0)

    def train_step(self, step: int) -> StepReport:
        started = time.perf_counter()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._forward_backward(self.train_data, step - 1, forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        if ok:
            self.scheduler.step(increment=1)
        loss = self._mean_loss(losses)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        a = self.args
        return StepReport(step=step, loss=loss, lr=self.optimizer.param_groups[0]["lr"], grad_norm=grad_norm,
                          tokens=a.global_batch_size * a.seq_length, step_time_s=time.perf_counter() - started)

    def synced_params(self) -> Any:
        """A context in which every rank holds the updated parameters: with overlap_param_gather the
        all-gather after an optimizer step runs in the next forward's pre-hooks, so evaluation and
        checkpoints gather synchronously first (hooks off, back on after), as Megatron-LM does."""
        from contextlib import contextmanager

        @contextmanager
        def synced() -> Iterator[None]:
            hooked = [chunk for chunk in self.model if getattr(chunk, "use_forward_hook", False)]
            for chunk in hooked:
                chunk.disable_forward_pre_hook(param_sync=True)
            try:
                yield
            finally:
                for chunk in hooked:
                    chunk.enable_forward_pre_hook()

        return synced()

    @torch.no_grad()
    def evaluate(self, step: int) -> float:
        with self.synced_params():
            return self._evaluate(step)

    def _evaluate(self, step: int) -> float:
        for chunk in self.model:
            chunk.eval()
        losses: list[dict] = []
        for i in range(self.args.eval_iters):
            losses += self._forward_backward(self.valid_data, (step // self.args.eval_interval) * self.args.eval_iters
                                             + i, forward_only=True)
        for chunk in self.model:
            chunk.train()
        return self._mean_loss(losses)

    # -- the loop

    def train(self) -> None:
        a = self.args
        for chunk in self.model:
            chunk.train()
        while self.step < a.train_iters:
            self.step += 1
            report = self.train_step(self.step)
            if self.step % a.log_interval == 0 or self.step == a.train_iters:
                self.on_step(report)
            if a.eval_iters and a.eval_interval and self.step % a.eval_interval == 0:
                self.on_eval(self.step, self.evaluate(self.step))
            if a.save_interval and self.step % a.save_interval == 0 and self.step < a.train_iters:
                self.save_checkpoint()
            if a.exit_interval and self.step % a.exit_interval == 0 and self.step < a.train_iters:
                # Megatron-LM's planned stop: checkpoint and leave; a rerun continues from here.
                logger.info(f"exit_interval {a.exit_interval}: stopping after step {self.step}")
                self.save_checkpoint()
                return
            if self.step < a.train_iters and self._stop_agreed():
                logger.warning(f"stopping after step {self.step} (SIGTERM): writing a checkpoint")
                self.save_checkpoint()
                self.stopped_early = True
                return
        self.save_last_checkpoint()

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop. Every rank must agree at the same step boundary, or
        the ranks that go on would wait forever in the next step's collectives."""
        if torch.distributed.get_world_size() == 1:
            return self.stop_requested()
        flag = torch.tensor([1 if self.stop_requested() else 0], dtype=torch.int32)
        if self.args.distributed_backend == "nccl":
            flag = flag.to(self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def save_checkpoint(self) -> None:
        with self.synced_params():
            ckpt.save(self.save_dir, self.step, self, keep_last=self.args.ckpt_keep_last)

    def save_last_checkpoint(self) -> None:
        """The checkpoint after the last step (`disable_last_saving` replaces this with a no-op)."""
        self.save_checkpoint()

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            mpu.destroy_model_parallel()
            torch.distributed.destroy_process_group()
