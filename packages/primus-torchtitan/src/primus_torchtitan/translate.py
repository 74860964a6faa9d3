"""The light half of the torchtitan backend: neutral config in, TorchTitan's dotted keys out.

Runs at resolve time (`primus config show`, `--dry-run`), so it imports neither torch nor
torchtitan: the key set and the model flavors come from `torchtitan_config_keys.json`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from primus.backends.translator import NativeValues, Translator
from primus.errors import ConfigError
from primus.suggest import did_you_mean
from primus_torchtitan.config_keys import config_keys, model_flavors

if TYPE_CHECKING:
    from primus.config.resolve import ResolvedModule
    from primus.config.schema import ModuleConfig
    from primus.models.spec import ModelSpec

#: keys Primus adds to TorchTitan's (the adapter consumes them); a trailing "." accepts a subtree
PRIMUS_KEYS = frozenset({
    "model.name", "model.flavor", "model.attn_backend", "model.dim", "model.n_layers", "model.n_heads",
    "model.n_kv_heads", "model.head_dim", "model.vocab_size", "model.hidden_dim", "model.rope_theta",
    "model.max_seq_len", "model.norm_eps", "model.tie_embeddings", "model.qk_norm", "model.rope_scaling.",
    "model.mla.", "model.moe.", "model.mtp_layers", "model.llama4.",
    "optimizer.name", "optimizer.lr", "optimizer.beta1", "optimizer.beta2", "optimizer.eps",
    "optimizer.weight_decay", "training.mock_data", "training.exit_at_step", "dataloader.text_key", "activation_checkpoint.mode",
    "checkpoint.on_damaged",
    "primus_turbo.enable_embedding_autocast",
})

#: upstream Primus names from TorchTitan before 0.3 (upstream pins 0.2.2), and where they live now
UPSTREAM_ALIASES = {
    "training.dataset": "dataloader.dataset",
    "training.dataset_path": "dataloader.dataset_path",
    "training.seed": "debug.seed",
    "training.deterministic": "debug.deterministic",
    "training.debug_moe_force_load_balance": "debug.moe_force_load_balance",  # upstream v26.5.1's spelling
    "activation_checkpoint.selective_ac_option": "activation_checkpoint.mode",
    "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns":
        "activation_checkpoint.force_recompute_mm_shapes_by_fqns",
    "model.hf_assets_path": "hf_assets_path",
    "parallelism.enable_async_tensor_parallel": "compile.enable_async_tensor_parallel",
    **{f"profiling.{k}": f"profiler.{k}" for k in (
        "enable_profiling", "profile_freq", "profiler_active", "profiler_warmup", "save_traces_folder",
        "enable_memory_snapshot", "save_memory_snapshot_folder")},
    **{f"training.dataloader.{k}": f"dataloader.{k}" for k in (
        "num_workers", "persistent_workers", "pin_memory", "prefetch_factor")},
    **{f"validation.{k}": f"validator.{k}" for k in ("enable", "freq", "steps")},
    "validation.dataset": "validator.dataloader.dataset",
    "validation.dataset_path": "validator.dataloader.dataset_path",
    **{f"validation.dataloader.{k}": f"validator.dataloader.{k}" for k in (
        "num_workers", "persistent_workers", "pin_memory", "prefetch_factor")},
}

#: upstream keys accepted so upstream experiment files load, but with no effect here, and why
UNAVAILABLE = {
    "primus_turbo.": "Primus-Turbo kernels are not part of this backend (ROCm-only library)",
    "job.": "TorchTitan 0.3 has no job section; Primus sets the dump folder to the run directory",
    "model.converters": "quantization converters are not wired through Primus yet",
    "optimizer.early_step_in_backward": "not an option of TorchTitan 0.3's optimizer",
    "experimental.": "TorchTitan 0.3 extends configs by subclassing, not custom_args_module",
    "fault_tolerance.": "TorchFT is not driven by Primus",
    "memory_estimation.": "not part of TorchTitan 0.3",
    "float8.": "quantization converters are not wired through Primus yet",
    "mx.": "quantization converters are not wired through Primus yet",
}

FAMILY_TO_MODULE = {"llama": "llama3", "qwen3": "qwen3", "deepseek": "deepseek_v3", "llama4": "llama4"}
#: model modules of this package (TorchTitan's model protocol), importable as `model.name`; built
#: from a model spec only (flavor `custom`)
OWN_MODULES = {"llama4": "primus_torchtitan.models.llama4"}
#: the neutral MoE fields each module reads (model.moe.*)
MOE_FIELDS = ("experts", "top_k", "expert_ffn", "shared_experts", "first_dense_layers", "score_function",
              "expert_bias", "groups", "top_k_groups", "routed_scaling_factor", "norm_topk_prob", "layer_interval",
              "router_aux_loss_coef")
#: `org/name`: a Hugging Face repository (upstream's presets name the tokenizer's this way), as
#: opposed to a local directory (`./tok`, `/data/tok`, `~/tok`, or one that exists)
HUB_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hub_repository(value: Any) -> str | None:
    """The repository id when a tokenizer location is a Hugging Face repository, else None."""
    if not isinstance(value, str) or not HUB_REPO.fullmatch(value) or Path(value).expanduser().exists():
        return None
    return value


def tokenizer_location(native: dict[str, Any]) -> Any:
    """TorchTitan 0.3's `hf_assets_path`, or upstream's `model.hf_assets_path` spelling of it."""
    return native_get(native, "hf_assets_path") or native_get(native, "model.hf_assets_path")
PARALLEL_KEYS = ("data_parallel_replicate_degree", "data_parallel_shard_degree", "context_parallel_degree",
                 "tensor_parallel_degree", "pipeline_parallel_degree", "expert_parallel_degree")
REPLICATE = "parallelism.data_parallel_replicate_degree"
SHARD = "parallelism.data_parallel_shard_degree"
#: the degrees that leave world / (their product) ranks to the two data-parallel degrees
MODEL_PARALLEL_KEYS = ("parallelism.tensor_parallel_degree", "parallelism.pipeline_parallel_degree",
                       "parallelism.context_parallel_degree")
MIN_LR_FACTOR = "lr_scheduler.min_lr_factor"
#: layers a user writes, most recent first: the one to blame when two written values disagree
USER_LAYERS = ("cli", "overrides", "neutral")


def native_get(native: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = native
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def key_matches(dotted: str, pattern: str) -> bool:
    return dotted.startswith(pattern) if pattern.endswith(".") else dotted == pattern


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _model_parallel(native: dict[str, Any]) -> int:
    product = 1
    for key in MODEL_PARALLEL_KEYS:
        product *= int(native_get(native, key, 1) or 1)
    return product


def _latest_written(resolved: ResolvedModule, keys: tuple[str, ...]) -> str:
    """Of `keys`, the one written in the highest user layer (command line, overrides, sections)."""
    def rank(key: str) -> int:
        source = resolved.sources.get(tuple(key.split(".")))
        layer = source.layer if source else ""
        return next((i for i, name in enumerate(USER_LAYERS) if layer.startswith(name)), len(USER_LAYERS))

    return min(keys, key=rank)


def _other_builders(family: str) -> list[str]:
    """The other installed backends that declare `family` (their specs only: nothing heavy loads)."""
    try:
        from primus.backends.discovery import discover

        return sorted(n for n, b in discover().backends.items() if n != "torchtitan" and family in b.spec.model_families)
    except ConfigError:
        return []


#: Llama 4's attention options (model.llama4.*), read by primus_torchtitan.models.llama4
LLAMA4_FIELDS = ("nope_layer_interval", "attention_chunk_size", "qk_l2_norm", "attn_temperature_tuning",
                 "attn_floor_scale", "attn_scale")


def _check_deepseek(spec: ModelSpec) -> None:
    """What TorchTitan's DeepSeek-V3 module cannot express, refused in one line each."""
    if spec.mla is None or spec.moe is None:
        missing = "mla" if spec.mla is None else "moe"
        raise ConfigError(f"TorchTitan's DeepSeek-V3 module builds latent attention with MoE layers; this deepseek "
                          f"model has no {missing}", key=missing)
    moe, scaling = spec.moe, spec.rope_scaling
    if moe.groups is not None and moe.score_function == "softmax":
        raise ConfigError("group-limited routing with softmax scores (DeepSeek-V2) ranks groups by their best expert; "
                          "TorchTitan ranks them by the sum of their top two (DeepSeek-V3's sigmoid routing)",
                          key="moe.groups")
    if moe.layer_interval != 1:
        raise ConfigError("TorchTitan's DeepSeek-V3 module puts routed experts on every layer after the dense ones "
                          f"(moe.layer_interval {moe.layer_interval} is Llama 4's interleaving)", key="moe.layer_interval")
    if moe.shared_expert_ffn not in (None, moe.expert_ffn):
        raise ConfigError("TorchTitan's DeepSeek-V3 shared experts are expert_ffn wide each "
                          f"(moe.shared_expert_ffn {moe.shared_expert_ffn} differs)", key="moe.shared_expert_ffn")
    if moe.expert_bias and moe.score_function != "sigmoid":
        raise ConfigError("the per-expert selection bias goes with sigmoid scores (DeepSeek-V3)", key="moe.expert_bias")
    if scaling is not None and (not scaling.mscale or scaling.mscale != scaling.mscale_all_dim):
        # transformers multiplies cos/sin by mscale(factor, mscale) / mscale(factor, mscale_all_dim), or by
        # mscale(factor) when either is unset; TorchTitan folds YaRN's scale into the softmax scale only
        raise ConfigError(f"YaRN with mscale {scaling.mscale} and mscale_all_dim {scaling.mscale_all_dim} rescales "
                          "the rotary cache, which TorchTitan's RoPE keeps a pure rotation (DeepSeek sets both, equal)",
                          key="rope_scaling.mscale", fix="set rope_scaling.mscale and mscale_all_dim to one value")


#: `dataloader.dataset` of a post_trainer module: core's post-training rows (primus_torchtitan.posttrain)
SFT_DATASET = "primus_sft"
#: the attention backends that keep packed samples apart (TorchTitan's document masks)
DOCUMENT_MASKED = ("flex", "varlen")


def _check_posttrain(resolved: ResolvedModule) -> None:
    data, backend = resolved.module.data, native_get(resolved.native, "model.attn_backend") or "flex"
    if native_get(resolved.native, "validator.enable"):
        raise ConfigError("the torchtitan post_trainer has no validation set (its validator would read TorchTitan's "
                          "default corpus from the hub)", key="validator.enable",
                          fix="remove train.eval_interval; score the exported model with `primus eval`")
    if data.packing and data.packed_attention != "causal" and backend not in DOCUMENT_MASKED:
        raise ConfigError(f"packed samples are kept apart by TorchTitan's document masks, which attention backend "
                          f"'{backend}' does not build", key="model.attn_backend",
                          fix="use model.attn_backend: flex (or varlen), or data.packed_attention: causal")


def _check_llama4(spec: ModelSpec) -> None:
    """Llama 4's MoE as this package's module builds it (transformers' Llama4TextMoe)."""
    moe = spec.moe
    if moe is None:
        return
    if moe.score_function != "sigmoid" or moe.groups is not None or moe.expert_bias or moe.first_dense_layers \
            or moe.shared_experts > 1 or moe.routed_scaling_factor != 1.0:
        raise ConfigError("Llama 4's MoE is sigmoid top-k with at most one shared expert: no groups, expert bias, "
                          "routed scaling or leading dense layers", key="moe")
    if moe.norm_topk_prob:
        raise ConfigError("Llama 4 weights each expert by the sigmoid of its score, without renormalising the top-k",
                          key="moe.norm_topk_prob", fix="set moe.norm_topk_prob: false")


class TorchTitanTranslator(Translator):
    steps_key = "training.steps"
    #: the post_trainer (primus_torchtitan.posttrain): full fine-tuning; packed samples isolated by
    #: TorchTitan's document masks (FlexAttention or varlen), or causal across them
    post_training = frozenset({"full", "packing", "isolated_packing"})
    renamed_keys = UPSTREAM_ALIASES
    #: what core's neutral rules (primus.config.rules) judge, read from the resolved native keys so
    #: `parallelism.tensor_parallel_degree=3` is judged like `parallel.tensor=3`. Not named, so read
    #: from the neutral sections: `data` (TorchTitan splits it in two degrees, replicate x shard,
    #: checked below) and `global_batch_size` (TorchTitan's -1, "local x data-parallel", is not a
    #: size core's rules accept). No pipeline_split: TorchTitan has no per-stage layer list.
    dimension_keys = {
        "tensor": "parallelism.tensor_parallel_degree", "pipeline": "parallelism.pipeline_parallel_degree",
        "context": "parallelism.context_parallel_degree", "expert": "parallelism.expert_parallel_degree",
        "micro_batch_size": "training.local_batch_size", "seq_length": "training.seq_len", "steps": "training.steps",
        "num_layers": "model.n_layers", "num_heads": "model.n_heads", "num_kv_heads": "model.n_kv_heads",
        "max_positions": "model.max_seq_len",
    }
    #: every neutral field translate_sections maps, plus checkpoint.resume, which the adapter also
    #: reads (`never` keeps TorchTitan from loading a checkpoint). Not data.valid_fraction:
    #: validation reads the training corpus (or other synthetic samples), nothing is held out.
    neutral_fields = frozenset({
        "train.steps", "train.lr", "train.min_lr", "train.warmup_steps", "train.lr_schedule",
        "train.micro_batch_size", "train.global_batch_size", "train.seq_length", "train.seed",
        "train.weight_decay", "train.grad_clip", "train.precision", "train.log_interval", "train.eval_interval",
        "train.eval_steps", "train.compile",
        "parallel.tensor", "parallel.pipeline", "parallel.context", "parallel.expert", "parallel.data",
        "parallel.fsdp",
        "data.mock", "data.path", "data.text_key", "data.tokenizer",
        "checkpoint.dir", "checkpoint.interval", "checkpoint.resume", "checkpoint.keep_last",
        "checkpoint.on_damaged",
    })

    def native_keys(self, preset: dict[str, Any]) -> set[str]:
        tops = {k.split(".")[0] for k in [*config_keys(), *PRIMUS_KEYS, *UPSTREAM_ALIASES, *UNAVAILABLE]}
        return set(preset) | tops

    # ------------------------------------------------------------------ keys

    def check_native_key(self, path: tuple[str, ...], known: set[str]) -> str | None:
        dotted = ".".join(path)
        if len(path) == 1 and path[0] in known and path[0] not in self._sections():
            return None  # module_base keys and TorchTitan's top-level scalars
        schema = config_keys()
        if dotted in schema or any(key_matches(dotted, p) for p in (*PRIMUS_KEYS, *UNAVAILABLE)):
            return None
        if dotted in UPSTREAM_ALIASES:
            return None
        # a value inside a mapping- or list-valued key (optimizer_factory_kwargs_by_name.AdamW, ...)
        for cut in range(len(path) - 1, 0, -1):
            parent = ".".join(path[:cut])
            if parent in schema and isinstance(schema[parent], (dict, list)):
                return None
        if dotted in self._sections():  # a whole section given as an empty mapping
            return None
        candidates = sorted({*schema, *(p.rstrip(".") for p in PRIMUS_KEYS), *UPSTREAM_ALIASES})
        hint = did_you_mean(dotted, candidates)
        if hint is None and len(path) > 1:
            section = [c for c in candidates if c.startswith(path[0] + ".")]
            hint = did_you_mean(dotted, section) or (
                f"keys of {path[0]}: " + ", ".join(c.split(".", 1)[1] for c in section[:12])
                + (" ..." if len(section) > 12 else "") if section else None)
        return f"unknown TorchTitan key '{dotted}'" + (f"; {hint}" if hint else "")

    @staticmethod
    def _sections() -> set[str]:
        return {k.split(".")[0] for k in config_keys() if "." in k} | {"model", "primus_turbo"}

    # ------------------------------------------------------------------ model

    def translate_model(self, spec: ModelSpec) -> NativeValues:
        module = FAMILY_TO_MODULE.get(spec.family)
        if module is None:
            raise ConfigError(f"model family '{spec.family}' is not supported by the torchtitan backend "
                              f"(supported: {', '.join(FAMILY_TO_MODULE)})")
        if spec.family == "deepseek":
            _check_deepseek(spec)
        elif spec.family == "llama4":
            _check_llama4(spec)
        dense = spec.family in ("llama", "qwen3")  # the families whose modules have no MoE here
        unsupported = [name for name, on in (("moe", dense and spec.moe), ("mla", dense and spec.mla),
                                             ("qkv_bias", spec.qkv_bias), ("qk_norm", spec.family != "qwen3"
                                                                          and spec.qk_norm)) if on]
        if unsupported:
            others = _other_builders(spec.family)
            raise ConfigError(f"{', '.join(unsupported)} of a {spec.family} model are not built by the torchtitan "
                              "backend from a model spec or Hugging Face weights",
                              fix=(f"train it on {' or '.join(others)}" if others else
                                   "use a TorchTitan flavor natively: model.flavor"))
        out = NativeValues()
        out.set("model.name", module, "family")
        out.set("model.flavor", "custom", "family")
        out.set("model.vocab_size", spec.vocab_size, "vocab_size")
        out.set("model.dim", spec.hidden_size, "hidden_size")
        out.set("model.n_layers", spec.num_layers, "num_layers")
        out.set("model.n_heads", spec.num_heads, "num_heads")
        out.set("model.n_kv_heads", spec.kv_heads, "num_kv_heads")
        out.set("model.head_dim", spec.head_size, "head_dim")
        out.set("model.hidden_dim", spec.ffn_hidden_size, "ffn_hidden_size")
        out.set("model.max_seq_len", spec.max_position_embeddings, "max_position_embeddings")
        out.set("model.rope_theta", spec.rope_theta, "rope_theta")
        out.set("model.norm_eps", spec.norm_eps, "norm_eps")
        out.set("model.tie_embeddings", spec.tie_embeddings, "tie_embeddings")
        if spec.rope_scaling is not None:
            wanted = "yarn" if spec.family == "deepseek" else "llama3"
            if spec.rope_scaling.type != wanted:
                raise ConfigError(f"rope scaling '{spec.rope_scaling.type}' of a {spec.family} model is not supported "
                                  f"by the torchtitan backend ({wanted} scaling is)")
            out.set("model.rope_scaling", spec.rope_scaling.model_dump(exclude_none=True), "rope_scaling")
        if spec.moe is not None:
            out.set("model.moe", {k: getattr(spec.moe, k) for k in MOE_FIELDS}, "moe")
            out.set("model.hidden_dim", spec.ffn_hidden_size, "ffn_hidden_size")
        if spec.mla is not None:
            out.set("model.mla", spec.mla.model_dump(), "mla")
        if spec.mtp_layers:
            out.set("model.mtp_layers", spec.mtp_layers, "mtp_layers")
        if spec.family == "llama4":
            out.set("model.llama4", {k: getattr(spec, k) for k in LLAMA4_FIELDS}, "family")
        return out

    # ------------------------------------------------------------------ neutral sections

    def translate_sections(self, module: ModuleConfig, model: ModelSpec | None) -> NativeValues:
        out = NativeValues()
        t, p, d, c = module.train, module.parallel, module.data, module.checkpoint
        out.set("training.steps", t.steps, "train.steps")
        out.set("optimizer.lr", t.lr, "train.lr")  # train.min_lr becomes a factor of it in derive()
        out.set("lr_scheduler.warmup_steps", t.warmup_steps, "train.warmup_steps")
        if t.lr_schedule == "constant":
            out.set("lr_scheduler.decay_ratio", 0.0, "train.lr_schedule")
        elif t.lr_schedule is not None:
            out.set("lr_scheduler.decay_type", t.lr_schedule, "train.lr_schedule")
        out.set("training.local_batch_size", t.micro_batch_size, "train.micro_batch_size")
        out.set("training.global_batch_size", t.global_batch_size, "train.global_batch_size")
        out.set("training.seq_len", t.seq_length, "train.seq_length")
        out.set("debug.seed", t.seed, "train.seed")
        out.set("compile.enable", t.compile, "train.compile")
        out.set("optimizer.weight_decay", t.weight_decay, "train.weight_decay")
        out.set("training.max_norm", t.grad_clip, "train.grad_clip")
        if t.precision in ("fp32", "bf16", "fp16"):
            dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[t.precision]
            out.set("training.mixed_precision_param", dtype, "train.precision")
        out.set("metrics.log_freq", t.log_interval, "train.log_interval")
        if t.eval_interval is not None:
            out.set("validator.enable", True, "train.eval_interval")
            out.set("validator.freq", t.eval_interval, "train.eval_interval")
        out.set("validator.steps", t.eval_steps, "train.eval_steps")

        out.set("parallelism.tensor_parallel_degree", p.tensor, "parallel.tensor")
        out.set("parallelism.pipeline_parallel_degree", p.pipeline, "parallel.pipeline")
        out.set("parallelism.context_parallel_degree", p.context, "parallel.context")
        out.set("parallelism.expert_parallel_degree", p.expert, "parallel.expert")
        # the data-parallel ranks are replicated (fsdp: false) or sharded; -1 is "what the world
        # size leaves", made a number in derive() (TorchTitan itself accepts -1 for the shard only)
        data = None if p.data in (None, "auto") else p.data
        if p.fsdp is False:
            out.set(REPLICATE, data or -1, "parallel.data" if data else "parallel.fsdp")
            out.set(SHARD, 1, "parallel.fsdp")
        elif p.fsdp is True:
            out.set(REPLICATE, 1, "parallel.fsdp")
            out.set(SHARD, data or -1, "parallel.data" if data else "parallel.fsdp")
        else:
            out.set(SHARD, data, "parallel.data")

        out.set("training.mock_data", d.mock, "data.mock")
        if d.path:
            out.set("training.mock_data", False, "data.path")
            out.set("dataloader.dataset", "primus_jsonl", "data.path")
            out.set("dataloader.dataset_path", d.path, "data.path")
        out.set("dataloader.text_key", d.text_key, "data.text_key")
        out.set("hf_assets_path", d.tokenizer, "data.tokenizer")

        if c.interval is not None or c.resume in ("auto", True):
            out.set("checkpoint.enable", True, "checkpoint.interval" if c.interval else "checkpoint.resume")
        out.set("checkpoint.interval", c.interval, "checkpoint.interval")
        out.set("checkpoint.keep_latest_k", c.keep_last, "checkpoint.keep_last")
        out.set("checkpoint.on_damaged", c.on_damaged, "checkpoint.on_damaged")
        return out

    # ------------------------------------------------------------------ derived values

    def derive(self, resolved: ResolvedModule) -> NativeValues:
        """The data-parallel degree left as -1 (auto) and the minimum-LR factor, each with the keys
        it came from. Core's rules have passed: tensor x pipeline x context divides the world size."""
        out = NativeValues()
        self._derive_renamed(resolved, out)
        self._derive_data_degree(resolved, out)
        self._derive_min_lr_factor(resolved, out)
        if resolved.kind == "posttrain" and resolved.module.data.path:  # core's rows, not the text corpus loader
            out.set("dataloader.dataset", SFT_DATASET, "data.path")
        return out

    @staticmethod
    def _derive_renamed(resolved: ResolvedModule, out: NativeValues) -> None:
        """Upstream's TorchTitan 0.2.2 spelling of a key, as the experiment wrote it, under 0.3's name:
        it replaces the module preset's default there (`training.deterministic: true` reaches
        `debug.deterministic`), and `config show --explain` names the spelling it came from. When the
        new name is written too, the new name wins. `selective_ac_option` is not a rename of `mode`
        (it picks the selective policy): the adapter reads it."""
        for old, new in UPSTREAM_ALIASES.items():
            if old == "activation_checkpoint.selective_ac_option":
                continue
            written = resolved.sources.get(tuple(old.split(".")))
            value = native_get(resolved.native, old)
            if written is None or value is None or written.layer.startswith("module"):
                continue
            current = resolved.sources.get(tuple(new.split(".")))
            if current is not None and not current.layer.startswith("module"):
                continue
            out.set(new, value, old)

    @staticmethod
    def _derive_data_degree(resolved: ResolvedModule, out: NativeValues) -> None:
        """-1 in one data-parallel degree: world / (tensor x pipeline x context x the other one).

        Written as a number, so `config show` and the run's config.yaml say how the ranks are used,
        and a replicated (`parallel.fsdp: false`) run gets the positive degree TorchTitan requires.
        """
        native = resolved.native
        degrees = {key: native_get(native, key, 1) for key in (REPLICATE, SHARD)}
        for key, value in degrees.items():
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
                raise ConfigError(f"must be a positive integer or -1 (auto), got {value!r}", key=key)
        auto = [key for key, value in degrees.items() if value == -1]
        if not auto:
            return
        if len(auto) > 1:
            raise ConfigError("only one of the two data-parallel degrees may be -1 (auto)", key=REPLICATE,
                              fix="set data_parallel_replicate_degree to a number (1: shard every data rank)")
        (auto_key,) = auto
        other = SHARD if auto_key == REPLICATE else REPLICATE
        model_parallel = _model_parallel(native)
        data_ranks = resolved.world_size // model_parallel
        if data_ranks % degrees[other]:
            raise ConfigError(f"{_short(other)} ({degrees[other]}) does not divide the {data_ranks} data-parallel "
                              f"ranks (world size {resolved.world_size} / tensor x pipeline x context "
                              f"{model_parallel})", key=other,
                              fix=f"use a divisor of {data_ranks}, or the number of processes it needs")
        used = [key for key in (other, *MODEL_PARALLEL_KEYS) if native_get(native, key, 1) != 1]
        out.set(auto_key, data_ranks // degrees[other], ",".join([*used, "world_size"]))

    @staticmethod
    def _derive_min_lr_factor(resolved: ResolvedModule, out: NativeValues) -> None:
        """TorchTitan's schedule ends at optimizer.lr x min_lr_factor: train.min_lr over the resolved
        LR, so an LR given natively (`optimizer.lr=...`) is the one divided. A factor written
        natively in overrides or on the command line stays, as native keys win over the sections."""
        min_lr = resolved.module.train.min_lr
        source = resolved.sources.get(tuple(MIN_LR_FACTOR.split(".")))
        if min_lr is None or (source is not None and source.layer in ("overrides", "cli")):
            return
        lr = native_get(resolved.native, "optimizer.lr")
        if isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0:
            out.set(MIN_LR_FACTOR, min_lr / lr, "train.min_lr,optimizer.lr")

    # ------------------------------------------------------------------ checks (read-only)

    def check(self, resolved: ResolvedModule) -> None:
        """TorchTitan's own format rules; the neutral ones (parallel sizes, heads, batch, sequence
        length, corpus and tokenizer paths) are core's, judged on `dimension_keys`."""
        native = resolved.native
        self._check_model(native)
        self._check_data_degrees(resolved)
        self._check_data(resolved)
        on_damaged = native_get(native, "checkpoint.on_damaged")
        if on_damaged not in (None, "fail", "previous"):
            raise ConfigError(f"checkpoint.on_damaged {on_damaged!r} is not one of fail, previous",
                              key="checkpoint.on_damaged")
        if native_get(native, "training.mixed_precision_param") == "float16":
            # FSDP2 casts the parameters to fp16 and TorchTitan has no loss scaler: small gradients
            # underflow to zero and large ones overflow, silently
            raise ConfigError("fp16 needs loss scaling, which TorchTitan does not have",
                              key="training.mixed_precision_param", fix="use train.precision: bf16")
        factor = native_get(native, MIN_LR_FACTOR)
        if isinstance(factor, (int, float)) and not isinstance(factor, bool) and not 0 <= factor <= 1:
            raise ConfigError(f"lr_scheduler.min_lr_factor {factor:g} is outside [0, 1]: the schedule would end "
                              "above the peak learning rate", key=MIN_LR_FACTOR,
                              fix="use a train.min_lr at most the learning rate")

    @staticmethod
    def _check_model(native: dict[str, Any]) -> None:
        model_name, flavor = native_get(native, "model.name"), native_get(native, "model.flavor")
        flavors = {**model_flavors(), **{name: [] for name in OWN_MODULES}}
        if model_name not in flavors:
            raise ConfigError(f"TorchTitan model '{model_name}' is not known", key="model.name",
                              fix=did_you_mean(str(model_name), flavors) or "one of: " + ", ".join(flavors))
        if flavor != "custom" and model_name in OWN_MODULES:
            raise ConfigError(f"TorchTitan model '{model_name}' is primus-torchtitan's and has no named flavors",
                              key="model.flavor", fix=f"use a neutral {model_name} model preset (flavor custom)")
        if flavor != "custom" and flavor not in flavors[model_name]:
            raise ConfigError(f"flavor '{flavor}' does not exist for TorchTitan model '{model_name}'",
                              key="model.flavor",
                              fix=did_you_mean(str(flavor), flavors[model_name])
                              or "flavors: " + ", ".join(flavors[model_name]))
        if flavor == "custom" and not native_get(native, "model.dim"):
            raise ConfigError("model.flavor 'custom' needs the model's arguments (a neutral model preset or "
                              "model.dim, model.n_layers, ...)", key="model.flavor")

    @staticmethod
    def _check_data_degrees(resolved: ResolvedModule) -> None:
        """TorchTitan's layout: replicate x shard x tensor x pipeline x context = the world size.
        Core checked the model-parallel part; derive() filled a -1, so a mismatch is two written
        data degrees that disagree with the world size."""
        native = resolved.native
        replicate, shard = native_get(native, REPLICATE, 1), native_get(native, SHARD, 1)
        model_parallel = _model_parallel(native)
        product = replicate * shard * model_parallel
        if product != resolved.world_size:
            culprit = _latest_written(resolved, (SHARD, REPLICATE))
            raise ConfigError(f"{_short(REPLICATE)} ({replicate}) x {_short(SHARD)} ({shard}) x tensor x pipeline "
                              f"x context ({model_parallel}) multiply to {product}, not the world size "
                              f"{resolved.world_size}", key=culprit,
                              fix="make their product the number of processes, or set one data degree to -1 (auto)")

    @staticmethod
    def _check_data(resolved: ResolvedModule) -> None:
        """A real corpus needs TorchTitan's tokenizer directory (hf_assets_path). Core checked the
        neutral `data.path` and `data.tokenizer`; a value written natively instead is checked here."""
        native, data = resolved.native, resolved.module.data
        if resolved.kind == "posttrain":
            _check_posttrain(resolved)
            return  # core checked the records and the tokenizer
        if native_get(native, "training.mock_data"):
            return
        path = native_get(native, "dataloader.dataset_path")
        if native_get(native, "dataloader.dataset") == "primus_jsonl" and path != data.path \
                and not (path and Path(path).is_file()):
            raise ConfigError(f"data file '{path}' does not exist", key="dataloader.dataset_path")
        assets = tokenizer_location(native)
        if not assets:
            raise ConfigError("a corpus needs a tokenizer", key="data.tokenizer",
                              fix="set data.tokenizer to a local tokenizer directory, or use data: {mock: true}")
        if hub_repository(assets):
            return  # fetched from the Hugging Face hub at run time, as upstream's prepare step does
        if assets != data.tokenizer and not Path(assets).is_dir():
            raise ConfigError(f"tokenizer directory '{assets}' does not exist", key="hf_assets_path",
                              fix="set data.tokenizer to a local tokenizer directory, or use data: {mock: true}")

    def notices(self, resolved: ResolvedModule) -> list[str]:
        notes = []
        from primus.config.yamlfile import flatten

        repo = hub_repository(tokenizer_location(resolved.native))
        if repo and not native_get(resolved.native, "training.mock_data"):
            notes.append(f"hf_assets_path: the tokenizer is read from the Hugging Face repository {repo}, downloaded "
                         "at run time (needs the network; a gated repository needs HF_TOKEN)")

        aux = native_get(resolved.native, "model.moe.router_aux_loss_coef")
        if aux:
            notes.append(f"moe.router_aux_loss_coef {aux:g}: not applied; TorchTitan balances the experts with the "
                         "per-expert selection bias it updates after each step (no auxiliary loss)")
        for path, value in flatten(resolved.native).items():
            dotted = ".".join(path)
            for pattern, why in UNAVAILABLE.items():
                if key_matches(dotted, pattern) and value and dotted != "primus_turbo.enable_embedding_autocast":
                    notes.append(f"{dotted}: accepted for compatibility but not available here ({why})")
        return notes

    def summary(self, resolved: ResolvedModule) -> dict[str, Any]:
        n = resolved.native
        network = f"{native_get(n, 'model.name')} {native_get(n, 'model.flavor')}"
        parallel = ", ".join(f"{k.replace('_degree', '')}={native_get(n, f'parallelism.{k}')}" for k in PARALLEL_KEYS
                             if native_get(n, f"parallelism.{k}", 1) not in (1, -1))
        return {"network": network, "steps": native_get(n, "training.steps"),
                "batch": f"{native_get(n, 'training.local_batch_size')} x seq {native_get(n, 'training.seq_len')}",
                "parallel": parallel or "none", "data": "mock" if native_get(n, "training.mock_data")
                else native_get(n, "dataloader.dataset_path") or native_get(n, "dataloader.dataset"),
                "precision": f"{native_get(n, 'training.mixed_precision_param') or 'bfloat16'} compute, fp32 master",
                "compile": "torch.compile (compile.enable)" if native_get(n, "compile.enable") else "off"}
