"""The native `model:` section turned into a TorchTitan `ModelSpec` (imports torchtitan).

`model.flavor` names one of TorchTitan's registered flavors, used as is (upstream's
`model.n_layers` override of a flavor trims or repeats its blocks). `model.flavor: custom` builds
the model from its arguments, which is what a neutral model preset translates to; the builders
follow TorchTitan's own flavor factories for Llama 3 and Qwen 3, with their initialisations.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import replace
from typing import Any

from primus.errors import ConfigError
from primus_torchtitan.translate import OWN_MODULES

#: argument overrides a named flavor accepts without becoming custom
FLAVOR_OVERRIDES = {"n_layers"}
ARGUMENTS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "hidden_dim", "rope_theta",
             "max_seq_len", "norm_eps", "tie_embeddings", "qk_norm", "rope_scaling", "mla", "moe", "mtp_layers")


def build_model_spec(model: dict[str, Any]) -> Any:
    name, flavor = model["name"], model.get("flavor")
    attn_backend = model.get("attn_backend") or "flex"
    if name in OWN_MODULES:  # this package's modules: built from a model spec only
        return importlib.import_module(OWN_MODULES[name]).model_spec(model, attn_backend)
    module = importlib.import_module(f"torchtitan.models.{name}")
    if flavor != "custom":
        spec = module.model_registry(flavor, attn_backend=attn_backend)
        overrides = {k: model[k] for k in ARGUMENTS if model.get(k) is not None}
        unsupported = set(overrides) - FLAVOR_OVERRIDES
        if unsupported:
            raise ConfigError(f"model.{', model.'.join(sorted(unsupported))} cannot override flavor '{flavor}'",
                              key="model.flavor", fix="set model.flavor: custom and give every argument")
        if "n_layers" in overrides:
            spec.model.layers = _resize(spec.model.layers, int(overrides["n_layers"]))
        return spec
    builder = CUSTOM_BUILDERS.get(name)
    if builder is None:
        raise ConfigError(f"model.flavor 'custom' is not supported for TorchTitan model '{name}'",
                          key="model.flavor", fix=f"use one of its flavors: model.flavor ({name})")
    base = module.model_registry("debugmodel", attn_backend=attn_backend)
    return replace(base, flavor="custom", model=builder(model, attn_backend))


def _resize(layers: list, n: int) -> list:
    if n <= len(layers):
        return layers[:n]
    return layers + [copy.deepcopy(layers[-1]) for _ in range(n - len(layers))]


def _rope_kwargs(model: dict[str, Any], head_dim: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"dim": head_dim, "max_seq_len": int(model["max_seq_len"]),
                              "theta": float(model.get("rope_theta") or 10000.0)}
    scaling = model.get("rope_scaling")
    if scaling:
        kwargs.update(scaling="llama", scaling_factor=float(scaling["factor"]),
                      low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                      high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                      original_max_position_embeddings=int(scaling.get("original_max_positions", 8192)))
    return kwargs


def _llama3(model: dict[str, Any], attn_backend: str) -> Any:
    from torchtitan.models import llama3 as L
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm

    dim, vocab, heads = int(model["dim"]), int(model["vocab_size"]), int(model["n_heads"])
    eps = float(model.get("norm_eps") or 1e-5)
    head_dim = int(model.get("head_dim") or dim // heads)
    if head_dim * heads != dim:
        raise ConfigError("TorchTitan's Llama 3 needs head_dim x n_heads == dim", key="model.head_dim")
    layers = L._build_llama3_layers(
        fuse_qkv=True, n_layers=int(model["n_layers"]), dim=dim, n_heads=heads,
        n_kv_heads=int(model.get("n_kv_heads") or heads), hidden_dim=int(model["hidden_dim"]),
        rope=ComplexRoPE.Config(**_rope_kwargs(model, head_dim)), attn_backend=attn_backend)
    for block in layers:  # the factory uses RMSNorm's default eps; the preset may differ
        block.attention_norm.eps = block.ffn_norm.eps = eps
    return L.Llama3Model.Config(
        dim=dim, vocab_size=vocab,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=L._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, eps=eps, param_init=L._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=L._output_linear_init(dim)),
        layers=layers, enable_weight_tying=bool(model.get("tie_embeddings")))


def _qwen3(model: dict[str, Any], attn_backend: str) -> Any:
    from torchtitan.models import qwen3 as Q
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear
    from torchtitan.models.common.nn_modules import RMSNorm

    dim, vocab, heads = int(model["dim"]), int(model["vocab_size"]), int(model["n_heads"])
    eps = float(model.get("norm_eps") or 1e-6)
    head_dim = int(model.get("head_dim") or dim // heads)
    layers = Q._build_qwen3_layers(
        fuse_qkv=True, n_layers=int(model["n_layers"]), dim=dim, n_heads=heads,
        n_kv_heads=int(model.get("n_kv_heads") or heads), head_dim=head_dim, hidden_dim=int(model["hidden_dim"]),
        attn_backend=attn_backend, rope=CosSinRoPE.Config(**_rope_kwargs(model, head_dim)))
    tied = bool(model.get("tie_embeddings"))
    return Q.Qwen3Model.Config(
        vocab_size=vocab, dim=dim, enable_weight_tying=tied,
        norm=RMSNorm.Config(normalized_shape=dim, eps=eps, param_init=Q._NORM_INIT),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim,
                                        param_init=Q._EMBEDDING_SKIP_INIT if tied else Q._EMBEDDING_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=Q._LINEAR_INIT),
        layers=layers)


def _yarn_kwargs(scaling: dict[str, Any]) -> dict[str, Any]:
    return {"scaling": "yarn", "rope_factor": float(scaling["factor"]),
            "beta_fast": float(scaling.get("beta_fast") or 32.0), "beta_slow": float(scaling.get("beta_slow") or 1.0),
            "original_seq_len": int(scaling.get("original_max_positions") or 4096)}


def _deepseek_v3(model: dict[str, Any], attn_backend: str) -> Any:
    """TorchTitan's DeepSeek-V3 module (MLA + MoE) from the neutral spec's values: its own layer
    factory and initialisations; V2-Lite's plain q projection is its `q_lora_rank: 0`."""
    from torchtitan.models import deepseek_v3 as D
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm

    dim, vocab = int(model["dim"]), int(model["vocab_size"])
    mla, moe = model["mla"], model["moe"]
    eps = float(model.get("norm_eps") or 1e-6)
    rope: dict[str, Any] = {"dim": int(mla["qk_rope_head_dim"]), "max_seq_len": int(model["max_seq_len"]),
                            "theta": float(model.get("rope_theta") or 10000.0)}
    scaling = model.get("rope_scaling")
    if scaling:
        rope.update(_yarn_kwargs(scaling))
    layers = D._build_dsv3_layers(
        n_layers=int(model["n_layers"]), n_dense_layers=int(moe.get("first_dense_layers") or 0), dim=dim,
        n_heads=int(model["n_heads"]), q_lora_rank=int(mla.get("q_lora_rank") or 0),
        kv_lora_rank=int(mla["kv_lora_rank"]), qk_nope_head_dim=int(mla["qk_nope_head_dim"]),
        qk_rope_head_dim=int(mla["qk_rope_head_dim"]), v_head_dim=int(mla["v_head_dim"]),
        mscale=float((scaling or {}).get("mscale_all_dim") or 0.0),  # 0: no YaRN factor on the softmax scale
        dense_hidden_dim=int(model["hidden_dim"]), moe_hidden_dim=int(moe["expert_ffn"]),
        num_experts=int(moe["experts"]), num_shared_experts=int(moe.get("shared_experts") or 0),
        router_top_k=int(moe["top_k"]), router_score_func=moe.get("score_function") or "softmax",
        router_num_expert_groups=moe.get("groups"), router_num_limited_groups=moe.get("top_k_groups"),
        router_route_scale=float(moe.get("routed_scaling_factor") or 1.0),
        router_route_norm=bool(moe.get("norm_topk_prob")),
        attn_backend=attn_backend, moe_comm_backend="standard", non_blocking_capacity_factor=None,
        rope=ComplexRoPE.Config(**rope))
    for block in layers:
        block.attention_norm.eps = block.ffn_norm.eps = block.attention.kv_norm.eps = eps
        if block.attention.q_lora_rank:
            block.attention.q_norm.eps = eps
        if block.moe is not None:
            # the per-expert selection bias exists (and is loaded) only when the spec has one
            block.moe.load_balance_coeff = 1e-3 if moe.get("expert_bias") else None
            if not moe.get("shared_experts"):
                block.moe.shared_experts = None
    return D.DeepSeekV3Model.Config(
        vocab_size=vocab, dim=dim,
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=D._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, eps=eps, param_init=D._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=D._output_linear_init(dim)),
        layers=layers, enable_weight_tying=bool(model.get("tie_embeddings")),
        mtp_layers=D._build_mtp_layers(layers[-1], dim=dim, num_mtp_layers=int(model.get("mtp_layers") or 0)))


CUSTOM_BUILDERS = {"llama3": _llama3, "qwen3": _qwen3, "deepseek_v3": _deepseek_v3}
