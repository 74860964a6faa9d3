"""The light half of the tinytorch backend: neutral config in, native keys out, checks first.

Core calls this while resolving (`primus config show`, `primus run --dry-run`, and before every run),
so nothing here may import torch. Core drives it in this order:

  native_keys(preset)      the accepted native keys (default: the module preset's keys)
  translate_model(spec)    a neutral ModelSpec -> native model keys            (layer "model")
  translate_sections(...)  the neutral train/parallel/data/checkpoint sections (layer "neutral")
    ... core applies overrides: and the command line, then checks the neutral rules (parallel
    sizes, heads, batch arithmetic, seq_length vs positions, data paths) on `dimension_keys` ...
  derive(resolved)         values computed from others                         (layer "derived")
  check(resolved)          read-only rules of this format; raise ConfigError(key=<native key>)
  notices(resolved)        one-line warnings

Native keys are flat and named after what the loop in adapter.py reads; presets/pre_trainer.yaml
lists every one with its default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from primus.backends.translator import NativeValues, Translator
from primus.errors import ConfigError

if TYPE_CHECKING:
    from primus.config.resolve import ResolvedModule
    from primus.config.schema import ModuleConfig
    from primus.models.spec import ModelSpec

SCHEDULES = ("cosine", "linear", "constant")
# computed by derive(), never written by a user: check_native_key refuses them with the reason
DERIVED_KEYS = {"grad_accum_steps": "derived from the batch sizes; set train.global_batch_size instead"}


class TinyTorchTranslator(Translator):
    default_module_preset = "pre_trainer.yaml"

    # The native key holding the number of optimizer steps: the worker's progress line and ETA, and
    # core's resume checks ("already finished", "train.steps changed") read it.
    steps_key = "steps"

    # Where core's neutral rules find each dimension in the *resolved* native keys, so an override
    # `micro_batch_size: 3` is judged exactly like `train.micro_batch_size: 3`. Parallel sizes are not
    # named: this backend has no native keys for them, so core reads `parallel.*` itself.
    dimension_keys = {
        "micro_batch_size": "micro_batch_size", "global_batch_size": "global_batch_size",
        "seq_length": "seq_length", "steps": "steps",
        "num_layers": "num_layers", "num_heads": "num_heads", "num_kv_heads": "num_kv_heads",
        "max_positions": "max_position_embeddings",
    }

    # The neutral fields this backend acts on. A field a user sets that is not listed is reported as
    # "not used by the tinytorch backend; ignored" (train.precision, train.eval_interval, ...) instead
    # of vanishing. The parallel sizes are listed because check() reads them (only 1 is supported).
    neutral_fields = frozenset({
        "train.steps", "train.lr", "train.min_lr", "train.warmup_steps", "train.lr_schedule",
        "train.micro_batch_size", "train.global_batch_size", "train.seq_length", "train.seed",
        "train.weight_decay", "train.grad_clip", "train.log_interval",
        "parallel.tensor", "parallel.pipeline", "parallel.context", "parallel.expert", "parallel.fsdp",
        "data.mock", "data.path",
        "checkpoint.interval", "checkpoint.resume", "checkpoint.keep_last",
    })

    def check_native_key(self, path: tuple[str, ...], known: set[str]) -> str | None:
        """A derived key written in overrides or on the command line gets the reason, not 'unknown key'."""
        return DERIVED_KEYS.get(path[0]) or super().check_native_key(path, known)

    # ------------------------------------------------------------------ translation

    def translate_model(self, spec: ModelSpec) -> NativeValues:
        """A dense Llama-style model. Anything this small model cannot build is refused by name (no
        key needed: core names the model preset, or the command line's `model=` item)."""
        if spec.family != "llama":
            raise ConfigError(f"model family '{spec.family}' is not supported by the tinytorch backend",
                              fix="tinytorch builds dense llama models, e.g. model: llama3_tiny.yaml")
        unsupported = [name for name, present in (("moe", spec.moe), ("mla", spec.mla),
                                                  ("rope_scaling", spec.rope_scaling),
                                                  ("qkv_bias", spec.qkv_bias), ("qk_norm", spec.qk_norm)) if present]
        if unsupported:
            raise ConfigError(f"llama model with {', '.join(unsupported)} is not supported by the tinytorch "
                              "backend", fix="use a dense llama preset without those features")
        out = NativeValues()
        # origin: the ModelSpec field each value came from (config show --explain prints it)
        for native_key, value, origin in (
            ("vocab_size", spec.vocab_size, "vocab_size"),
            ("hidden_size", spec.hidden_size, "hidden_size"),
            ("num_layers", spec.num_layers, "num_layers"),
            ("num_heads", spec.num_heads, "num_heads"),
            ("num_kv_heads", spec.kv_heads, "num_kv_heads"),  # kv_heads: the default (= heads) resolved
            ("head_dim", spec.head_size, "head_dim"),
            ("ffn_hidden_size", spec.ffn_hidden_size, "ffn_hidden_size"),
            ("max_position_embeddings", spec.max_position_embeddings, "max_position_embeddings"),
            ("rope_theta", spec.rope_theta, "rope_theta"),
            ("norm_eps", spec.norm_eps, "norm_eps"),
            ("tie_embeddings", spec.tie_embeddings, "tie_embeddings"),
        ):
            out.set(native_key, value, origin)
        return out

    def translate_sections(self, module: ModuleConfig, model: ModelSpec | None) -> NativeValues:
        """Only what the user wrote is translated (unset neutral fields are None, and `set` skips
        None), so the preset's defaults stay where the experiment is silent. It only maps: rules go
        in check(), where core can locate their errors."""
        out, t, c = NativeValues(), module.train, module.checkpoint
        out.set("steps", t.steps, "train.steps")
        out.set("lr", t.lr, "train.lr")
        out.set("min_lr", t.min_lr, "train.min_lr")
        out.set("warmup_steps", t.warmup_steps, "train.warmup_steps")
        out.set("lr_schedule", t.lr_schedule, "train.lr_schedule")
        out.set("micro_batch_size", t.micro_batch_size, "train.micro_batch_size")
        out.set("global_batch_size", t.global_batch_size, "train.global_batch_size")
        out.set("seq_length", t.seq_length, "train.seq_length")
        out.set("seed", t.seed, "train.seed")
        out.set("weight_decay", t.weight_decay, "train.weight_decay")
        out.set("grad_clip", t.grad_clip, "train.grad_clip")
        out.set("log_interval", t.log_interval, "train.log_interval")
        out.set("mock_data", module.data.mock, "data.mock")
        if module.data.path:  # a corpus means "not mock": check() then refuses it at data.path's line
            out.set("mock_data", False, "data.path")
        out.set("save_interval", c.interval, "checkpoint.interval")
        out.set("keep_last", c.keep_last, "checkpoint.keep_last")
        if c.resume is not None:
            out.set("resume", "auto" if c.resume in ("auto", True) else "never", "checkpoint.resume")
        return out

    # ------------------------------------------------------------------ derived values and checks

    def derive(self, resolved: ResolvedModule) -> NativeValues:
        """Gradient accumulation from the batch sizes. Core's rules already checked that the global
        batch is a multiple of micro x data-parallel, so the division is exact. The origins are the
        keys the value came from: `config show --explain grad_accum_steps` prints them, and an error
        raised about this key is placed at their lines."""
        n, out = resolved.native, NativeValues()
        micro, data_parallel = int(n["micro_batch_size"]), resolved.world_size  # no tensor/pipeline here
        global_batch = n["global_batch_size"]
        if global_batch is None:  # unset: one micro batch per rank per step
            global_batch = micro * data_parallel
            out.set("global_batch_size", global_batch, "train.micro_batch_size,world_size")
        out.set("grad_accum_steps", int(global_batch) // (micro * data_parallel),
                "train.global_batch_size,train.micro_batch_size,world_size")
        return out

    def check(self, resolved: ResolvedModule) -> None:
        """Rules of this backend's own format, read-only (core raises if `resolved.native` changes).

        Raise ConfigError with `key=` the native key (or a neutral path such as `parallel.tensor`)
        and no file or line: core finds where that key was set (preset, experiment line, overrides,
        command line, or the keys a derived value came from) and prints it. The neutral rules
        (world size, heads, batch arithmetic, positions, data paths) are core's: not repeated here.
        """
        n = resolved.native
        parallel = resolved.module.parallel
        for name in ("tensor", "pipeline", "context", "expert"):
            if (getattr(parallel, name) or 1) > 1:
                raise ConfigError(f"{name} parallelism is not supported by the tinytorch backend",
                                  key=f"parallel.{name}", fix="tinytorch is data parallel only (DDP)")
        if parallel.fsdp:
            raise ConfigError("FSDP is not supported by the tinytorch backend", key="parallel.fsdp",
                              fix="tinytorch replicates the model (DDP); drop parallel.fsdp")
        if not n["mock_data"]:
            raise ConfigError("tinytorch trains on mock tokens only", key="mock_data",
                              fix="set data: {mock: true}")
        if int(n["num_heads"]) % int(n["num_kv_heads"]):  # an override can break what ModelSpec checked
            raise ConfigError(f"num_heads {n['num_heads']} is not a multiple of num_kv_heads {n['num_kv_heads']}",
                              key="num_heads", fix="each key/value head serves a whole group of query heads")
        if int(n["hidden_size"]) % int(n["num_heads"]) and not n.get("head_dim"):
            raise ConfigError(f"hidden_size {n['hidden_size']} does not divide into {n['num_heads']} heads",
                              key="hidden_size", fix="set head_dim, or a hidden size divisible by num_heads")
        if int(n.get("head_dim") or int(n["hidden_size"]) // int(n["num_heads"])) % 2:
            raise ConfigError("rotary embeddings need an even head dimension", key="head_dim")
        if n["lr_schedule"] not in SCHEDULES:
            raise ConfigError(f"lr_schedule {n['lr_schedule']!r} is not one of {', '.join(SCHEDULES)}",
                              key="lr_schedule")
        if int(n["warmup_steps"]) >= int(n["steps"]):
            raise ConfigError(f"warmup_steps {n['warmup_steps']} leaves no step after warmup (steps "
                              f"{n['steps']})", key="warmup_steps", fix="use fewer warmup steps than steps")
        if n["resume"] not in ("auto", "never"):
            raise ConfigError(f"resume {n['resume']!r} must be auto or never", key="resume")

    def summary(self, resolved: ResolvedModule) -> dict[str, Any]:
        """What `primus run --dry-run` prints about this module."""
        n = resolved.native
        return {
            "builds": f"TinyDecoder, {n['num_layers']} layers x hidden {n['hidden_size']}, vocab {n['vocab_size']}",
            "steps": n["steps"],
            "batch": f"global {n['global_batch_size']} = micro {n['micro_batch_size']} x world "
                     f"{resolved.world_size} x accumulation {n['grad_accum_steps']}",
            "seq": n["seq_length"],
            "parallel": "DDP" if resolved.world_size > 1 else "single process",
        }
