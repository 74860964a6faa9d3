"""`primus eval` on megatron: the training model (same layout, same GPTModel), its init or a
checkpoint, scored on core's evaluation blocks through megatron-core's forward-only schedule.

Each data-parallel replica scores its share of the blocks (`primus.runs.evaluate.shard`); every
replica runs the same number of microbatches (short shares are padded with blocks whose tokens do
not count), so expert-parallel collectives line up. The loss is the cross-entropy of the logits
over the model's real vocabulary: the rows megatron pads the vocabulary with are masked out, so the
number is transformers' number whatever make_vocab_size_divisible_by is.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from loguru import logger
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from primus.errors import ConfigError
from primus.models.spec import ModelSpec
from primus.runs.evaluate import EvalRequest, EvalResult, blocks_for, shard
from primus_megatron import checkpoint as ckpt
from primus_megatron.trainer import build_model, init_distributed, seed_everything, transformer_config


def load_tokenizer(directory: str) -> tuple[Any, int]:
    """(encode, eos id) of a tokenizer directory: tokenizer.json, EOS from tokenizer_config.json."""
    from tokenizers import Tokenizer

    from primus_megatron.data import EOD_NAMES

    path = Path(directory)
    file = path / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"no tokenizer.json in {directory}", key="data.tokenizer")
    tokenizer = Tokenizer.from_file(str(file))
    eos_name = None
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{config} is not JSON", key="data.tokenizer") from None
        eos_name = eos.get("content") if isinstance(eos, dict) else eos
    names = ([eos_name] if eos_name else []) + list(EOD_NAMES)
    eos_id = next((i for n in names if (i := tokenizer.token_to_id(n)) is not None), None)
    if eos_id is None:
        raise ConfigError(f"tokenizer {directory} has no end-of-text token", key="data.tokenizer")
    return (lambda text: tokenizer.encode(text, add_special_tokens=False).ids), eos_id


class _Bare:
    """A model chunk in the shape checkpoint.load expects of a DDP-wrapped one."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:
        return self.module.load_state_dict(state, strict=strict)


class _Holder:
    """What checkpoint.load reads of a PretrainLoop: args, model, device, step (no optimizer)."""

    def __init__(self, args: SimpleNamespace, model: list[torch.nn.Module], device: torch.device) -> None:
        self.args = SimpleNamespace(**{**vars(args), "no_load_optim": True, "no_load_rng": True,
                                       "exit_on_missing_checkpoint": True, "auto_continue_train": False})
        self.model = [_Bare(m) for m in model]
        self.device = device
        self.step = 0


def _eval_loss(labels: torch.Tensor, weights: torch.Tensor, vocab: int, logits: torch.Tensor) -> tuple:
    """Summed cross-entropy (fp64) over the tokens with weight 1, padded vocabulary masked."""
    logits = logits.float()
    local = logits.shape[-1]
    first = mpu.get_tensor_model_parallel_rank() * local
    if first + local > vocab:
        logits = logits.clone()
        logits[..., max(vocab - first, 0):] = float("-inf")
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
    total = (losses.double() * weights).sum()
    count = weights.sum()
    return total.float(), count.clamp(min=1).to(torch.int), {"eval": torch.stack([total, count])}


def _forward(vocab: int, data_iterator: Any, model: Any) -> tuple[torch.Tensor, Any]:
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None)
    return output, partial(_eval_loss, batch["labels"], batch["weights"], vocab)


def _microbatches(blocks: list[list[int]], count: int, size: int, seq: int,
                  device: torch.device) -> list[dict[str, torch.Tensor]]:
    """`count` microbatches of `size` blocks; missing blocks are zeros with weight 0."""
    out = []
    for m in range(count):
        chunk = blocks[m * size:(m + 1) * size]
        ids = torch.zeros(size, seq + 1, dtype=torch.long)
        weights = torch.zeros(size, seq, dtype=torch.float64)
        for i, block in enumerate(chunk):
            ids[i] = torch.tensor(block, dtype=torch.long)
            weights[i] = 1.0
        out.append({"tokens": ids[:, :-1].contiguous().to(device), "labels": ids[:, 1:].contiguous().to(device),
                    "weights": weights.to(device),
                    "position_ids": torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(size, seq).to(device)})
    return out


@torch.no_grad()
def evaluate(args: SimpleNamespace, request: EvalRequest, *, spec: ModelSpec | None, hf_path: str | None,
             checkpoint_root: Path, device: torch.device) -> EvalResult | None:
    if (args.context_parallel_size or 1) > 1:
        raise ConfigError("primus eval on megatron does not split blocks over context-parallel ranks",
                          key="parallel.context", fix="evaluate with parallel.context=1")
    # the blocks first: a corpus or tokenizer that cannot be scored fails before any model is built
    encode, eos_id = load_tokenizer(request.tokenizer)
    blocks = blocks_for(request, encode, eos_id)
    top = max(max(b) for b in blocks)
    if top >= args.vocab_size:
        raise ConfigError(f"tokenizer {request.tokenizer} gives token id {top}, the model's vocabulary has "
                          f"{args.vocab_size}", key="data.tokenizer", fix="evaluate with the model's tokenizer")
    init_distributed(args, device)
    try:
        seed_everything(args.seed)
        config = transformer_config(args, device)
        # the random init stays even when every parameter is overwritten: megatron-core 0.16 marks the
        # tensor-parallel parameters (grad norms, clipping) only inside it (perform_initialization)
        model = build_model(args, config, device)
        step: int | None = None
        if request.checkpoint is None:
            if hf_path:
                from primus_megatron.hf_weights import load_and_describe

                assert spec is not None
                logger.info(load_and_describe(model, spec, hf_path))
        else:
            root = checkpoint_root if request.checkpoint == "latest" else Path(request.checkpoint)
            if ckpt.STEP_DIR.match(root.name) is None and not ckpt.checkpoints(root):
                raise ConfigError(f"no checkpoint in {root}", key="--checkpoint",
                                  fix="train the run first, or pass a checkpoint directory")
            step = ckpt.load(root, _Holder(args, model, device))  # type: ignore[arg-type]
        for chunk in model:
            chunk.eval()

        dp_rank, dp = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
        share = math.ceil(len(blocks) / dp)
        size = max(1, min(args.micro_batch_size, share))
        count = math.ceil(share / size)
        batches = _microbatches(shard(blocks, dp_rank, dp), count, size, request.seq_length, device)
        iterators: Any = iter(batches) if len(model) == 1 else [iter(batches) for _ in model]
        config.no_sync_func = None
        losses = get_forward_backward_func()(
            forward_step_func=partial(_forward, args.vocab_size), data_iterator=iterators,
            model=model if len(model) > 1 else model[0], num_microbatches=count,
            seq_length=request.seq_length, micro_batch_size=size, decoder_seq_length=request.seq_length,
            forward_only=True)
        local = torch.zeros(2, dtype=torch.float64)
        if mpu.is_pipeline_last_stage(ignore_virtual=True) and mpu.get_tensor_model_parallel_rank() == 0:
            for item in losses:
                local += item["eval"].to(torch.float64).cpu()
        reduce_on = local.to(device) if args.distributed_backend == "nccl" else local
        torch.distributed.all_reduce(reduce_on)
        total, tokens = reduce_on.cpu().tolist()
        if torch.distributed.get_rank() != 0:
            return None
        return EvalResult(loss_sum=float(total), tokens=int(round(tokens)), step=step)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            mpu.destroy_model_parallel()
            torch.distributed.destroy_process_group()
