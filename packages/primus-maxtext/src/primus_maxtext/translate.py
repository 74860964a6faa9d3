"""The light half of the maxtext backend: neutral config in, MaxText `base.yml` keys out, checks first.

Core calls this while resolving (`primus config show`, `primus run --dry-run`), so nothing here may
import jax or maxtext: MaxText's key set and defaults come from package data (`base_config`), paths
are checked on disk, and the device mesh is checked against the job's device count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from primus.backends.translator import NativeValues, Translator
from primus.errors import ConfigError
from primus_maxtext.base_config import base_defaults

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
}

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
    out.set("rope_max_timescale", _whole(spec.rope_theta), "rope_theta")
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
    return out


def _translate_rope_scaling(spec: ModelSpec, out: NativeValues) -> None:
    s = spec.rope_scaling
    if s is None:
        return
    if s.type == "llama3":
        given = {"factor": s.factor, "original_max_positions": s.original_max_positions,
                 "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor}
        differs = {k: v for k, v in given.items() if v is not None and float(v) != float(LLAMA31_ROPE[k])}
        if differs:
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
        out.set("mscale", s.mscale, "rope_scaling.mscale")
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
    # Megablox and sparse matmul kernels target TPUs and GPUs; the dense path runs everywhere.
    out.set("megablox", False, "moe")
    out.set("sparse_matmul", False, "moe")


# --------------------------------------------------------------------------- neutral sections


def translate_train(module: ModuleConfig, out: NativeValues) -> None:
    t = module.train
    out.set("steps", t.steps, "train.steps")
    out.set("learning_rate", t.lr, "train.lr")
    if t.min_lr is not None:
        if t.lr is None:
            raise ConfigError("train.min_lr needs train.lr (MaxText takes the final rate as a fraction of the peak)",
                              key="train.min_lr")
        out.set("learning_rate_final_fraction", t.min_lr / t.lr, "train.min_lr")
    if t.warmup_steps is not None:
        if not t.steps:
            raise ConfigError("train.warmup_steps needs train.steps (MaxText takes warmup as a fraction of the steps)",
                              key="train.warmup_steps")
        out.set("warmup_steps_fraction", min(t.warmup_steps / t.steps, 1.0), "train.warmup_steps")
    if t.lr_schedule == "cosine":
        out.set("lr_schedule_type", "cosine", "train.lr_schedule")
    elif t.lr_schedule == "constant":
        out.set("lr_schedule_type", "cosine", "train.lr_schedule")
        out.set("learning_rate_final_fraction", 1.0, "train.lr_schedule")  # a cosine from lr to lr is flat
    elif t.lr_schedule == "linear":
        # warmup-stable-decay with the whole post-warmup span decaying linearly
        warmup = (t.warmup_steps / t.steps) if t.warmup_steps is not None and t.steps else None
        out.set("lr_schedule_type", "wsd", "train.lr_schedule")
        out.set("wsd_decay_style", "linear", "train.lr_schedule")
        out.set("wsd_decay_steps_fraction", None if warmup is None else max(1.0 - warmup, 0.0), "train.lr_schedule")
    out.set("per_device_batch_size", t.micro_batch_size, "train.micro_batch_size")
    out.set("max_target_length", t.seq_length, "train.seq_length")
    out.set("init_weights_seed", t.seed, "train.seed")
    out.set("data_shuffle_seed", t.seed, "train.seed")
    out.set("adam_weight_decay", t.weight_decay, "train.weight_decay")
    out.set("gradient_clipping_threshold", t.grad_clip, "train.grad_clip")
    if t.precision == "fp16":
        raise ConfigError(f"fp16 is {UNSUPPORTED} (use bf16 or fp32)", key="train.precision")
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
    data = -1 if p.data == "auto" else p.data
    if p.fsdp:
        # FSDP takes every device the other axes leave; an explicit data degree replicates on top.
        out.set("ici_fsdp_parallelism", -1, "parallel.fsdp")
        out.set("ici_data_parallelism", data if data is not None else 1, "parallel.fsdp")
    elif p.fsdp is False or data is not None:
        out.set("ici_fsdp_parallelism", 1, "parallel.fsdp" if p.fsdp is False else "parallel.data")
        out.set("ici_data_parallelism", data if data is not None else -1, "parallel.data")


def translate_data(module: ModuleConfig, out: NativeValues) -> None:
    d = module.data
    if d.valid_fraction:
        raise ConfigError(f"data.valid_fraction is {UNSUPPORTED}; give MaxText a held-out file with "
                          "overrides.hf_eval_files and train.eval_interval", key="data.valid_fraction")
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


# --------------------------------------------------------------------------- checks


def mesh_axes(native: dict[str, Any], prefix: str) -> dict[str, int]:
    defaults = base_defaults()
    names = sorted(k for k in defaults if k.startswith(prefix) and k.endswith("_parallelism"))
    return {k: int(native.get(k, defaults[k])) for k in names}


def check_mesh(native: dict[str, Any], devices: int) -> None:
    """The ICI and DCN axes must fill the job's devices the way MaxText's mesh builder fills them."""
    num_slices = int(native.get("num_slices", -1))
    slices = num_slices if num_slices > 0 else 1  # GPUs and CPU form one slice unless told otherwise
    if devices % slices:
        raise ConfigError(f"num_slices {slices} does not divide the job's {devices} devices", key="num_slices")
    for prefix, size, what in (("ici_", devices // slices, "devices per slice"), ("dcn_", slices, "slices")):
        axes = mesh_axes(native, prefix)
        bad = {k: v for k, v in axes.items() if v == 0 or v < -1}
        if bad:
            raise ConfigError(f"mesh sizes must be positive or -1 (fill), got {bad}", key=next(iter(bad)))
        auto = [k for k, v in axes.items() if v == -1]
        explicit = {k: v for k, v in axes.items() if v > 1}
        product = math.prod(explicit.values())
        shown = " x ".join(f"{k}={v}" for k, v in explicit.items()) or f"all {prefix}* axes = 1"
        if len(explicit) > 1:
            shown += f" = {product}"
        if len(auto) > 1:
            raise ConfigError(f"more than one {prefix}* axis is -1 ({', '.join(auto)}); MaxText fills only one",
                              key=auto[1], fix="set all but one to a size")
        fix = ("the job has --nproc-per-node x --nnodes devices (on CPU, --nproc-per-node N gives N host devices); "
               "change the parallel sizes or set one axis to -1")
        if auto and size % product:
            raise ConfigError(f"{shown} does not divide the job's {size} {what}",
                              key=next(iter(explicit)), fix=fix)
        if not auto and product != size:
            raise ConfigError(f"{shown} does not match the job's {size} {what}",
                              key=next(iter(explicit), f"{prefix}*"), fix=fix)


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~"))


def check_data(module: ModuleConfig, native: dict[str, Any]) -> None:
    d = module.data
    dataset_type = native.get("dataset_type")
    if d.tokenizer and not Path(d.tokenizer).is_dir():
        raise ConfigError(f"tokenizer directory {d.tokenizer} does not exist", key="data.tokenizer",
                          fix="give a local Hugging Face tokenizer directory (tokenizer.json)")
    if d.path and not Path(d.path).is_file():
        raise ConfigError(f"corpus {d.path} does not exist", key="data.path")
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


def check_batch(module: ModuleConfig, native: dict[str, Any], devices: int) -> None:
    gbs = module.train.global_batch_size
    if gbs is None:
        return
    per_device = float(native.get("per_device_batch_size", base_defaults()["per_device_batch_size"]))
    accumulation = int(native.get("gradient_accumulation_steps", 1))
    total = per_device * devices * accumulation
    if total != gbs:
        wanted = gbs / (per_device * devices)
        fix = (f"set overrides.gradient_accumulation_steps: {int(wanted)}" if wanted.is_integer() and wanted >= 1
               else "MaxText's global batch is per_device_batch_size x devices x gradient_accumulation_steps")
        raise ConfigError(f"global_batch_size {gbs} != per_device_batch_size {per_device:g} x {devices} devices x "
                          f"gradient_accumulation_steps {accumulation}", key="train.global_batch_size", fix=fix)


# --------------------------------------------------------------------------- the translator


class MaxTextTranslator(Translator):
    default_module_preset = "pre_trainer.yaml"

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

    def check(self, resolved: ResolvedModule) -> None:
        native, module = resolved.native, resolved.module
        where = f"modules.{resolved.name}"
        try:
            check_types(native)
            check_mesh(native, resolved.world_size)
            check_data(module, native)
            check_batch(module, native, resolved.world_size)
            if resolved.model is not None and native.get("model_name", "default") != "default":
                raise ConfigError(f"model_name {native['model_name']!r} and a Primus model preset both define the "
                                  "model", key="model_name", fix="drop one of them")
            ckpt = module.checkpoint.dir
            if ckpt and Path(ckpt).name != "checkpoints":
                raise ConfigError("MaxText keeps checkpoints in <base_output_directory>/<run_name>/checkpoints",
                                  key="checkpoint.dir", fix="give a directory named 'checkpoints'")
        except ConfigError as exc:
            # point at the layer that set the key: the overrides line, the neutral section, the command line
            source = resolved.explain(exc.key) if exc.key in native else None
            layer = source.layer if source else ""
            key = exc.key or ""
            if layer in ("overrides", "cli"):
                key = f"{where}.overrides.{key}" if layer == "overrides" else f"command line {key}"
            elif not key.startswith(where):
                key = f"{where}.{key}" if key else where
            raise ConfigError(exc.message, file=source.file if source and layer != "cli" else None,
                              line=source.line if source else None, key=key, fix=exc.fix) from None

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
            "batch": f"{n.get('per_device_batch_size')} per device x {n.get('max_target_length', '?')} tokens",
            "mesh": ", ".join(f"{k.removesuffix('_parallelism')}={v}" for k, v in mesh_axes(n, "ici_").items()
                              if v != 1) or "single device",
            "data": n.get("dataset_type"),
        }
