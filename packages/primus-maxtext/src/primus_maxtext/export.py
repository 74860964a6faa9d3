"""`primus export` for maxtext: a MaxText checkpoint's parameters as Hugging Face safetensors.

One process on the CPU: Orbax restores the `params` and `step` of the chosen step as numpy arrays
(whatever mesh saved them; Orbax reassembles the shards), `hf_weights.to_hf` undoes MaxText's
layout (stacked layers, heads, folded query scale, RoPE order), and core's `write_weights` writes
the shards and index. Core writes config.json and the tokenizer files.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from primus.errors import ConfigError

if TYPE_CHECKING:
    from primus.config.resolve import ResolvedModule


def read_checkpoint(items: Path, keys: Iterable[str], optional: Iterable[str] = ()) -> dict[str, Any]:
    """The top-level entries `keys` (and those of `optional` it has) of a MaxText checkpoint's state
    (`<step>/items`), as numpy."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(str(items))
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", None) or metadata.item_metadata
    missing = [k for k in keys if k not in tree]
    if missing:
        raise ConfigError(f"{items} holds no {missing[0]!r} (a MaxText training checkpoint has params and step)")
    wanted = {k: tree[k] for k in [*keys, *optional] if k in tree}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    return checkpointer.restore(str(items), args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                                                       partial_restore=True))


def find_step(checkpoint_dir: Path, step: int | None) -> Path:
    """The `items` of the checkpoint holding `step` completed steps (MaxText names a directory by
    its 0-based step, so step N lives in `<N - 1>`), else of the newest complete one."""
    from primus_maxtext.checkpoint import DamagedCheckpoint, check_complete, steps

    found = steps(checkpoint_dir)
    if not found:
        raise ConfigError(f"no checkpoint in {checkpoint_dir}", key="RUN_DIR",
                          fix="train with checkpoint.interval set (MaxText also saves the last step)")
    if step is not None:
        chosen = checkpoint_dir / str(step - 1)
        if not chosen.is_dir():
            have = ", ".join(str(int(p.name) + 1) for p in found)
            raise ConfigError(f"{checkpoint_dir} has no checkpoint of step {step} (steps: {have})", key="--step")
        try:
            check_complete(chosen)
        except DamagedCheckpoint as exc:
            raise ConfigError(f"checkpoint {exc}", key="--step") from None
        return chosen / "items"
    for candidate in reversed(found):
        try:
            check_complete(candidate)
            return candidate / "items"
        except DamagedCheckpoint:
            continue
    raise ConfigError(f"no complete checkpoint in {checkpoint_dir}", key="RUN_DIR")


def export_hf(module: ResolvedModule, run_dir: Path, step: int | None, out_dir: Path) -> int:
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from primus.models.hf import check_tensors, write_weights
    from primus_maxtext.base_config import base_defaults
    from primus_maxtext.hf_weights import Layout, to_hf

    spec = module.model
    assert spec is not None  # core refuses a run without a model spec
    configured = module.module.checkpoint.dir  # where training put them, as RunContext.checkpoint_dir says
    checkpoint_dir = Path(configured).expanduser().resolve() if configured else run_dir / "checkpoints"
    items = find_step(checkpoint_dir, step)
    # MaxText keeps variables other than parameters (DeepSeek's selection bias, a MoEBiasVar) under nnx_aux
    state = read_checkpoint(items, ("params", "step"), optional=("nnx_aux",))
    layout = Layout.from_config({**base_defaults(), **module.native})
    aux = (state.get("nnx_aux") or {}).get("model")
    tensors = to_hf({"params": state["params"].get("params", state["params"]), **({"nnx_aux": aux} if aux else {})},
                    spec, layout)
    check_tensors(((n, tuple(t.shape)) for n, t in tensors.items()), spec, f"checkpoint {items.parent}")
    from safetensors.numpy import save_file

    write_weights(out_dir, tensors, save_file=save_file, nbytes=lambda t: int(t.nbytes))
    return int(state["step"])
