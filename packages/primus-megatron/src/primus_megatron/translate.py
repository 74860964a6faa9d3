"""Neutral config -> Megatron's argument names, the values Megatron-LM derives from others, and
Megatron's own format checks before a run (the neutral rules are core's: primus.config.rules).

Light on purpose: core calls this while resolving (`primus config show`, `primus run --dry-run`),
so nothing here imports torch or megatron.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from primus.backends.translator import NativeValues, Translator
from primus.errors import ConfigError

if TYPE_CHECKING:
    from primus.config.resolve import ResolvedModule
    from primus.config.schema import ModuleConfig
    from primus.models.spec import ModelSpec

# Upstream Primus flags that need Primus-Turbo (AMD GPU kernels) or TransformerEngine. An upstream
# experiment file that sets them still loads; a truthy value is reported as unavailable here.
_TURBO = "needs Primus-Turbo, which this package does not use"
_TE = "not built by this trainer, with or without TransformerEngine"
UNAVAILABLE: dict[str, str] = {
    **{key: _TURBO for key in (
        "enable_primus_turbo", "use_turbo_autotune", "turbo_gemm_backend", "turbo_grouped_gemm_backend",
        "use_turbo_attention", "use_sink_attention", "sink_sliding_window", "sink_window_even_layers_only",
        "enable_turbo_attention_float8", "use_turbo_gemm", "use_turbo_grouped_gemm", "use_turbo_grouped_mlp",
        "turbo_fused_grouped_gemm", "turbo_grouped_gemm_without_padding", "use_turbo_fused_act_with_probs",
        "moe_use_fused_router_with_aux_score", "use_turbo_deepep", "turbo_deepep_num_cu",
        "turbo_deepep_use_comm_stream", "turbo_sync_free_moe_stage", "use_turbo_mega_moe",
        "turbo_mega_moe_precision", "use_turbo_rms_norm", "use_turbo_norm_te_linear", "patch_moe_overlap",
        "mxfp4_gradient_stochastic_rounding", "mxfp4_scale_rounding_mode", "te_precision_config_file",
        "no_fp8_weight_transpose_cache", "patch_zero_bubble", "enable_zero_bubble", "zero_bubble_v_schedule",
    )},
    **{key: _TE for key in ("fp4", "te_rng_tracker")},
}
# TransformerEngine's layer spec and fp8, decided per platform by primus_megatron.fast_path
FAST_PATH_KEYS = frozenset({"fp8", "fp8_recipe", "transformer_impl"})

# Which neutral value became which native key, for the sections that map one to one.
_TRAIN = {
    "steps": "train_iters", "lr": "lr", "min_lr": "min_lr", "warmup_steps": "lr_warmup_iters",
    "lr_schedule": "lr_decay_style", "micro_batch_size": "micro_batch_size",
    "global_batch_size": "global_batch_size", "seq_length": "seq_length", "seed": "seed",
    "weight_decay": "weight_decay", "grad_clip": "clip_grad", "log_interval": "log_interval",
    "eval_interval": "eval_interval", "eval_steps": "eval_iters",
}
_PARALLEL = {
    "tensor": "tensor_model_parallel_size", "pipeline": "pipeline_model_parallel_size",
    "expert": "expert_model_parallel_size", "context": "context_parallel_size", "fsdp": "use_torch_fsdp2",
}
# megatron-core's llama3 RoPE scaling shape (its defaults besides the factor)
LLAMA3_ROPE_SHAPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_positions": 8192}
SUPPORTED_FAMILIES = ("llama", "qwen2", "qwen3", "mixtral", "deepseek", "llama4")


class MegatronTranslator(Translator):
    default_module_preset = "pre_trainer.yaml"
    unavailable_keys = UNAVAILABLE
    extra_native_keys = FAST_PATH_KEYS
    # upstream's Megatron argument handling takes 0/1 for its flags (`sequence_parallel: 1`)
    int_bools = True
    trainer_classes = frozenset({"MegatronPretrainTrainer"})
    # post_trainer modules (presets/sft_trainer.yaml, primus_megatron.posttrain): isolated packing through
    # the local attention's mask
    post_training = frozenset({"full", "lora", "packing", "isolated_packing"})
    steps_key = "train_iters"
    # Core's neutral rules (primus.config.rules) read these resolved native values, so the neutral
    # sections, `overrides:` and a native (upstream-form) model file are judged by the same rules.
    dimension_keys = {
        **{dimension: native for dimension, native in _PARALLEL.items() if dimension != "fsdp"},
        "micro_batch_size": "micro_batch_size", "global_batch_size": "global_batch_size",
        "seq_length": "seq_length", "steps": "train_iters",
        "pipeline_split": "decoder_pipeline_manual_split_list",
        "num_layers": "num_layers", "num_heads": "num_attention_heads",
        # Megatron reads num_query_groups only with group_query_attention on; off, the kv heads are
        # the attention heads (judged as num_heads) and num_query_groups is null in every preset
        # this package writes. A stale num_query_groups beside group_query_attention: false would
        # still be judged: core reads one key per dimension, with no flag.
        "num_kv_heads": "num_query_groups",
        "num_experts": "num_experts", "max_positions": "max_position_embeddings",
    }
    # every neutral field translate_sections maps (prepare.py reads data.path/tokenizer/text_key too)
    neutral_fields = frozenset(
        [f"train.{name}" for name in _TRAIN] + ["train.precision", "train.compile"]
        + [f"parallel.{name}" for name in _PARALLEL]
        + ["data.mock", "data.path", "data.tokenizer", "data.text_key", "data.valid_fraction"]
        + ["checkpoint.interval", "checkpoint.keep_last", "checkpoint.resume", "checkpoint.on_damaged"])

    # ------------------------------------------------------------------ model

    def translate_model(self, spec: ModelSpec) -> NativeValues:
        if spec.family not in SUPPORTED_FAMILIES:
            raise ConfigError(f"model family '{spec.family}' is not supported by the megatron backend",
                              fix="supported: " + ", ".join(SUPPORTED_FAMILIES))
        out = NativeValues()
        out.set("num_layers", spec.num_layers, "num_layers")
        out.set("hidden_size", spec.hidden_size, "hidden_size")
        out.set("ffn_hidden_size", spec.ffn_hidden_size, "ffn_hidden_size")
        out.set("num_attention_heads", spec.num_heads, "num_heads")
        out.set("vocab_size", spec.vocab_size, "vocab_size")
        out.set("max_position_embeddings", spec.max_position_embeddings, "max_position_embeddings")
        out.set("position_embedding_type", "rope", "family")
        out.set("rotary_base", int(spec.rope_theta), "rope_theta")
        out.set("norm_epsilon", spec.norm_eps, "norm_eps")
        out.set("normalization", "RMSNorm", "family")
        out.set("swiglu", True, "family")
        out.set("add_bias_linear", False, "family")
        out.set("untie_embeddings_and_output_weights", not spec.tie_embeddings, "tie_embeddings")
        out.set("add_qkv_bias", spec.qkv_bias, "qkv_bias")
        out.set("qk_layernorm", spec.qk_norm, "qk_norm")
        if spec.mla is None:
            gqa = spec.kv_heads != spec.num_heads
            out.set("group_query_attention", gqa, "num_kv_heads")
            out.set("num_query_groups", spec.kv_heads if gqa else None, "num_kv_heads")
            if spec.head_dim is not None:
                out.set("kv_channels", spec.head_dim, "head_dim")
        else:
            # megatron-core's MLA; its core attention is Primus's SDPAttention (primus_megatron.layers),
            # or TransformerEngine's on a GPU where TE is installed
            out.set("multi_latent_attention", True, "mla")
            for native, field in (("q_lora_rank", "q_lora_rank"), ("kv_lora_rank", "kv_lora_rank"),
                                  ("qk_head_dim", "qk_nope_head_dim"), ("qk_pos_emb_head_dim", "qk_rope_head_dim"),
                                  ("v_head_dim", "v_head_dim")):
                out.set(native, getattr(spec.mla, field), f"mla.{field}")
            out.set("rope_type", "rope", "family")
        if spec.family == "llama4":
            self._llama4(spec, out)
        if spec.mtp_layers:
            out.set("mtp_num_layers", spec.mtp_layers, "mtp_layers")
        if spec.rope_scaling is not None and spec.mla is not None:
            self._yarn(spec, out)
        elif spec.rope_scaling is not None:
            if spec.rope_scaling.type != "llama3":
                raise ConfigError(f"rope_scaling type '{spec.rope_scaling.type}' is not supported by the "
                                  "megatron backend's GPT model", fix="supported: llama3")
            scaling = spec.rope_scaling
            # megatron-core 0.16's GPT model takes only the factor; other low/high frequency factors and
            # original lengths (Llama 4 Scout: 1.0 / 1.0 / 8192) come through patch megatron.rope.llama3_shape
            for name in ("low_freq_factor", "high_freq_factor", "original_max_positions"):
                given = getattr(scaling, name)
                if given is not None and float(given) != LLAMA3_ROPE_SHAPE[name]:
                    out.set(f"rope_scaling_{name}", given, f"rope_scaling.{name}")
            out.set("use_rope_scaling", True, "rope_scaling")
            out.set("rope_scaling_factor", spec.rope_scaling.factor, "rope_scaling.factor")
        if spec.moe is not None:
            moe = spec.moe
            out.set("num_experts", moe.experts, "moe.experts")
            out.set("moe_router_topk", moe.top_k, "moe.top_k")
            out.set("moe_ffn_hidden_size", moe.expert_ffn, "moe.expert_ffn")
            if moe.shared_experts:
                size = moe.shared_experts * (moe.shared_expert_ffn or moe.expert_ffn)
                out.set("moe_shared_expert_intermediate_size", size, "moe.shared_experts")
            pattern = [int(moe.is_moe_layer(i)) for i in range(spec.num_layers)]
            if 0 in pattern:
                # Megatron's pattern form: one entry per layer, 0 = dense FFN, 1 = MoE.
                out.set("moe_layer_freq", pattern, "moe.first_dense_layers,moe.layer_interval")
            out.set("moe_aux_loss_coeff", moe.router_aux_loss_coef, "moe.router_aux_loss_coef")
            self._routing(spec, out)
        return out

    @staticmethod
    def _routing(spec: ModelSpec, out: NativeValues) -> None:
        """megatron-core's router options for the MoE spec (all of them megatron-core's own)."""
        moe = spec.moe
        assert moe is not None
        out.set("moe_router_score_function", moe.score_function, "moe.score_function")
        if moe.score_function == "softmax":
            # top-k of the softmax over all experts, not renormalised (Qwen3-MoE's norm_topk_prob: false);
            # megatron's default (softmax over the top-k logits) is the renormalised form
            out.set("moe_router_pre_softmax", not moe.norm_topk_prob, "moe.norm_topk_prob")
        elif not moe.norm_topk_prob and moe.top_k > 1:
            raise ConfigError("megatron-core's sigmoid router renormalises its top-k scores (norm_topk_prob: true)",
                              key="moe.norm_topk_prob", fix="set moe.norm_topk_prob: true or use another backend")
        if moe.expert_bias:
            if moe.score_function != "sigmoid":
                raise ConfigError("megatron-core adds the expert bias to sigmoid scores only",
                                  key="moe.expert_bias", fix="set moe.score_function: sigmoid")
            out.set("moe_router_enable_expert_bias", True, "moe.expert_bias")
        if moe.groups is not None:
            out.set("moe_router_num_groups", moe.groups, "moe.groups")
            out.set("moe_router_group_topk", moe.top_k_groups, "moe.top_k_groups")
        if moe.routed_scaling_factor != 1.0:
            out.set("moe_router_topk_scaling_factor", moe.routed_scaling_factor, "moe.routed_scaling_factor")
        if spec.family == "llama4":
            # Llama 4 multiplies each token by its router score before the expert, not after
            if moe.top_k != 1:
                raise ConfigError("Llama 4's routing scales the expert input by the router score, which megatron-core "
                                  "builds for top-1 only", key="moe.top_k", fix="set moe.top_k: 1")
            out.set("moe_apply_probs_on_input", True, "family")

    @staticmethod
    def _llama4(spec: ModelSpec, out: NativeValues) -> None:
        """Llama 4's attention: NoPE layers and the q/k L2 norm through megatron-core's options; chunked
        attention and temperature tuning through Primus's SDPAttention (primus_megatron.layers)."""
        out.set("rotary_interleaved", True, "family")  # Llama 4 rotates interleaved pairs
        if spec.nope_layer_interval is not None:
            out.set("no_rope_freq", [int(not spec.uses_rope(i)) for i in range(spec.num_layers)],
                    "nope_layer_interval")
        # same names in ModelSpec and in this package's native keys
        names = ["qk_l2_norm", "attention_chunk_size", "attn_temperature_tuning"]
        if spec.attn_temperature_tuning:
            names += ["attn_floor_scale", "attn_scale"]
        for name in names:
            out.set(name, getattr(spec, name), name)

    @staticmethod
    def _yarn(spec: ModelSpec, out: NativeValues) -> None:
        """MLA's RoPE scaling: megatron-core's YaRN with mscale (its MLA's softmax scale follows)."""
        scaling = spec.rope_scaling
        assert scaling is not None
        if scaling.type != "yarn":
            raise ConfigError(f"rope_scaling type '{scaling.type}' with multi-latent attention: megatron-core's MLA "
                              "builds yarn only", key="rope_scaling.type", fix="use rope_scaling type yarn")
        out.set("rope_type", "yarn", "rope_scaling.type")
        out.set("rotary_scaling_factor", scaling.factor, "rope_scaling.factor")
        for name, native in (("mscale", "mscale"), ("mscale_all_dim", "mscale_all_dim"),
                             ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"),
                             ("original_max_positions", "original_max_position_embeddings")):
            value = getattr(scaling, name)
            if value is not None:
                out.set(native, value, f"rope_scaling.{name}")

    # ------------------------------------------------------------------ neutral sections

    def translate_sections(self, module: ModuleConfig, model: ModelSpec | None) -> NativeValues:
        from primus_megatron.posttrain.settings import native_to_neutral

        native_to_neutral(module)  # upstream's post-training keys (lora, sft_dataset_name, ...) as neutral fields
        if module.train.compile:
            raise ConfigError("the megatron backend does not torch.compile the model: megatron-core 0.16 compiles "
                              "only its fused kernels (on by default with a GPU, see --dry-run)", key="train.compile",
                              fix="drop train.compile, or use the hf or torchtitan backend")
        out = NativeValues()
        for neutral, native in _TRAIN.items():
            out.set(native, getattr(module.train, neutral), f"train.{neutral}")
        precision = module.train.precision
        if precision is not None and precision != "auto":
            out.set("bf16", precision == "bf16", "train.precision")
            out.set("fp16", precision == "fp16", "train.precision")
        for neutral, native in _PARALLEL.items():
            out.set(native, getattr(module.parallel, neutral), f"parallel.{neutral}")

        data = module.data
        # `mock: true` beside a `path` is refused by core (config.rules.check_data), so neither wins
        # here: each is written as given, and a corpus alone means real data.
        if data.mock is not None:
            out.set("mock_data", data.mock, "data.mock")
        elif data.path:
            out.set("mock_data", False, "data.path")
        out.set("data_path", data.path, "data.path")
        out.set("tokenizer_model", data.tokenizer, "data.tokenizer")
        if data.text_key:
            out.set("json_keys", [data.text_key], "data.text_key")
        if data.valid_fraction is not None:
            valid = round(data.valid_fraction * 100, 4)
            out.set("split", f"{100 - valid:g},{valid:g},0", "data.valid_fraction")

        ckpt = module.checkpoint
        out.set("save_interval", ckpt.interval, "checkpoint.interval")
        out.set("ckpt_keep_last", ckpt.keep_last, "checkpoint.keep_last")
        if ckpt.resume is not None:
            out.set("auto_continue_train", ckpt.resume in ("auto", True), "checkpoint.resume")
        return out

    # ------------------------------------------------------------------ values Megatron-LM derives

    def derive(self, resolved: ResolvedModule) -> NativeValues:
        """What Megatron-LM's argument validation would compute, recorded with the keys it came from:
        the interleaved pipeline's chunk count from upstream's per-stage spelling, batch_p2p_comm from
        overlap_p2p_comm, and real data for an upstream-form `data_path`."""
        n, out = resolved.native, NativeValues()
        chunks = _chunks_from_layers_per_virtual_stage(n)
        if chunks is not None:
            out.set("virtual_pipeline_model_parallel_size", chunks,
                    "num_layers,pipeline_model_parallel_size,num_layers_per_virtual_pipeline_stage")
        if n.get("batch_p2p_comm") is None:
            out.set("batch_p2p_comm", effective_batch_p2p_comm(n), "overlap_p2p_comm")
        # Upstream's preset says mock_data: false, so an upstream file names a data_path and nothing
        # else; this package's preset defaults to mock data so that an experiment with no data runs.
        # Only that default gives way to a data_path: a mock_data the user wrote is judged in check().
        if n.get("data_path") and n.get("mock_data") and _is_package_default(resolved, "mock_data"):
            out.set("mock_data", False, "data_path")
        return out

    # ------------------------------------------------------------------ Megatron's own rules

    def check(self, resolved: ResolvedModule) -> None:
        """Megatron's own format rules on the resolved native keys. Parallel sizes against the world
        size and the model, the pipeline split, batch arithmetic, seq_length against the positions
        and the neutral data paths are core's (primus.config.rules), judged before this runs."""
        n = resolved.native
        for key in ("num_layers", "num_attention_heads", "hidden_size"):
            if n.get(key) is None:
                raise ConfigError(f"{key} is not set: no model", key="model",
                                  fix="set `model:` to a model preset (e.g. llama3_tiny.yaml) or give "
                                      "the model's keys in overrides")
        layers = n["num_layers"]
        tp = n.get("tensor_model_parallel_size") or 1
        pp = n.get("pipeline_model_parallel_size") or 1
        cp = n.get("context_parallel_size") or 1
        ep = n.get("expert_model_parallel_size") or 1
        experts = n.get("num_experts")
        if ep > 1 and not experts:
            raise ConfigError(f"expert_model_parallel_size {ep} needs an MoE model (num_experts is not set)",
                              key="expert_model_parallel_size")
        dp = resolved.world_size // (tp * pp * cp)
        if ep > 1 and dp * cp % ep:
            # megatron-core builds the expert groups inside data x context parallel ranks
            raise ConfigError(f"expert_model_parallel_size {ep} does not divide data x context parallel {dp * cp}",
                              key="expert_model_parallel_size")
        if experts and tp > 1 and not n.get("sequence_parallel"):
            # megatron-core's MoE layer raises this at the first training step
            raise ConfigError(f"an MoE model over tensor parallel {tp} needs sequence parallel", key="sequence_parallel",
                              fix="set sequence_parallel: true")
        self._check_pipeline_schedule(n, pp, layers)
        if experts and n.get("moe_layer_freq") is not None:
            moe_layer_pattern(n["moe_layer_freq"], layers)
        if n.get("moe_router_force_load_balancing") and not experts:
            raise ConfigError("moe_router_force_load_balancing needs an MoE model (num_experts is not set)",
                              key="moe_router_force_load_balancing")
        self._check_recompute_layer_ids(n, pp, layers)
        self._check_layer_spec(n, cp, experts)
        # what cannot work on any GPU (bad values: an fp8 format or recipe that does not exist, fp8 with
        # transformer_impl: local or with Llama 4's SDPA-only attention). Whether TransformerEngine is
        # installed is the compute nodes' business, not this host's (a login node validates and submits
        # GPU jobs without it): the dry run and the trainer judge it where they run
        from primus_megatron.fast_path import decide

        decide(n, "cuda", te=True)
        self._check_trackers(n)
        self._check_data(resolved)

    @staticmethod
    def _check_layer_spec(n: dict[str, Any], cp: int, experts: Any) -> None:
        """What the local layer spec cannot build (the spec a run without TransformerEngine gets, or
        with `transformer_impl: local`): its attentions (megatron-core's DotProductAttention, Primus's
        SDPAttention) do not split the sequence, and its grouped experts (megatron-core's GroupedMLP)
        need the grouped_gemm package. TE's spec has context-parallel attention and TEGroupedMLP."""
        import importlib.util

        te_spec = n.get("transformer_impl") != "local" and importlib.util.find_spec("transformer_engine") is not None
        if cp > 1 and not te_spec:
            raise ConfigError(f"context_parallel_size {cp}: the local layer spec's attention does not split the "
                              "sequence; TransformerEngine's does, and it is not installed or transformer_impl is local",
                              key="context_parallel_size", fix="use parallel.context: 1")
        if experts and n.get("moe_grouped_gemm") and not te_spec and importlib.util.find_spec("grouped_gemm") is None:
            raise ConfigError("moe_grouped_gemm: true builds megatron-core's GroupedMLP without TransformerEngine, "
                              "and its grouped_gemm package is not installed", key="moe_grouped_gemm",
                              fix="set moe_grouped_gemm: false, or install grouped_gemm")

    @staticmethod
    def _check_data(resolved: ResolvedModule) -> None:
        """This trainer's data rules. The neutral `data:` section (a corpus that exists with the
        text key, a tokenizer directory) is core's; a data_path or tokenizer_model written natively,
        which core does not see, is checked here the same way."""
        if resolved.kind == "posttrain":
            return  # records, judged by core (primus.posttrain.rules) and primus_megatron.posttrain.settings
        n, data = resolved.native, resolved.module.data
        data_path, tokenizer = n.get("data_path"), n.get("tokenizer_model")
        if n.get("mock_data"):
            if data_path:
                raise ConfigError("mock_data is true beside data_path: one of them would be ignored",
                                  key="mock_data", fix="set mock_data: false to train on data_path, or drop data_path")
            return
        if not data_path:
            raise ConfigError("no training data", key="data",
                              fix="set data: {mock: true} or data: {path: corpus.jsonl, tokenizer: ./tokenizer}")
        jsonl = str(data_path).endswith((".jsonl", ".json"))
        native_corpus = data_path != data.path
        if jsonl and native_corpus and not Path(data_path).is_file():
            raise ConfigError(f"corpus {data_path} does not exist", key="data_path",
                              fix="point data_path at a local .jsonl file or an indexed-dataset prefix")
        if jsonl and not tokenizer:
            raise ConfigError("a JSONL corpus needs a tokenizer directory",
                              key="tokenizer_model" if native_corpus else "data.tokenizer",
                              fix="set data.tokenizer (or tokenizer_model) to a local directory with tokenizer.json")
        if tokenizer and tokenizer != data.tokenizer and not Path(tokenizer).is_dir():
            raise ConfigError(f"tokenizer directory {tokenizer} does not exist", key="tokenizer_model",
                              fix="this backend reads a local tokenizer directory (tokenizer.json), not a hub id")

    @staticmethod
    def _check_recompute_layer_ids(n: dict[str, Any], pp: int, layers: int) -> None:
        ids = recompute_layer_ids(n.get("recompute_layer_ids"))
        if not ids:
            return
        if n.get("recompute_granularity") != "full":
            raise ConfigError("recompute_layer_ids needs recompute_granularity: full",
                              key="recompute_granularity", fix="set recompute_granularity: full")
        split = n.get("decoder_pipeline_manual_split_list")
        per_stage = max(split) if split else layers // pp
        per_stage //= virtual_pipeline_size(n) or 1
        if max(ids) >= per_stage:
            raise ConfigError(f"recompute_layer_ids {ids}: ids count the layers of one pipeline stage, 0 to "
                              f"{per_stage - 1} here", key="recompute_layer_ids")

    @staticmethod
    def _check_trackers(n: dict[str, Any]) -> None:
        import importlib.util

        from primus_megatron.trackers import PACKAGES

        for flag, package in PACKAGES.items():
            if n.get(flag) is False and importlib.util.find_spec(package) is None:
                raise ConfigError(f"{flag}: false needs the {package} package, which is not installed",
                                  key=flag, fix=f"pip install 'primus-megatron[trackers]' or set {flag}: true")

    @staticmethod
    def _check_pipeline_schedule(n: dict[str, Any], pp: int, layers: int) -> None:
        vpp = virtual_pipeline_size(n)
        if vpp is None:
            return
        if pp < 2:
            raise ConfigError("an interleaved (virtual) pipeline needs pipeline_model_parallel_size >= 2",
                              key="virtual_pipeline_model_parallel_size")
        if layers % (pp * vpp):
            raise ConfigError(f"num_layers {layers} is not divisible by pipeline ({pp}) x virtual stages ({vpp})",
                              key="virtual_pipeline_model_parallel_size")
        if effective_batch_p2p_comm(n):
            # Seen on megatron-core 0.16: same-shape messages to one peer get swapped, so the model
            # trains silently wrong (loss flat, grad norm exploding). Megatron-LM refuses it too.
            raise ConfigError("an interleaved pipeline with batch_p2p_comm: true trains silently wrong",
                              key="batch_p2p_comm", fix="set batch_p2p_comm: false")
        if n.get("overlap_p2p_comm") and n.get("deallocate_pipeline_outputs"):
            raise ConfigError("overlap_p2p_comm with deallocate_pipeline_outputs: true gives NaN losses in an "
                              "interleaved pipeline", key="deallocate_pipeline_outputs",
                              fix="set deallocate_pipeline_outputs: false or overlap_p2p_comm: false")

    def summary(self, resolved: ResolvedModule, platform: Any = None) -> dict[str, Any]:
        """The dry-run lines, with the fast path (spec, attention, precision, fusions, overlap) the run
        takes on `platform` (core's Platform of the target: kind and arch; None: this host's CPU view)."""
        from primus_megatron.fast_path import decide, transformer_engine_installed

        n = resolved.native
        kind, arch = (platform.kind, platform.arch) if platform is not None else ("cpu", None)
        try:
            path = decide(n, kind, arch)
        except ConfigError:
            if kind == "cpu" or transformer_engine_installed():
                raise
            # a GPU target judged from a host without TransformerEngine (a login node): what the run takes
            # where TE is installed, said as such; a node without it refuses fp8 when the run starts
            path = decide(n, kind, arch, te=True)
            path = replace(path, why=path.why + " (if installed on the nodes: it is not on this host)")
        return {
            "parallel": f"tp {n.get('tensor_model_parallel_size')}, pp {n.get('pipeline_model_parallel_size')}, "
                        f"ep {n.get('expert_model_parallel_size')}",
            "batch": f"micro {n.get('micro_batch_size')}, global {n.get('global_batch_size')}, "
                     f"seq {n.get('seq_length')}",
            "steps": n.get("train_iters"),
            "data": "mock" if n.get("mock_data") else n.get("data_path"),
            **path.lines(),
        }


_PRESET_DIR = Path(__file__).resolve().parent / "presets"


def _is_package_default(resolved: ResolvedModule, key: str) -> bool:
    """Whether `key` still holds this package's module-preset value (no file of the user set it)."""
    source = resolved.sources.get((key,))
    return (source is not None and source.layer == "module preset" and source.file is not None
            and Path(source.file).resolve().parent == _PRESET_DIR)


def _chunks_from_layers_per_virtual_stage(n: dict[str, Any]) -> int | None:
    """Megatron-LM's `virtual_pipeline_model_parallel_size` from its other spelling,
    `num_layers_per_virtual_pipeline_stage` (None when that spelling is not used). The trainer reads
    the chunk count only, so without this an upstream file's interleaving would be dropped silently."""
    per_chunk = n.get("num_layers_per_virtual_pipeline_stage")
    layers = n.get("num_layers")
    if per_chunk is None or not isinstance(layers, int):
        return None
    if isinstance(per_chunk, bool) or not isinstance(per_chunk, int) or per_chunk <= 0:
        raise ConfigError(f"must be a positive integer, got {per_chunk!r}", key="num_layers_per_virtual_pipeline_stage")
    pp = n.get("pipeline_model_parallel_size") or 1
    per_stage = layers // pp
    if per_stage % per_chunk:
        raise ConfigError(f"num_layers_per_virtual_pipeline_stage {per_chunk} does not divide the {per_stage} layers "
                          f"of each of the {pp} pipeline stages", key="num_layers_per_virtual_pipeline_stage")
    chunks = per_stage // per_chunk
    written = n.get("virtual_pipeline_model_parallel_size")
    if written is not None and written != chunks:
        raise ConfigError(f"virtual_pipeline_model_parallel_size {written} contradicts "
                          f"num_layers_per_virtual_pipeline_stage {per_chunk} ({per_stage} layers per stage make "
                          f"{chunks} chunks)", key="virtual_pipeline_model_parallel_size",
                          fix="set only one of the two")
    return None if written is not None else chunks


def virtual_pipeline_size(n: dict[str, Any]) -> int | None:
    """Model chunks per pipeline stage, from either of Megatron's two spellings (None: not interleaved)."""
    if n.get("virtual_pipeline_model_parallel_size"):
        return int(n["virtual_pipeline_model_parallel_size"])
    per_stage = n.get("num_layers_per_virtual_pipeline_stage")
    pp = n.get("pipeline_model_parallel_size") or 1
    if per_stage and n.get("num_layers"):
        return n["num_layers"] // pp // per_stage
    return None


def effective_batch_p2p_comm(n: dict[str, Any]) -> bool:
    """Megatron-LM's rule: batch_p2p_comm unset means `not overlap_p2p_comm`."""
    value = n.get("batch_p2p_comm")
    return (not n.get("overlap_p2p_comm")) if value is None else bool(value)


def recompute_layer_ids(value: Any, *, key: str = "recompute_layer_ids") -> list[int]:
    """Upstream accepts a list or a comma-separated string ("0,1,2"); sorted, without duplicates."""
    if value in (None, "", []):
        return []
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        ids = sorted({int(str(item).strip()) for item in items})
    except ValueError:
        raise ConfigError(f"{value!r} is not a list of layer ids", key=key, fix="write a list like [0, 1]") from None
    if ids[0] < 0:
        raise ConfigError(f"{value!r}: layer ids start at 0", key=key)
    return ids


def moe_layer_pattern(value: Any, num_layers: int, *, key: str = "moe_layer_freq") -> int | list[int]:
    """Megatron-LM's `moe_layer_freq`: an int (every n-th layer is MoE), a list with one 0/1 per
    layer, or that list as a Python expression string such as "([0]*3+[1]*27)". The string is read
    by a tiny evaluator of list literals, `+` and `*` (never `eval`)."""
    import ast

    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{value!r} is not a layer frequency or pattern", key=key)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        def evaluate(node: ast.AST) -> Any:
            if isinstance(node, ast.Constant) and type(node.value) is int:
                return node.value
            if isinstance(node, ast.List):
                return [evaluate(item) for item in node.elts]
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
                left, right = evaluate(node.left), evaluate(node.right)
                return left + right if isinstance(node.op, ast.Add) else left * right
            raise ValueError(ast.dump(node))

        try:
            value = evaluate(ast.parse(value.strip(), mode="eval").body)
        except (SyntaxError, ValueError, TypeError):
            raise ConfigError(f"{value!r} is not a layer pattern", key=key,
                              fix='write an int, a list of 0/1, or an expression like "([0]*1+[1]*3)"') from None
    if not isinstance(value, list) or any(item not in (0, 1) or isinstance(item, bool) for item in value):
        raise ConfigError(f"{value!r}: a pattern has one 0 (dense) or 1 (MoE) per layer", key=key)
    if len(value) != num_layers:
        raise ConfigError(f"the pattern has {len(value)} entries for {num_layers} layers", key=key)
    return value
