"""Primus's overhead on Megatron: the tiny Llama through `primus run` and through a plain megatron-core loop.

    python bench/overhead.py megatron [--rounds 3 --steps 200]
    python bench/overhead_megatron.py --steps 200   (the plain side alone)

Both sides train examples/megatron/llama3_tiny-pretrain.yaml's model and settings in one CPU process
(gloo, fp32, the plain optimizer, mock data); evaluation and checkpoints are off on both. The Primus
side is the real CLI, `primus run <example>` with overrides; the plain side is this file run as a
script: a training loop written on megatron-core alone, the way a Megatron user would, with no
Primus code in it: parallel_state, GPTModel on the local layer spec, megatron-core's
DistributedDataParallel, get_megatron_optimizer, OptimizerParamScheduler, get_forward_backward_func
over microbatches of megatron-core's MockGPTDataset, the loss reduced and read back every step.
The one exception: megatron-core 0.16 does not run on a CPU at all unpatched (CUDA RNG states,
tensors made on 'cuda', a CUDA-only grad-clip assertion), so the plain side applies
primus_megatron's registered CPU patches (`CPU_PATCHES`), the same ones `primus run` applies here.

As bench/overhead.py measures: the wall time from the end of step 1 to the end of step N, read from
Primus's rank-0 log timestamps and printed by the plain loop; rounds alternate the sides; prints
the median steps/s of each side, their ratio (target >= 0.97) and the peak RSS of each process.
Before the first round the plain side's settings are checked against what Primus resolves for the
example. Not run by the tests; uses OMP_NUM_THREADS=1 as they do.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from overhead import primus_loop_seconds, run_child

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "megatron" / "llama3_tiny-pretrain.yaml"

# The example's settings under Megatron's argument names (llama3_tiny.yaml + the example's train:
# section + the pre_trainer preset's defaults). check_settings() compares them with Primus's resolution.
SETTINGS: dict[str, Any] = dict(
    num_layers=2, hidden_size=64, ffn_hidden_size=172, num_attention_heads=4, num_query_groups=2,
    vocab_size=512, make_vocab_size_divisible_by=128, max_position_embeddings=256, rotary_base=500000,
    rotary_percent=1.0, norm_epsilon=1e-5, init_method_std=0.02, untie_embeddings_and_output_weights=True,
    micro_batch_size=2, global_batch_size=4, seq_length=64, seed=1234,
    optimizer="adam", lr=3e-3, min_lr=3e-4, lr_warmup_init=0.0, lr_warmup_iters=2, lr_decay_style="cosine",
    weight_decay=0.0, clip_grad=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8,
    use_distributed_optimizer=True,
)


def primus_overrides(steps: int) -> list[str]:
    # no evaluation, no checkpoint at the end nor at an interval: the bench measures training steps
    # use_flash_attn: false: megatron-core's local attention, as the plain side's local spec builds
    # (Primus's default is its SDPAttention: bench/attention.py compares the two)
    return [f"train.steps={steps}", "overrides.eval_iters=0", "overrides.disable_last_saving=true",
            "overrides.save_interval=1000000000", "overrides.use_flash_attn=false"]


# ------------------------------------------------------------------------------ the plain side


class MockTokenizer:
    """All MockGPTDataset reads from a tokenizer: the vocabulary size and the end-of-document id."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.eod = self.pad = vocab_size - 1
        self.unique_identifiers = {"class": "MockTokenizer", "vocab_size": vocab_size}


def build_plain(s: dict[str, Any], steps: int, **config_extra: Any) -> tuple[Any, Any, Any, Any]:
    """One CPU process (gloo) with megatron-core alone: (config, ddp model, optimizer, scheduler) of the
    tiny Llama in `s` (Megatron's argument names), seeded, fp32, every CUDA fusion off, the local layer
    spec, megatron-core's DDP, optimizer and LR schedule over `steps` steps."""
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
    from megatron.core.transformer.transformer_config import TransformerConfig

    # the one Primus import: megatron-core 0.16 needs these patches to run on a CPU at all
    from primus.patches.registry import PatchContext
    from primus_megatron.patches.cpu import CPU_PATCHES

    ctx = PatchContext(backend="megatron", platform="cpu", framework_version=megatron.core.__version__)
    for patch in CPU_PATCHES:
        patch.apply(ctx)

    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    random.seed(s["seed"])
    np.random.seed(s["seed"])
    torch.manual_seed(s["seed"])
    tensor_parallel.model_parallel_cuda_manual_seed(s["seed"])

    # fp32 on the CPU, every CUDA fusion off
    config = TransformerConfig(
        num_layers=s["num_layers"], hidden_size=s["hidden_size"], ffn_hidden_size=s["ffn_hidden_size"],
        num_attention_heads=s["num_attention_heads"], num_query_groups=s["num_query_groups"],
        normalization="RMSNorm", layernorm_epsilon=s["norm_epsilon"], gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=s["init_method_std"], params_dtype=torch.float32, pipeline_dtype=torch.float32,
        use_cpu_initialization=True, deallocate_pipeline_outputs=True, gradient_accumulation_fusion=False,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, **config_extra,
    )
    divisor = s["make_vocab_size_divisible_by"]
    model = GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=-(-s["vocab_size"] // divisor) * divisor, max_sequence_length=s["max_position_embeddings"],
        pre_process=True, post_process=True,
        share_embeddings_and_output_weights=not s["untie_embeddings_and_output_weights"],
        position_embedding_type="rope", rotary_percent=s["rotary_percent"], rotary_base=s["rotary_base"],
    )
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, check_for_nan_in_grad=True,
                                               use_distributed_optimizer=s["use_distributed_optimizer"])
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    opt_config = OptimizerConfig(optimizer=s["optimizer"], lr=s["lr"], min_lr=s["min_lr"],
                                 weight_decay=s["weight_decay"], adam_beta1=s["adam_beta1"],
                                 adam_beta2=s["adam_beta2"], adam_eps=s["adam_eps"], clip_grad=s["clip_grad"],
                                 params_dtype=torch.float32,
                                 use_distributed_optimizer=s["use_distributed_optimizer"])
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=s["lr_warmup_init"], max_lr=s["lr"], min_lr=s["min_lr"],
        lr_warmup_steps=min(s["lr_warmup_iters"], steps - 1), lr_decay_steps=steps,
        lr_decay_style=s["lr_decay_style"], start_wd=s["weight_decay"], end_wd=s["weight_decay"],
        wd_incr_steps=steps, wd_incr_style="constant")
    # the schedule's hooks live on the model config
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return config, ddp, optimizer, scheduler


def masked_loss(loss_mask: Any, per_token: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(loss sum, token count, what to report): the schedule divides by the count."""
    import torch

    mask = loss_mask.reshape(-1).float()
    loss = (per_token.reshape(-1).float() * mask).sum()
    count = mask.sum().int()
    return loss, count, {"lm loss": torch.stack([loss.detach(), count.detach().float()])}


def train_plain(s: dict[str, Any], steps: int, ddp: Any, optimizer: Any, scheduler: Any, microbatches: Any,
                forward_step: Any) -> tuple[float, float]:
    """megatron-core's forward/backward schedule over `microbatches(step)` for `steps` steps, the step's mean
    loss reduced and read back every step as a logging loop would; (last loss, seconds of steps 2..N,
    timed like Primus's log timestamps of step 1 and step N). Ends the process group."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mbs, gbs, seq = s["micro_batch_size"], s["global_batch_size"], s["seq_length"]
    forward_backward = get_forward_backward_func()
    ddp.train()
    first_step_done, last_loss = 0.0, float("nan")
    for step in range(steps):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(forward_step_func=forward_step, data_iterator=microbatches(step),
                                   model=ddp, num_microbatches=gbs // mbs, seq_length=seq,
                                   micro_batch_size=mbs, decoder_seq_length=seq, forward_only=False)
        ok, _grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        totals = torch.stack([r["lm loss"] for r in reports]).sum(0).double()
        torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
        last_loss = (totals[0] / totals[1]).item()
        if step == 0:
            first_step_done = time.perf_counter()
    loop_s = time.perf_counter() - first_step_done
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    return last_loss, loop_s


def plain_main(steps: int) -> None:
    """Train SETTINGS for `steps` steps on megatron-core alone; print the wall time of steps 2..N."""
    import torch
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

    s = SETTINGS
    mbs, gbs, seq = s["micro_batch_size"], s["global_batch_size"], s["seq_length"]
    _config, ddp, optimizer, scheduler = build_plain(s, steps)
    data_config = GPTDatasetConfig(random_seed=s["seed"], sequence_length=seq, split="99,1,0",
                                   tokenizer=MockTokenizer(s["vocab_size"]), reset_position_ids=False,
                                   reset_attention_mask=False, eod_mask_loss=False,
                                   create_attention_mask=False)
    train_data, _, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, [steps * gbs, 1, 0], lambda: True,
                                                     data_config).build()

    def microbatches(step: int):
        """Global batch `step` is samples [step * gbs, (step + 1) * gbs), mbs at a time."""
        for first in range(step * gbs, (step + 1) * gbs, mbs):
            rows = [train_data[i] for i in range(first, first + mbs)]
            keys = [key for key, value in rows[0].items() if value is not None]
            yield {key: torch.stack([row[key] for row in rows]) for key in keys}

    def forward_step(batches, chunk):
        batch = next(batches)
        per_token = chunk(batch["tokens"], batch["position_ids"], attention_mask=None, labels=batch["labels"])
        return per_token, lambda out: masked_loss(batch["loss_mask"], out)

    last_loss, loop_s = train_plain(s, steps, ddp, optimizer, scheduler, microbatches, forward_step)
    print(f"plain_megatron steps={steps} loss={last_loss:.4f} loop_s={loop_s:.4f}", flush=True)


# ------------------------------------------------------------------------------ the bench


def check_settings(steps: int) -> None:
    """Exit if the plain side's SETTINGS differ from what Primus resolves for the example."""
    from primus.config.resolve import resolve

    native = resolve(EXAMPLE, primus_overrides(steps)).modules["pre_trainer"].native
    differ = {k: (v, native.get(k)) for k, v in SETTINGS.items() if native.get(k) != v}
    if differ:
        sys.exit("plain settings differ from the example's (plain, primus): "
                 + ", ".join(f"{k}={a!r}/{b!r}" for k, (a, b) in differ.items()))
    if native["eval_iters"] or native["save_interval"] <= steps or not native["disable_last_saving"]:
        sys.exit("the Primus side would evaluate or write a checkpoint")


def measure(side: str, steps: int, workdir: Path, env: dict[str, str]) -> tuple[float, int]:
    """(seconds for steps 2..N, peak RSS KiB) of one run of `side`."""
    if side == "plain":
        text, rss = run_child([sys.executable, str(Path(__file__).resolve()), "--steps", str(steps)], env)
        return float(re.search(r"loop_s=(\S+)", text).group(1)), rss
    workspace = Path(tempfile.mkdtemp(dir=workdir))
    _, rss = run_child([sys.executable, "-m", "primus", "run", str(EXAMPLE), f"workspace={workspace}",
                        *primus_overrides(steps)], {**env, "CUDA_DEVICE_MAX_CONNECTIONS": "1"})
    return primus_loop_seconds(workspace, steps), rss


def plain_script(description: str, default_steps: int, run: Any) -> None:
    """The command line of a plain megatron-core side (this file's and plain_megatron_sft.py's): `--steps N`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=default_steps)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    run(args.steps)


def main() -> None:
    plain_script("the plain megatron-core side of bench/overhead.py megatron", 200, plain_main)


if __name__ == "__main__":
    main()
