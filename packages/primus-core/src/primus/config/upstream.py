"""Upstream Primus's experiment files, loaded unchanged: per-backend tables shipped as data.

Upstream Primus (github AMD-AGI/Primus) keeps one model preset folder per backend, with its own
names, and its experiment files set native keys of the framework version it pins. A backend package
bridges both with two optional files in its presets package (`BackendSpec.presets`), read here
without importing the backend:

`upstream_models.yaml`: upstream's model preset names for this backend, each mapped to what this
repository builds. Core's model resolution looks a `model:` name up here after the backend's own
`models/` folder and before core's neutral presets::

    upstream: AMD-AGI/Primus v26.5.1, primus/configs/models/torchtitan
    models:
      qwen3_8b: {preset: qwen3_8B.yaml}               # a neutral (or the backend's) model preset
      llama3.1_8B-fp8:                                # a variant: the preset plus the native keys
        preset: llama3.1_8B.yaml                      # its precision implies
        native: {model: {converters: [quantize.linear.float8]}}
      qwen3_235B_A22B_4layer:                         # a trimmed proxy: neutral fields changed
        preset: qwen3_235B_A22B.yaml
        spec: {num_layers: 4}
      deepseek_v3_16b:                                # native keys only (a framework's own flavor)
        family: deepseek
        native: {model: {name: deepseek_v3, flavor: 16B}}
      gpt_oss_20b: {family: gpt_oss}                  # neither: a family this backend does not build

`upstream_keys.yaml`: native keys upstream's framework version knows and the installed one lacks,
grouped by why they have no effect here. Such a key is accepted (its value is kept, so `config show`
explains it) and reported in one warning when its value is on (not null, false, 0 or empty); a key
that is in no table and not the backend's is still an error with a did-you-mean::

    upstream: AMD-AGI/Primus v26.5.1 (Megatron-LM d3528a2)
    installed: megatron-core 0.16
    groups:
      - why: Megatron-LM's legacy MoE path; megatron-core 0.16 has no such switch
        keys: [moe_use_legacy_grouped_gemm]
      - why: Primus-Turbo quantization, not part of this backend
        keys: [quantize.]                             # a trailing dot: every key under the section
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from primus.config.yamlfile import KeyPath, flatten, load_yaml
from primus.errors import ConfigError

if TYPE_CHECKING:
    from primus.backends.discovery import Backend, Discovery
    from primus.backends.translator import Translator

MODELS_FILE = "upstream_models.yaml"
KEYS_FILE = "upstream_keys.yaml"
_ALIAS_FIELDS = {"preset", "spec", "native", "family", "why"}
_MODEL_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class ModelAlias:
    """One upstream model preset name and what it means for this backend."""

    name: str
    file: str  # the table it comes from (provenance of its native values)
    line: int | None
    family: str | None = None
    preset: str | None = None  # a model preset file (neutral or the backend's)
    spec: dict[str, Any] = field(default_factory=dict)  # neutral ModelSpec fields over the preset's
    native: dict[str, Any] = field(default_factory=dict)  # native keys, applied in the model layer
    native_lines: dict[KeyPath, int] = field(default_factory=dict)
    why: str | None = None  # why the family is not built here (shown in the refusal)

    @property
    def built(self) -> bool:
        return self.preset is not None or bool(self.native)


@dataclass(frozen=True)
class CompatGroup:
    why: str
    keys: tuple[str, ...]  # dotted keys; a trailing "." names a whole section
    #: upstream's default of a key, where the table records it: a value equal to it asks for nothing
    defaults: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def asks_for_something(self, key: str, value: Any) -> bool:
        """Whether an experiment's value would change something upstream (worth a warning here)."""
        if value is None:
            return False
        if self.defaults.get(key) is not None:
            return value != self.defaults[key]
        return is_on(value)


class UpstreamTables:
    """A backend's two tables (empty when it ships none), each read on first use: a resolution that
    names no upstream model and sets no key the backend lacks never parses them."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory

    @functools.cached_property
    def _models(self) -> tuple[dict[str, ModelAlias], str]:
        path = self.directory / MODELS_FILE if self.directory else None
        return _load_models(path) if path is not None and path.is_file() else ({}, "")

    @functools.cached_property
    def _keys(self) -> tuple[tuple[CompatGroup, ...], str, str]:
        path = self.directory / KEYS_FILE if self.directory else None
        return _load_keys(path) if path is not None and path.is_file() else ((), "", "")

    @property
    def models(self) -> dict[str, ModelAlias]:
        return self._models[0]

    @property
    def models_source(self) -> str:
        return self._models[1]

    @property
    def groups(self) -> tuple[CompatGroup, ...]:
        return self._keys[0]

    @property
    def keys_source(self) -> str:
        return self._keys[1]

    @property
    def keys_installed(self) -> str:
        return self._keys[2]

    def alias(self, model: str) -> ModelAlias | None:
        """The entry for a `model:` value as written (`llama3.1_8B-fp8.yaml` or without the suffix)."""
        name = model
        for suffix in _MODEL_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        return self.models.get(name)

    def compat(self, dotted: str) -> CompatGroup | None:
        """The group of a dotted native key upstream knows and this backend lacks, or None."""
        for group in self.groups:
            for key in group.keys:
                if dotted == key or dotted + "." == key or dotted.startswith(key if key.endswith(".") else key + "."):
                    return group
        return None

    def flat_keys(self) -> set[str]:
        """The table's keys that are not inside a section (a flat native key space's names)."""
        return {k for group in self.groups for k in group.keys if "." not in k}

    def built_families(self) -> set[str]:
        """Families some entry builds (natively or through a preset)."""
        return {a.family for a in self.models.values() if a.built and a.family}


def _problem(file: Path, line: int | None, key: str, message: str) -> ConfigError:
    return ConfigError(f"upstream table: {message}", file=str(file), line=line, key=key,
                       fix="a packaging error of the backend: fix its table")


def _load_models(path: Path) -> tuple[dict[str, ModelAlias], str]:
    doc = load_yaml(path, what="upstream model table")
    models = doc.data.get("models") or {}
    if not isinstance(models, dict):
        raise _problem(path, doc.line_of(("models",)), "models", "`models` must be a mapping")
    out: dict[str, ModelAlias] = {}
    for name, entry in models.items():
        where = ("models", str(name))
        line = doc.line_of(where)
        if isinstance(entry, str):
            entry = {"preset": entry}
        if not isinstance(entry, dict) or set(entry) - _ALIAS_FIELDS:
            raise _problem(path, line, ".".join(where),
                           f"an entry is a preset name or a mapping of {', '.join(sorted(_ALIAS_FIELDS))}")
        native, spec = entry.get("native") or {}, entry.get("spec") or {}
        if not isinstance(native, dict) or not isinstance(spec, dict):
            raise _problem(path, line, ".".join(where), "`native` and `spec` are mappings")
        if spec and not entry.get("preset"):
            raise _problem(path, line, ".".join(where), "`spec` changes a preset: name one")
        if not (entry.get("preset") or native or entry.get("family")):
            raise _problem(path, line, ".".join(where), "an entry without a preset or native keys names its family")
        lines = {p: doc.line_of((*where, "native", *p)) or line or 0 for p in flatten(native)}
        out[str(name)] = ModelAlias(
            name=str(name), file=str(path), line=line, family=entry.get("family"), preset=entry.get("preset"),
            spec=spec, native=native, native_lines=lines, why=entry.get("why"))
    return out, str(doc.data.get("upstream") or "")


def _load_keys(path: Path) -> tuple[tuple[CompatGroup, ...], str, str]:
    doc = load_yaml(path, what="upstream key table")
    groups = doc.data.get("groups") or []
    if not isinstance(groups, list):
        raise _problem(path, doc.line_of(("groups",)), "groups", "`groups` must be a list")
    out = []
    for i, group in enumerate(groups):
        keys = group.get("keys") if isinstance(group, dict) else None
        if not (isinstance(group, dict) and isinstance(group.get("why"), str) and isinstance(keys, (list, dict))
                and all(isinstance(k, str) and k for k in keys) and set(group) <= {"why", "keys"}):
            raise _problem(path, doc.line_of(("groups",)), f"groups[{i}]",
                           "a group is {why: text, keys: [dotted keys] or {dotted key: upstream's default}}")
        defaults = dict(keys) if isinstance(keys, dict) else {}
        out.append(CompatGroup(why=" ".join(group["why"].split()), keys=tuple(keys), defaults=defaults))
    return tuple(out), str(doc.data.get("upstream") or ""), str(doc.data.get("installed") or "")


@functools.cache
def _tables(preset_dir: str) -> UpstreamTables:
    return UpstreamTables(Path(preset_dir))


def upstream_tables(backend: Backend) -> UpstreamTables:
    """The backend's upstream tables, read once per process from its presets package."""
    return _tables(str(backend.spec.preset_dir()))


def families_built_by(backend: Backend) -> set[str]:
    """The model families a backend builds: its declared neutral families and the families its
    upstream table builds natively (TorchTitan's own DeepSeek V3 flavors, ...)."""
    return set(backend.spec.model_families) | upstream_tables(backend).built_families()


def family_refusal(family: str, backend: Backend, translator: Translator, discovery: Discovery | None, *,
                   upstream_name: str | None = None, why: str | None = None) -> ConfigError:
    """One line: the family, this backend, why (when known), and the installed backends that build it."""
    builders = []
    if discovery is not None:
        builders = sorted(n for n, b in discovery.backends.items() if n != backend.name and family in families_built_by(b))
    reason = why or translator.unbuilt_families.get(family)
    named = f" (upstream's {upstream_name}.yaml)" if upstream_name else ""
    message = f"model family '{family}'{named} is not supported by the {backend.name} backend"
    if reason:
        message += f": {reason}"
    fix = ("built by: " + ", ".join(builders)) if builders else "no installed backend builds it"
    return ConfigError(message, fix=fix)


def is_on(value: Any) -> bool:
    """Whether a value asks for something (null, false, 0 and empty leave a feature off)."""
    return value not in (None, False, 0, "", [], {})


def compat_notices(tables: UpstreamTables, native: dict[str, Any], paths: set[KeyPath], backend: str) -> list[str]:
    """One warning per reason for the upstream keys (`paths`, as the experiment set them) whose value
    upstream would act on (not upstream's default; when the table has none, not null, false, 0 or
    empty): they have no effect here. The others are accepted silently."""
    by_group: dict[CompatGroup, list[str]] = {}
    for path, value in flatten(native).items():
        if path not in paths:
            continue
        dotted = ".".join(path)
        group = tables.compat(dotted)
        if group is not None and group.asks_for_something(dotted, value):
            by_group.setdefault(group, []).append(dotted)
    return [f"{', '.join(keys)}: upstream Primus key{'s' if len(keys) > 1 else ''} with no effect on the {backend} "
            f"backend: {group.why}" for group, keys in by_group.items()]
