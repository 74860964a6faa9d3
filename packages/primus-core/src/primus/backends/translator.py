"""The light half of a backend: neutral config in, native keys out, checks before anything runs.

A backend subclasses `Translator`; core calls it while resolving a config (`primus config show`,
`primus run --dry-run`), so it must not import the framework. Core drives it in this order
(docs/guide/new-backend.md has the whole contract):

1. `native_keys(preset)`       the native key set, for validating overrides and the command line
2. `translate_model(spec)`     a neutral `ModelSpec` -> native model keys          (layer "model")
3. `translate_sections(...)`   the neutral train/parallel/data/checkpoint sections (layer "neutral")
   ... core applies `overrides:` and the command line, then checks the neutral rules (parallel
   sizes against the world size and the model, batch arithmetic, data and tokenizer paths) on the
   dimensions named by `dimension_keys` (primus.config.rules) ...
4. `derive(resolved)`          values computed from others, each with the keys it came from
                               (layer "derived", e.g. gradient accumulation from the batch sizes)
5. `check(resolved)`           read-only format rules; raise `ConfigError(key=<native key>)` and core
                               turns the key into file, line and layer through provenance
6. `notices(resolved)`         one-line warnings printed before the run
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from primus.errors import ConfigError
from primus.suggest import did_you_mean

if TYPE_CHECKING:
    from primus.config.resolve import ResolvedModule
    from primus.config.schema import ModuleConfig
    from primus.models.spec import ModelSpec

#: the dimensions core's neutral rules read; a translator maps each to the native key holding it
DIMENSIONS = (
    "tensor", "pipeline", "context", "expert", "data",  # parallel sizes
    "micro_batch_size", "global_batch_size", "seq_length", "steps",
    "pipeline_split",  # an explicit list of layers per pipeline stage, when the backend has one
    "num_layers", "num_heads", "num_kv_heads", "num_experts", "max_positions",  # a native model's sizes
)


@dataclass
class NativeValues:
    """Native keys produced by a translation, each with the key(s) it came from.

    An origin is a neutral path (`train.lr`, or a `ModelSpec` field for models), a native key, or
    `world_size`; several origins are joined with commas (`train.global_batch_size,world_size`).
    """

    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def set(self, native_key: str, value: Any, origin: str) -> None:
        """Set `native_key` (dots nest) unless `value` is None."""
        if value is None:
            return
        node = self.values
        *parents, last = native_key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        self.origins[native_key] = origin


class Translator:
    """Override what your backend needs; the defaults suit a flat native key space."""

    #: module preset used when an experiment's module has no `config:`
    default_module_preset: str = "pre_trainer.yaml"
    #: native keys accepted in overrides although no preset lists them
    extra_native_keys: frozenset[str] = frozenset()
    #: native keys accepted for compatibility with upstream Primus but unavailable here, with why.
    #: A truthy value is reported as a notice, not rejected. (Keys the installed framework version
    #: lacks are data: the backend's `upstream_keys.yaml`, see primus.config.upstream.)
    unavailable_keys: dict[str, str] = {}
    #: dimension (see DIMENSIONS) -> the native key (dots walk sections) holding its resolved value.
    #: Core's rules read these, so an override of `tensor_model_parallel_size` is judged like
    #: `parallel.tensor`. An unnamed dimension is read from the neutral sections or the ModelSpec.
    dimension_keys: dict[str, str] = {}
    #: the native key holding the number of optimizer steps (the worker's progress line reads it)
    steps_key: str | None = None
    #: neutral fields this backend honours ("train.lr", or "data.*" for a whole section); None:
    #: whatever `translate_sections` maps. A field set by the user that is not honoured is
    #: reported as ignored rather than dropped silently.
    neutral_fields: frozenset[str] | None = None
    #: processes in the job (--nproc-per-node x --nnodes); core sets it before translating
    world_size: int = 1

    # ---- upstream Primus's files (primus.config.upstream has the two data tables a backend ships)
    #: accept 0 and 1 for a native key whose preset value is a bool (`sequence_parallel: 1`), as
    #: upstream's argument handling does for this framework; core stores them as false and true.
    #: Off: a bool key takes only true or false.
    int_bools: bool = False
    #: neutral model families this backend cannot build, with why; core's refusal says it and names
    #: the installed backends that build the family
    unbuilt_families: dict[str, str] = {}
    #: the upstream `trainer_class` names this backend runs (its module's default trainer); another
    #: name is refused. Empty: the backend has no trainer classes to choose from.
    trainer_classes: frozenset[str] = frozenset()
    #: upstream spellings of native keys that this framework version renamed -> the name here; the
    #: translator accepts them and the adapter reads the value under the new name (docs list them)
    renamed_keys: dict[str, str] = {}

    #: what this backend's post_trainer module (`config: sft_trainer.yaml`) does, from POST_TRAINING
    #: ("full", "lora", "packing", "isolated_packing"); empty: no post-training. Core refuses a
    #: post-training request the backend cannot honour before anything runs.
    post_training: frozenset[str] = frozenset()

    #: the first contract's name for the parallel and batch part of `dimension_keys`; still read
    native_parallel_keys: dict[str, str] = {}

    def native_keys(self, preset: dict[str, Any]) -> set[str]:
        """Top-level native keys this backend accepts (default: the module preset's keys)."""
        return set(preset) | set(self.extra_native_keys) | set(self.unavailable_keys)

    def check_native_key(self, path: tuple[str, ...], known: set[str]) -> str | None:
        """Why `path` is not a valid native key (None when it is)."""
        if path[0] in known:
            return None
        hint = did_you_mean(path[0], known)
        return "unknown key" + (f"; {hint}" if hint else "")

    def translate_model(self, spec: ModelSpec) -> NativeValues:
        raise ConfigError(f"model family '{spec.family}' is not supported by this backend")

    def translate_sections(self, module: ModuleConfig, model: ModelSpec | None) -> NativeValues:
        return NativeValues()

    def derive(self, resolved: ResolvedModule) -> NativeValues:
        """Values computed from others (set with `origin` = the keys they came from, comma-joined).

        Runs after core's neutral rules passed, so the sizes it divides are consistent. Core applies
        the result as the `derived` layer; `config show --explain` names the keys it came from.
        """
        return NativeValues()

    def check(self, resolved: ResolvedModule) -> None:
        """Read-only rules of this backend's format. Raise ConfigError with `key=` the native key
        (`tensor_model_parallel_size`, `training.steps`) or a neutral path (`data.tokenizer`); core
        locates it. Must not change `resolved.native`: computed values belong in `derive`.
        """

    def notices(self, resolved: ResolvedModule) -> list[str]:
        """Human notes shown at resolve time (e.g. upstream flags unavailable on this platform)."""
        notes = []
        for key, why in self.unavailable_keys.items():
            if resolved.native.get(key):
                notes.append(f"{key}: accepted for compatibility but not available here ({why})")
        return notes

    def summary(self, resolved: ResolvedModule) -> dict[str, Any]:
        """A few native values worth printing in `--dry-run`."""
        return {}
