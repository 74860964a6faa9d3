"""The JAX side of Hugging Face weights: MaxText's model built as training builds it, its parameters
made from safetensors shard by shard, the converted initial checkpoint, and `primus eval`.

Imported only in a worker, after JAX's environment is set.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

from primus.errors import ConfigError
from primus_maxtext.hf_weights import Layout, Rule, SafetensorsReader, read_leaf, rules

#: where the converted initial parameters live, under <run dir>/maxtext/
INIT_DIR = "hf_init"
SOURCE_FILE = "primus_source.json"  # what the converted checkpoint was made from; written last
CONVERSION_VERSION = 1


def maxtext_config(config_file: Path, **overrides: Any) -> Any:
    from maxtext.configs import pyconfig

    return pyconfig.initialize(["primus-maxtext", str(config_file)], **overrides)


def abstract_model(config: Any) -> tuple[Any, Callable[[], Any], Any]:
    """(mesh, model factory, abstract model with shardings), exactly as MaxText's trainer makes them."""
    from maxtext.utils import maxtext_utils, model_creation_utils

    mesh = maxtext_utils.get_mesh_from_config(config)
    create, abstract = model_creation_utils.create_nnx_abstract_model(config, mesh)
    return mesh, create, abstract


def _rule_index(spec: Any, layout: Layout) -> dict[tuple[str, ...], Rule]:
    return {r.path: r for r in rules(spec, layout)}


def _weight_types() -> tuple[type, ...]:
    """The variables a checkpoint's weights fill: parameters and DeepSeek's selection bias (a
    MoEBiasVar: not trained by the optimizer; MaxText restores it from the `params` collection)."""
    from flax import nnx
    from maxtext.layers.moe import MoEBiasVar

    return (nnx.Param, MoEBiasVar)


def _param_leaves(state: Any) -> list[tuple[tuple[str, ...], Any]]:
    from flax import nnx

    return [(tuple(str(p) for p in path), var) for path, var in nnx.to_flat_state(state)
            if isinstance(var, _weight_types())]


def hf_arrays(abstract_state: Any, spec: Any, layout: Layout, hf_dir: Path) -> dict[tuple[str, ...], Any]:
    """Every parameter of the (abstract, sharded) NNX state as a global jax.Array made from the
    safetensors files: each device's shard reads only its slice of the tensors it comes from."""
    import jax

    by_path = _rule_index(spec, layout)
    leaves = _param_leaves(abstract_state)
    missing = [".".join(p) for p, _ in leaves if p not in by_path]
    if missing:
        raise ConfigError(f"MaxText's {layout.decoder_block} model has parameter {missing[0]} that no Hugging Face "
                          "tensor maps to", key="model.hf_path", fix="this MaxText model option is not loadable from HF")
    unused = sorted(set(by_path) - {p for p, _ in leaves})
    if unused:
        raise ConfigError(f"MaxText's {layout.decoder_block} model has no parameter {'.'.join(unused[0])}",
                          key="model.hf_path")
    out: dict[tuple[str, ...], Any] = {}
    with SafetensorsReader(hf_dir) as read:
        for path, var in leaves:
            value = var.get_value() if hasattr(var, "get_value") else var.value
            rule, dtype = by_path[path], np.dtype(value.dtype)
            shape = tuple(value.shape)

            def shard(index: tuple[slice, ...], rule: Rule = rule, dtype: Any = dtype,
                      shape: tuple[int, ...] = shape) -> np.ndarray:
                block = read_leaf(rule, spec, layout, index, read, dtype)
                want = tuple(len(range(*s.indices(n))) for s, n in zip(index, shape, strict=True))
                assert block.shape == want, (rule.path, block.shape, want)
                return block

            out[path] = jax.make_array_from_callback(shape, value.sharding, shard)
    return out


def set_params(model: Any, arrays: Mapping[tuple[str, ...], Any]) -> None:
    from flax import nnx

    state = nnx.state(model, _weight_types())
    for path, var in nnx.to_flat_state(state):
        key = tuple(str(p) for p in path)
        if key in arrays:
            var.set_value(arrays[key]) if hasattr(var, "set_value") else setattr(var, "value", arrays[key])
    nnx.update(model, state)


# --------------------------------------------------------------------------- the initial checkpoint


def source_fingerprint(hf_dir: Path, config: Mapping[str, Any]) -> dict[str, Any]:
    """What the converted checkpoint depends on: the weight files (name, size, mtime) and the layout keys."""
    files = sorted(p for p in Path(hf_dir).iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
    keys = ("decoder_block", "head_dim", "rope_type", "rope_interleave", "scan_layers", "weight_dtype",
            "base_emb_dim", "base_num_decoder_layers", "vocab_size", "num_experts")
    digest = hashlib.sha256(json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]).encode())
    return {"hf_path": str(Path(hf_dir).resolve()), "files": digest.hexdigest(), "version": CONVERSION_VERSION,
            "layout": {k: config.get(k) for k in keys}}


def init_checkpoint_dir(run_dir: Path, module: str) -> Path:
    return run_dir / "maxtext" / INIT_DIR / module


def write_init_checkpoint(config_file: Path, target: Path, hf_dir: Path, spec: Any,
                          native: Mapping[str, Any]) -> bool:
    """Convert the Hugging Face weights into a MaxText parameter checkpoint at `target` (what
    `load_parameters_path` reads), unless one made from the same files is there. Every process of
    the job takes part (each writes its shards); returns whether it wrote."""
    import jax

    fingerprint = source_fingerprint(hf_dir, native)
    marker = target / SOURCE_FILE
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == fingerprint:
                logger.info(f"Hugging Face weights already converted: {target}")
                return False
        except (OSError, json.JSONDecodeError):
            pass
    from flax import traverse_util
    from maxtext.common import checkpointing

    config = maxtext_config(config_file, enable_checkpointing=False, load_parameters_path="")
    mesh, _, abstract = abstract_model(config)
    from flax import nnx

    _, state = nnx.split(abstract)
    layout = Layout.from_config(native)
    with jax.set_mesh(mesh):
        arrays = hf_arrays(state, spec, layout, hf_dir)
    tree = traverse_util.unflatten_dict(arrays)
    if jax.process_index() == 0 and marker.exists():
        marker.unlink()
    logger.info(f"converting Hugging Face weights {hf_dir} into MaxText parameters at {target}")
    checkpointing.save_params_to_path(str(target), {"params": tree},
                                      use_ocdbt=bool(native.get("checkpoint_storage_use_ocdbt", True)),
                                      use_zarr3=bool(native.get("checkpoint_storage_use_zarr3", True)))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("primus_hf_init_saved")
    if jax.process_index() == 0:
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(fingerprint, indent=2) + "\n")
        os.replace(tmp, marker)
    return True


# --------------------------------------------------------------------------- primus eval

#: evaluation runs in fp32 with exact matmuls whatever the training precision, so it compares with
#: transformers' fp32 forward
EVAL_PRECISION = {"dtype": "float32", "weight_dtype": "float32", "matmul_precision": "highest"}
MAX_ROWS_PER_DEVICE = 8


def tokenizer_functions(directory: Path) -> tuple[Callable[[str], list[int]], int]:
    """(encode, EOS id) of a Hugging Face tokenizer directory, through the `tokenizers` library."""
    from tokenizers import Tokenizer

    directory = Path(directory)
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"{file} does not exist", key="data.tokenizer", fix="give a directory with tokenizer.json")
    tokenizer = Tokenizer.from_file(str(file))
    eos = "<|endoftext|>"
    config_file = directory / "tokenizer_config.json"
    if config_file.is_file():
        value = json.loads(config_file.read_text()).get("eos_token") or eos
        eos = value.get("content", eos) if isinstance(value, dict) else str(value)
    eos_id = tokenizer.token_to_id(eos)
    if eos_id is None:
        raise ConfigError(f"the tokenizer in {directory} has no EOS token {eos!r}", key="data.tokenizer")
    return (lambda text: tokenizer.encode(text, add_special_tokens=False).ids), eos_id


def resolve_checkpoint(which: str | None, checkpoint_dir: Path) -> Path | None:
    """`--checkpoint`: None (the init), "latest" (the newest complete step) or a step directory
    (`<checkpoints>/<step>` or its `items`); returns the step's `items` directory."""
    from primus_maxtext.checkpoint import DamagedCheckpoint, check_complete, steps

    if which is None:
        return None
    if which == "latest":
        for step in reversed(steps(checkpoint_dir)):
            try:
                check_complete(step)
            except DamagedCheckpoint as exc:
                logger.warning(f"skipping damaged checkpoint {exc}")
                continue
            return step / "items"
        raise ConfigError(f"no complete checkpoint in {checkpoint_dir}", key="--checkpoint",
                          fix="train with checkpoint.interval set, or evaluate the init (no --checkpoint)")
    path = Path(which)
    items = path if (path / "_METADATA").is_file() else path / "items"
    if not (items / "_METADATA").is_file():
        raise ConfigError(f"{path} is not a MaxText checkpoint step (no items/_METADATA)", key="--checkpoint",
                          fix=f"pass latest or a step directory of {checkpoint_dir}")
    try:
        check_complete(items.parent)
    except DamagedCheckpoint as exc:
        raise ConfigError(f"checkpoint {exc}", key="--checkpoint") from None
    return items


def checkpoint_step(items: Path) -> int:
    """The number of optimizer steps the checkpoint's state has taken (its `step` leaf)."""
    from primus_maxtext.export import read_checkpoint

    return int(read_checkpoint(items, ("step",))["step"])


def evaluate(config_file: Path, native: Mapping[str, Any], request: Any, *, spec: Any, hf_path: str | None,
             checkpoint_dir: Path) -> Any:
    """Summed token loss of the module's model on core's evaluation blocks (rank 0 gets the result)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from flax.core.spmd import logical_axis_rules
    from maxtext.utils import maxtext_utils, maxtext_utils_nnx, model_creation_utils, sharding

    from primus.runs.evaluate import EvalResult, blocks_for

    items = resolve_checkpoint(request.checkpoint, checkpoint_dir)
    encode, eos_id = tokenizer_functions(Path(request.tokenizer))
    blocks = blocks_for(request, encode, eos_id)
    devices = jax.device_count()
    per_device = min(max(-(-len(blocks) // devices), 1), MAX_ROWS_PER_DEVICE)
    rows = per_device * devices
    config = maxtext_config(config_file, **EVAL_PRECISION, enable_checkpointing=False, load_full_state_path="",
                            load_parameters_path=str(items) if items else "", per_device_batch_size=per_device,
                            gradient_accumulation_steps=1, max_target_length=request.seq_length,
                            dataset_type="synthetic")
    mesh = maxtext_utils.get_mesh_from_config(config)
    with jax.set_mesh(mesh), logical_axis_rules(config.logical_axis_rules):
        if items is not None:  # MaxText's own restore of a checkpoint's parameters, resharded to this mesh
            model = model_creation_utils.from_pretrained(config, mesh)
        else:
            create, abstract = model_creation_utils.create_nnx_abstract_model(config, mesh)
            model = maxtext_utils_nnx.create_nnx_sharded_model(abstract, create, mesh=mesh)
            if hf_path:
                _, state = nnx.split(abstract)
                set_params(model, hf_arrays(state, spec, Layout.from_config(native), Path(hf_path)))
        graphdef, state = nnx.split(model)
        data_sharding = sharding.get_input_data_sharding(config, mesh)

        @jax.jit
        def loss_sum(state: Any, ids: Any, targets: Any, weights: Any) -> Any:
            m = nnx.merge(graphdef, state)
            positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
            logits = m(decoder_input_tokens=ids, decoder_positions=positions,
                       decoder_segment_ids=jnp.ones_like(ids), enable_dropout=False).astype(jnp.float32)
            picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
            return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * weights)

        total, tokens = 0.0, 0
        for start in range(0, len(blocks), rows):
            chunk = np.asarray(blocks[start:start + rows], dtype=np.int32)
            weights = np.ones(chunk[:, 1:].shape, np.float32)
            if len(chunk) < rows:  # a short last batch: padded rows that weigh nothing
                pad = rows - len(chunk)
                chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), np.int32)])
                weights = np.concatenate([weights, np.zeros((pad, weights.shape[1]), np.float32)])
            arrays = [jax.make_array_from_callback(a.shape, data_sharding, lambda idx, a=a: a[idx])
                      for a in (chunk[:, :-1], chunk[:, 1:], weights)]
            total += float(jax.device_get(loss_sum(state, *arrays)))
            tokens += int(weights.sum())
    step = checkpoint_step(items) if items is not None else None
    if jax.process_index() != 0:
        return None
    return EvalResult(loss_sum=total, tokens=tokens, step=step)
