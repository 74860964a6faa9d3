"""The light half of the maxtext backend: neutral config in, MaxText `base.yml` keys out, checks first.

Core calls this while resolving (`primus config show`, `primus run --dry-run`), so nothing here may
import jax or maxtext: MaxText's key set and defaults come from package data (`base_config`). Core
owns the neutral rules (parallel sizes, heads, batch arithmetic, corpus and tokenizer paths) on the
dimensions named here; this module derives what MaxText would compute from the job's devices (the
mesh's -1 axes, the gradient accumulation) and checks MaxText's own format.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from primus.backends.translator import NativeValues, Translator
from primus.config.rules import check_first_record
from primus.errors import ConfigError
from primus_maxtext.base_config import base_defaults
from primus_maxtext.posttrain import check_posttrain, derive_posttrain

if TYPE_CHECKING:
    from primus.config.resolve import ResolvedModule
    from primus.config.schema import ModuleConfig
    from primus.models.spec import ModelSpec

UNSUPPORTED = "not supported by the maxtext backend"

# MaxText's decoder block per model family (dense, mixture of experts).
DECODER_BLOCKS: dict[str, tuple[str | None, str | None]] = {
    "llama": ("llama2", None),
    "qwen2": ("qwen2", None),
    "qwen3": ("qwen3", "qwen3_moe"),
    "mixtral": (None, "mixtral"),
    "deepseek": ("deepseek", "deepseek"),
    "llama4": (None, "llama4"),
}

# MaxText keys DeepSeek-V3's routing (selection by the biased scores, weights from the unbiased ones,
# group-limited top-k) on the model name's prefix, not on a key, and accepts only its own model names.
# A named model's file is read from `models/<name>.yml` next to the config file first, and its values
# win over the config file's: the adapter writes that file with the model's own values of
# DEEPSEEK_V3_MODEL_KEYS (every key MaxText's file of that name sets, checked by the tests), so the
# base_* keys below still define the model.
DEEPSEEK_V3_MODEL_NAME = "deepseek3-test"
DEEPSEEK_V3_MODEL_KEYS = (
    "base_emb_dim", "base_num_query_heads", "base_num_kv_heads", "base_mlp_dim", "base_moe_mlp_dim",
    "base_num_decoder_layers", "first_num_dense_layers", "mlp_activations", "vocab_size", "enable_dropout",
    "logits_via_embedding", "normalization_layer_epsilon", "num_experts", "num_experts_per_tok", "shared_experts",
    "routed_scaling_factor", "routed_score_func", "routed_bias", "decoder_block", "attention_type", "q_lora_rank",
    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "mscale", "rope_type",
    "rope_max_timescale", "max_position_embeddings", "original_max_position_embeddings", "rope_factor", "beta_fast",
)

# MaxText's "llama3.1" RoPE hard-codes Llama 3.1's scaling; any other values cannot be expressed.
LLAMA31_ROPE = {"factor": 8.0, "original_max_positions": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0}

# Neutral parallel degree -> MaxText ICI axis (inside one slice; on GPUs and CPU that is the whole job).
PARALLEL_AXES = {
    "tensor": "ici_tensor_parallelism",
    "pipeline": "ici_pipeline_parallelism",
    "context": "ici_context_parallelism",
    "expert": "ici_expert_parallelism",
}

PRECISION = {"fp32": ("float32", "float32"), "bf16": ("bfloat16", "float32")}


def _whole(value: float) -> int | float:
    """MaxText types several model fields as int (rope_max_timescale, beta_fast, ...)."""
    return int(value) if float(value).is_integer() else value


# --------------------------------------------------------------------------- model


def translate_model_spec(spec: ModelSpec) -> NativeValues:
    out = NativeValues()
    dense_block, moe_block = DECODER_BLOCKS[spec.family]
    block = moe_block if spec.moe else dense_block
    if block is None:
        kind = "without" if spec.moe is None else "with"
        raise ConfigError(f"a {spec.family} model {kind} a moe: block is {UNSUPPORTED}", key="model.moe")
    out.set("decoder_block", block, "family")
    out.set("model_name", "default", "family")  # the base_* keys below define the model, not a MaxText preset
    if spec.family == "llama4":
        _translate_llama4(spec, out)
    out.set("vocab_size", spec.vocab_size, "vocab_size")
    out.set("base_emb_dim", spec.hidden_size, "hidden_size")
    out.set("base_num_decoder_layers", spec.num_layers, "num_layers")
    out.set("base_num_query_heads", spec.num_heads, "num_heads")
    out.set("base_num_kv_heads", spec.kv_heads, "num_kv_heads")
    out.set("head_dim", spec.head_size, "head_dim")
    out.set("base_mlp_dim", spec.ffn_hidden_size, "ffn_hidden_size")
    out.set("mlp_activations", ["silu", "linear"], "family")
    out.set("normalization_layer_epsilon", spec.norm_eps, "norm_eps")
    out.set("logits_via_embedding", spec.tie_embeddings, "tie_embeddings")
    if spec.tie_embeddings:
        # MaxText divides tied logits by sqrt(hidden) by default; the models Primus describes (Qwen, Llama
        # 3.2 with tied embeddings, as transformers builds them) do not
        out.set("normalize_embedding_logits", False, "tie_embeddings")
    out.set("rope_max_timescale", _whole(spec.rope_theta), "rope_theta")
    if spec.family == "deepseek" and spec.rope_scaling is None:
        # DeepSeek's checkpoints rotate interleaved pairs; MaxText's YaRN RoPE does (rope_interleave), and
        # with factor 1 it is plain RoPE
        out.set("rope_type", "yarn", "family")
        out.set("rope_factor", 1, "family")
        out.set("original_max_position_embeddings", spec.max_position_embeddings, "max_position_embeddings")
    out.set("max_position_embeddings", spec.max_position_embeddings, "max_position_embeddings")
    out.set("enable_dropout", False, "family")
    if spec.qk_norm:
        out.set("use_qk_norm", True, "qk_norm")
    if spec.qkv_bias:
        if spec.family != "qwen2":
            raise ConfigError(f"qkv_bias on a {spec.family} model is {UNSUPPORTED}", key="model.qkv_bias")
        out.set("attention_bias", True, "qkv_bias")
    _translate_rope_scaling(spec, out)
    if spec.moe:
        _translate_moe(spec, out)
    if spec.mla:
        m = spec.mla
        out.set("attention_type", "mla", "mla")
        out.set("q_lora_rank", m.q_lora_rank or 0, "mla.q_lora_rank")
        out.set("kv_lora_rank", m.kv_lora_rank, "mla.kv_lora_rank")
        out.set("qk_nope_head_dim", m.qk_nope_head_dim, "mla.qk_nope_head_dim")
        out.set("qk_rope_head_dim", m.qk_rope_head_dim, "mla.qk_rope_head_dim")
        out.set("v_head_dim", m.v_head_dim, "mla.v_head_dim")
    elif spec.family == "deepseek":
        raise ConfigError(f"a deepseek model without an mla: block is {UNSUPPORTED}", key="model.mla")
    if spec.mtp_layers:
        out.set("mtp_num_layers", spec.mtp_layers, "mtp_layers")
    if out.values.get("model_name") == DEEPSEEK_V3_MODEL_NAME:
        defaults = base_defaults()
        for key in DEEPSEEK_V3_MODEL_KEYS:  # none of the model file's values is used
            if key not in out.values:
                out.set(key, defaults[key], "family")
    return out


def _translate_llama4(spec: ModelSpec, out: NativeValues) -> None:
    """MaxText's Llama 4 block: RoPE (interleaved pairs, as Llama 4's checkpoints) on all but every
    nope_layer_interval-th layer, chunked attention on the RoPE layers, L2-normalised q and k there."""
    if spec.qk_norm:
        raise ConfigError(f"qk_norm (RMSNorm on q and k) on a llama4 model is {UNSUPPORTED} (MaxText's Llama 4 "
                          "block applies qk_l2_norm)", key="model.qk_norm")
    assert spec.moe is not None  # DECODER_BLOCKS refuses a llama4 model without one
    out.set("rope_type", "llama3.1", "family")
    out.set("rope_use_scale", spec.rope_scaling is not None, "rope_scaling")
    nope = spec.nope_layer_interval or -1
    out.set("nope_layer_interval", nope, "nope_layer_interval")
    out.set("interleave_moe_layer_step", spec.moe.layer_interval, "moe.layer_interval")
    # scanned layers repeat in blocks holding one whole pattern of NoPE and MoE layers
    cycle = math.lcm(max(nope, 1), spec.moe.layer_interval)
    if spec.num_layers % cycle:
        raise ConfigError(f"num_layers ({spec.num_layers}) must be a multiple of {cycle}: MaxText scans Llama 4 "
                          "layers in blocks of lcm(nope_layer_interval, moe.layer_interval)", key="model.num_layers")
    out.set("inhomogeneous_layer_cycle_interval", cycle, "nope_layer_interval,moe.layer_interval")
    # every RoPE layer of MaxText's block is chunked; no chunk size means one chunk of every position
    out.set("chunk_attn_window_size", spec.attention_chunk_size or spec.max_position_embeddings,
            "attention_chunk_size")
    out.set("use_qk_norm", spec.qk_l2_norm, "qk_l2_norm")
    out.set("temperature_tuning", spec.attn_temperature_tuning, "attn_temperature_tuning")


def llama3_rope_differs(spec: ModelSpec) -> dict[str, float]:
    """The Llama 3 RoPE scaling values of `spec` that differ from the Llama 3.1 constants MaxText has."""
    s = spec.rope_scaling
    if s is None or s.type != "llama3":
        return {}
    given = {"factor": s.factor, "original_max_positions": s.original_max_positions,
             "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor}
    return {k: v for k, v in given.items() if v is not None and float(v) != float(LLAMA31_ROPE[k])}


def _translate_rope_scaling(spec: ModelSpec, out: NativeValues) -> None:
    s = spec.rope_scaling
    if s is None:
        return
    if s.type == "llama3":
        differs = llama3_rope_differs(spec)
        if differs and spec.family != "llama4":  # Llama 4's: patch maxtext.llama4_rope_scaling gives its values
            raise ConfigError(f"llama3 rope scaling other than Llama 3.1's {LLAMA31_ROPE} is {UNSUPPORTED} "
                              f"(MaxText fixes it); got {differs}", key="model.rope_scaling")
        out.set("rope_type", "llama3.1", "rope_scaling.type")
        out.set("rope_use_scale", True, "rope_scaling.type")
    elif s.type == "yarn":
        out.set("rope_type", "yarn", "rope_scaling.type")
        out.set("rope_factor", _whole(s.factor), "rope_scaling.factor")
        out.set("original_max_position_embeddings", s.original_max_positions, "rope_scaling.original_max_positions")
        out.set("beta_fast", None if s.beta_fast is None else _whole(s.beta_fast), "rope_scaling.beta_fast")
        out.set("beta_slow", None if s.beta_slow is None else _whole(s.beta_slow), "rope_scaling.beta_slow")
        # MaxText's MLA scales the softmax by YaRN's mscale of `mscale` (DeepSeek's mscale_all_dim)
        all_dim = s.mscale_all_dim if s.mscale_all_dim is not None else s.mscale
        out.set("mscale", all_dim, "rope_scaling.mscale_all_dim" if s.mscale_all_dim is not None
                else "rope_scaling.mscale")
        if spec.family == "deepseek" and s.mscale not in (None, s.mscale_all_dim) and s.mscale_all_dim is not None:
            raise ConfigError(f"rope_scaling.mscale ({s.mscale}) different from mscale_all_dim ({s.mscale_all_dim}) "
                              f"is {UNSUPPORTED} (MaxText's YaRN applies one mscale)", key="model.rope_scaling.mscale")
    elif s.type == "linear":
        out.set("rope_type", "default", "rope_scaling.type")
        out.set("rope_linear_scaling_factor", s.factor, "rope_scaling.factor")
    else:
        raise ConfigError(f"rope scaling type '{s.type}' is {UNSUPPORTED}", key="model.rope_scaling.type")


def _translate_moe(spec: ModelSpec, out: NativeValues) -> None:
    e = spec.moe
    assert e is not None
    if e.shared_expert_ffn not in (None, e.expert_ffn):
        raise ConfigError(f"a shared expert FFN size different from expert_ffn is {UNSUPPORTED} "
                          "(MaxText sizes shared experts with base_moe_mlp_dim)", key="model.moe.shared_expert_ffn")
    out.set("num_experts", e.experts, "moe.experts")
    out.set("num_experts_per_tok", e.top_k, "moe.top_k")
    out.set("base_moe_mlp_dim", e.expert_ffn, "moe.expert_ffn")
    out.set("shared_experts", e.shared_experts, "moe.shared_experts")
    out.set("first_num_dense_layers", e.first_dense_layers, "moe.first_dense_layers")
    out.set("load_balance_loss_weight", e.router_aux_loss_coef, "moe.router_aux_loss_coef")
    out.set("norm_topk_prob", e.norm_topk_prob, "moe.norm_topk_prob")
    if e.layer_interval != 1 and spec.family != "llama4":
        raise ConfigError(f"moe.layer_interval on a {spec.family} model is {UNSUPPORTED} (MaxText interleaves dense "
                          "and MoE layers in its Llama 4 block only)", key="model.moe.layer_interval")
    if spec.family == "deepseek":
        _translate_deepseek_routing(spec, out)
    elif spec.family == "llama4":
        # MaxText's Llama 4 block scales the chosen expert's input by the sigmoid of its router logit
        if e.score_function != "sigmoid" or e.top_k != 1:
            raise ConfigError(f"a llama4 MoE with {e.score_function} scores and top_k {e.top_k} is {UNSUPPORTED} "
                              "(MaxText's Llama 4 block routes each token to one expert by sigmoid score)",
                              key="model.moe.top_k" if e.top_k != 1 else "model.moe.score_function")
        out.set("norm_topk_prob", False, "family")  # renormalising one sigmoid weight would make it 1
    if spec.family != "deepseek" and (e.expert_bias or e.groups or e.routed_scaling_factor != 1.0
                                      or (e.score_function != "softmax" and spec.family != "llama4")):
        raise ConfigError(f"sigmoid scores, expert bias, group routing and routed scaling on a {spec.family} model "
                          f"are {UNSUPPORTED} (MaxText routes that way in its DeepSeek block)",
                          key="model.moe.score_function")
    # Megablox and sparse matmul kernels target TPUs and GPUs; the dense path runs everywhere.
    out.set("megablox", False, "moe")
    out.set("sparse_matmul", False, "moe")


def _translate_deepseek_routing(spec: ModelSpec, out: NativeValues) -> None:
    """MaxText's DeepSeek block scores experts with routed_score_func, scales the top-k weights by
    routed_scaling_factor and renormalises them for sigmoid scores only (DeepSeek-V3 always, V2 never)."""
    e = spec.moe
    assert e is not None
    sigmoid = e.score_function == "sigmoid"
    if e.norm_topk_prob != sigmoid:
        raise ConfigError(f"moe.norm_topk_prob {str(e.norm_topk_prob).lower()} with {e.score_function} scores is "
                          f"{UNSUPPORTED} (MaxText's DeepSeek block renormalises sigmoid top-k weights and never "
                          "softmax ones)", key="model.moe.norm_topk_prob")
    if e.groups and not sigmoid:
        raise ConfigError(f"group-limited routing with softmax scores (DeepSeek-V2's group max) is {UNSUPPORTED} "
                          "(MaxText ranks groups by their top-2 sum, DeepSeek-V3's rule)", key="model.moe.groups")
    out.set("routed_score_func", e.score_function, "moe.score_function")
    out.set("routed_bias", e.expert_bias, "moe.expert_bias")
    out.set("routed_scaling_factor", e.routed_scaling_factor, "moe.routed_scaling_factor")
    if e.groups:
        out.set("n_routing_groups", e.groups, "moe.groups")
        out.set("topk_routing_group", e.top_k_groups, "moe.top_k_groups")
    if sigmoid or e.expert_bias:
        origin = "moe.score_function" if sigmoid else "moe.expert_bias"
        out.set("model_name", DEEPSEEK_V3_MODEL_NAME, origin)


# --------------------------------------------------------------------------- neutral sections


def translate_train(module: ModuleConfig, out: NativeValues) -> None:
    """Train fields to MaxText keys. A field MaxText cannot take is left out here and refused by
    `check_neutral_support`, so the error is located like every other check's."""
    t = module.train
    out.set("steps", t.steps, "train.steps")
    out.set("learning_rate", t.lr, "train.lr")
    if t.min_lr is not None and t.lr is not None:
        out.set("learning_rate_final_fraction", t.min_lr / t.lr, "train.min_lr,train.lr")
    warmup = (t.warmup_steps / t.steps) if t.warmup_steps is not None and t.steps else None
    out.set("warmup_steps_fraction", None if warmup is None else min(warmup, 1.0), "train.warmup_steps,train.steps")
    if t.lr_schedule == "cosine":
        out.set("lr_schedule_type", "cosine", "train.lr_schedule")
    elif t.lr_schedule == "constant":
        out.set("lr_schedule_type", "cosine", "train.lr_schedule")
        out.set("learning_rate_final_fraction", 1.0, "train.lr_schedule")  # a cosine from lr to lr is flat
    elif t.lr_schedule == "linear":
        # warmup-stable-decay with the whole post-warmup span decaying linearly
        out.set("lr_schedule_type", "wsd", "train.lr_schedule")
        out.set("wsd_decay_style", "linear", "train.lr_schedule")
        out.set("wsd_decay_steps_fraction", None if warmup is None else max(1.0 - warmup, 0.0),
                "train.lr_schedule,train.warmup_steps,train.steps")
    out.set("per_device_batch_size", t.micro_batch_size, "train.micro_batch_size")
    out.set("max_target_length", t.seq_length, "train.seq_length")
    out.set("init_weights_seed", t.seed, "train.seed")
    out.set("data_shuffle_seed", t.seed, "train.seed")
    out.set("adam_weight_decay", t.weight_decay, "train.weight_decay")
    out.set("gradient_clipping_threshold", t.grad_clip, "train.grad_clip")
    if t.precision in PRECISION:
        dtype, weight_dtype = PRECISION[t.precision]
        out.set("dtype", dtype, "train.precision")
        out.set("weight_dtype", weight_dtype, "train.precision")
    out.set("log_period", t.log_interval, "train.log_interval")
    out.set("eval_interval", t.eval_interval, "train.eval_interval")
    out.set("eval_steps", t.eval_steps, "train.eval_steps")


def translate_parallel(module: ModuleConfig, out: NativeValues) -> None:
    p = module.parallel
    for neutral, axis in PARALLEL_AXES.items():
        out.set(axis, getattr(p, neutral), f"parallel.{neutral}")
    # parallel.data is the whole data-parallel extent (core checks data x tensor x pipeline x context =
    # world size); -1 lets derive() size the axis from the devices the other axes leave.
    data = -1 if p.data == "auto" else p.data
    if p.fsdp:
        # FSDP shards over all of the data-parallel extent, so MaxText's fsdp axis takes it and its
        # replicating data axis is 1.
        out.set("ici_fsdp_parallelism", data if data is not None else -1,
                "parallel.fsdp" if data is None else "parallel.fsdp,parallel.data")
        out.set("ici_data_parallelism", 1, "parallel.fsdp")
    elif p.fsdp is False or data is not None:
        out.set("ici_fsdp_parallelism", 1, "parallel.fsdp" if p.fsdp is False else "parallel.data")
        out.set("ici_data_parallelism", data if data is not None else -1,
                "parallel.data" if data is not None else "parallel.fsdp")


def translate_data(module: ModuleConfig, out: NativeValues) -> None:
    d = module.data
    if d.mock:
        out.set("dataset_type", "synthetic", "data.mock")
    if d.path:
        out.set("dataset_type", "hf", "data.path")
        out.set("hf_path", "json", "data.path")
        out.set("hf_train_files", d.path, "data.path")
        out.set("train_data_columns", [d.text_key or "text"], "data.text_key")
    if d.tokenizer:
        out.set("tokenizer_type", "huggingface", "data.tokenizer")
        out.set("tokenizer_path", d.tokenizer, "data.tokenizer")


def translate_checkpoint(module: ModuleConfig, out: NativeValues) -> None:
    c = module.checkpoint
    if c.interval is not None or c.dir is not None:
        out.set("enable_checkpointing", True, "checkpoint.interval" if c.interval is not None else "checkpoint.dir")
    out.set("checkpoint_period", c.interval, "checkpoint.interval")
    out.set("max_to_keep", c.keep_last, "checkpoint.keep_last")


# --------------------------------------------------------------------------- derived values


def _origins(resolved: ResolvedModule, key: str) -> list[str]:
    """What a native value came from, for a derived value's origin: the neutral path(s) it was
    translated from, else the native key itself; nothing for MaxText's own base.yml default."""
    source = resolved.sources.get(tuple(key.split(".")))
    if source is None:
        return []
    if source.layer.startswith("neutral") and key in resolved.neutral_origins:
        return resolved.neutral_origins[key].split(",")
    return [key]


def _joined(origins: list[str]) -> str:
    return ",".join(dict.fromkeys(origins))  # in order, once each


def mesh_axes(native: dict[str, Any], prefix: str) -> dict[str, int]:
    defaults = base_defaults()
    names = sorted(k for k in defaults if k.startswith(prefix) and k.endswith("_parallelism"))
    return {k: int(native.get(k, defaults[k])) for k in names}


def _slices(native: dict[str, Any], devices: int) -> int:
    num_slices = int(native.get("num_slices", -1))
    slices = num_slices if num_slices > 0 else 1  # GPUs and CPU form one slice unless told otherwise
    if devices % slices:
        raise ConfigError(f"num_slices {slices} does not divide the job's {devices} devices", key="num_slices")
    return slices


def _mesh_levels(native: dict[str, Any], devices: int) -> list[tuple[str, int, str]]:
    """(axis prefix, devices that level's axes must multiply to, what those are)."""
    slices = _slices(native, devices)
    return [("ici_", devices // slices, "devices per slice"), ("dcn_", slices, "slices")]


MESH_FIX = ("the job has --nproc-per-node x --nnodes devices (on CPU, --nproc-per-node N gives N host devices); "
            "change the parallel sizes or set one axis to -1")


def _shown(explicit: dict[str, int], prefix: str) -> str:
    shown = " x ".join(f"{k}={v}" for k, v in explicit.items()) or f"all {prefix}* axes = 1"
    return shown + (f" = {math.prod(explicit.values())}" if len(explicit) > 1 else "")


def fill_mesh(native: dict[str, Any], devices: int) -> dict[str, tuple[int, list[str]]]:
    """The size MaxText's mesh builder gives each -1 axis on the job's devices, with the explicit axes
    it is computed from. Raises when the axes cannot be filled (a bad size, two -1s, no fit)."""
    fills: dict[str, tuple[int, list[str]]] = {}
    for prefix, size, what in _mesh_levels(native, devices):
        axes = mesh_axes(native, prefix)
        bad = {k: v for k, v in axes.items() if v == 0 or v < -1}
        if bad:
            raise ConfigError(f"mesh sizes must be positive or -1 (fill), got {bad}", key=next(iter(bad)))
        auto = [k for k, v in axes.items() if v == -1]
        if len(auto) > 1:
            raise ConfigError(f"more than one {prefix}* axis is -1 ({', '.join(auto)}); MaxText fills only one",
                              key=auto[1], fix="set all but one to a size")
        if not auto:
            continue
        explicit = {k: v for k, v in axes.items() if v > 1}
        product = math.prod(explicit.values())
        if size % product:
            raise ConfigError(f"{_shown(explicit, prefix)} does not divide the job's {size} {what}",
                              key=next(iter(explicit)), fix=MESH_FIX)
        fills[auto[0]] = (size // product, list(explicit))
    return fills


def check_mesh(native: dict[str, Any], devices: int) -> None:
    """The ICI and DCN axes must fill the job's devices the way MaxText's mesh builder fills them."""
    filled = {**native, **{axis: size for axis, (size, _) in fill_mesh(native, devices).items()}}
    for prefix, size, what in _mesh_levels(filled, devices):
        explicit = {k: v for k, v in mesh_axes(filled, prefix).items() if v > 1}
        if math.prod(explicit.values()) != size:
            # all axes 1 on several devices: blame the axis MaxText fills by default
            default_fill = next((k for k, v in mesh_axes({}, prefix).items() if v == -1), f"{prefix}*")
            raise ConfigError(f"{_shown(explicit, prefix)} does not match the job's {size} {what}",
                              key=next(iter(explicit), default_fill), fix=MESH_FIX)


def derive_mesh(resolved: ResolvedModule, out: NativeValues) -> None:
    """Each -1 mesh axis becomes the size MaxText would give it on this job's devices, so the
    generated config, `config show` and `--explain` say what the run uses. (A -1 written in overrides
    asks for exactly this; core lets a derived value replace a written -1, and no other.)"""
    native = resolved.native
    for axis, (size, explicit) in fill_mesh(native, resolved.world_size).items():
        from_ = _origins(resolved, axis) + [o for k in explicit for o in _origins(resolved, k)]
        if axis.startswith("ici_"):
            from_ += ["world_size"] + (["num_slices"] if int(native.get("num_slices", -1)) > 1 else [])
        else:
            from_ += ["num_slices"]
        out.set(axis, size, _joined(from_))


def derive_accumulation(resolved: ResolvedModule, out: NativeValues) -> None:
    """MaxText's global batch is per_device_batch_size x devices x gradient_accumulation_steps; with
    train.global_batch_size given, the accumulation is what makes them agree. (Core refuses a
    gradient_accumulation_steps the user wrote that differs from it.)"""
    native, gbs = resolved.native, resolved.module.train.global_batch_size
    if gbs is None:
        return
    per_device = float(native.get("per_device_batch_size", base_defaults()["per_device_batch_size"]))
    devices = resolved.world_size
    per_step = per_device * devices
    accumulation = gbs / per_step
    if not accumulation.is_integer() or accumulation < 1:
        raise ConfigError(f"global_batch_size {gbs} is not a multiple of per_device_batch_size {per_device:g} x "
                          f"{devices} devices = {per_step:g} (MaxText's global batch counts every device)",
                          key="train.global_batch_size",
                          fix=f"use a multiple of {per_step:g}" if per_step.is_integer()
                          else "MaxText's global batch is per_device_batch_size x devices x gradient_accumulation_steps")
    origins = ["train.global_batch_size", *(_origins(resolved, "per_device_batch_size") or ["per_device_batch_size"]),
               "world_size"]
    out.set("gradient_accumulation_steps", int(accumulation), _joined(origins))


# --------------------------------------------------------------------------- checks (read-only)


def check_types(native: dict[str, Any]) -> None:
    """Wrong kinds that MaxText would reject only after JAX started (numbers, booleans)."""
    defaults = base_defaults()
    for key, value in native.items():
        default = defaults.get(key)
        if default is None or value is None:
            continue
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"expects a boolean, got {value!r}", key=key)
        number = (int, float)
        if isinstance(default, number) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, number)):
            raise ConfigError(f"expects a number, got {value!r}", key=key)


def check_neutral_support(module: ModuleConfig) -> None:
    """Neutral fields MaxText cannot express (translate_sections leaves them out)."""
    t, d = module.train, module.data
    if t.precision == "fp16":
        raise ConfigError(f"fp16 is {UNSUPPORTED}", key="train.precision", fix="use bf16 or fp32")
    if t.min_lr is not None and t.lr is None:
        raise ConfigError("train.min_lr needs train.lr (MaxText takes the final rate as a fraction of the peak)",
                          key="train.min_lr", fix="set train.lr too")
    if t.warmup_steps is not None and not t.steps:
        raise ConfigError("train.warmup_steps needs train.steps (MaxText takes warmup as a fraction of the steps)",
                          key="train.warmup_steps", fix="set train.steps too")
    if d.valid_fraction:
        raise ConfigError(f"data.valid_fraction is {UNSUPPORTED}", key="data.valid_fraction",
                          fix="give MaxText a held-out file with overrides.hf_eval_files and train.eval_interval")


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~"))


def check_data(native: dict[str, Any]) -> None:
    """MaxText's own data keys; the neutral corpus and tokenizer paths are core's (config.rules)."""
    dataset_type = native.get("dataset_type")
    if dataset_type == "synthetic":
        return
    tokenizer = str(native.get("tokenizer_path") or "")
    if not tokenizer:
        raise ConfigError(f"dataset_type {dataset_type} needs a tokenizer", key="data.tokenizer",
                          fix="set data.tokenizer to a local tokenizer directory")
    if _looks_local(tokenizer) and not Path(tokenizer).expanduser().exists():
        raise ConfigError(f"tokenizer {tokenizer} does not exist", key="tokenizer_path")
    if dataset_type == "hf":
        files = native.get("hf_train_files") or ""
        for f in [files] if isinstance(files, str) else files:
            if f and _looks_local(f) and not any(Path(f).expanduser().parent.glob(Path(f).name)):
                raise ConfigError(f"training files {f} do not exist", key="hf_train_files")
        # core checks the text field only when data.text_key names it; MaxText reads its own default
        # column ("text") otherwise, so a JSONL file without it must fail here, not after JAX started
        columns = native.get("train_data_columns") or base_defaults()["train_data_columns"]
        if (native.get("hf_path") == "json" and isinstance(files, str) and files.endswith(".jsonl")
                and isinstance(columns, list) and columns and Path(files).is_file()):
            check_first_record(Path(files), str(columns[0]), key="train_data_columns")


# --------------------------------------------------------------------------- the translator


class MaxTextTranslator(Translator):
    default_module_preset = "pre_trainer.yaml"
    # post_trainer modules: full SFT on core's rows, packed samples kept apart by MaxText's segment ids
    post_training = frozenset({"full", "packing", "isolated_packing"})
    steps_key = "steps"
    # per_device_batch_size is not named for micro_batch_size: MaxText takes fractions (0.5) and
    # floats (4.0) there, which core's positive-integer rule would refuse; core reads the neutral
    # train.micro_batch_size instead, and derive/check judge the native value against the batch.
    # parallel.data is not one MaxText axis (data-parallel is ici_data x ici_fsdp x dcn_data x ...),
    # so core reads the neutral value.
    dimension_keys = {
        "tensor": "ici_tensor_parallelism", "pipeline": "ici_pipeline_parallelism",
        "context": "ici_context_parallelism", "expert": "ici_expert_parallelism",
        "seq_length": "max_target_length", "steps": "steps",
        "num_layers": "base_num_decoder_layers", "num_heads": "base_num_query_heads",
        "num_kv_heads": "base_num_kv_heads", "num_experts": "num_experts",
        "max_positions": "max_position_embeddings",
    }
    neutral_fields = frozenset({
        "train.steps", "train.lr", "train.min_lr", "train.warmup_steps", "train.lr_schedule",
        "train.micro_batch_size", "train.global_batch_size", "train.seq_length", "train.seed",
        "train.weight_decay", "train.grad_clip", "train.precision", "train.log_interval",
        "train.eval_interval", "train.eval_steps",
        "parallel.tensor", "parallel.pipeline", "parallel.context", "parallel.expert", "parallel.data",
        "parallel.fsdp",
        "data.mock", "data.path", "data.text_key", "data.tokenizer",
        "data.valid_fraction",  # read to refuse it (check_neutral_support)
        "checkpoint.dir", "checkpoint.interval", "checkpoint.keep_last",
        "checkpoint.resume",  # the adapter reads it: never refuses a directory with checkpoints
        "checkpoint.on_damaged",  # the adapter reads it: a damaged newest step fails or falls back (checkpoint.py)
    })

    def native_keys(self, preset: dict[str, Any]) -> set[str]:
        return set(preset) | set(base_defaults())

    def translate_model(self, spec: ModelSpec) -> NativeValues:
        return translate_model_spec(spec)

    def translate_sections(self, module: ModuleConfig, model: ModelSpec | None) -> NativeValues:
        out = NativeValues()
        translate_train(module, out)
        translate_parallel(module, out)
        translate_data(module, out)
        translate_checkpoint(module, out)
        return out

    def derive(self, resolved: ResolvedModule) -> NativeValues:
        """The mesh's -1 axes and the gradient accumulation, from the job's devices."""
        check_types(resolved.native)  # the arithmetic below needs numbers where MaxText wants numbers
        out = NativeValues()
        derive_mesh(resolved, out)
        derive_accumulation(resolved, out)
        if resolved.kind == "posttrain":
            derive_posttrain(resolved, out)
        return out

    def check(self, resolved: ResolvedModule) -> None:
        native, module = resolved.native, resolved.module
        check_neutral_support(module)
        check_mesh(native, resolved.world_size)
        if resolved.kind == "posttrain":
            check_posttrain(resolved)  # the records and tokenizer: core checked them (primus.posttrain)
        else:
            check_data(native)
        if resolved.model is not None and native.get("model_name", "default") not in ("default",
                                                                                     DEEPSEEK_V3_MODEL_NAME):
            raise ConfigError(f"model_name {native['model_name']!r} and a Primus model preset both define the "
                              "model", key="model_name", fix="drop one of them")
        if resolved.hf_path and resolved.model is not None and resolved.model.mtp_layers:
            raise ConfigError(f"Hugging Face weights of a model with multi-token prediction (mtp_layers "
                              f"{resolved.model.mtp_layers}) are {UNSUPPORTED}: its MTP weights are not mapped into "
                              "MaxText's MTP block", key="model.hf_path",
                              fix="train it from its presets (MaxText's MTP trains), or load a model without MTP layers")
        given = [k for k in ("load_parameters_path", "load_full_state_path") if native.get(k)]
        if resolved.hf_path and given:
            raise ConfigError(f"model.hf_path and MaxText's {given[0]} both give the initial weights", key=given[0],
                              fix="drop one of them; Primus converts hf_path into load_parameters_path")
        ckpt = module.checkpoint.dir
        if ckpt and Path(ckpt).name != "checkpoints":
            raise ConfigError("MaxText keeps checkpoints in <base_output_directory>/<run_name>/checkpoints",
                              key="checkpoint.dir", fix="give a directory named 'checkpoints'")

    def notices(self, resolved: ResolvedModule) -> list[str]:
        notes = super().notices(resolved)
        for key in ("run_name", "base_output_directory"):
            if resolved.native.get(key):
                notes.append(f"{key} is set by Primus from the run directory; {resolved.native[key]!r} is replaced "
                             "(checkpoint.dir moves MaxText's output)")
        return notes

    def summary(self, resolved: ResolvedModule) -> dict[str, Any]:
        n = resolved.native
        return {
            "steps": n.get("steps"),
            "batch": f"{n.get('per_device_batch_size')} per device x {n.get('max_target_length', '?')} tokens"
                     + (f" x {n['gradient_accumulation_steps']} accumulated" if n.get("gradient_accumulation_steps")
                        not in (None, 1) else ""),
            "mesh": ", ".join(f"{k.removesuffix('_parallelism')}={v}" for k, v in mesh_axes(n, "ici_").items()
                              if v != 1) or "single device",
            "data": n.get("dataset_type"),
            "precision": f"{n.get('dtype')} compute, {n.get('weight_dtype')} weights",
            "attention": n.get("attention"),
            "compile": "XLA (every MaxText step is jit-compiled)",
        }
