"""`primus eval` on the torchtitan backend: TorchTitan's own Trainer builds and parallelizes the
model exactly as a training run of the same config would, then the weights are set and core's
evaluation blocks are scored (imports torch and torchtitan; used by the adapter only).

- Weights: the model's init (`model: {hf_path}` weights when set, else TorchTitan's seeded random
  init), the run's newest complete checkpoint (`latest`), or a checkpoint directory. A
  checkpoint's model tensors are read with DCP through the backend's safe readers
  (primus.runs.dcp): any saved layout loads into this layout, nothing is unpickled.
- Precision: the forward runs on the fp32 parameters. FSDP's mixed-precision parameter dtype
  (bf16 by default) is a training throughput setting; a score is computed in full precision.
- Attention: positions 0..seq_length-1 for every block, so TorchTitan's document mask is one
  causal mask over the block, as transformers computes it.
- Blocks are split over the data-parallel ranks (core's `shard`); tensor-parallel ranks of one
  data-parallel rank score the same blocks. Every rank runs the same number of forwards (FSDP
  gathers are collective), a rank out of blocks scores a copy with weight 0.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from loguru import logger

from primus.errors import ConfigError
from primus.runs.evaluate import EvalRequest, EvalResult, blocks_for, shard


def read_tokenizer(directory: str) -> tuple[Any, int]:
    """The `tokenizers` tokenizer of a directory and its EOS id (tokenizer_config.json's eos_token)."""
    from tokenizers import Tokenizer

    path = Path(directory)
    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"tokenizer directory {path} has no tokenizer.json", key="data.tokenizer")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    eos = None
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{config} is not JSON", key="data.tokenizer") from None
        if isinstance(eos, dict):
            eos = eos.get("content")
    eos_id = tokenizer.token_to_id(eos) if isinstance(eos, str) else None
    if eos_id is None:
        eos_id = tokenizer.token_to_id("<|endoftext|>")
    if eos_id is None:
        raise ConfigError(f"tokenizer {path} names no EOS token", key="data.tokenizer",
                          fix="set eos_token in its tokenizer_config.json")
    return tokenizer, eos_id


def checkpoint_to_score(request: EvalRequest, checkpoint_dir: Path) -> tuple[Path | None, int | None]:
    """The checkpoint folder `request` names and its step (None, None: the model's init)."""
    from primus_torchtitan.checkpoint import METADATA, STEP_DIR, complete_steps

    if request.checkpoint is None:
        return None, None
    if request.checkpoint == "latest":
        steps = complete_steps(checkpoint_dir)
        if not steps:
            raise ConfigError(f"no complete checkpoint in {checkpoint_dir}", key="--checkpoint",
                              fix="train first, or evaluate the model's init (no --checkpoint)")
        return checkpoint_dir / f"step-{steps[-1]}", steps[-1]
    path = Path(request.checkpoint)
    if not (path / METADATA).is_file():
        raise ConfigError(f"{path} is not a complete TorchTitan checkpoint (no {METADATA})", key="--checkpoint",
                          fix=f"pass latest, or a step-N folder of {checkpoint_dir}")
    match = STEP_DIR.fullmatch(path.name)
    return path, int(match.group(1)) if match else None


def load_model_checkpoint(model_parts: list[Any], path: Path) -> None:
    """The model tensors of DCP checkpoint `path` into the (parallelized) model: DCP reshards from
    the saved layout; optimizer and dataloader states are not read."""
    import torch.distributed.checkpoint as dcp
    from torchtitan.components.checkpoint import ModelWrapper

    from primus.runs.dcp import SafePlanner, SafeReader

    wrapper = ModelWrapper(model_parts)
    state = wrapper.state_dict()
    dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner())
    wrapper.load_state_dict(state)


def score(trainer: Any, request: EvalRequest) -> tuple[float, int]:
    """(summed token loss, tokens) of this job on the blocks of `request`, all-reduced."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    tokenizer, eos_id = read_tokenizer(request.tokenizer)
    blocks = blocks_for(request, lambda text: tokenizer.encode(text, add_special_tokens=False).ids, eos_id)
    vocab = trainer.model_config.vocab_size
    if max(max(b) for b in blocks) >= vocab:
        raise ConfigError(f"tokenizer {request.tokenizer} produces ids up to {max(max(b) for b in blocks)}, "
                          f"the model's vocabulary has {vocab}", key="data.tokenizer")
    dims = trainer.parallel_dims
    group = None
    if dims.dp_enabled:
        mesh = dims.get_mesh("batch")
        dp_rank, dp_world, group = mesh.get_local_rank(), mesh.size(), mesh.get_group()
    else:
        dp_rank, dp_world = 0, 1
    mine = shard(blocks, dp_rank, dp_world)
    batch = max(1, int(trainer.config.training.local_batch_size))
    rounds = math.ceil(math.ceil(len(blocks) / dp_world) / batch)

    model = trainer.model_parts[0]
    skip_lm_head = getattr(model, "_skip_lm_head", False)
    model._skip_lm_head = False  # training applies lm_head inside its chunked loss; here the logits are wanted
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.int64)
    try:
        with torch.no_grad():
            for k in range(rounds):
                part = mine[k * batch:(k + 1) * batch]
                weight = 1.0 if part else 0.0
                ids = torch.tensor(part or blocks[:1], dtype=torch.long, device=trainer.device)
                inputs, labels = ids[:, :-1], ids[:, 1:]
                positions = torch.arange(inputs.shape[1], device=trainer.device).expand_as(inputs)
                with trainer.train_context():
                    inputs, labels, extra = trainer.post_dataloading_process(
                        {"input": inputs, "positions": positions}, labels)
                    logits = model(inputs, **extra)
                if isinstance(logits, list):  # DeepSeek-V3 with multi-token prediction: the main head's
                    logits = logits[0]
                if isinstance(logits, DTensor):
                    logits = logits.full_tensor()
                if isinstance(labels, DTensor):
                    labels = labels.full_tensor()
                losses = torch.nn.functional.cross_entropy(
                    logits.double().reshape(-1, logits.shape[-1]).cpu(), labels.reshape(-1).cpu(), reduction="sum")
                loss_sum += losses * weight
                tokens += int(labels.numel()) if part else 0
    finally:
        model._skip_lm_head = skip_lm_head
    if group is not None:
        totals = torch.stack([loss_sum, tokens.double()]).to(trainer.device)
        dist.all_reduce(totals, group=group)
        loss_sum, tokens = totals[0].cpu(), totals[1].cpu().round().long()
    return float(loss_sum), int(tokens)


def evaluate(ctx: Any, request: EvalRequest) -> EvalResult | None:
    import torch

    from primus_torchtitan.adapter import (
        build_trainer_config,
        parameters_left_uninitialised,
        single_process_env,
    )
    from primus_torchtitan.hf_weights import Layout, load_into, peak_rss_gib
    from primus_torchtitan.translate import native_get

    native = ctx.native
    if int(native_get(native, "parallelism.pipeline_parallel_degree", 1) or 1) > 1 or \
            int(native_get(native, "parallelism.context_parallel_degree", 1) or 1) > 1:
        raise ConfigError("primus eval on the torchtitan backend runs without pipeline or context parallelism",
                          key="parallel.pipeline", fix="evaluate with parallel.pipeline=1 parallel.context=1 "
                          "(any checkpoint layout loads into any other)")
    path, step = checkpoint_to_score(request, ctx.checkpoint_dir)
    with single_process_env():
        from torchtitan.trainer import Trainer  # noqa: F401 - the framework import, after before_import

        config = build_trainer_config(native, run_dir=str(ctx.run_dir), checkpoint_dir=str(ctx.checkpoint_dir))
        config.checkpoint.enable = False  # the run's checkpoints are read below, never rotated or written
        config.validator.enable = False
        config.training.seq_len = request.seq_length
        config.training.mixed_precision_param = "float32"
        ctx.apply_patches("build_args", titan_config=config)
        ctx.apply_patches("setup")
        trainer = None
        try:
            with parameters_left_uninitialised(path is not None or bool(ctx.module.hf_path)):
                trainer = config.build()
            if path is not None:
                load_model_checkpoint(trainer.model_parts, path)
            elif ctx.module.hf_path:
                started = time.perf_counter()
                read = load_into(trainer.model_parts, Layout.from_native(native["model"]), Path(ctx.module.hf_path))
                logger.info(f"loaded the Hugging Face weights of {ctx.module.hf_path}: {read / 2**20:.1f} MiB read by "
                            f"this rank in {time.perf_counter() - started:.1f}s, peak RSS so far {peak_rss_gib():.2f} GiB")
            started = time.perf_counter()
            loss_sum, tokens = score(trainer, request)
            logger.info(f"scored {tokens} tokens in {time.perf_counter() - started:.1f}s")
        finally:
            if trainer is not None:
                trainer.close()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    if ctx.rank != 0:
        return None
    return EvalResult(loss_sum=loss_sum, tokens=tokens, step=step)
