"""The light half of a backend: neutral config in, native keys out, checks before anything runs.

A backend subclasses `Translator`; core calls it while resolving a config (`primus config show`,
`primus run --dry-run`), so it must not import the framework.
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


@dataclass
class NativeValues:
    """Native keys produced by a translation, each with the neutral key it came from."""

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
    #: A truthy value is reported as a notice, not rejected.
    unavailable_keys: dict[str, str] = {}
    #: native keys that hold the parallel and batch sizes ("tensor", "pipeline", "context", "expert",
    #: "data", "micro_batch_size", "global_batch_size"); core checks the resolved values of these
    #: against the world size and the model. Unnamed ones are read from the neutral sections.
    native_parallel_keys: dict[str, str] = {}
    #: processes in the job (--nproc-per-node x --nnodes); core sets it before translating, so a
    #: backend can turn a global batch into gradient accumulation steps
    world_size: int = 1

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

    def check(self, resolved: ResolvedModule) -> None:
        """Cross-key checks that need the resolved config (data paths, batch arithmetic, ...).

        Raise ConfigError; run before the run directory exists, so a failure leaves nothing.
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
