"""Hugging Face model directories, both ways, without importing a framework.

- `spec_from_hf(config)`: a `config.json` (llama, qwen2, qwen3, qwen3_moe, mixtral, deepseek_v2,
  deepseek_v3, llama4_text, or a llama4 config's text model) -> `ModelSpec`, so
  `model: {hf_path: DIR}` needs no model preset beside it.
- `hf_config(spec)`: a `ModelSpec` -> the `config.json` transformers builds the same model from
  (the hf backend's model config, and what `primus export` writes).
- `hf_tensor_shapes(spec)`: every tensor name of the transformers model and its shape, the one
  naming every backend's loader and exporter maps from and to.
- `read_weight_index(dir)` / `check_weights(dir, spec)`: the safetensors headers (8 bytes of
  length, then JSON; never the data), so a missing or misshapen tensor is one line before any
  process starts.
- `shard_plan` / `write_index`: how `primus export` cuts tensors into shards and indexes them;
  the backend writes each shard with the safetensors library of its framework.

What a family's transformers class fixes that `ModelSpec` leaves to the family (every backend
builds the same; see docs/decisions.md):

- deepseek: MLA with RoPE on interleaved pairs of the rope dims; the softmax scale is
  (qk head dim)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN. `moe.score_function`
  picks the class: sigmoid is DeepseekV3 (always with the `e_score_correction_bias` selection bias;
  a group's score is the sum of its two best biased scores), softmax is DeepseekV2 (no top-k
  renormalisation; a group's score is its best expert's). The shared experts are one MLP of
  `shared_experts * expert_ffn`. Multi-token prediction weights (`model.layers.<num_layers + k>.*`
  in DeepSeek's checkpoints) are not part of the transformers model: `check_weights` accepts them
  without requiring them, `hf_tensor_shapes` does not list them, an export does not write them.
- llama4: RoPE on interleaved pairs; the router takes the top-k logits and a sigmoid of them (no
  renormalisation) and scales each expert's *input* by its score; one shared expert of
  `expert_ffn`; qk L2 norm and chunked attention on RoPE layers only, attention temperature on NoPE
  layers only. On disk (as Meta publishes it and transformers saves it) the routed experts are
  fused: `feed_forward.experts.gate_up_proj` [E, H, 2F] (gate columns first) and
  `feed_forward.experts.down_proj` [E, F, H], the transpose of a Linear's weight.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from primus.errors import ConfigError
from primus.models.spec import MLASpec, ModelSpec, MoESpec, RopeScaling

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
    "deepseek_v2": ("deepseek", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("deepseek", "DeepseekV3ForCausalLM"),
    "llama4_text": ("llama4", "Llama4ForCausalLM"),
}
SUPPORTED = "llama, qwen2, qwen3, qwen3_moe, mixtral, deepseek_v2, deepseek_v3, llama4_text (or llama4's text_config)"


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
    if model_type == "llama4":  # the multimodal config: Primus trains its text model
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("llama4 config has no text_config", file=file, key="text_config")
        quantised = {"quantization_config": config["quantization_config"]} if "quantization_config" in config else {}
        return spec_from_hf({**text, **quantised, "model_type": "llama4_text"}, file=file)
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not a family Primus builds", file=file, key="model_type",
                          fix=f"supported: {SUPPORTED}")

    def refuse(key: str, why: str) -> ConfigError:
        return ConfigError(f"{model_type} model with {key}={config.get(key)!r}: {why}", file=file, key=key,
                           fix=f"Primus builds the standard {model_type} layout")

    if config.get("mlp_bias"):
        raise refuse("mlp_bias", "MLP biases are not built by the backends")
    if config.get("quantization_config"):
        raise refuse("quantization_config", "quantised weights are not loaded (dequantise them to bf16 first)")
    if model_type != "qwen2" and config.get("attention_bias"):
        raise refuse("attention_bias", "attention biases are not built for this family")
    if config.get("use_sliding_window") or (model_type == "mixtral" and config.get("sliding_window")):
        raise refuse("use_sliding_window" if "use_sliding_window" in config else "sliding_window",
                      "sliding-window attention is not built")
    family, _ = MODEL_TYPES[model_type]
    try:
        if model_type.startswith("deepseek"):
            return ModelSpec(**_deepseek_values(config, model_type, refuse))
        if model_type == "llama4_text":
            return ModelSpec(**_llama4_values(config, refuse))
        heads = config["num_attention_heads"]
        values: dict[str, Any] = dict(
            _base_values(config, family), num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            ffn_hidden_size=config["intermediate_size"],
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


def _base_values(config: dict[str, Any], family: str) -> dict[str, Any]:
    """The `ModelSpec` fields every family's config spells the same way."""
    theta, scaling = _rope(config)
    return dict(family=family, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
                max_position_embeddings=config["max_position_embeddings"], rope_theta=theta, rope_scaling=scaling,
                norm_eps=config.get("rms_norm_eps", 1e-6), tie_embeddings=bool(config.get("tie_word_embeddings", False)))


def _aux_coef(config: dict[str, Any]) -> float:
    # DeepSeek's own configs call it aux_loss_alpha; transformers' MoE configs router_aux_loss_coef
    return float(config.get("aux_loss_alpha", config.get("router_aux_loss_coef")) or 0.0)


def _deepseek_values(config: dict[str, Any], model_type: str,
                     refuse: Callable[[str, str], ConfigError]) -> dict[str, Any]:
    v3 = model_type == "deepseek_v3"
    heads = config["num_attention_heads"]
    if config.get("num_key_value_heads") not in (None, heads):
        raise refuse("num_key_value_heads", "latent attention has one key/value head per query head")
    if config.get("head_dim") not in (None, config["qk_rope_head_dim"]):  # transformers rotates head_dim dims
        raise refuse("head_dim", f"DeepSeek's head_dim is the RoPE width, qk_rope_head_dim ({config['qk_rope_head_dim']})")
    if config.get("moe_layer_freq", 1) != 1:
        raise refuse("moe_layer_freq", "every layer after first_k_dense_replace is a MoE layer")
    if v3:
        if config.get("scoring_func", "sigmoid") != "sigmoid":
            raise refuse("scoring_func", "DeepseekV3 routes with a sigmoid")
        if config.get("topk_method", "noaux_tc") != "noaux_tc":
            raise refuse("topk_method", "DeepseekV3 selects with the expert bias (noaux_tc)")
        if config.get("rope_interleave") is False:
            raise refuse("rope_interleave", "DeepSeek-V3 rotates interleaved pairs")
        groups = config.get("n_group") or 1
        top_k_groups = config.get("topk_group") or 1
    else:
        if config.get("scoring_func", "softmax") != "softmax":
            raise refuse("scoring_func", "DeepseekV2 routes with a softmax")
        if config.get("norm_topk_prob"):
            raise refuse("norm_topk_prob", "transformers' DeepseekV2 does not renormalise the top-k weights")
        method = config.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise refuse("topk_method", "DeepseekV2 selects greedy or group_limited_greedy")
        limited = method == "group_limited_greedy"
        groups = config.get("n_group") if limited else 1
        top_k_groups = config.get("topk_group") if limited else 1
        if not (groups and top_k_groups):
            raise KeyError("n_group" if not groups else "topk_group")
    grouped = groups > 1  # one group is no group limit
    moe = MoESpec(
        experts=config["n_routed_experts"], top_k=config["num_experts_per_tok"],
        expert_ffn=config["moe_intermediate_size"], shared_experts=config.get("n_shared_experts") or 0,
        first_dense_layers=config.get("first_k_dense_replace") or 0, router_aux_loss_coef=_aux_coef(config),
        norm_topk_prob=bool(config.get("norm_topk_prob", True)) if v3 else False,
        score_function="sigmoid" if v3 else "softmax", expert_bias=v3,
        groups=groups if grouped else None, top_k_groups=top_k_groups if grouped else None,
        routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)))
    if not moe.shared_experts:
        raise refuse("n_shared_experts", "transformers' DeepSeek layers always have shared experts")
    mla = MLASpec(q_lora_rank=config.get("q_lora_rank"), kv_lora_rank=config["kv_lora_rank"],
                  qk_nope_head_dim=config["qk_nope_head_dim"], qk_rope_head_dim=config["qk_rope_head_dim"],
                  v_head_dim=config["v_head_dim"])
    mtp = config.get("num_nextn_predict_layers", config.get("num_mtp_layers", 0)) if v3 else 0
    return dict(_base_values(config, "deepseek"), ffn_hidden_size=config["intermediate_size"], moe=moe, mla=mla,
                mtp_layers=mtp or 0)


def _interval(flags: list[bool], preferred: int | None) -> int | None:
    """N such that flags[i] == ((i + 1) % N == 0) for every layer; None when no flag is set."""
    if not any(flags):
        return None
    for n in ([preferred] if preferred else []) + list(range(1, len(flags) + 1)):
        if all(f == ((i + 1) % n == 0) for i, f in enumerate(flags)):
            return n
    raise ValueError


def _llama4_values(config: dict[str, Any], refuse: Callable[[str, str], ConfigError]) -> dict[str, Any]:
    layers = config["num_hidden_layers"]
    step = config.get("interleave_moe_layer_step") or 1
    moe_layers = config.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, layers, step))
    moe = None
    if moe_layers:
        for interval in [step] + list(range(1, layers + 1)):
            first = next((d for d in range(layers) if [i for i in range(layers) if i >= d and (i + 1) % interval == 0]
                          == list(moe_layers)), None)
            if first is not None:
                break
        else:
            raise refuse("moe_layers", "MoE layers must be every Nth layer after the first dense ones")
        moe = MoESpec(experts=config["num_local_experts"], top_k=config["num_experts_per_tok"],
                      expert_ffn=config["intermediate_size"], shared_experts=1, first_dense_layers=first,
                      layer_interval=interval, router_aux_loss_coef=float(config.get("router_aux_loss_coef") or 0.0),
                      norm_topk_prob=False, score_function="sigmoid")
    rope_flags = config.get("no_rope_layers") or [(i + 1) % (config.get("no_rope_layer_interval") or 4) != 0
                                                  for i in range(layers)]  # 1: the layer uses RoPE
    if len(rope_flags) != layers:
        raise refuse("no_rope_layers", f"one entry per layer ({layers})")
    try:
        nope = _interval([not f for f in rope_flags], config.get("no_rope_layer_interval"))
    except ValueError:
        raise refuse("no_rope_layers", "RoPE-free layers must be every Nth layer") from None
    chunk = config.get("attention_chunk_size")
    types = config.get("layer_types")
    if types is not None and list(types) != [
            "chunked_attention" if f and chunk is not None else "full_attention" for f in rope_flags]:
        raise refuse("layer_types", "chunked attention on the RoPE layers, full attention on the others")
    return dict(_base_values(config, "llama4"), num_kv_heads=config.get("num_key_value_heads"),
                head_dim=config.get("head_dim"), ffn_hidden_size=config["intermediate_size_mlp"], moe=moe,
                nope_layer_interval=nope, attention_chunk_size=chunk, qk_l2_norm=bool(config.get("use_qk_norm")),
                attn_temperature_tuning=bool(config.get("attn_temperature_tuning")),
                attn_floor_scale=config.get("floor_scale", 8192), attn_scale=config.get("attn_scale", 0.1))


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
                   fix="supported: llama, qwen2, qwen3 (dense or MoE), mixtral, deepseek (V2 and V3), llama4 "
                       "with their standard layouts")


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


def _deepseek(spec: ModelSpec) -> dict[str, Any]:
    moe, mla = spec.moe, spec.mla
    if mla is None or moe is None:
        raise _refuse(spec, "no mla or no moe block")  # transformers' DeepSeek layers are MLA and MoE
    if moe.layer_interval != 1 or not moe.shared_experts or moe.shared_expert_ffn not in (None, moe.expert_ffn):
        raise _refuse(spec, "moe.layer_interval, no shared experts, or a shared_expert_ffn other than expert_ffn")
    v3 = moe.score_function == "sigmoid"
    if v3 and not moe.expert_bias:
        raise _refuse(spec, "sigmoid routing without moe.expert_bias (DeepseekV3 always selects with it)")
    if not v3 and (moe.expert_bias or moe.norm_topk_prob):
        raise _refuse(spec, "softmax routing with moe.expert_bias or moe.norm_topk_prob (DeepseekV2 has neither)")
    model_type = "deepseek_v3" if v3 else "deepseek_v2"
    config = {k: v for k, v in _common(spec, model_type).items() if k != "head_dim"}  # transformers derives it
    config.update(
        q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank, qk_nope_head_dim=mla.qk_nope_head_dim,
        qk_rope_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim,
        n_routed_experts=moe.experts, num_experts_per_tok=moe.top_k, moe_intermediate_size=moe.expert_ffn,
        n_shared_experts=moe.shared_experts, first_k_dense_replace=moe.first_dense_layers,
        routed_scaling_factor=moe.routed_scaling_factor, norm_topk_prob=moe.norm_topk_prob,
        n_group=moe.groups or 1, topk_group=moe.top_k_groups or 1, scoring_func=moe.score_function,
        aux_loss_alpha=moe.router_aux_loss_coef)
    if v3:
        config.update(topk_method="noaux_tc", rope_interleave=True, num_nextn_predict_layers=spec.mtp_layers)
    else:
        if spec.mtp_layers:
            raise _refuse(spec, "mtp_layers with softmax routing (DeepseekV2)")
        config.update(topk_method="group_limited_greedy" if moe.groups else "greedy")
    return config


def _llama4(spec: ModelSpec) -> dict[str, Any]:
    if spec.qkv_bias or spec.qk_norm:
        raise _refuse(spec, "qkv_bias or qk_norm (Llama 4's is qk_l2_norm)")
    moe = spec.moe
    if moe is not None and (
            moe.score_function != "sigmoid" or moe.norm_topk_prob or moe.expert_bias or moe.groups
            or moe.routed_scaling_factor != 1.0 or moe.shared_experts != 1
            or moe.shared_expert_ffn not in (None, moe.expert_ffn)):
        raise _refuse(spec, "a router other than Llama 4's (sigmoid of the top-k logits, no renormalisation, no "
                            "expert bias or groups, scaling 1.0, one shared expert of expert_ffn; set "
                            "moe.norm_topk_prob: false)")
    layers = range(spec.num_layers)
    uses_rope = [spec.uses_rope(i) for i in layers]
    config = _common(spec, "llama4_text")
    config.update(
        intermediate_size=moe.expert_ffn if moe else spec.ffn_hidden_size, intermediate_size_mlp=spec.ffn_hidden_size,
        num_local_experts=moe.experts if moe else 1, num_experts_per_tok=moe.top_k if moe else 1,
        interleave_moe_layer_step=moe.layer_interval if moe else 1,
        moe_layers=[i for i in layers if moe and moe.is_moe_layer(i)],
        router_aux_loss_coef=moe.router_aux_loss_coef if moe else 0.0,
        no_rope_layers=[int(r) for r in uses_rope],
        attention_chunk_size=spec.attention_chunk_size,
        layer_types=["chunked_attention" if r and spec.attention_chunk_size else "full_attention" for r in uses_rope],
        use_qk_norm=spec.qk_l2_norm, attn_temperature_tuning=spec.attn_temperature_tuning,
        floor_scale=spec.attn_floor_scale, attn_scale=spec.attn_scale, attention_bias=False)
    if spec.nope_layer_interval:
        config["no_rope_layer_interval"] = spec.nope_layer_interval
    return config


CONFIG_BUILDERS: dict[str, Callable[[ModelSpec], dict[str, Any]]] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mixtral": _mixtral, "deepseek": _deepseek,
    "llama4": _llama4}


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


def _mlp(prefix: str, h: int, f: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (f, h), prefix + "up_proj.weight": (f, h), prefix + "down_proj.weight": (h, f)}


def _attention(spec: ModelSpec, p: str) -> dict[str, tuple[int, ...]]:
    h, d = spec.hidden_size, spec.head_size
    mla = spec.mla
    if mla is not None:
        heads = spec.num_heads
        q = ({p + "q_a_proj.weight": (mla.q_lora_rank, h), p + "q_a_layernorm.weight": (mla.q_lora_rank,),
              p + "q_b_proj.weight": (heads * mla.qk_head_dim, mla.q_lora_rank)} if mla.q_lora_rank
             else {p + "q_proj.weight": (heads * mla.qk_head_dim, h)})
        return {**q, p + "kv_a_proj_with_mqa.weight": (mla.kv_lora_rank + mla.qk_rope_head_dim, h),
                p + "kv_a_layernorm.weight": (mla.kv_lora_rank,),
                p + "kv_b_proj.weight": (heads * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank),
                p + "o_proj.weight": (h, heads * mla.v_head_dim)}
    q, kv = spec.num_heads * d, spec.kv_heads * d
    shapes = {p + "q_proj.weight": (q, h), p + "k_proj.weight": (kv, h), p + "v_proj.weight": (kv, h),
              p + "o_proj.weight": (h, q)}
    if spec.qkv_bias:
        shapes.update({p + "q_proj.bias": (q,), p + "k_proj.bias": (kv,), p + "v_proj.bias": (kv,)})
    if spec.qk_norm:
        shapes.update({p + "q_norm.weight": (d,), p + "k_norm.weight": (d,)})
    return shapes


def _ffn(spec: ModelSpec, p: str, index: int) -> dict[str, tuple[int, ...]]:
    h, moe = spec.hidden_size, spec.moe
    block = "feed_forward." if spec.family == "llama4" else "mlp."
    if moe is None or not moe.is_moe_layer(index):
        return _mlp(p + block, h, spec.ffn_hidden_size)
    f, experts = moe.expert_ffn, moe.experts
    if spec.family == "llama4":  # fused on disk, as published
        return {p + "feed_forward.router.weight": (experts, h),
                p + "feed_forward.experts.gate_up_proj": (experts, h, 2 * f),
                p + "feed_forward.experts.down_proj": (experts, f, h),
                **_mlp(p + "feed_forward.shared_expert.", h, f)}
    if spec.family == "mixtral":
        shapes = {p + "block_sparse_moe.gate.weight": (experts, h)}
        for e in range(experts):
            x = f"{p}block_sparse_moe.experts.{e}."
            shapes.update({x + "w1.weight": (f, h), x + "w3.weight": (f, h), x + "w2.weight": (h, f)})
        return shapes
    shapes = {p + "mlp.gate.weight": (experts, h)}
    if moe.expert_bias:
        shapes[p + "mlp.gate.e_score_correction_bias"] = (experts,)
    for e in range(experts):
        shapes.update(_mlp(f"{p}mlp.experts.{e}.", h, f))
    if moe.shared_experts:
        shapes.update(_mlp(p + "mlp.shared_experts.", h, moe.shared_experts * f))
    return shapes


def hf_tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor of the transformers model of `spec`, by its on-disk name (fp32 shapes)."""
    h = spec.hidden_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    if not spec.tie_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
        shapes.update(_attention(spec, p + "self_attn."))
        shapes.update(_ffn(spec, p, i))
    return shapes


def is_mtp_tensor(name: str, spec: ModelSpec) -> bool:
    """A multi-token prediction weight of a DeepSeek checkpoint (`model.layers.<num_layers + k>.*`):
    transformers builds no module for it; loaders skip it, exports do not write it."""
    if not spec.mtp_layers or not name.startswith("model.layers."):
        return False
    index = name.split(".", 3)[2]
    return index.isdigit() and spec.num_layers <= int(index) < spec.num_layers + spec.mtp_layers


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
_MULTIMODAL_PREFIXES = ("language_model.", "vision_model.", "multi_modal_projector.")


def check_weights(directory: Path, spec: ModelSpec,
                  key: str = "model.hf_path") -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """The weights of `directory` against the tensors `spec` has: the first missing, unexpected or
    misshapen tensor is a one-line error naming it and both shapes. Returns the index."""
    index = read_weight_index(directory, key)
    if not index:
        raise ConfigError(f"model directory {directory} has no safetensors weights", key=key,
                          fix="save the model with save_pretrained(safe_serialization=True); .bin files are "
                              "pickles and are never loaded")
    if any(name.startswith(_MULTIMODAL_PREFIXES) for name in index):
        raise ConfigError(f"{directory} holds a multimodal Llama 4 checkpoint (language_model.*, vision_model.*); "
                          "Primus trains the text model only", key=key,
                          fix="save the text model alone: Llama4ForCausalLM.from_pretrained(DIR).save_pretrained(OUT)")
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
    extra = [n for n in index if n not in expected and not n.endswith(_IGNORED_SUFFIXES) and not is_mtp_tensor(n, spec)]
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
