"""The plain side of `bench/sft_overhead.py --backend megatron`: SFT of the tiny Llama on megatron-core alone.

    python bench/plain_megatron_sft.py --steps 60

examples/megatron/llama3_sft_tiny.yaml's model and training settings with one sample per row of 64 tokens, 8 rows
a step (SETTINGS; sft_overhead.py checks them against what Primus resolves before its first round), in one CPU
process (gloo, fp32, the distributed optimizer as the preset has it), written the way a Megatron user would:
the toy records tokenized here (prompt, then completion + EOS; labels only on the completion and EOS, the masking
core's rows have), rows read in a new seeded order every epoch, megatron-core's GPTModel on the local layer spec,
DistributedDataParallel, get_megatron_optimizer, OptimizerParamScheduler and get_forward_backward_func with
`calculate_per_token_loss` (the loss and gradient are the mean over the step's trained tokens), the loss read back
every step. The one Primus import is overhead_megatron.py's: the registered CPU patches megatron-core 0.16 needs to
run on a CPU at all. Prints the wall time of steps 2..N.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead_megatron import SETTINGS as PRETRAIN  # noqa: E402  (llama3_tiny.yaml under Megatron's names)

#: the SFT example's settings under Megatron's argument names (the tiny model, then the bench's train: section)
SETTINGS = {**PRETRAIN, "micro_batch_size": 8, "global_batch_size": 8, "seq_length": 64, "min_lr": 1e-3,
            "lr_warmup_iters": 4, "calculate_per_token_loss": True}
#: what the bench sets on the Primus side to get SETTINGS from examples/megatron/llama3_sft_tiny.yaml (the
#: checkpoint after the last step and its export to <run dir>/hf/ come after the timed steps)
PRIMUS_OVERRIDES = ["data.packing=false", "data.packed_attention=null", "train.global_batch_size=8",
                    "train.seq_length=64", "overrides.log_interval=1", "overrides.eval_iters=0",
                    "overrides.save_interval=1000000000"]


def plain_main(steps: int) -> None:
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    import random

    import megatron.core
    import numpy as np
    import torch
    import torch.nn.functional as F
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig
    from sft_overhead import plain_rows

    from primus.patches.registry import PatchContext
    from primus_megatron.patches.cpu import CPU_PATCHES

    ctx = PatchContext(backend="megatron", platform="cpu", framework_version=megatron.core.__version__)
    for patch in CPU_PATCHES:
        patch.apply(ctx)

    s = SETTINGS
    mbs, gbs, seq = s["micro_batch_size"], s["global_batch_size"], s["seq_length"]
    inputs, targets = plain_rows(seq)
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    random.seed(s["seed"])
    np.random.seed(s["seed"])
    torch.manual_seed(s["seed"])
    tensor_parallel.model_parallel_cuda_manual_seed(s["seed"])

    config = TransformerConfig(
        num_layers=s["num_layers"], hidden_size=s["hidden_size"], ffn_hidden_size=s["ffn_hidden_size"],
        num_attention_heads=s["num_attention_heads"], num_query_groups=s["num_query_groups"],
        normalization="RMSNorm", layernorm_epsilon=s["norm_epsilon"], gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=s["init_method_std"], params_dtype=torch.float32, pipeline_dtype=torch.float32,
        use_cpu_initialization=True, deallocate_pipeline_outputs=True, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, calculate_per_token_loss=True,
    )
    divisor = s["make_vocab_size_divisible_by"]
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=-(-s["vocab_size"] // divisor) * divisor, max_sequence_length=s["max_position_embeddings"],
        pre_process=True, post_process=True,
        share_embeddings_and_output_weights=not s["untie_embeddings_and_output_weights"],
        position_embedding_type="rope", rotary_percent=s["rotary_percent"], rotary_base=s["rotary_base"],
    )
    ddp = DistributedDataParallel(config=config, module=model, ddp_config=DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, check_for_nan_in_grad=True, use_distributed_optimizer=s["use_distributed_optimizer"]))
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer=s["optimizer"], lr=s["lr"], min_lr=s["min_lr"], weight_decay=s["weight_decay"],
        adam_beta1=s["adam_beta1"], adam_beta2=s["adam_beta2"], adam_eps=s["adam_eps"], clip_grad=s["clip_grad"],
        params_dtype=torch.float32, use_distributed_optimizer=s["use_distributed_optimizer"]), [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=s["lr_warmup_init"], max_lr=s["lr"], min_lr=s["min_lr"],
        lr_warmup_steps=min(s["lr_warmup_iters"], steps - 1), lr_decay_steps=steps,
        lr_decay_style=s["lr_decay_style"], start_wd=s["weight_decay"], end_wd=s["weight_decay"],
        wd_incr_steps=steps, wd_incr_style="constant")
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss

    orders: dict[int, np.ndarray] = {}
    positions = torch.arange(seq).unsqueeze(0).expand(mbs, seq)

    def microbatches(step: int):
        """Global batch `step`: samples [step * gbs, (step + 1) * gbs) of the endless stream of epochs."""
        for first in range(step * gbs, (step + 1) * gbs, mbs):
            picks = []
            for i in range(first, first + mbs):
                epoch, at = divmod(i, len(inputs))
                if epoch not in orders:
                    orders[epoch] = np.random.default_rng([s["seed"], epoch]).permutation(len(inputs))
                picks.append(int(orders[epoch][at]))
            labels = targets[picks]
            yield {"tokens": inputs[picks], "labels": labels.clamp(min=0), "loss_mask": (labels != -100).float()}

    def loss_func(loss_mask: torch.Tensor, per_token: torch.Tensor):
        mask = loss_mask.reshape(-1)
        loss = (per_token.reshape(-1).float() * mask).sum()
        count = mask.sum().int()
        return loss, count, {"lm loss": torch.stack([loss.detach(), count.detach().float()])}

    def forward_step(batches, chunk):
        batch = next(batches)
        per_token = chunk(batch["tokens"], positions, attention_mask=None, labels=batch["labels"])
        return per_token, lambda out: loss_func(batch["loss_mask"], out)

    forward_backward = get_forward_backward_func()
    ddp.train()
    first_step_done = 0.0
    for step in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(forward_step_func=forward_step, data_iterator=microbatches(step), model=ddp,
                                   num_microbatches=gbs // mbs, seq_length=seq, micro_batch_size=mbs,
                                   decoder_seq_length=seq, forward_only=False)
        ok, _grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        totals = torch.stack([r["lm loss"] for r in reports]).sum(0).double()
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        last_loss = (totals[0] / totals[1]).item()
        if step == 0:
            first_step_done = time.perf_counter()
    loop_s = time.perf_counter() - first_step_done
    print(f"plain_megatron_sft steps={steps} loss={last_loss:.4f} loop_s={loop_s:.4f}", flush=True)
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    plain_main(args.steps)


if __name__ == "__main__":
    main()
