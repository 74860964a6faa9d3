"""Resolve an experiment file into one validated config per module (ARCHITECTURE §3.2).

Layers, lowest to highest, each recorded for `primus config show --explain`:
  1 module_base   core's module_base.yaml
  2 module preset the backend preset named by `config:`, with its extends chain
  3 model         the model preset: neutral (translated by the backend) or backend-native
  4 neutral       the `train`, `parallel`, `data`, `checkpoint` sections, translated
  5 overrides     the module's `overrides:` (native keys)
  6 cli           `key=value` from the command line, neutral or native, each item with its own text
then the neutral rules (primus.config.rules) on the resolved dimensions, then
  7 derived       values the translator computes from others (`Translator.derive`), with their origins
and the translator's read-only `check`. Every error a rule or a translator raises names a key; the
resolver turns it into file:line or `command line: key=value` through the recorded sources.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from primus.backends.discovery import Backend, Discovery, discover
from primus.backends.translator import NativeValues, Translator
from primus.config.layered import COMMAND_LINE, Layered, Source, find_file, load_with_extends
from primus.config.rules import AUTO, check_data, check_dimensions, get_path, non_finite, read_dimensions
from primus.config.schema import NEUTRAL_SECTIONS, Experiment, ModuleConfig
from primus.config.upstream import ModelAlias, UpstreamTables, compat_notices, family_refusal, upstream_tables
from primus.config.yamlfile import KeyPath, YamlDoc, flatten, load_yaml, parse_scalar, substitute_env
from primus.errors import ConfigError
from primus.models.spec import ModelSpec
from primus.posttrain.rules import (
    POST_TRAINING_FIELDS,
    POST_TRAINING_PRESET,
    POST_TRAINING_PRESETS,
    check_post_training,
    check_split,
    template_is_file,
)
from primus.suggest import did_you_mean

MODULE_FIELDS = set(ModuleConfig.model_fields)
EXPERIMENT_SCALARS = {"work_group", "user_name", "exp_name", "workspace"}


def core_preset_dir() -> Path:
    return Path(str(resources.files("primus.presets")))


@dataclass
class ResolvedModule:
    name: str
    framework: str
    native: dict[str, Any]
    sources: dict[KeyPath, Source]
    module: ModuleConfig
    model: ModelSpec | None
    model_file: str | None
    experiment_file: str
    world_size: int = 1
    notices: list[str] = field(default_factory=list)
    #: native key -> the neutral path it was translated from (`max_steps` -> `train.steps`,
    #: `model_config.hidden_size` -> `model.hidden_size`)
    neutral_origins: dict[str, str] = field(default_factory=dict)
    #: the native key holding the number of optimizer steps (Translator.steps_key)
    steps_key: str | None = None
    #: the upstream Primus model name `model:` was found under (the backend's upstream table)
    model_alias: str | None = None
    #: `model: {hf_path: DIR}`: the local Hugging Face directory (absolute) the spec was read from;
    #: the adapter loads its weights, when it has some, instead of a random init
    hf_path: str | None = None
    #: "pretrain" or "posttrain" (a post_trainer module: `config: sft_trainer.yaml`)
    kind: str = "pretrain"

    def explain(self, key: str) -> Source | None:
        """The layer, file and line that set the native `key` (dotted), or None."""
        layered = Layered()
        layered.sources = self.sources
        return layered.source_of(key)

    def native_keys_of(self, neutral_path: str) -> list[str]:
        """The native keys a neutral path (`train.steps`) was translated to, or derived from."""
        keys = [k for k, o in self.neutral_origins.items() if neutral_path in o.split(",")]
        keys += [".".join(p) for p, src in self.sources.items()
                 if src.layer == "derived" and neutral_path in src.origins and ".".join(p) not in keys]
        return keys

    @property
    def total_steps(self) -> int:
        """Optimizer steps the run trains for, read from the backend's step key."""
        value = get_path(self.native, self.steps_key) if self.steps_key else None
        if value is None:
            value = self.module.train.steps
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0

    def to_dict(self) -> dict[str, Any]:
        """Serializable form, written into the run directory and read back by workers."""
        return {
            "name": self.name,
            "framework": self.framework,
            "experiment_file": self.experiment_file,
            "world_size": self.world_size,
            "model_file": self.model_file,
            "model": self.model.model_dump(exclude_none=True) if self.model else None,
            "module": self.module.model_dump(exclude_none=True),
            "native": self.native,
            "steps_key": self.steps_key,
            "model_alias": self.model_alias,
            "hf_path": self.hf_path,
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResolvedModule:
        return cls(
            name=data["name"],
            framework=data["framework"],
            native=data["native"],
            sources={},
            module=ModuleConfig.model_validate(data["module"]),
            model=ModelSpec.model_validate(data["model"]) if data.get("model") else None,
            model_file=data.get("model_file"),
            experiment_file=data["experiment_file"],
            world_size=data.get("world_size", 1),
            steps_key=data.get("steps_key"),
            model_alias=data.get("model_alias"),
            hf_path=data.get("hf_path"),
            kind=data.get("kind", "pretrain"),
        )


@dataclass
class ResolvedExperiment:
    file: str
    experiment: Experiment
    modules: dict[str, ResolvedModule]
    backends: dict[str, Backend]
    loaded: LoadedExperiment | None = None

    @property
    def run_dir(self) -> Path:
        e = self.experiment
        return Path(e.workspace).expanduser() / e.work_group / e.user_name / e.exp_name


# --------------------------------------------------------------------------- the command line

MAX_KEY_PARTS = 32  # a dotted command-line key deeper than any real config is a mistake (or an attack)
EXPERIMENT_SECTIONS = {"env", "launch"}  # experiment-level mappings a dotted command-line key may reach


@dataclass(frozen=True)
class CliItem:
    """One `key=value` from the command line, as typed and as parsed."""

    text: str
    path: KeyPath  # inside the module (a `modules.NAME.` prefix is removed) or the experiment
    value: Any
    module: str | None = None  # `modules.NAME.key=...` targets NAME only

    @property
    def source(self) -> Source:
        return Source("cli", COMMAND_LINE, item=self.text)

    def error(self, message: str, fix: str | None = None) -> ConfigError:
        return ConfigError(message, file=COMMAND_LINE, key=self.text, fix=fix)


@dataclass
class CommandLine:
    """The command line's `key=value` items: a layer of their own, above everything in files."""

    items: list[CliItem] = field(default_factory=list)

    @property
    def experiment_items(self) -> list[CliItem]:
        return [i for i in self.items if i.module is None and _experiment_level(i.path)]

    def module_items(self, name: str) -> list[CliItem]:
        return [i for i in self.items if i.module in (None, name) and not (i.module is None and _experiment_level(i.path))]


def _experiment_level(path: KeyPath) -> bool:
    return (len(path) == 1 and path[0] in EXPERIMENT_SCALARS) or (len(path) > 1 and path[0] in EXPERIMENT_SECTIONS)


def parse_command_line(items: list[str]) -> CommandLine:
    """`key=value` items: dotted paths inside the module; a bare native key goes to layer 6."""
    out = CommandLine()
    for text in items:
        key, sep, raw = text.partition("=")
        path = tuple(key.split("."))
        if not sep or not key:
            raise ConfigError("is not key=value", file=COMMAND_LINE, key=text, fix="write e.g. train.steps=10")
        if len(path) > MAX_KEY_PARTS or not all(path):
            raise ConfigError(f"'{key[:80]}' is not a config key ({len(path)} dotted parts)", file=COMMAND_LINE,
                              key=text[:80], fix="write a dotted key such as train.steps")
        module = None
        if path[0] == "modules":
            if len(path) < 3:
                raise ConfigError("names no key inside the module", file=COMMAND_LINE, key=text,
                                  fix="write modules.NAME.KEY=VALUE, e.g. modules.pre_trainer.train.steps=10")
            module, path = path[1], path[2:]
        out.items.append(CliItem(text=text, path=path, value=parse_scalar(raw), module=module))
    return out


def parse_cli_overrides(items: list[str]) -> CommandLine:
    """The first contract's name for `parse_command_line`."""
    return parse_command_line(items)


def _route_to_native(item: CliItem, native_keys: set[str]) -> bool:
    """Whether a module-level item is a native key (else a module field or neutral path).

    `train.steps` is neutral; `overrides.x` and bare unknown names are native; a dotted key whose
    first part is both a neutral section and one of the backend's native sections
    (TorchTitan's `checkpoint.enable`) is native unless the section has that field.
    """
    path = item.path
    if path[0] == "overrides":
        return True
    if len(path) == 1:
        return path[0] not in MODULE_FIELDS
    if path[0] == "model":
        return True  # model.flavor=8B: a native section (an inline model is written in the file)
    section = NEUTRAL_SECTIONS.get(path[0])
    if section is not None:
        return path[0] in native_keys and path[1] not in section.model_fields
    return path[0] not in MODULE_FIELDS


def _native_path(item: CliItem) -> KeyPath:
    return item.path[1:] if item.path[0] == "overrides" else item.path


def _set_path(target: dict[str, Any], path: KeyPath, value: Any) -> None:
    for part in path[:-1]:
        child = target.get(part)
        if not isinstance(child, dict):
            child = target[part] = {}
        target = child
    target[path[-1]] = value


# --------------------------------------------------------------------------- pydantic errors


def _validation_error(exc: ValidationError, *, doc: YamlDoc, prefix: KeyPath, known_by_prefix: Any,
                      items: list[CliItem], item_prefix: KeyPath = ()) -> ConfigError:
    """One line for a pydantic error: at the command-line item that set it, else at the file's line."""
    err = exc.errors()[0]
    loc = tuple(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        known = known_by_prefix(loc[:-1])
        hint = did_you_mean(loc[-1], known) if known else None
        message = "unknown key" + (f"; {hint}" if hint else "")
        fix = None if hint else ("known keys: " + ", ".join(sorted(known)) if known else None)
    elif kind == "missing":
        message, fix = "required key is missing", None
    else:
        message, fix = err["msg"].replace("Value error, ", ""), None
        if "input" in err and not isinstance(err["input"], dict):
            message += f" (got {err['input']!r})"
    for item in items:
        path = (*item_prefix, *item.path)
        if loc[: len(path)] == path or path[: len(loc)] == loc:
            return item.error(message, fix)
    key_path = (*prefix, *loc)
    return ConfigError(message, file=str(doc.path), line=doc.line_of(key_path), key=".".join(key_path), fix=fix)


def _known_fields(model_cls: type) -> Any:
    """For a pydantic model class: the known field names at a location inside it."""
    from pydantic import BaseModel

    def known(loc: tuple[str, ...]) -> set[str]:
        cls: Any = model_cls
        for part in loc:
            if cls is Experiment and part == "modules":
                cls = "modules"
                continue
            if cls == "modules":
                cls = ModuleConfig
                continue
            f = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
            if f is None:
                return set()
            ann = f.annotation
            cls = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)
                        and issubclass(a, BaseModel)), ann)
        return set(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else set()

    return known


# --------------------------------------------------------------------------- loading (once per command)


@dataclass
class LoadedExperiment:
    """The experiment file parsed once, with the command line beside it (not merged into it).

    Launch options (`--image`, `--srun-arg`, ...) change `experiment` in place, so what the run
    directory records is exactly what will run.
    """

    doc: YamlDoc
    experiment: Experiment
    cli: CommandLine

    @property
    def path(self) -> Path:
        return self.doc.path


def load_experiment(path: str | Path, cli: CommandLine | list[str] | None = None,
                    environ: dict[str, str] | None = None) -> LoadedExperiment:
    """Parse the experiment file and validate its skeleton; command-line items are checked here
    (module names, experiment-level keys) and applied to each module when it is resolved."""
    path = Path(path)
    env = dict(os.environ) if environ is None else environ
    command_line = cli if isinstance(cli, CommandLine) else parse_command_line(list(cli or []))
    doc = load_yaml(path, what="experiment file")
    substitute_env(doc, env)
    if "extends" in doc.data:
        data, _ = load_with_extends(path, search_dirs=[], environ=env, what="experiment file")
        doc.data = data
    data = copy.deepcopy(doc.data)
    modules = data.get("modules")
    for item in command_line.items:
        if item.module is not None and not (isinstance(modules, dict) and item.module in modules):
            names = sorted(modules) if isinstance(modules, dict) else []
            raise item.error(f"no module '{item.module}' in {path}",
                             did_you_mean(item.module, names) or f"modules there: {', '.join(names) or 'none'}")
    for item in command_line.experiment_items:
        _set_path(data, item.path, item.value)
    try:
        experiment = Experiment.model_validate(data)
    except ValidationError as exc:
        post = _post_training_module(modules)
        if post is not None and not _has_post_training(modules[post[0]]):
            # upstream's post-training files carry keys of their own (`lora:`, ...): what to say
            # first is that post-training does not exist here, not which key is unknown
            name, config = post
            raise post_training_error(name, modules[name].get("framework"), config).located(
                file=str(path), line=doc.line_of(("modules", name)) or doc.line_of(("extends",)),
                key=f"modules.{name}") from None
        raise _validation_error(exc, doc=doc, prefix=(), known_by_prefix=_known_fields(Experiment),
                                items=command_line.experiment_items) from None
    return LoadedExperiment(doc=doc, experiment=experiment, cli=command_line)


def module_kind(name: str, config: str | None) -> str:
    """`posttrain` for a post_trainer module (by name, or its `sft_trainer.yaml` preset), else `pretrain`."""
    if name == "post_trainer" or (isinstance(config, str) and Path(config).stem in POST_TRAINING_PRESETS):
        return "posttrain"
    return "pretrain"


def _has_post_training(module: Any) -> bool:
    """Whether the raw module's backend (installed) ships a post-training module preset."""
    framework = module.get("framework") if isinstance(module, dict) else None
    if not isinstance(framework, str):
        return False
    try:
        backend = discover().backends.get(framework)
    except ConfigError:
        return False
    return backend is not None and (backend.spec.preset_dir() / POST_TRAINING_PRESET).is_file()


def _post_training_module(modules: Any) -> tuple[str, str] | None:
    """(name, config) of the first post-training module of a raw `modules:` mapping, if any."""
    if not isinstance(modules, dict):
        return None
    for name, module in modules.items():
        config = module.get("config") if isinstance(module, dict) else None
        if name == "post_trainer" or (isinstance(config, str) and Path(config).stem in POST_TRAINING_PRESETS):
            return str(name), str(config or "sft_trainer.yaml")
    return None


def post_training_error(module: str, framework: Any, config: str) -> ConfigError:
    """A post-training module (SFT, LoRA) on a backend that has none: a module kind of its own, not a typo."""
    backend = f"the {framework} backend" if isinstance(framework, str) else "no backend"
    return ConfigError(f"{backend} has no post-training: no '{config}' module preset for module '{module}'",
                       fix="run it on a backend with post-training (`primus backends` lists them), or run a "
                           "pre_trainer module (config: pre_trainer.yaml)")


# --------------------------------------------------------------------------- the model


def _via_extends(sources: dict[KeyPath, Source], layer: str) -> dict[KeyPath, Source]:
    """Name the layer of each value, saying when it came from a file the preset `extends`."""
    return {p: Source(f"{layer} via extends" if src.layer == "extends" else layer, src.file, src.line)
            for p, src in sources.items()}


def _is_experiment_file(path: Path) -> bool:
    """A YAML file with `modules:` is an experiment, never a model preset (a copy of an example
    saved beside it must not be picked up as `model: llama3_tiny.yaml`)."""
    try:
        return "modules" in load_yaml(path, what="model preset").data
    except ConfigError:
        return False


@dataclass
class _Model:
    """The module's model: a neutral spec (translated by the backend), native keys, or both (an
    upstream name that means a neutral preset plus the precision keys its variant implies)."""

    spec: ModelSpec | None = None
    native: dict[str, Any] = field(default_factory=dict)
    sources: dict[KeyPath, Source] = field(default_factory=dict)  # of the spec's fields
    native_sources: dict[KeyPath, Source] = field(default_factory=dict)
    file: str | None = None
    alias: ModelAlias | None = None
    hf_path: str | None = None


def _hf_model(value: Any, relative_to: Path, key: str, backend: Backend) -> _Model | None:
    """`model: {hf_path: DIR}`: the spec from DIR/config.json, its weights checked against it (a
    missing or misshapen tensor is an error now, not in the middle of a launch). None: a hub id
    (`org/name`, no such local directory), which only the hf backend resolves, natively."""
    from primus.models.hf import CONFIG_FILE, check_weights, read_hf_config, read_weight_index, spec_from_hf

    path = Path(str(value)).expanduser()
    path = path if path.is_absolute() else relative_to / path
    text = str(value)
    if not path.exists() and backend.name == "hf" and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        return None
    config = read_hf_config(path, key=key)
    config_file = str(path.resolve() / CONFIG_FILE)
    spec = spec_from_hf(config, file=config_file)
    if read_weight_index(path, key):
        check_weights(path, spec, key)
    sources = {p: Source("model", config_file) for p in flatten(spec.model_dump(exclude_none=True))}
    return _Model(spec=spec, sources=sources, file=config_file, hf_path=str(path.resolve()))


def _model_for(module: ModuleConfig, name: str, doc: YamlDoc, backend: Backend, environ: dict[str, str] | None,
               cli_model: CliItem | None, translator: Translator, discovery: Discovery | None) -> _Model:
    """The module's model. A name is looked up next to the experiment, in the backend's `models/`,
    in the backend's table of upstream Primus names (primus.config.upstream), then in core's presets."""
    key = f"modules.{name}.model"

    def located(exc: ConfigError) -> ConfigError:
        if cli_model is not None:
            return cli_model.error(exc.message, exc.fix)
        return exc.located(file=str(doc.path), line=doc.line_of(("modules", name, "model")), key=key)

    if module.model is None:
        return _Model()
    backend_models, core_models = backend.spec.preset_dir() / "models", core_preset_dir() / "models"
    search = [backend_models, core_models]
    alias: ModelAlias | None = None
    if isinstance(module.model, dict) and set(module.model) == {"hf_path"}:
        relative_to = Path.cwd() if cli_model is not None else doc.path.parent
        try:
            hf = _hf_model(module.model["hf_path"], relative_to, f"{key}.hf_path", backend)
        except ConfigError as exc:
            if exc.file:  # config.json's own key
                raise
            raise located(exc) from None
        if hf is not None:
            return hf
    if isinstance(module.model, dict):
        data, file = dict(module.model), str(doc.path)
        line_base = ("modules", name, "model")
        sources = {p: Source("model", file, doc.line_of((*line_base, *p))) for p in flatten(data)}
    else:
        relative_to = Path.cwd() if cli_model is not None else doc.path.parent
        found = find_file(module.model, relative_to=relative_to, search_dirs=[])
        if found is not None and (found == doc.path.resolve() or _is_experiment_file(found)):
            found = None  # an experiment named like its model preset (examples/hf/llama3_tiny.yaml)
        found = found or find_file(module.model, relative_to=None, search_dirs=[backend_models])
        if found is None:
            alias = upstream_tables(backend).alias(module.model)
            if alias is not None and not alias.built:
                raise located(family_refusal(alias.family or "?", backend, translator, discovery,
                                             upstream_name=alias.name, why=alias.why))
            if alias is not None and alias.preset is None:  # native keys only
                return _Model(native=copy.deepcopy(alias.native), file=alias.file, alias=alias,
                              native_sources=_alias_sources(alias))
        model_name = alias.preset if alias is not None else module.model
        found = found or find_file(model_name, relative_to=None, search_dirs=search)
        if found is None:
            available = sorted({p.name for d in search if d.is_dir() for p in d.glob("*.yaml")})
            available += sorted(f"{n}.yaml" for n in upstream_tables(backend).models)
            hint = did_you_mean(module.model, available)
            fix = hint or "looked next to the experiment and in the model presets; `primus presets` lists them"
            if alias is not None:  # the table names a preset that is not installed: a packaging error
                fix = f"upstream name {alias.name} maps to '{alias.preset}' ({alias.file}:{alias.line})"
            raise located(ConfigError(f"model preset '{module.model}' not found", fix=fix))
        data, sources = load_with_extends(found, search_dirs=search, environ=environ, what="model preset")
        sources = _via_extends(sources, "model")
        file = str(found)
        if alias is not None and alias.spec:
            data = {**data, **copy.deepcopy(alias.spec)}
            sources.update({p: Source("model", alias.file, alias.line) for p in flatten(alias.spec)})
    native = copy.deepcopy(alias.native) if alias is not None else {}
    native_sources = _alias_sources(alias) if alias is not None else {}
    if "family" not in data:
        return _Model(native={**data, **native}, native_sources={**sources, **native_sources}, file=file, alias=alias)
    try:
        spec = ModelSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(str(p) for p in err["loc"])
        src = sources.get(loc) or next(iter(sources.values()), Source("model", file))
        msg = "unknown model key" if err["type"] == "extra_forbidden" else err["msg"].replace("Value error, ", "")
        hint = did_you_mean(loc[-1], ModelSpec.model_fields) if err["type"] == "extra_forbidden" and loc else None
        raise ConfigError(msg, file=src.file, line=src.line, key=".".join(loc) or key, fix=hint) from None
    return _Model(spec=spec, native=native, sources=sources, native_sources=native_sources, file=file, alias=alias)


def _alias_sources(alias: ModelAlias) -> dict[KeyPath, Source]:
    """Native values of an upstream name come from its line in the backend's table."""
    return {p: Source("model", alias.file, line) for p, line in alias.native_lines.items()}


# --------------------------------------------------------------------------- native values


def _type_name(value: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "mapping"}.get(
        type(value), type(value).__name__)


def _type_mismatch(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return False
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) != isinstance(value, bool)
    if isinstance(default, (int, float)) and isinstance(value, (int, float)):
        return isinstance(default, int) and isinstance(value, float) and not value.is_integer()
    kinds = (str, list, dict, int, float)
    return next((k for k in kinds if isinstance(default, k)), None) != next(
        (k for k in kinds if isinstance(value, k)), None)


def _check_native(values: dict[str, Any], *, known: set[str], preset: dict[str, Any], translator: Translator,
                  where: Any, tables: UpstreamTables | None = None, upstream_keys: set[KeyPath] | None = None) -> None:
    """Native keys against the backend's key set and the preset's types; `where(path)` locates.

    A key of the backend's upstream key table (one upstream's framework knows and this one lacks) is
    accepted as it is and added to `upstream_keys`; core reports it with its reason after resolving,
    and suggests it for a typo. With `translator.int_bools`, 0 and 1 for a bool key become false and
    true in `values` (upstream's argument handling).
    """
    for path, value in flatten(values).items():
        why = translator.check_native_key(path, known)
        if why and tables is not None:  # the table is read only when a key is not the backend's own
            if tables.compat(".".join(path)) is not None:
                if upstream_keys is not None:
                    upstream_keys.add(path)
                continue
            why = translator.check_native_key(path, known | tables.flat_keys())
        if why:
            raise where(path, why, None)
        if non_finite(value):
            raise where(path, f"must be a finite number, got {value!r}", "write a finite value")
        default: Any = preset
        for part in path:
            default = default.get(part) if isinstance(default, dict) else None
        if translator.int_bools and isinstance(default, bool) and type(value) is int and value in (0, 1):
            _set_path(values, path, bool(value))
            continue
        if _type_mismatch(default, value):
            raise where(path, f"expects {_type_name(default)}, got {_type_name(value)} {value!r}",
                        f"the preset's value is {default!r}")


# --------------------------------------------------------------------------- resolution


def _absolute(value: str | None, base: Path) -> str | None:
    if not value:
        return value
    p = Path(os.path.expandvars(value)).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


_PATH_FIELDS = (("data", "path"), ("data", "tokenizer"), ("checkpoint", "dir"))


def _absolute_paths(module: ModuleConfig, base: Path, cli_paths: dict[KeyPath, CliItem]) -> ModuleConfig:
    """Relative data, tokenizer and checkpoint paths: relative to the experiment file's folder when
    written there, to the working directory when given on the command line (as a shell user means)."""
    updates: dict[str, Any] = {}
    for section, key in _PATH_FIELDS:
        origin = Path.cwd() if (section, key) in cli_paths else base
        current = updates.get(section, getattr(module, section))
        updates[section] = current.model_copy(update={key: _absolute(getattr(current, key), origin)})
    template = module.data.chat_template
    if template is not None and template_is_file(template):  # a .jinja file, not a name or inline Jinja
        origin = Path.cwd() if ("data", "chat_template") in cli_paths else base
        updates["data"] = updates["data"].model_copy(update={"chat_template": _absolute(template, origin)})
    return module.model_copy(update=updates)


def _module_config(name: str, loaded: LoadedExperiment, items: list[CliItem]) -> ModuleConfig:
    """The module as written, with the command line's module-level items applied on top."""
    raw = loaded.doc.data.get("modules", {}).get(name) or {}
    data = copy.deepcopy(raw) if isinstance(raw, dict) else {}
    for item in items:
        _set_path(data, item.path, item.value)
    try:
        return ModuleConfig.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, doc=loaded.doc, prefix=("modules", name), known_by_prefix=_known_fields(ModuleConfig),
                                items=items) from None


class _Locator:
    """Turns a key named by a rule or a translator into file:line or the command line, through
    provenance, the same way for every backend."""

    def __init__(self, name: str, doc: YamlDoc, layered: Layered, neutral_origins: dict[str, str],
                 cli_paths: dict[KeyPath, CliItem]) -> None:
        self.name, self.doc, self.layered = name, doc, layered
        self.neutral_origins, self.cli_paths = neutral_origins, cli_paths

    def _neutral(self, path: KeyPath, message: str, fix: str | None, shown: str | None = None) -> ConfigError:
        for cli_path, item in self.cli_paths.items():
            if cli_path[: len(path)] == path or path[: len(cli_path)] == cli_path:
                return item.error(message, fix)
        full = ("modules", self.name, *path)
        key = ".".join(full) + (f" ({shown})" if shown else "")
        return ConfigError(message, file=str(self.doc.path), line=self.doc.line_of(full), key=key, fix=fix)

    def locate(self, exc: ConfigError) -> ConfigError:
        if exc.file:
            return exc
        key = exc.key or ""
        prefix = f"modules.{self.name}."
        key = key[len(prefix):] if key.startswith(prefix) else key
        native_key = key[len("overrides."):] if key.startswith("overrides.") else key
        src = self.layered.source_of(native_key) if native_key else None
        if src is None:
            path = tuple(key.split(".")) if key else ()
            if path and path[0] in MODULE_FIELDS:
                return self._neutral(path, exc.message, exc.fix)
            return ConfigError(exc.message, file=str(self.doc.path), line=self.doc.line_of(("modules", self.name)),
                               key=f"modules.{self.name}" + (f".{key}" if key else ""), fix=exc.fix)
        if src.layer == "derived":
            shown = f"{native_key} (derived from {', '.join(src.origins)})"
            for origin in src.origins:
                origin_path = tuple(origin.split("."))
                if origin_path[0] in NEUTRAL_SECTIONS and len(origin_path) == 2:
                    located = self._neutral(origin_path, exc.message, exc.fix, shown=native_key)
                    if located.file == COMMAND_LINE:
                        return located
                    return ConfigError(exc.message, file=located.file, line=located.line, key=shown, fix=exc.fix)
            return ConfigError(exc.message, file=str(self.doc.path), line=None, key=shown, fix=exc.fix)
        if src.item is not None:
            return ConfigError(exc.message, file=COMMAND_LINE, key=src.item, fix=exc.fix)
        origin = self.neutral_origins.get(native_key)
        if src.layer.startswith("neutral") and origin:
            return self._neutral(tuple(origin.split(".")), exc.message, exc.fix,
                                 shown=native_key if native_key != origin else None)
        if src.layer == "overrides":
            native_key = f"modules.{self.name}.overrides.{native_key}"
        return ConfigError(exc.message, file=src.file, line=src.line, key=native_key, fix=exc.fix)


# neutral fields core itself acts on, whatever the backend maps: the checkpoint folder (the run
# context hands it to the adapter) and the data-parallel size (checked against the world size)
CORE_CONSUMED_FIELDS = frozenset({"checkpoint.dir", "parallel.data", "checkpoint.export"}) | POST_TRAINING_FIELDS


def _honoured(translator: Translator, origins: dict[str, str]) -> set[str]:
    declared = translator.neutral_fields
    if declared is not None:
        return set(declared)
    return {o for origin in origins.values() for o in origin.split(",")}


def _ignored_neutral_fields(module: ModuleConfig, translator: Translator, origins: dict[str, str]) -> list[str]:
    """Neutral fields the user set that this backend does not use."""
    honoured = _honoured(translator, origins) | CORE_CONSUMED_FIELDS
    out = []
    for section in NEUTRAL_SECTIONS:
        for field_name in getattr(module, section).model_dump(exclude_none=True):
            path = f"{section}.{field_name}"
            if path not in honoured and f"{section}.*" not in honoured:
                out.append(path)
    return out


def resolve_module(name: str, loaded: LoadedExperiment, discovery: Discovery, world_size: int,
                   environ: dict[str, str] | None) -> ResolvedModule:
    doc, file = loaded.doc, str(loaded.doc.path)
    items = loaded.cli.module_items(name)
    field_items = [i for i in items if len(i.path) == 1 and i.path[0] in MODULE_FIELDS]
    first = _module_config(name, loaded, field_items)  # framework, config, model may come from the command line
    framework_item = next((i for i in field_items if i.path == ("framework",)), None)
    try:
        backend = discovery.get(first.framework, file=file, key=f"modules.{name}.framework")
    except ConfigError as exc:
        if framework_item:
            raise framework_item.error(exc.message, exc.fix) from None
        raise exc.located(line=doc.line_of(("modules", name, "framework"))) from None
    translator: Translator = backend.spec.load_translator()
    translator.world_size = world_size
    tables = upstream_tables(backend)
    layered = Layered()

    # 1 module_base
    base_file = core_preset_dir() / "module_base.yaml"
    base, base_sources = load_with_extends(base_file, search_dirs=[], environ=environ)
    layered.apply(base, "module_base", sources=base_sources)

    # 2 module preset
    kind = module_kind(name, first.config)
    preset_name = first.config or (POST_TRAINING_PRESET if kind == "posttrain" else translator.default_module_preset)
    search = [backend.spec.preset_dir(), core_preset_dir()]
    config_item = next((i for i in field_items if i.path == ("config",)), None)
    preset_path = find_file(preset_name, relative_to=Path.cwd() if config_item else doc.path.parent,
                            search_dirs=search)
    if preset_path is None:
        available = sorted(p.name for p in backend.spec.preset_dir().glob("*.yaml")
                           if not p.name.startswith("upstream_"))
        message = f"module preset '{preset_name}' not found for backend '{backend.name}'"
        fix = did_you_mean(preset_name, available) or "available: " + (", ".join(available) or "none")
        if _post_training_module({name: {"config": preset_name}}) is not None:
            refusal = post_training_error(name, backend.name, preset_name)
            message, fix = refusal.message, refusal.fix
        if config_item:
            raise config_item.error(message, fix)
        raise ConfigError(message, file=file, line=doc.line_of(("modules", name, "config")),
                          key=f"modules.{name}.config", fix=fix)
    preset, preset_sources = load_with_extends(preset_path, search_dirs=search, environ=environ,
                                               what="module preset")
    layered.apply(preset, "module preset", sources=_via_extends(preset_sources, "module preset"),
                  keep_layer_names=True)
    known = translator.native_keys(layered.data)
    preset_values = dict(layered.data)
    upstream_keys: set[KeyPath] = set()  # keys of the upstream key table the experiment set

    # the command line: module fields and neutral paths vs native keys, now that the keys are known
    native_items = [i for i in items if i not in field_items and _route_to_native(i, known)]
    module_items = [i for i in items if i not in native_items]
    module = _module_config(name, loaded, module_items)
    cli_paths = {i.path: i for i in module_items}
    module = _absolute_paths(module, doc.path.parent, cli_paths)

    # 3 model
    model_item = next((i for i in field_items if i.path == ("model",)), None)
    model = _model_for(module, name, doc, backend, environ, model_item, translator, discovery)
    spec, model_file = model.spec, model.file
    neutral_origins: dict[str, str] = {}

    def model_error(exc: ConfigError) -> ConfigError:
        if model_item is not None:
            return model_item.error(exc.message, exc.fix)
        shown = f"modules.{name}.model" + (f" ({Path(model_file).name})" if model_file else "")
        return exc.located(file=file, line=doc.line_of(("modules", name, "model")), key=shown)

    if spec is not None:
        if backend.spec.model_families and spec.family not in backend.spec.model_families:
            raise model_error(family_refusal(spec.family, backend, translator, discovery,
                                             upstream_name=model.alias.name if model.alias else None))
        try:
            translated = translator.translate_model(spec)
        except ConfigError as exc:
            raise model_error(exc) from None
        neutral_origins.update({k: f"model.{o}" for k, o in translated.origins.items()})
        layered.apply(translated.values, "model", sources={
            tuple(k.split(".")): model.sources.get((origin,), Source("model", model_file))
            for k, origin in translated.origins.items()})
    if model.native:
        def where_model(path: KeyPath, message: str, fix: str | None) -> ConfigError:
            src = model.native_sources.get(path) or Source("model", model_file)
            return ConfigError(message, file=src.file, line=src.line, key=".".join(path), fix=fix)

        _check_native(model.native, known=known, preset=preset_values, translator=translator, where=where_model,
                      tables=tables, upstream_keys=upstream_keys)
        layered.apply(model.native, "model", sources=model.native_sources)
    if module.trainer_class is not None and module.trainer_class not in translator.trainer_classes:
        runs = sorted(translator.trainer_classes)
        item = cli_paths.get(("trainer_class",))
        message = f"trainer_class '{module.trainer_class}' is not a trainer of the {backend.name} backend"
        fix = (did_you_mean(module.trainer_class, runs) or "it runs: " + ", ".join(runs)) if runs else \
            "it has one trainer: remove trainer_class"
        if item is not None:
            raise item.error(message, fix)
        raise ConfigError(message, file=file, line=doc.line_of(("modules", name, "trainer_class")),
                          key=f"modules.{name}.trainer_class", fix=fix)

    # 4 neutral sections
    locator = _Locator(name, doc, layered, neutral_origins, cli_paths)
    try:
        neutral: NativeValues = translator.translate_sections(module, spec)
    except ConfigError as exc:
        raise locator.locate(exc) from None
    base_path = ("modules", name)

    def neutral_source(origin: str) -> Source:
        path = tuple(origin.split("."))
        for cli_path, item in cli_paths.items():
            if path[: len(cli_path)] == cli_path:
                return item.source
        return Source("neutral " + path[0], file, doc.line_of((*base_path, *path)),
                      env=doc.env_refs.get((*base_path, *path)))

    neutral_origins.update(neutral.origins)
    layered.apply(neutral.values, "neutral", sources={
        tuple(k.split(".")): neutral_source(origin.split(",")[0]) for k, origin in neutral.origins.items()},
        keep_layer_names=True)
    for level_key in ("trainable", "sink_level", "file_sink_level", "stderr_sink_level"):
        value = getattr(module, level_key)
        if value is not None:
            item = cli_paths.get((level_key,))
            src = item.source if item else Source("experiment", file, doc.line_of((*base_path, level_key)))
            layered.apply({level_key: value}, src.layer, sources={(level_key,): src}, keep_layer_names=True)

    # 5 overrides
    ov_base = (*base_path, "overrides")

    def where_override(path: KeyPath, message: str, fix: str | None) -> ConfigError:
        full = (*ov_base, *path)
        return ConfigError(message, file=file, line=doc.line_of(full), key=".".join(full), fix=fix)

    _check_native(module.overrides, known=known, preset=preset_values, translator=translator, where=where_override,
                  tables=tables, upstream_keys=upstream_keys)
    layered.apply(module.overrides, "overrides", file=file,
                  lines={p: doc.line_of((*ov_base, *p)) or 0 for p in flatten(module.overrides)},
                  env_refs={p: doc.env_refs[(*ov_base, *p)] for p in flatten(module.overrides)
                            if (*ov_base, *p) in doc.env_refs})

    # 6 command line (native keys); every item keeps its own text for --explain and errors
    for item in native_items:
        path = _native_path(item)
        values: dict[str, Any] = {}
        _set_path(values, path, item.value)
        _check_native(values, known=known, preset=preset_values, translator=translator,
                      where=lambda _p, message, fix, item=item: item.error(message, fix), tables=tables,
                      upstream_keys=upstream_keys)
        layered.apply(values, "cli", sources={p: item.source for p in flatten(values)}, keep_layer_names=True)

    resolved = ResolvedModule(
        name=name, framework=backend.name, native=layered.data, sources=layered.sources, module=module,
        model=spec, model_file=model_file, experiment_file=file, world_size=world_size,
        neutral_origins=neutral_origins, steps_key=translator.steps_key,
        model_alias=model.alias.name if model.alias else None, hf_path=model.hf_path, kind=kind)
    try:
        # the neutral rules, once, on the resolved dimensions
        dims = read_dimensions(layered.data, module, spec, translator, {
            k: o[len("model."):] for k, o in neutral_origins.items() if o.startswith("model.")})
        check_dimensions(dims, spec, world_size)
        check_data(module)
        check_post_training(module, kind, translator.post_training, backend.name, model.hf_path)
        if kind == "posttrain" and "sft_dataset_split" in layered.data:  # upstream's key given on the command line
            check_split(layered.data, module.data.path)
        if kind == "posttrain" and not module.finetune.is_lora and module.checkpoint.export is None \
                and backend.spec.exporter is not None and spec is not None:
            module.checkpoint.export = "hf"  # a full fine-tune ends as a Hugging Face model: <run dir>/hf/
        if module.checkpoint.export and (backend.spec.exporter is None or spec is None):
            why = f"the {backend.name} backend cannot export weights" if backend.spec.exporter is None else \
                "the model is native keys, not a model spec, so no config.json can be written"
            raise ConfigError(f"checkpoint.export: {module.checkpoint.export}: {why}", key="checkpoint.export",
                              fix="remove checkpoint.export" + ("" if backend.spec.exporter is None else
                                                                 ", or use a neutral model preset or hf_path"))
        if spec is not None and module.data.tokenizer and not module.data.mock:
            from primus.models.hf import check_tokenizer_fits

            check_tokenizer_fits(Path(module.data.tokenizer), spec.vocab_size)
        # values computed from others: a layer of their own, with the keys they came from
        derived = translator.derive(resolved)
        for key, origin in derived.origins.items():
            value = get_path(derived.values, key)
            written, current = layered.source_of(key), get_path(layered.data, key)
            by_hand = written is not None and written.layer in ("cli", "overrides") and key not in neutral_origins
            if by_hand and current not in (None, AUTO) and current != value:
                # a user-written value the backend would overwrite: say so rather than drop it
                raise ConfigError(f"{key} {current!r} contradicts {value!r}, which the "
                                  f"{backend.name} backend derives from {', '.join(origin.split(','))}",
                                  key=key, fix=f"set only one of {key} and {origin.split(',')[0]}")
            values = {}
            _set_path(values, tuple(key.split(".")), value)
            layered.apply(values, "derived", sources={p: Source("derived", origins=tuple(origin.split(",")))
                                                      for p in flatten(values)}, keep_layer_names=True)
        resolved.native, resolved.sources = layered.data, layered.sources
        before = copy.deepcopy(resolved.native)
        translator.check(resolved)
    except ConfigError as exc:
        raise locator.locate(exc) from None
    if resolved.native != before:
        changed = sorted(k for k in set(before) | set(resolved.native) if before.get(k) != resolved.native.get(k))
        raise RuntimeError(f"{type(translator).__name__}.check() changed {', '.join(changed)}: check() is "
                           "read-only; return computed values from derive()")
    resolved.notices = translator.notices(resolved) + compat_notices(tables, resolved.native, upstream_keys,
                                                                     backend.name) + [
        f"{path} is not used by the {backend.name} backend; ignored"
        for path in _ignored_neutral_fields(module, translator, neutral.origins)]
    return resolved


def resolve(experiment: str | Path | LoadedExperiment, overrides: list[str] | None = None, *,
            module: str | None = None, world_size: int = 1, environ: dict[str, str] | None = None,
            discovery: Discovery | None = None) -> ResolvedExperiment:
    """Resolve and validate an experiment. Raises ConfigError for anything the user must fix.

    Pass a `LoadedExperiment` (parsed once by the command) or a path plus the command line's items.
    """
    env = dict(os.environ) if environ is None else environ
    if isinstance(experiment, LoadedExperiment):
        if overrides:
            raise TypeError("a LoadedExperiment carries its own command line")
        loaded = experiment
    else:
        loaded = load_experiment(Path(experiment), overrides or [], env)
    discovery = discovery or discover()
    names = list(loaded.experiment.modules)
    if module is not None:
        if module not in loaded.experiment.modules:
            hint = did_you_mean(module, names)
            raise ConfigError(f"no module '{module}' in the experiment (has: {', '.join(names)})",
                              file=str(loaded.path), key="--module", fix=hint)
        names = [module]
    modules = {n: resolve_module(n, loaded, discovery, world_size, env) for n in names}
    used = {m.framework: discovery.backends[m.framework] for m in modules.values()}
    return ResolvedExperiment(file=str(loaded.path), experiment=loaded.experiment, modules=modules, backends=used,
                              loaded=loaded)
