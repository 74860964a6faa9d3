"""Distributed checkpoints with megatron-core's `dist_checkpointing` (torch_dist format).

Layout: `<dir>/iter_0000010/` per checkpoint, written under a temporary name and renamed when every
rank has finished (so a directory named `iter_*` is always complete), plus
`latest_checkpointed_iteration.txt`, Megatron-LM's marker, written last. Each checkpoint holds the
model, the optimizer, the LR schedule, the step, and every rank's RNG state: without the RNG state a
resumed run drifts from one that was never stopped.

Loading reads no pickled code: `common.pt` and every object stored inside the `.distcp` files go
through `torch.load(weights_only=True)` (megatron-core registers the few numpy types the RNG state
needs), and torch's `.metadata` file through an unpickler that admits only torch's checkpoint
metadata classes. Before loading, a checkpoint is checked whole (`check_complete`): a file missing,
truncated or unreadable makes it *damaged*; `checkpoint.on_damaged: fail` (the default) stops with one
line naming it, `previous` moves it aside (`iter_0000010.damaged`, never deleted) and resumes from
the newest older complete one.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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


def checkpoints(root: str | Path) -> list[Path]:
    """The checkpoints under `root`, oldest first (a damaged one moved aside is not among them)."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name)))
    return [step_dir(root, step) for step in steps]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under `root` (None when there is none)."""
    found = checkpoints(root)
    return found[-1] if found else None


# ------------------------------------------------------------------------------------ damaged checkpoints


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be loaded: a file missing, truncated or unreadable."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# torch's DCP `.metadata` is a plain pickle (torch reads it with pickle.load): only these may be in it
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner")
_METADATA_NAMES = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                   ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch's checkpoint metadata (dataclasses, enums, sizes, dtypes) and refuses anything
    else, so a planted `.metadata` cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_NAMES:
            return super().find_class(module, name)
        if module in _METADATA_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type) and found.__module__ == module:
                return found
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                           torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which checkpoint metadata never holds")


def _read_metadata(path: Path) -> Any:
    with path.open("rb") as f:
        return _MetadataUnpickler(f).load()


def check_complete(path: Path) -> dict[str, Any]:
    """Read what loading `path` needs, without loading tensors: Megatron's `metadata.json`, `common.pt`
    (weights only), torch's `.metadata`, and the size of every `.distcp` file against the byte ranges
    the metadata records. Returns the common state; raises DamagedCheckpoint naming the first file
    that is missing, truncated or unreadable."""
    import megatron.core  # noqa: F401  (registers the numpy types of the RNG state as safe for weights_only)

    def damaged(reason: str) -> DamagedCheckpoint:
        return DamagedCheckpoint(path, reason)

    try:
        json.loads((path / "metadata.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise damaged("metadata.json is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise damaged(f"metadata.json cannot be read ({_first_line(exc)})") from None
    try:
        common = torch.load(path / "common.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise damaged("common.pt is missing") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # what torch.load raises on a bad file
        raise damaged(f"common.pt cannot be read ({_first_line(exc)})") from None
    if not isinstance(common, dict):
        raise damaged("common.pt holds no state dict")
    try:
        metadata = _read_metadata(path / ".metadata")
        storage = dict(metadata.storage_data or {})
    except FileNotFoundError:
        raise damaged(".metadata is missing") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError, KeyError) as exc:
        raise damaged(f".metadata cannot be read ({_first_line(exc)})") from None
    needed: dict[str, int] = {}
    for info in storage.values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        try:
            size = (path / name).stat().st_size
        except FileNotFoundError:
            raise damaged(f"{name} is missing") from None
        if size < end:
            raise damaged(f"{name} is truncated ({size:,} of at least {end:,} bytes)")
    return common


def _any_rank(flag: bool, loop: PretrainLoop) -> bool:
    """Whether `flag` is true on any rank: every rank must pick the same checkpoint."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    if loop.args.distributed_backend == "nccl":
        value = value.to(loop.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _move_aside(path: Path) -> Path:
    """`iter_0000010` -> `iter_0000010.damaged` (or `.damaged-2`, ...): kept, but no longer a checkpoint."""
    target, n = path.with_name(f"{path.name}.damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    path.rename(target)
    return target


def _choose(root: Path, candidates: list[Path], loop: PretrainLoop, on_damaged: str,
            explicit: bool) -> tuple[Path, dict[str, Any]]:
    """The newest of `candidates` (newest first) that every rank can load, with its common state."""
    from primus.errors import ConfigError
    from primus.runs.resume import refuse_damaged

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for i, path in enumerate(candidates):
        common, reason = None, None
        try:
            common = check_complete(path)
        except DamagedCheckpoint as exc:
            reason = exc.reason
        if not _any_rank(reason is not None, loop):
            assert common is not None
            return path, common
        reason = reason or "another rank cannot read it"
        older = candidates[i + 1] if i + 1 < len(candidates) else None
        if explicit:
            raise ConfigError(f"checkpoint {path} cannot be loaded: {reason}", key="load",
                              fix="point load at another checkpoint, or delete this one")
        refuse_damaged(path, reason, older=older, on_damaged=on_damaged)
        if rank == 0:
            aside = _move_aside(path)
            (root / LATEST).write_text(f"{int(STEP_DIR.match(older.name).group(1))}\n")  # type: ignore[union-attr]
            logger.warning(f"checkpoint {path} is damaged ({reason}): moved aside to {aside.name} and resuming "
                           f"from {older.name} (checkpoint.on_damaged: previous)")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    raise AssertionError("unreachable")


@contextmanager
def _weights_only_reads() -> Iterator[None]:
    """For one `dist_checkpointing.load`: the objects inside `.distcp` files are read with
    `torch.load(..., weights_only=True)` (torch's stock planner loads them with the weights-only guard
    off, so a planted object would run) and the `.metadata` pickle with `_MetadataUnpickler` (torch's
    stock reader unpickles it unrestricted). megatron-core's torch_dist strategy builds its reader and
    planner from these two module names on each load; both are swapped only for this call and put
    back after. Nothing here loads with the guard off."""
    import io

    from megatron.core.dist_checkpointing.strategies import torch as strategy
    from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
        CachedMetadataFileSystemReader,
    )
    from torch.distributed.checkpoint.metadata import StorageMeta

    planner_cls, reader_fn = strategy.MCoreLoadPlanner, strategy._get_filesystem_reader

    class WeightsOnlyPlanner(planner_cls):  # type: ignore[misc, valid-type]
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            from torch.distributed.checkpoint._traverse import set_element

            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    class SafeMetadataReader(CachedMetadataFileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            rank = kwargs.get("rank")
            if rank is None and self._cached_metadata is not None:
                return self._cached_metadata
            metadata = _read_metadata(Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata"))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            if rank is None:
                self._cached_metadata = metadata
            return metadata

    strategy.MCoreLoadPlanner = WeightsOnlyPlanner
    strategy._get_filesystem_reader = lambda checkpoint_dir, cache_metadata=False: SafeMetadataReader(checkpoint_dir)
    try:
        yield
    finally:
        strategy.MCoreLoadPlanner, strategy._get_filesystem_reader = planner_cls, reader_fn


def _weights_only_common() -> Any:
    """megatron-core's common.pt reader with weights_only stated, not left to torch's default (which
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns off)."""
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy

    class WeightsOnlyCommon(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir: str | Path) -> Any:
            return torch.load(Path(checkpoint_dir) / COMMON_STATE_FNAME, map_location="cpu", weights_only=True)

    return WeightsOnlyCommon()


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as mpu

    return {"tp": mpu.get_tensor_model_parallel_world_size(), "pp": mpu.get_pipeline_model_parallel_world_size(),
            "dp": mpu.get_data_parallel_world_size()}


def _same_model_layout(saved: Any, current: dict[str, int]) -> bool:
    """Whether two layouts shard the model the same way (data parallelism aside)."""
    return isinstance(saved, dict) and all(saved.get(k) == current[k] for k in ("tp", "pp"))


def _describe(layout: Any) -> str:
    return " ".join(f"{k} {v}" for k, v in layout.items()) if isinstance(layout, dict) else "an unknown layout"


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


def _optimizer_sharding(loop: PretrainLoop, saved: str | None = None) -> dict[str, Any]:
    """How the distributed optimizer lays out its state in a checkpoint (as Megatron-LM chooses it).

    megatron-core 0.16's own default, fully_sharded_model_space, builds ShardedTensors with a
    flattened_range, which its checkpointing no longer accepts. dp_reshardable (each rank writes its
    shard, no communication) can be resumed at another data-parallel size; fully_reshardable gathers
    the state on data-parallel rank 0 (over the gloo groups when mem_efficient, without CUDA) and can
    be resumed at any layout. A load reads the state the way the checkpoint wrote it (`saved`).
    """
    if not loop.args.use_distributed_optimizer:
        return {}
    if saved == "dp_reshardable" or (saved is None and loop.args.ckpt_fully_parallel_save):
        return {"metadata": {"distrib_optim_sharding_type": "dp_reshardable"}}
    return {"metadata": {"distrib_optim_sharding_type": "fully_reshardable",
                         "distrib_optim_fully_reshardable_mem_efficient": loop.device.type == "cpu"}}


def _sharded_state(loop: PretrainLoop, *, with_rng: bool, with_optimizer: bool, loading: bool,
                   saved_sharding: str | None = None) -> dict[str, Any]:
    model_state: dict[str, Any] = {}
    keep = getattr(loop, "checkpoint_filter", None)  # LoRA: the adapters only (the base is reloaded)
    for i, chunk in enumerate(loop.model):
        key = "model" if len(loop.model) == 1 else f"model{i}"
        model_state[key] = chunk.module.sharded_state_dict()  # unwrapped: keys without DDP's "module."
        if keep is not None:
            model_state[key] = {k: v for k, v in model_state[key].items() if keep(k)}
    state: dict[str, Any] = dict(model_state)
    if with_optimizer:
        merged = {k: v for chunk_state in model_state.values() for k, v in chunk_state.items()}
        state["optimizer"] = loop.optimizer.sharded_state_dict(merged, is_loading=loading,
                                                               **_optimizer_sharding(loop, saved_sharding))
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
    dist_checkpointing.save(state, str(tmp), _save_strategy(args))
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


def _save_strategy(args: Any) -> Any:
    """megatron-core's default save, spread over the data-parallel ranks with
    `ckpt_fully_parallel_save` (as Megatron-LM does): each replicated shard (the weights under DP,
    the optimizer state without the distributed optimizer) is written by one of its replicas, not
    all by data-parallel rank 0. None (the plain default) on one data-parallel rank."""
    from megatron.core import parallel_state as mpu

    group = mpu.get_data_parallel_group(with_context_parallel=True)
    if not args.ckpt_fully_parallel_save or torch.distributed.get_world_size(group) < 2:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load(root: Path, loop: PretrainLoop, *, finetune: bool = False, on_damaged: str = "fail") -> int:
    """Load the newest checkpoint under `root` (or `root` itself if it is one); returns its step.

    `finetune` loads the weights only and starts at step 0 (Megatron-LM's --finetune). A damaged
    newest checkpoint is an error naming it, or with `on_damaged="previous"` is moved aside and the
    newest older one is loaded.
    """
    from megatron.core import dist_checkpointing

    explicit = STEP_DIR.match(root.name) is not None
    candidates = [root] if explicit else checkpoints(root)[::-1]
    if not candidates:
        if loop.args.exit_on_missing_checkpoint and not loop.args.auto_continue_train:
            from primus.errors import ConfigError

            raise ConfigError(f"no checkpoint to load in {root}", key="load")
        logger.warning(f"no checkpoint in {root}; training from scratch")
        return 0
    path, common = _choose(root, candidates, loop, on_damaged, explicit)
    args = loop.args
    same_layout = common.get("layout") == _layout()
    with_rng = not finetune and not args.no_load_rng and same_layout and bool(common.get("has_rng"))
    with_optimizer = not finetune and not args.no_load_optim and "optimizer" in common
    if not same_layout and not finetune:
        logger.warning(f"checkpoint layout {common.get('layout')} differs from this run's {_layout()}: "
                       "the RNG state is not restored")
    saved_sharding = (common.get("optimizer") or {}).get("param_state_sharding_type")
    if with_optimizer and saved_sharding == "dp_reshardable" and not _same_model_layout(common.get("layout"), _layout()):
        from primus.errors import ConfigError

        raise ConfigError(f"checkpoint {path} keeps its distributed-optimizer state per data-parallel shard "
                          f"(saved with ckpt_fully_parallel_save: true at {_describe(common.get('layout'))}); it "
                          f"resumes only at that tensor/pipeline layout, not at {_describe(_layout())}", key="load",
                          fix="resume at the saved layout, set no_load_optim: true to resume without the optimizer "
                              "state, or train with ckpt_fully_parallel_save: false (state any layout can resume)")
    state = _sharded_state(loop, with_rng=with_rng, with_optimizer=with_optimizer, loading=True,
                           saved_sharding=saved_sharding if isinstance(saved_sharding, str) else None)
    if not with_optimizer:
        state.pop("scheduler", None)
    with _weights_only_reads():
        loaded = dist_checkpointing.load(state, str(path), common_strategy=_weights_only_common())
    keep = getattr(loop, "checkpoint_filter", None)
    for i, chunk in enumerate(loop.model):
        part = loaded["model" if len(loop.model) == 1 else f"model{i}"]
        if keep is None:
            # the wrapper's load: DDP loads into its module; FSDP2's shards were loaded in place
            chunk.load_state_dict(part)
            continue
        missing, unexpected = chunk.module.load_state_dict(part, strict=False)  # the rest kept as it is
        if unexpected or any(keep(k) for k in missing):
            raise RuntimeError(f"checkpoint {path} does not match the model's checkpointed state "
                               f"(missing {[k for k in missing if keep(k)][:3]}, unexpected {unexpected[:3]})")
    if with_optimizer:
        with torch.no_grad():  # fp32 params: the distributed optimizer's main shards are views of them
            loop.optimizer.load_state_dict(loaded["optimizer"])
        loop.scheduler.load_state_dict(loaded["scheduler"])
    if with_rng:
        _set_rng_state(loaded["rng_state"])
    step = 0 if finetune else int(loaded["step"])
    logger.info(f"loaded checkpoint {path} (step {loaded['step']}{', weights only' if finetune else ''})")
    return step

