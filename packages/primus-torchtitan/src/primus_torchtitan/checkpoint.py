"""Resuming from TorchTitan's checkpoints safely (issue 15); imports torch, used by the adapter only.

- **Nothing in a checkpoint runs code.** TorchTitan saves with torch's distributed checkpoint (DCP),
  whose stock reader unpickles three things without restriction: the `.metadata` file, every
  non-tensor value, and TorchTitan's dataloader state (bytes stored in the checkpoint). The first
  two go through core's safe DCP readers (`primus.runs.dcp`, shared with the hf backend), the
  dataloader state through an unpickler that knows no class at all; a file that names anything else
  is refused. Nothing here ever loads with the guard off.
- **A damaged newest checkpoint** (a file missing or cut short) is named in one line, or, with
  `checkpoint.on_damaged: previous`, set aside and the newest older complete checkpoint loaded.

Both are installed on the trainer's own checkpointer and dataloader objects, not on their classes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch.distributed as dist
from loguru import logger
from torch.distributed.checkpoint.api import CheckpointException

from primus.errors import ConfigError, TrainingError
from primus.runs.dcp import (
    METADATA,
    SafePlanner,
    SafeReader,
    damage,
    first_failure,
    restricted_loads,
)

STEP_DIR = re.compile(r"step-(\d+)")


def load_safely(checkpointer: Any, dataloader: Any) -> None:
    """Route the checkpointer's DCP loads through SafeReader/SafePlanner, and check the dataloader
    state's pickled bytes before TorchTitan's `pickle.loads` sees them."""
    import torch.distributed.checkpoint as dcp

    framework_dcp_load = checkpointer.dcp_load

    def dcp_load(state_dict: dict[str, Any], checkpoint_id: str, from_hf: bool, from_quantized: bool) -> None:
        if from_hf:  # safetensors and a JSON index: nothing is unpickled
            return framework_dcp_load(state_dict, checkpoint_id=checkpoint_id, from_hf=from_hf,
                                      from_quantized=from_quantized)
        from torchtitan.components.checkpoint import MODEL

        # TorchTitan's dcp_load with a safe reader and planner
        dcp.load(state_dict, storage_reader=SafeReader(checkpoint_id), planner=SafePlanner())
        if MODEL in checkpointer.states:
            checkpointer.states[MODEL].load_state_dict(state_dict)
        return None

    checkpointer.dcp_load = dcp_load
    if dataloader is None or not hasattr(dataloader, "load_state_dict"):
        return
    framework_load_state_dict = dataloader.load_state_dict

    def load_state_dict(state: dict[str, Any]) -> None:
        for key, value in (state or {}).items():
            if isinstance(value, (bytes, bytearray)):  # TorchTitan pickles each rank's loader state
                restricted_loads(bytes(value), what=f"the dataloader state {key}")
        from primus_torchtitan.data import MOCK_POSITION

        saved_world = (state or {}).get("world_size")
        world = getattr(dataloader, "dp_world_size", saved_world)
        if saved_world is not None and saved_world != world and MOCK_POSITION not in state:
            # TorchTitan cannot move a dataset position between data-parallel layouts (it asserts);
            # the model and optimizer reshard, the corpus is read again from its start
            logger.warning(f"the checkpoint's data position was saved by {saved_world} data-parallel ranks and "
                           f"this run has {world}: TorchTitan cannot reshard a corpus position, so the corpus "
                           "is read from its start (the model and optimizer states resumed)")
            return
        framework_load_state_dict(state)

    dataloader.load_state_dict = load_state_dict


# ----------------------------------------------------------------------------- damaged checkpoints


def complete_steps(folder: Path) -> list[int]:
    """Steps of the `step-N` folders that hold DCP's metadata (TorchTitan's own rule), oldest first."""
    if not folder.is_dir():
        return []
    steps = [int(m.group(1)) for p in folder.iterdir() if (m := STEP_DIR.fullmatch(p.name))
             and (p / METADATA).is_file()]
    return sorted(steps)


def _set_aside(path: Path) -> Path:
    """`step-8` -> `step_8.damaged`: TorchTitan's resume and its rotation look for `step-<n>` names."""
    aside = path.with_name(f"{path.name.replace('-', '_')}.damaged")
    n = 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name.replace('-', '_')}.damaged-{n}")
    return aside


def handle_damaged(checkpointer: Any, *, on_damaged: str, rank: int) -> None:
    """Resume (`load`, step -1: the newest) from the newest checkpoint that loads, as
    `checkpoint.on_damaged` allows; an explicit `checkpoint.load_step` is treated the same way."""
    framework_load = checkpointer.load
    folder = Path(checkpointer.folder)

    def load(step: int = -1) -> bool:
        steps = complete_steps(folder)
        target = step if step != -1 else (steps[-1] if steps else -1)
        if target not in steps:  # a fresh start, TorchTitan's initial_load_path, or a load_step it reports
            return framework_load(step)
        damaged: list[tuple[Path, str]] = []
        while True:
            try:
                loaded = framework_load(target)
                break
            except (CheckpointException, Exception) as exc:
                path = folder / f"step-{target}"
                why = damage(path, exc)
                if why is None and isinstance(exc, CheckpointException):
                    # a BaseException: it would pass the worker's handler by, status left "running"
                    raise TrainingError(f"checkpoint {path} cannot be loaded: {first_failure(exc)}") from exc
                if why is None:
                    raise
                if on_damaged != "previous":
                    raise ConfigError(f"checkpoint {path} cannot be loaded: {why}",
                                      fix=f"set checkpoint.on_damaged=previous to resume from the complete "
                                          f"checkpoint before it, or delete {path}") from None
                damaged.append((path, why))
                older = [s for s in steps if s < target]
                if not older:
                    first = damaged[0]
                    raise ConfigError(f"checkpoint {first[0]} cannot be loaded: {first[1]}; no older complete "
                                      "checkpoint could be loaded either",
                                      fix=f"delete the damaged checkpoints in {folder} to start from step 0") from None
                target = older[-1]
        if not damaged:
            return loaded
        asides = [_set_aside(path) for path, _ in damaged]
        if dist.is_initialized():  # every rank has read what it needed, and named the asides alike
            dist.barrier()
        for (path, why), aside in zip(damaged, asides, strict=True):
            if rank == 0:
                os.replace(path, aside)
            logger.warning(f"checkpoint {path} cannot be loaded ({why}); resumed from step-{target} instead "
                           f"(checkpoint.on_damaged: previous); the damaged one is kept as {aside.name}")
        if dist.is_initialized():
            dist.barrier()
        return loaded

    checkpointer.load = load
