"""`primus export` for megatron: a torch_dist checkpoint (saved at any TP/PP/EP/DP layout) -> the
Hugging Face tensors, in one process on CPU, with no process group.

torch_dist checkpoints hold every parameter as one global tensor under megatron's sharded key
(layers stacked along axis 0), whatever the layout was, so the export reads global tensors and
only undoes megatron's fusions (hf_weights.MegatronToHf). Reading is as safe as resuming: the
`.metadata` pickle goes through checkpoint.py's restricted unpickler, `common.pt` is read
weights-only, and only plain tensors (never pickled objects) are read from the `.distcp` files.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from primus.errors import ConfigError


def checkpoint_root(module: Any, run_dir: Path) -> Path:
    """Where the run's checkpoints are: `save`, else checkpoint.dir, else <run dir>/checkpoints."""
    save = module.native.get("save")
    if save:
        return Path(save).expanduser().resolve()
    configured = module.module.checkpoint.dir
    return Path(configured).expanduser().resolve() if configured else run_dir / "checkpoints"


def read_global_tensors(path: Path) -> dict[str, Any]:
    """Every model tensor of the torch_dist checkpoint `path`, unsharded, on CPU."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from primus_megatron import checkpoint as ckpt

    try:
        ckpt.check_complete(path)
    except ckpt.DamagedCheckpoint as exc:
        raise ConfigError(f"checkpoint {path} cannot be exported: {exc.reason}", key="--step") from None
    metadata = ckpt._read_metadata(path / ".metadata")

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return metadata

    wanted: dict[str, Any] = {}
    for key, info in metadata.state_dict_metadata.items():
        if isinstance(info, TensorStorageMetadata) and not key.startswith(("optimizer", "rng_state")):
            wanted[key] = torch.empty(tuple(info.size), dtype=info.properties.dtype)
    with warnings.catch_warnings():  # "torch.distributed is disabled ... a single process": just so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wanted, storage_reader=SafeReader(str(path)), no_dist=True)
    return wanted


def export_hf(module: Any, run_dir: Path, step: int | None, out_dir: Path) -> int:
    """The weights of the run's checkpoint (`step`, else the newest) as Hugging Face safetensors
    under `out_dir`; returns the step exported."""
    import torch
    from safetensors.torch import save_file

    with warnings.catch_warnings():  # megatron-core's import notes that TransformerEngine/Apex are absent
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        import megatron.core  # noqa: F401

    from primus.models.hf import check_tensors, write_weights
    from primus_megatron import checkpoint as ckpt
    from primus_megatron.hf_weights import MegatronToHf

    root = checkpoint_root(module, Path(run_dir))
    if step is None:
        path = ckpt.latest_checkpoint(root)
        if path is None:
            raise ConfigError(f"no checkpoint in {root}", key="RUN_DIR", fix="train the run first (primus run)")
    else:
        path = ckpt.step_dir(root, step)
        if not path.is_dir():
            have = ", ".join(p.name for p in ckpt.checkpoints(root)) or "none"
            raise ConfigError(f"no checkpoint of step {step} in {root} (checkpoints: {have})", key="--step")
    found = int(ckpt.STEP_DIR.match(path.name).group(1))  # type: ignore[union-attr]
    spec = module.model
    tensors = {name: t.to(torch.float32).contiguous()
               for name, t in MegatronToHf(spec, read_global_tensors(path), f"checkpoint {path}").tensors_hf()}
    check_tensors(((n, tuple(t.shape)) for n, t in tensors.items()), spec, f"checkpoint {path}")
    write_weights(out_dir, tensors, save_file=save_file, nbytes=lambda t: t.numel() * t.element_size())
    return found
