"""The neutral rules: one owner for what every backend must agree on.

Parallel sizes against the world size and the model, batch arithmetic, sequence length against the
model's positions, the pipeline split, and the corpus and tokenizer paths. They run on the
*resolved* dimensions (after overrides and the command line), read through the translator's
`dimension_keys`, so `parallel.tensor: 2` and `tensor_model_parallel_size: 2` are judged alike.
Each rule raises `ConfigError(key=...)` with the native key (or neutral path) that holds the
culprit; the resolver locates it (file:line, or the command line) through provenance. Backends
keep only the rules of their own format.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from primus.backends.translator import DIMENSIONS, Translator
from primus.errors import ConfigError
from primus.suggest import did_you_mean

if TYPE_CHECKING:
    from primus.backends.translator import Translator
    from primus.config.resolve import ResolvedModule
    from primus.config.schema import ModuleConfig
    from primus.models.spec import ModelSpec

# where an unnamed dimension is read from when the backend names no native key
_NEUTRAL_PATHS = {
    "tensor": "parallel.tensor", "pipeline": "parallel.pipeline", "context": "parallel.context",
    "expert": "parallel.expert", "data": "parallel.data", "micro_batch_size": "train.micro_batch_size",
    "global_batch_size": "train.global_batch_size", "seq_length": "train.seq_length", "steps": "train.steps",
}
_SPEC_FIELDS = {"num_layers": "num_layers", "num_heads": "num_heads", "num_kv_heads": "num_kv_heads",
                "max_positions": "max_position_embeddings"}
_FIRST_RECORD_BYTES = 1 << 20  # how much of a corpus is read to check its first record


@dataclass(frozen=True)
class Dimension:
    value: Any
    key: str  # the native key (or neutral path) that holds it, for locating an error


def dimension_keys(translator: Translator) -> dict[str, str]:
    """The translator's dimension map (the first contract's `native_parallel_keys` included)."""
    return {**(getattr(translator, "native_parallel_keys", None) or {}), **(translator.dimension_keys or {})}


def get_path(data: dict[str, Any], key: str) -> Any:
    """`data[key]`, with dots walking nested sections when the flat key is absent."""
    if key in data:
        return data[key]
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_dimensions(native: dict[str, Any], module: ModuleConfig, spec: ModelSpec | None,
                    translator: Translator, model_origins: dict[str, str]) -> dict[str, Dimension]:
    keys = dimension_keys(translator)
    out: dict[str, Dimension] = {}
    for name in DIMENSIONS:
        if name in keys:
            out[name] = Dimension(get_path(native, keys[name]), keys[name])
        elif name in _NEUTRAL_PATHS:
            section, field_name = _NEUTRAL_PATHS[name].split(".")
            out[name] = Dimension(getattr(getattr(module, section), field_name), _NEUTRAL_PATHS[name])
        elif spec is not None and name in _SPEC_FIELDS:
            value = spec.kv_heads if name == "num_kv_heads" else getattr(spec, _SPEC_FIELDS[name])
            native_key = next((k for k, o in model_origins.items() if o == _SPEC_FIELDS[name]), "model")
            out[name] = Dimension(value, native_key)
        elif spec is not None and name == "num_experts" and spec.moe is not None:
            out[name] = Dimension(spec.moe.experts, next((k for k, o in model_origins.items() if o == "moe"), "model"))
        else:
            out[name] = Dimension(None, name)
    return out


def resolved_dimension(resolved: ResolvedModule, translator: Translator, name: str) -> Any:
    """One dimension's resolved value (`seq_length`, `tensor`, ...), whichever layer set it."""
    return read_dimensions(resolved.native, resolved.module, resolved.model, translator, {})[name].value


AUTO = -1  # a native size left for the backend to work out (TorchTitan's spelling); treated as unset


def _size(dim: Dimension) -> int:
    v = dim.value
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 1


def check_dimensions(dims: dict[str, Dimension], spec: ModelSpec | None, world_size: int) -> None:
    """Parallel layout, model divisibility, batch arithmetic, sequence length, steps."""
    dims = {name: Dimension(None, d.key) if d.value == AUTO and not isinstance(d.value, bool) else d
            for name, d in dims.items()}
    for name in ("tensor", "pipeline", "context", "expert", "micro_batch_size", "global_batch_size",
                 "seq_length", "steps"):
        v = dims[name].value
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ConfigError(f"must be a positive integer, got {v!r}", key=dims[name].key)
    tp, pp, cp = _size(dims["tensor"]), _size(dims["pipeline"]), _size(dims["context"])
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        culprit = "tensor" if tp > 1 else "pipeline" if pp > 1 else "context"
        raise ConfigError(f"tensor ({tp}) x pipeline ({pp}) x context ({cp}) = {model_parallel} does not divide "
                          f"the world size {world_size}", key=dims[culprit].key,
                          fix="change the parallel sizes or the number of processes (--nproc-per-node x --nnodes)")
    data = dims["data"].value
    if isinstance(data, int) and not isinstance(data, bool) and data * model_parallel != world_size:
        raise ConfigError(f"data ({data}) x tensor x pipeline x context ({model_parallel}) = {data * model_parallel} "
                          f"!= world size {world_size}", key=dims["data"].key, fix="use data: auto")

    heads, kv_heads = dims["num_heads"].value, dims["num_kv_heads"].value
    if isinstance(heads, int) and heads % tp:
        raise ConfigError(f"tensor ({tp}) does not divide the model's {heads} attention heads",
                          key=dims["tensor"].key, fix="pick a tensor size that divides the heads")
    mla = spec is not None and spec.mla is not None
    if isinstance(kv_heads, int) and not mla and kv_heads % tp:
        raise ConfigError(f"tensor ({tp}) does not divide the model's {kv_heads} key/value heads",
                          key=dims["tensor"].key, fix="pick a tensor size that divides the kv heads")

    layers, split = dims["num_layers"].value, dims["pipeline_split"].value
    if split:
        if (not isinstance(split, list) or len(split) != pp
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in split)
                or (isinstance(layers, int) and sum(split) != layers)):
            raise ConfigError(f"pipeline split {split!r} must have {pp} positive entries summing to the model's "
                              f"{layers} layers", key=dims["pipeline_split"].key)
    elif isinstance(layers, int) and layers % pp:
        raise ConfigError(f"pipeline ({pp}) does not divide the model's {layers} layers", key=dims["pipeline"].key,
                          fix="pick a pipeline size that divides the layers, or give an explicit split")

    ep, experts = _size(dims["expert"]), dims["num_experts"].value
    if ep > 1 and isinstance(experts, int) and experts % ep:
        raise ConfigError(f"expert ({ep}) does not divide the model's {experts} experts", key=dims["expert"].key)

    micro, global_ = dims["micro_batch_size"].value, dims["global_batch_size"].value
    if isinstance(micro, int) and isinstance(global_, int):
        dp = world_size // model_parallel
        if global_ % (micro * dp):
            raise ConfigError(f"global_batch_size {global_} is not a multiple of micro_batch_size {micro} x "
                              f"data-parallel {dp}", key=dims["global_batch_size"].key,
                              fix=f"use a multiple of {micro * dp}")

    seq, positions = dims["seq_length"].value, dims["max_positions"].value
    if isinstance(seq, int) and isinstance(positions, int) and seq > positions:
        raise ConfigError(f"seq_length {seq} exceeds the model's max_position_embeddings {positions}",
                          key=dims["seq_length"].key,
                          fix=f"set train.seq_length to at most {positions}, or use a model preset with more positions")
    chunk = spec.attention_chunk_size if spec is not None else None
    if isinstance(seq, int) and chunk is not None and chunk > seq:
        raise ConfigError(f"the model's attention_chunk_size {chunk} is larger than seq_length {seq}: the local "
                          "attention layers would attend globally", key=dims["seq_length"].key,
                          fix=f"set train.seq_length to at least {chunk}, or model.attention_chunk_size to at most {seq}")


# --------------------------------------------------------------------------- data and tokenizer


def _regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, RuntimeError, ValueError):
        return False


def check_data(module: ModuleConfig) -> None:
    """The neutral `data:` section and the checkpoint folder: a corpus that exists, a tokenizer directory that exists.

    Whether a corpus needs a tokenizer at all is the backend's rule (some ship a default)."""
    data = module.data  # mock beside path is the schema's rule (DataSection)
    if data.path:
        corpus = Path(data.path)
        if not corpus.exists():
            raise ConfigError(f"corpus {corpus} does not exist", key="data.path",
                              fix="point data.path at a local .jsonl or .txt file")
        if not _regular_file(corpus):
            raise ConfigError(f"corpus {corpus} is not a regular file", key="data.path")
        if corpus.suffix == ".jsonl":
            # the field is checked when named here; a backend's own native key for it (Megatron's
            # json_keys) is that backend's to check
            check_first_record(corpus, data.text_key)
    checkpoint_dir = module.checkpoint.dir
    if checkpoint_dir and Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise ConfigError(f"checkpoint.dir {checkpoint_dir} is a file, not a folder", key="checkpoint.dir",
                          fix="point checkpoint.dir at a folder (it is created when missing)")
    if data.tokenizer:
        tokenizer = Path(data.tokenizer)
        if not tokenizer.is_dir():
            raise ConfigError(f"tokenizer directory {tokenizer} does not exist", key="data.tokenizer",
                              fix="point data.tokenizer at a directory with tokenizer.json "
                                  "(examples/data/make_corpus.py makes one)")


def check_first_record(corpus: Path, text_key: str | None, key: str = "data.text_key") -> None:
    """The first non-empty JSONL record must be a JSON object carrying `text_key` (when given)
    with a string. A backend with its own default text field calls this with it (and its key)."""
    with corpus.open("rb") as f:
        head = f.read(_FIRST_RECORD_BYTES)
    for number, raw in enumerate(head.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
            raise ConfigError(f"corpus {corpus} line {number} is not JSON ({reason})", key="data.path") from None
        if not isinstance(record, dict) or (text_key is not None and not isinstance(record.get(text_key), str)):
            fields = sorted(str(k) for k in record) if isinstance(record, dict) else []
            hint = did_you_mean(text_key, fields)
            what = f"has no text field '{text_key}'" if text_key else "is not a JSON object"
            raise ConfigError(f"corpus {corpus} line {number} {what}", key=key if text_key else "data.path",
                              fix=hint or f"fields there: {', '.join(fields) or 'none'}; set data.text_key")
        return
    raise ConfigError(f"corpus {corpus} is empty", key="data.path")


def non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)
