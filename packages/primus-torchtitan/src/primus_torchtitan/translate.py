"""The light half of the torchtitan backend: neutral config in, TorchTitan's dotted keys out.

Runs at resolve time (`primus config show`, `--dry-run`), so it imports neither torch nor
torchtitan: the key set and the model flavors come from `torchtitan_config_keys.json`.
"""

from __future__ import annotations

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
    "optimizer.name", "optimizer.lr", "optimizer.beta1", "optimizer.beta2", "optimizer.eps",
    "optimizer.weight_decay", "training.mock_data", "training.exit_at_step", "dataloader.text_key", "activation_checkpoint.mode",
    "primus_turbo.enable_embedding_autocast",
})

#: upstream Primus names from TorchTitan before 0.3, and where they live now
UPSTREAM_ALIASES = {
    "training.dataset": "dataloader.dataset",
    "training.dataset_path": "dataloader.dataset_path",
    "training.seed": "debug.seed",
    "training.deterministic": "debug.deterministic",
    "activation_checkpoint.selective_ac_option": "activation_checkpoint.mode",
}

#: upstream keys accepted so upstream experiment files load, but with no effect here, and why
UNAVAILABLE = {
    "primus_turbo.": "Primus-Turbo kernels are not part of this backend (ROCm-only library)",
    "job.": "TorchTitan 0.3 has no job section; Primus sets the dump folder to the run directory",
    "model.hf_assets_path": "Primus reads the tokenizer from hf_assets_path / data.tokenizer",
    "model.converters": "quantization converters are not wired through Primus yet",
    "optimizer.early_step_in_backward": "not an option of TorchTitan 0.3's optimizer",
    "experimental.": "TorchTitan 0.3 extends configs by subclassing, not custom_args_module",
    "fault_tolerance.": "TorchFT is not driven by Primus",
    "memory_estimation.": "not part of TorchTitan 0.3",
    "float8.": "quantization converters are not wired through Primus yet",
    "mx.": "quantization converters are not wired through Primus yet",
}

FAMILY_TO_MODULE = {"llama": "llama3", "qwen3": "qwen3"}
PARALLEL_KEYS = ("data_parallel_replicate_degree", "data_parallel_shard_degree", "context_parallel_degree",
                 "tensor_parallel_degree", "pipeline_parallel_degree")


def native_get(native: dict[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = native
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def key_matches(dotted: str, pattern: str) -> bool:
    return dotted.startswith(pattern) if pattern.endswith(".") else dotted == pattern


class TorchTitanTranslator(Translator):
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
            hint = ("; for DeepSeek V3 set `model: {name: deepseek_v3, flavor: ...}` natively (untested on CPU)"
                    if spec.family == "deepseek" else "")
            raise ConfigError(f"model family '{spec.family}' is not supported by the torchtitan backend "
                              f"(supported: llama, qwen3){hint}")
        unsupported = [name for name, on in (("moe", spec.moe), ("mla", spec.mla), ("qkv_bias", spec.qkv_bias))
                       if on]
        if spec.family == "llama" and spec.qk_norm:
            unsupported.append("qk_norm")
        if unsupported:
            raise ConfigError(f"{', '.join(unsupported)} of a {spec.family} model preset are not translated "
                              "by the torchtitan backend", fix="use a TorchTitan flavor natively: model.flavor")
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
            if spec.rope_scaling.type != "llama3":
                raise ConfigError(f"rope scaling '{spec.rope_scaling.type}' is not supported by the torchtitan "
                                  "backend (llama3 scaling is)")
            out.set("model.rope_scaling", spec.rope_scaling.model_dump(exclude_none=True), "rope_scaling")
        return out

    # ------------------------------------------------------------------ neutral sections

    def translate_sections(self, module: ModuleConfig, model: ModelSpec | None) -> NativeValues:
        out = NativeValues()
        t, p, d, c = module.train, module.parallel, module.data, module.checkpoint
        out.set("training.steps", t.steps, "train.steps")
        out.set("optimizer.lr", t.lr, "train.lr")
        if t.min_lr is not None and t.lr:
            out.set("lr_scheduler.min_lr_factor", t.min_lr / t.lr, "train.min_lr")
        out.set("lr_scheduler.warmup_steps", t.warmup_steps, "train.warmup_steps")
        if t.lr_schedule == "constant":
            out.set("lr_scheduler.decay_ratio", 0.0, "train.lr_schedule")
        elif t.lr_schedule is not None:
            out.set("lr_scheduler.decay_type", t.lr_schedule, "train.lr_schedule")
        out.set("training.local_batch_size", t.micro_batch_size, "train.micro_batch_size")
        out.set("training.global_batch_size", t.global_batch_size, "train.global_batch_size")
        out.set("training.seq_len", t.seq_length, "train.seq_length")
        out.set("debug.seed", t.seed, "train.seed")
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
        data = None if p.data in (None, "auto") else p.data
        if p.fsdp is False:  # plain data parallel: replicate, no sharding
            out.set("parallelism.data_parallel_replicate_degree", data or -1, "parallel.fsdp")
            out.set("parallelism.data_parallel_shard_degree", 1, "parallel.fsdp")
        else:
            out.set("parallelism.data_parallel_shard_degree", data, "parallel.data")

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
        return out

    # ------------------------------------------------------------------ checks

    def check(self, resolved: ResolvedModule) -> None:
        native, name = resolved.native, resolved.name
        where = f"modules.{name}.overrides"
        model_name, flavor = native_get(native, "model.name"), native_get(native, "model.flavor")
        flavors = model_flavors()
        if model_name not in flavors:
            raise ConfigError(f"TorchTitan model '{model_name}' is not known", key=f"{where}.model.name",
                              fix=did_you_mean(str(model_name), flavors) or "one of: " + ", ".join(flavors))
        if flavor != "custom" and flavor not in flavors[model_name]:
            raise ConfigError(f"flavor '{flavor}' does not exist for TorchTitan model '{model_name}'",
                              key=f"{where}.model.flavor",
                              fix=did_you_mean(str(flavor), flavors[model_name])
                              or "flavors: " + ", ".join(flavors[model_name]))
        if flavor == "custom" and not native_get(native, "model.dim"):
            raise ConfigError("model.flavor 'custom' needs the model's arguments (a neutral model preset or "
                              "model.dim, model.n_layers, ...)", key=f"{where}.model.flavor")
        self._check_parallel(native, resolved.world_size, where)
        self._check_data(native, where)

    @staticmethod
    def _check_parallel(native: dict[str, Any], world_size: int, where: str) -> None:
        degrees = {k: int(native_get(native, f"parallelism.{k}", 1) or 1) for k in PARALLEL_KEYS}
        auto = [k for k, v in degrees.items() if v == -1]
        if len(auto) > 1:
            raise ConfigError("only one parallel degree may be -1 (auto)", key=f"{where}.parallelism")
        fixed = 1
        for _k, v in degrees.items():
            if v != -1:
                fixed *= v
        text = " x ".join(f"{k}={v}" for k, v in degrees.items() if v != 1)
        if auto and world_size % fixed:
            raise ConfigError(f"parallel degrees ({text}) do not divide the world size {world_size}",
                              key=f"{where}.parallelism",
                              fix="change the degrees or the number of processes (--nproc-per-node)")
        if not auto and fixed != world_size:
            raise ConfigError(f"parallel degrees ({text or 'all 1'}) multiply to {fixed}, not the world size "
                              f"{world_size}", key=f"{where}.parallelism",
                              fix="make their product the number of processes, or set one degree to -1")

    @staticmethod
    def _check_data(native: dict[str, Any], where: str) -> None:
        if native_get(native, "training.mock_data"):
            return
        path = native_get(native, "dataloader.dataset_path")
        if native_get(native, "dataloader.dataset") == "primus_jsonl" and not (path and Path(path).is_file()):
            raise ConfigError(f"data file '{path}' does not exist", key=f"{where}.dataloader.dataset_path")
        assets = native_get(native, "hf_assets_path")
        if not assets or not Path(assets).is_dir():
            raise ConfigError(f"tokenizer directory '{assets}' does not exist", key=f"{where}.hf_assets_path",
                              fix="set data.tokenizer to a local tokenizer directory, or use data: {mock: true}")

    def notices(self, resolved: ResolvedModule) -> list[str]:
        notes = []
        from primus.config.yamlfile import flatten

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
                else native_get(n, "dataloader.dataset_path") or native_get(n, "dataloader.dataset")}
