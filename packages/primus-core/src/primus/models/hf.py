"""Hugging Face model directories, both ways, without importing a framework.

- `spec_from_hf(config)`: a `config.json` (llama, qwen2, qwen3, qwen3_moe, mixtral) -> `ModelSpec`,
  so `model: {hf_path: DIR}` needs no model preset beside it.
- `hf_config(spec)`: a `ModelSpec` -> the `config.json` transformers builds the same model from
  (the hf backend's model config, and what `primus export` writes).
- `hf_tensor_shapes(spec)`: every tensor name of the transformers model and its shape, the one
  naming every backend's loader and exporter maps from and to.
- `read_weight_index(dir)` / `check_weights(dir, spec)`: the safetensors headers (8 bytes of
  length, then JSON; never the data), so a missing or misshapen tensor is one line before any
  process starts.
- `shard_plan` / `write_index`: how `primus export` cuts tensors into shards and indexes them;
  the backend writes each shard with the safetensors library of its framework.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from primus.errors import ConfigError
from primus.models.spec import ModelSpec, MoESpec, RopeScaling

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few KiB
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit on a header
MAX_SHARD_BYTES = 5 << 30  # what transformers' save_pretrained cuts at by default
#: tokenizer files `primus export` copies from the run's tokenizer directory (those that exist)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")

#: model_type -> (ModelSpec family, the transformers class in `architectures`)
MODEL_TYPES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen3_moe": ("qwen3", "Qwen3MoeForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
}
SUPPORTED = "llama, qwen2, qwen3, qwen3_moe, mixtral"


# --------------------------------------------------------------------------- config.json -> ModelSpec


def _read_bounded(path: Path, limit: int, what: str, key: str) -> bytes:
    try:
        st = os.stat(path)
    except OSError:
        raise ConfigError(f"{path} does not exist", key=key, fix=f"point hf_path at a directory with {what}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path} is not a regular file", key=key)
    if st.st_size > limit:
        raise ConfigError(f"{path} is {st.st_size} bytes, more than a {what} can be ({limit})", key=key)
    with open(path, "rb") as f:
        return f.read(limit + 1)


def read_hf_config(directory: Path, key: str = "model.hf_path") -> dict[str, Any]:
    """`DIR/config.json` as a mapping; one-line errors naming the file."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise ConfigError(f"model directory {directory} does not exist", key=key,
                          fix="point hf_path at a local directory with config.json and safetensors")
    raw = _read_bounded(path, MAX_CONFIG_BYTES, "config.json", key)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not JSON ({exc})", key=key) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object", key=key)
    return data


def _rope(config: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """transformers 5 writes `rope_parameters`; 4.x wrote `rope_theta` and `rope_scaling`."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return float(theta), None
    return float(theta), RopeScaling(
        type=kind, factor=scaling["factor"],
        original_max_positions=scaling.get("original_max_position_embeddings"),
        low_freq_factor=scaling.get("low_freq_factor"), high_freq_factor=scaling.get("high_freq_factor"),
        beta_fast=scaling.get("beta_fast"), beta_slow=scaling.get("beta_slow"),
        mscale=scaling.get("mscale"), mscale_all_dim=scaling.get("mscale_all_dim"))


def spec_from_hf(config: dict[str, Any], *, file: str = CONFIG_FILE) -> ModelSpec:
    """The `ModelSpec` of a transformers config; refuses what no backend builds the same way."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not a family Primus builds", file=file, key="model_type",
                          fix=f"supported: {SUPPORTED}")

    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError(f"{model_type} model with {key}={config.get(key)!r}: {why}", file=file, key=key,
                           fix=f"Primus builds the standard {model_type} layout")

    if config.get("mlp_bias"):
        raise refuse("mlp_bias", "MLP biases are not built by the backends")
    if model_type in ("llama", "mixtral", "qwen3", "qwen3_moe") and config.get("attention_bias"):
        raise refuse("attention_bias", "attention biases are not built for this family")
    if config.get("use_sliding_window") or (model_type == "mixtral" and config.get("sliding_window")):
        raise refuse("use_sliding_window" if "use_sliding_window" in config else "sliding_window",
                      "sliding-window attention is not built")
    family, _ = MODEL_TYPES[model_type]
    try:
        theta, scaling = _rope(config)
        heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        values: dict[str, Any] = dict(
            family=family, vocab_size=config["vocab_size"], hidden_size=hidden,
            num_layers=config["num_hidden_layers"], num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            ffn_hidden_size=config["intermediate_size"],
            max_position_embeddings=config["max_position_embeddings"],
            rope_theta=theta, rope_scaling=scaling, norm_eps=config.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2", qk_norm=model_type in ("qwen3", "qwen3_moe"))
        if model_type == "qwen3_moe":
            if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
                raise refuse("mlp_only_layers" if config.get("mlp_only_layers") else "decoder_sparse_step",
                             "every layer must be a MoE layer")
            experts = config.get("num_experts", config.get("num_local_experts"))  # transformers 5 renamed it
            if experts is None:
                raise KeyError("num_experts")
            values["moe"] = MoESpec(experts=experts, top_k=config["num_experts_per_tok"],
                                    expert_ffn=config["moe_intermediate_size"],
                                    norm_topk_prob=bool(config.get("norm_topk_prob", True)),
                                    router_aux_loss_coef=float(config.get("router_aux_loss_coef") or 0.0))
        if model_type == "mixtral":
            values["moe"] = MoESpec(experts=config["num_local_experts"], top_k=config["num_experts_per_tok"],
                                    expert_ffn=config["intermediate_size"],
                                    router_aux_loss_coef=float(config.get("router_aux_loss_coef") or 0.0))
        return ModelSpec(**values)
    except KeyError as exc:
        raise ConfigError(f"{model_type} config has no {exc.args[0]}", file=file, key=str(exc.args[0])) from None
    except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        first = str(exc).strip().splitlines()
        raise ConfigError(f"not a model Primus can build: {' '.join(first[:3])}", file=file) from None


# --------------------------------------------------------------------------- ModelSpec -> config.json


def _rope_parameters(spec: ModelSpec) -> dict[str, Any]:
    """transformers 5 keeps rope theta and scaling together in `rope_parameters`."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    scaling = spec.rope_scaling
    if scaling is None:
        return rope
    rope.update(rope_type=scaling.type, factor=scaling.factor)
    optional = {
        "original_max_position_embeddings": scaling.original_max_positions,
        "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
        "beta_fast": scaling.beta_fast, "beta_slow": scaling.beta_slow,
        "mscale": scaling.mscale, "mscale_all_dim": scaling.mscale_all_dim,
    }
    rope.update({k: v for k, v in optional.items() if v is not None})
    return rope


def _common(spec: ModelSpec, model_type: str) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "architectures": [next(a for t, (_, a) in MODEL_TYPES.items() if t == model_type)],
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_size,
        "intermediate_size": spec.ffn_hidden_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": spec.norm_eps,
        "tie_word_embeddings": spec.tie_embeddings,
        "rope_parameters": _rope_parameters(spec),
    }


class Unbuilt(ConfigError):
    """A spec transformers has no standard class for (the hf backend's refusal, export's too)."""


def _refuse(spec: ModelSpec, what: str) -> Unbuilt:
    return Unbuilt(f"{spec.family} model with {what} has no standard transformers layout",
                   fix="supported: llama, qwen2, qwen3 (dense or MoE), mixtral with their standard layouts")


def _llama(spec: ModelSpec) -> dict[str, Any]:
    if spec.qkv_bias or spec.qk_norm:
        raise _refuse(spec, "qkv_bias or qk_norm")  # LlamaConfig's attention_bias also adds an output bias
    return _common(spec, "llama")


def _qwen2(spec: ModelSpec) -> dict[str, Any]:
    if not spec.qkv_bias or spec.qk_norm:
        raise _refuse(spec, "no qkv bias or with qk_norm")  # Qwen2 attention always has q/k/v biases
    return _common(spec, "qwen2")


def _qwen3(spec: ModelSpec) -> dict[str, Any]:
    if spec.qkv_bias:
        raise _refuse(spec, "qkv_bias")
    if spec.moe is None:
        return _common(spec, "qwen3")
    moe = spec.moe
    if moe.shared_experts or moe.first_dense_layers:
        raise _refuse(spec, "shared experts or leading dense layers")
    return {
        **_common(spec, "qwen3_moe"),
        "num_experts": moe.experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.expert_ffn,
        "norm_topk_prob": moe.norm_topk_prob,
        "router_aux_loss_coef": moe.router_aux_loss_coef,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def _mixtral(spec: ModelSpec) -> dict[str, Any]:
    moe = spec.moe
    if moe is None:
        raise _refuse(spec, "no moe block")
    if moe.shared_experts or moe.first_dense_layers or not moe.norm_topk_prob or spec.qkv_bias or spec.qk_norm:
        raise _refuse(spec, "shared experts, dense layers, unnormalised top-k, qkv bias or qk_norm")
    config = _common(spec, "mixtral")
    config.update(intermediate_size=moe.expert_ffn, num_local_experts=moe.experts, num_experts_per_tok=moe.top_k,
                  router_aux_loss_coef=moe.router_aux_loss_coef)
    return config


CONFIG_BUILDERS: dict[str, Callable[[ModelSpec], dict[str, Any]]] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mixtral": _mixtral}


def legacy_rope_keys(spec: ModelSpec) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` as transformers 4.x wrote them: what vLLM and older readers
    of a config.json look for (an export carries both spellings)."""
    rope = _rope_parameters(spec)
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if spec.rope_scaling else None
    return {"rope_theta": spec.rope_theta, "rope_scaling": scaling}


def hf_config(spec: ModelSpec) -> dict[str, Any]:
    """The transformers config (model_type first) that builds `spec`; raises `Unbuilt`."""
    build = CONFIG_BUILDERS.get(spec.family)
    if build is None:
        raise Unbuilt(f"model family '{spec.family}' has no standard transformers layout here",
                      fix=f"families with one: {', '.join(CONFIG_BUILDERS)}")
    return build(spec)


# --------------------------------------------------------------------------- tokenizers


def tokenizer_size(directory: Path, key: str = "data.tokenizer") -> int | None:
    """Token ids a tokenizer directory can produce (tokenizer.json: its vocabulary and added
    tokens); None for a slow-tokenizer layout, whose size only the tokenizer library knows."""
    if not directory.is_dir():
        raise ConfigError(f"tokenizer directory {directory} does not exist", key=key,
                          fix="point data.tokenizer at a directory with tokenizer.json "
                              "(examples/data/make_corpus.py makes one)")
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        if any((directory / name).is_file() for name in ("tokenizer.model", "vocab.json", "spiece.model")):
            return None  # a slow-tokenizer layout: AutoTokenizer will load it; its size is checked at run time
        raise ConfigError(f"tokenizer directory {directory} has no tokenizer.json", key=key)
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{tokenizer_json} is not a tokenizer file ({exc})", key=key) from None
    vocab = (data.get("model") or {}).get("vocab") or {}
    added = {t["id"] for t in data.get("added_tokens") or [] if isinstance(t, dict) and "id" in t}
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
    ids |= added
    return max(ids) + 1 if ids else None


def check_tokenizer_fits(directory: Path, vocab_size: int, key: str = "data.tokenizer") -> None:
    """A tokenizer that makes ids the model has no embedding for is refused (fewer is normal:
    vocabularies are padded)."""
    size = tokenizer_size(Path(directory), key)
    if size is not None and size > vocab_size:
        raise ConfigError(f"tokenizer {directory} has {size} tokens but the model's vocab_size is {vocab_size}",
                          key=key, fix="use the model's own tokenizer, or a model whose vocabulary holds it")


# --------------------------------------------------------------------------- tensor names and shapes


def hf_tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the transformers model of `spec`, by its state-dict name (fp32 shapes)."""
    h, d = spec.hidden_size, spec.head_size
    q, kv = spec.num_heads * d, spec.kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q)})
        if spec.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
        if spec.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)})
        moe = spec.moe
        if moe is None:
            f = spec.ffn_hidden_size
            shapes.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                           p + "mlp.down_proj.weight": (h, f)})
        elif spec.family == "mixtral":
            f = moe.expert_ffn
            shapes[p + "block_sparse_moe.gate.weight"] = (moe.experts, h)
            for e in range(moe.experts):
                x = f"{p}block_sparse_moe.experts.{e}."
                shapes.update({x + "w1.weight": (f, h), x + "w3.weight": (f, h), x + "w2.weight": (h, f)})
        else:
            f = moe.expert_ffn
            shapes[p + "mlp.gate.weight"] = (moe.experts, h)
            for e in range(moe.experts):
                x = f"{p}mlp.experts.{e}."
                shapes.update({x + "gate_proj.weight": (f, h), x + "up_proj.weight": (f, h),
                               x + "down_proj.weight": (h, f)})
    return shapes


# --------------------------------------------------------------------------- safetensors headers


def _header(path: Path, key: str = "model.hf_path") -> dict[str, Any]:
    """The JSON header of one safetensors file (bounded; the tensor data is never read)."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise ConfigError(f"{path} is not a safetensors file (shorter than 8 bytes)", key=key)
            length = int.from_bytes(raw_len, "little")
            if length > MAX_HEADER_BYTES:
                raise ConfigError(f"{path}: header of {length} bytes is not a safetensors header", key=key)
            header = json.loads(f.read(length))
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}", key=key) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not a safetensors file (its header is not JSON)", key=key) from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path} is not a safetensors file", key=key)
    data_bytes = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise ConfigError(f"{path}: tensor {name} lies outside the file (truncated?)", key=key)
    return header


def read_weight_index(directory: Path, key: str = "model.hf_path") -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Tensor name -> (its file, dtype, shape), from the index (sharded) or the single file."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        raw = _read_bounded(index, MAX_HEADER_BYTES, INDEX_FILE, key)
        try:
            weight_map = json.loads(raw)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ConfigError(f"{index} is not a safetensors index (no weight_map)", key=key) from None
        files = sorted(set(weight_map.values()))
    elif (directory / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        found = sorted(p.name for p in directory.glob("*.safetensors"))
        if not found:
            return {}
        files = found
    out: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for name in files:
        if "/" in name or name.startswith("."):  # an index naming files outside the directory
            raise ConfigError(f"{index} names {name!r}, not a file of the model directory", key=key)
        path = directory / name
        if not path.is_file():
            raise ConfigError(f"{path} is missing (named by {INDEX_FILE})", key=key)
        for tensor, info in _header(path, key).items():
            if tensor != "__metadata__":
                out[tensor] = (path, str(info.get("dtype")), tuple(info.get("shape") or ()))
    return out


# transformers keeps these buffers in some older checkpoints; they are computed, not loaded
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def check_weights(directory: Path, spec: ModelSpec,
                  key: str = "model.hf_path") -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """The weights of `directory` against the tensors `spec` has: the first missing, unexpected or
    misshapen tensor is a one-line error naming it and both shapes. Returns the index."""
    index = read_weight_index(directory, key)
    if not index:
        raise ConfigError(f"model directory {directory} has no safetensors weights", key=key,
                          fix="save the model with save_pretrained(safe_serialization=True); .bin files are "
                              "pickles and are never loaded")
    expected = hf_tensor_shapes(spec)
    if spec.tie_embeddings:
        index.pop("lm_head.weight", None)  # some tied checkpoints store the copy
    for name, shape in expected.items():
        if name not in index:
            raise ConfigError(f"{directory}: tensor {name} {list(shape)} is missing", key=key,
                              fix="the weights do not match config.json")
        if index[name][2] != shape:
            raise ConfigError(f"{directory}: tensor {name} has shape {list(index[name][2])}, config.json "
                              f"implies {list(shape)}", key=key, fix="the weights do not match config.json")
    extra = [n for n in index if n not in expected and not n.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise ConfigError(f"{directory}: tensor {extra[0]} is not part of a {spec.family} model of this config"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""), key=key,
                          fix="the weights do not match config.json")
    return index


# --------------------------------------------------------------------------- writing (primus export)


def shard_plan(sizes: Mapping[str, int], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[tuple[str, list[str]]]:
    """Tensor names cut, in order, into shards of at most `max_shard_bytes` (a bigger tensor gets
    a shard of its own); file names as transformers writes them."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if groups[-1] and used + size > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    if len(groups) == 1:
        return [(SINGLE_FILE, groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def write_weights(out_dir: Path, tensors: Mapping[str, Any], *, save_file: Callable[..., None],
                  nbytes: Callable[[Any], int], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write `tensors` (HF names) as safetensors shards plus the index, with the safetensors
    library's `save_file` of the caller's framework. Returns the files written."""
    plan = shard_plan({k: nbytes(v) for k, v in tensors.items()}, max_shard_bytes)
    for file, names in plan:
        save_file({n: tensors[n] for n in names}, str(Path(out_dir) / file), metadata={"format": "pt"})
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(nbytes(t) for t in tensors.values())},
                 "weight_map": {n: file for file, names in plan for n in names}}
        (Path(out_dir) / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [f for f, _ in plan] + ([INDEX_FILE] if len(plan) > 1 else [])


def check_tensors(tensors: Iterable[tuple[str, tuple[int, ...]]], spec: ModelSpec, what: str) -> None:
    """An exporter's tensors against `spec`: every name present with its shape, nothing else."""
    expected = hf_tensor_shapes(spec)
    got = dict(tensors)
    for name, shape in expected.items():
        if tuple(got.get(name, ())) != shape:
            raise ConfigError(f"{what}: tensor {name} is {list(got[name]) if name in got else 'missing'}, "
                              f"expected {list(shape)}")
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ConfigError(f"{what}: tensor {extra[0]} is not part of the model")
