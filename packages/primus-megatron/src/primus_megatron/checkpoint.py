"""Distributed checkpoints with megatron-core's `dist_checkpointing` (torch_dist format).

Layout: `<dir>/iter_0000010/` per checkpoint, written under a temporary name and renamed when every
rank has finished (so a directory named `iter_*` is always complete), plus
`latest_checkpointed_iteration.txt`, Megatron-LM's marker, written last. Each checkpoint holds the
model, the optimizer, the LR schedule, the step, and every rank's RNG state: without the RNG state a
resumed run drifts from one that was never stopped.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from loguru import logger

if TYPE_CHECKING:
    from primus_megatron.trainer import PretrainLoop

LATEST = "latest_checkpointed_iteration.txt"
STEP_DIR = re.compile(r"^iter_(\d{7})$")


def step_dir(root: Path, step: int) -> Path:
    return root / f"iter_{step:07d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (None when there is none)."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name)))
    return step_dir(root, steps[-1]) if steps else None


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as mpu

    return {"tp": mpu.get_tensor_model_parallel_world_size(), "pp": mpu.get_pipeline_model_parallel_world_size(),
            "dp": mpu.get_data_parallel_world_size()}


def _rng_state() -> dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(layout: dict[str, int]) -> Any:
    """Every rank's RNG state, as one sharded object indexed by (pp, tp, dp) rank."""
    from megatron.core import parallel_state as mpu
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("rng_state", _rng_state(), (layout["pp"], layout["tp"], layout["dp"]),
                         (mpu.get_pipeline_model_parallel_rank(), mpu.get_tensor_model_parallel_rank(),
                          mpu.get_data_parallel_rank()), replica_id=0)


def _optimizer_sharding(loop: PretrainLoop) -> dict[str, Any]:
    """How the distributed optimizer lays out its state in a checkpoint (as Megatron-LM chooses it).

    megatron-core 0.16's own default, fully_sharded_model_space, builds ShardedTensors with a
    flattened_range, which its checkpointing no longer accepts. dp_reshardable (each rank writes its
    shard, no communication) can be resumed at another data-parallel size; fully_reshardable gathers
    the state on data-parallel rank 0 (over the gloo groups when mem_efficient, without CUDA) and can
    be resumed at any layout.
    """
    if not loop.args.use_distributed_optimizer:
        return {}
    if loop.args.ckpt_fully_parallel_save:
        return {"metadata": {"distrib_optim_sharding_type": "dp_reshardable"}}
    return {"metadata": {"distrib_optim_sharding_type": "fully_reshardable",
                         "distrib_optim_fully_reshardable_mem_efficient": loop.device.type == "cpu"}}


def _sharded_state(loop: PretrainLoop, *, with_rng: bool, with_optimizer: bool, loading: bool) -> dict[str, Any]:
    model_state: dict[str, Any] = {}
    for i, chunk in enumerate(loop.model):
        key = "model" if len(loop.model) == 1 else f"model{i}"
        model_state[key] = chunk.module.sharded_state_dict()  # unwrapped: keys without DDP's "module."
    state: dict[str, Any] = dict(model_state)
    if with_optimizer:
        merged = {k: v for chunk_state in model_state.values() for k, v in chunk_state.items()}
        state["optimizer"] = loop.optimizer.sharded_state_dict(merged, is_loading=loading,
                                                               **_optimizer_sharding(loop))
        state["scheduler"] = loop.scheduler.state_dict()
    state["step"] = loop.step
    state["layout"] = _layout()
    state["has_rng"] = with_rng
    if with_rng:
        state["rng_state"] = _rng_object(state["layout"])
    return state


def save(root: Path, step: int, loop: PretrainLoop, *, keep_last: int | None = None) -> Path:
    from megatron.core import dist_checkpointing

    final = step_dir(root, step)
    tmp = root / f".tmp-iter_{step:07d}"
    rank = torch.distributed.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    torch.distributed.barrier()
    args = loop.args
    state = _sharded_state(loop, with_rng=not args.no_save_rng, with_optimizer=not args.no_save_optim,
                           loading=False)
    dist_checkpointing.save(state, str(tmp))
    torch.distributed.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        (root / LATEST).write_text(f"{step}\n")
        if keep_last:
            _prune(root, keep_last)
        logger.info(f"saved checkpoint {final}")
    torch.distributed.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load(root: Path, loop: PretrainLoop, *, finetune: bool = False) -> int:
    """Load the newest checkpoint under `root` (or `root` itself if it is one); returns its step.

    `finetune` loads the weights only and starts at step 0 (Megatron-LM's --finetune).
    """
    from megatron.core import dist_checkpointing

    path = root if STEP_DIR.match(root.name) else latest_checkpoint(root)
    if path is None:
        if loop.args.exit_on_missing_checkpoint and not loop.args.auto_continue_train:
            from primus.errors import ConfigError

            raise ConfigError(f"no checkpoint to load in {root}", key="load")
        logger.warning(f"no checkpoint in {root}; training from scratch")
        return 0
    common = dist_checkpointing.load_common_state_dict(str(path))
    args = loop.args
    same_layout = common.get("layout") == _layout()
    with_rng = not finetune and not args.no_load_rng and same_layout and bool(common.get("has_rng"))
    with_optimizer = not finetune and not args.no_load_optim and "optimizer" in common
    if not same_layout and not finetune:
        logger.warning(f"checkpoint layout {common.get('layout')} differs from this run's {_layout()}: "
                       "the RNG state is not restored")
    state = _sharded_state(loop, with_rng=with_rng, with_optimizer=with_optimizer, loading=True)
    if not with_optimizer:
        state.pop("scheduler", None)
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(loop.model):
        # the wrapper's load: DDP loads into its module; FSDP2's shards were loaded in place
        chunk.load_state_dict(loaded["model" if len(loop.model) == 1 else f"model{i}"])
    if with_optimizer:
        with torch.no_grad():  # fp32 params: the distributed optimizer's main shards are views of them
            loop.optimizer.load_state_dict(loaded["optimizer"])
        loop.scheduler.load_state_dict(loaded["scheduler"])
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    step = 0 if finetune else int(loaded["step"])
    logger.info(f"loaded checkpoint {path} (step {loaded['step']}{', weights only' if finetune else ''})")
    return step

