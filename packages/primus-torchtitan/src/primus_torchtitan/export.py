"""`primus export` for the torchtitan backend: a TorchTitan DCP checkpoint as Hugging Face safetensors.

One process on CPU, no process group, whatever layout the checkpoint was saved with (one process,
FSDP, TP, ...): DCP's metadata knows every tensor's global shape and where each saved shard of it
lies, so each model tensor is allocated whole and DCP fills it from the shards. The reads go through
core's safe DCP readers (primus.runs.dcp: the metadata through a restricted unpickler; only the
model's tensors are requested, so no pickled value is read at all). Imports
torch, never torchtitan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from primus.errors import ConfigError


def checkpoint_folder(module: Any, run_dir: Path) -> Path:
    """Where the run's checkpoints are: `checkpoint.dir` when set, else `<run dir>/checkpoints`."""
    configured = module.module.checkpoint.dir
    return Path(configured).expanduser().resolve() if configured else run_dir / "checkpoints"


def read_model_tensors(path: Path, names: list[str]) -> dict[str, Any]:
    """The full tensors `names` of DCP checkpoint `path` (one process, any saved layout)."""
    from primus.runs.dcp import read_full_tensors

    return read_full_tensors(path, names)


def export_hf(module: Any, run_dir: Path, step: int | None, out_dir: Path) -> int:
    """Write the model of checkpoint `step` (else the newest complete one) of the run as transformers
    safetensors under `out_dir`; returns the step."""
    from safetensors.torch import save_file

    from primus.models.hf import check_tensors, write_weights
    from primus_torchtitan.checkpoint import complete_steps
    from primus_torchtitan.hf_weights import Layout, all_stock_names, to_hf

    folder = checkpoint_folder(module, Path(run_dir))
    steps = complete_steps(folder)
    if not steps:
        raise ConfigError(f"no complete checkpoint in {folder}", key="RUN_DIR",
                          fix="train the run with checkpoint.interval (or to its end) first")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ConfigError(f"no complete checkpoint of step {step} in {folder}", key="--step",
                          fix=f"complete steps: {', '.join(map(str, steps))}")
    path = folder / f"step-{step}"
    layout = Layout.from_native(module.native["model"])
    stock = read_model_tensors(path, all_stock_names(layout))
    tensors = to_hf(stock, layout)
    check_tensors(((name, tuple(t.shape)) for name, t in tensors.items()), module.model, str(path))
    write_weights(out_dir, tensors, save_file=save_file, nbytes=lambda t: t.numel() * t.element_size())
    return step
