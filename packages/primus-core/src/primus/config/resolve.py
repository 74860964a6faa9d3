"""Resolve an experiment file into one validated config per module (ARCHITECTURE §3.2).

Layers, lowest to highest, each recorded for `primus config show --explain`:
  1 module_base   core's module_base.yaml
  2 module preset the backend preset named by `config:`, with its extends chain
  3 model         the model preset: neutral (translated by the backend) or backend-native
  4 neutral       the `train`, `parallel`, `data`, `checkpoint` sections, translated
  5 overrides     the module's `overrides:` (native keys)
  6 cli           `key=value` from the command line
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from primus.backends.discovery import Backend, Discovery, discover
from primus.backends.translator import NativeValues, Translator
from primus.config.layered import Layered, Source, find_file, load_with_extends
from primus.config.schema import NEUTRAL_SECTIONS, Experiment, ModuleConfig
from primus.config.yamlfile import KeyPath, YamlDoc, flatten, load_yaml, substitute_env
from primus.errors import ConfigError
from primus.models.spec import ModelSpec
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

    def explain(self, key: str) -> Source | None:
        """The layer, file and line that set `key` (dotted), or None."""
        layered = Layered()
        layered.sources = self.sources
        return layered.source_of(key)

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
        )


@dataclass
class ResolvedExperiment:
    file: str
    experiment: Experiment
    modules: dict[str, ResolvedModule]
    backends: dict[str, Backend]

    @property
    def run_dir(self) -> Path:
        e = self.experiment
        return Path(e.workspace).expanduser() / e.work_group / e.user_name / e.exp_name


# --------------------------------------------------------------------------- command-line overrides


@dataclass
class CliOverrides:
    experiment: dict[str, Any] = field(default_factory=dict)
    module: dict[str, Any] = field(default_factory=dict)  # neutral sections and module fields
    native: dict[str, Any] = field(default_factory=dict)


def parse_cli_overrides(items: list[str]) -> CliOverrides:
    """`key=value` items: dotted paths inside the module; a bare native key goes to layer 6."""
    out = CliOverrides()
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value", key=item, fix="write e.g. train.steps=10")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        path = key.split(".")
        if path[0] == "modules" and len(path) > 2:
            path = path[2:]
        if len(path) == 1 and path[0] in EXPERIMENT_SCALARS:
            out.experiment[path[0]] = value
        elif path[0] == "overrides" and len(path) > 1:
            _set_path(out.native, path[1:], value)
        elif path[0] in MODULE_FIELDS and not _native_dotted(path):
            _set_path(out.module, path, value)
        else:
            _set_path(out.native, path, value)
    return out


def _native_dotted(path: list[str]) -> bool:
    """`model.flavor=8B` or `checkpoint.enable=false`: a dotted native key that shares its first
    part with a module field (TorchTitan's sections), not a path into that field."""
    if len(path) < 2:
        return False
    if path[0] == "model":
        return True
    section = NEUTRAL_SECTIONS.get(path[0])
    return section is not None and path[1] not in section.model_fields


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value


# --------------------------------------------------------------------------- pydantic errors


def _raise_validation(exc: ValidationError, doc: YamlDoc, prefix: KeyPath, known_by_prefix: Any) -> None:
    err = exc.errors()[0]
    loc = tuple(str(p) for p in err["loc"])
    key_path = (*prefix, *loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = key_path[:-1]
        known = known_by_prefix(loc[:-1])
        hint = did_you_mean(loc[-1], known) if known else None
        message = "unknown key" + (f"; {hint}" if hint else "")
        fix = None if hint else ("known keys: " + ", ".join(sorted(known)) if known else None)
        del parent
    elif kind == "missing":
        message, fix = "required key is missing", None
    else:
        message, fix = err["msg"].replace("Value error, ", ""), None
        if "input" in err and not isinstance(err["input"], dict):
            message += f" (got {err['input']!r})"
    raise ConfigError(message, file=str(doc.path), line=doc.line_of(key_path), key=".".join(key_path),
                      fix=fix) from None


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


# --------------------------------------------------------------------------- resolution


def load_experiment(path: Path, cli: CliOverrides | None = None,
                    environ: dict[str, str] | None = None) -> tuple[Experiment, YamlDoc]:
    doc = load_yaml(path, what="experiment file")
    substitute_env(doc, environ)
    if "extends" in doc.data:
        data, _ = load_with_extends(path, search_dirs=[], environ=environ, what="experiment file")
        doc.data = data
    cli = cli or CliOverrides()
    data = dict(doc.data)
    data.update(cli.experiment)
    if cli.module:
        modules = data.get("modules")
        if isinstance(modules, dict) and modules:
            # module-level command-line keys apply to every module being resolved
            from primus.config.yamlfile import deep_merge

            data["modules"] = {n: deep_merge(m or {}, cli.module) for n, m in modules.items()}
    try:
        experiment = Experiment.model_validate(data)
    except ValidationError as exc:
        _raise_validation(exc, doc, (), _known_fields(Experiment))
    return experiment, doc


def _model_for(module: ModuleConfig, name: str, doc: YamlDoc, backend: Backend,
               environ: dict[str, str] | None) -> tuple[ModelSpec | None, dict[str, Any], dict[KeyPath, Source], str | None]:
    """The module's model: (neutral spec or None, native values, their sources, file)."""
    key = f"modules.{name}.model"
    if module.model is None:
        return None, {}, {}, None
    search = [backend.spec.preset_dir() / "models", core_preset_dir() / "models"]
    if isinstance(module.model, dict):
        data, sources, file = dict(module.model), {}, str(doc.path)
        line_base = ("modules", name, "model")
        sources = {p: Source("model", file, doc.line_of((*line_base, *p))) for p in flatten(data)}
    else:
        found = find_file(module.model, relative_to=doc.path.parent, search_dirs=search)
        if found is not None and found == doc.path.resolve():
            # an experiment named like its model preset (examples/hf/llama3_tiny.yaml) is not its own model
            found = find_file(module.model, relative_to=None, search_dirs=search)
        if found is None:
            available = sorted({p.name for d in search if d.is_dir() for p in d.glob("*.yaml")})
            hint = did_you_mean(module.model, available)
            raise ConfigError(f"model preset '{module.model}' not found", file=str(doc.path),
                              line=doc.line_of(("modules", name, "model")), key=key,
                              fix=hint or "looked next to the experiment and in the model presets; "
                              "`primus presets` lists them")
        data, sources = load_with_extends(found, search_dirs=search, environ=environ, what="model preset")
        file = str(found)
    if "family" not in data:
        return None, data, sources, file
    try:
        spec = ModelSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(str(p) for p in err["loc"])
        src = sources.get(loc) or next(iter(sources.values()), Source("model", file))
        msg = "unknown model key" if err["type"] == "extra_forbidden" else err["msg"].replace("Value error, ", "")
        hint = did_you_mean(loc[-1], ModelSpec.model_fields) if err["type"] == "extra_forbidden" and loc else None
        raise ConfigError(msg, file=src.file, line=src.line, key=".".join(loc) or key, fix=hint) from None
    return spec, {}, sources, file


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
                  where: str, doc_file: str | None, line_of: Any) -> None:
    for path, value in flatten(values).items():
        why = translator.check_native_key(path, known)
        if why:
            raise ConfigError(why, file=doc_file, line=line_of(path), key=f"{where}.{'.'.join(path)}")
        default: Any = preset
        for part in path:
            default = default.get(part) if isinstance(default, dict) else None
        if _type_mismatch(default, value):
            raise ConfigError(
                f"expects {_type_name(default)}, got {_type_name(value)} {value!r}",
                file=doc_file, line=line_of(path), key=f"{where}.{'.'.join(path)}",
                fix=f"the preset's value is {default!r}")


@dataclass
class _Size:
    value: Any
    key: str
    file: str | None
    line: int | None


def _layout(module: ModuleConfig, layered: Layered, translator: Translator, doc: YamlDoc,
            name: str) -> dict[str, _Size]:
    """Parallel sizes and batch sizes as the backend will see them, each with where it was set.

    A backend that names its native keys (`Translator.native_parallel_keys`) is judged on the
    resolved native values, so an override of `tensor_model_parallel_size` counts; otherwise the
    neutral sections are.
    """
    out: dict[str, _Size] = {}
    neutral = {"tensor": ("parallel", "tensor"), "pipeline": ("parallel", "pipeline"),
               "context": ("parallel", "context"), "expert": ("parallel", "expert"), "data": ("parallel", "data"),
               "micro_batch_size": ("train", "micro_batch_size"),
               "global_batch_size": ("train", "global_batch_size")}
    for field_name, (section, key) in neutral.items():
        native_key = translator.native_parallel_keys.get(field_name)
        if native_key is not None:
            src = layered.source_of(native_key)
            out[field_name] = _Size(layered.data.get(native_key), native_key, src.file if src else None,
                                    src.line if src else None)
        else:
            path = ("modules", name, section, key)
            out[field_name] = _Size(getattr(getattr(module, section), key), ".".join(path), str(doc.path),
                                    doc.line_of(path))
    return out


def _check_parallel(layout: dict[str, _Size], model: ModelSpec | None, world_size: int) -> None:
    def num(k: str) -> int:
        v = layout[k].value
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 1

    def fail(k: str, message: str, fix: str | None = None) -> None:
        s = layout[k]
        raise ConfigError(message, file=s.file, line=s.line, key=s.key, fix=fix)

    tp, pp, cp = num("tensor"), num("pipeline"), num("context")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        fail("tensor" if tp > 1 else "pipeline" if pp > 1 else "context",
             f"tensor x pipeline x context = {model_parallel} does not divide the world size {world_size}",
             "change the parallel sizes or the number of processes (--nproc-per-node x --nnodes)")
    data = layout["data"].value
    if isinstance(data, int) and data * model_parallel != world_size:
        fail("data", f"data ({data}) x tensor x pipeline x context ({model_parallel}) = {data * model_parallel} "
             f"!= world size {world_size}", "use data: auto")
    if model is not None:
        if model.num_heads % tp:
            fail("tensor", f"tensor ({tp}) does not divide the model's {model.num_heads} attention heads",
                 "pick a tensor size that divides the heads")
        if model.mla is None and model.kv_heads % tp:
            fail("tensor", f"tensor ({tp}) does not divide the model's {model.kv_heads} key/value heads",
                 "pick a tensor size that divides the kv heads")
        if model.num_layers % pp:
            fail("pipeline", f"pipeline ({pp}) does not divide the model's {model.num_layers} layers")
        ep = num("expert")
        if model.moe and ep > 1 and model.moe.experts % ep:
            fail("expert", f"expert ({ep}) does not divide the model's {model.moe.experts} experts")
    micro, global_ = layout["micro_batch_size"].value, layout["global_batch_size"].value
    if isinstance(micro, int) and isinstance(global_, int) and micro > 0 and global_ > 0:
        dp = world_size // model_parallel
        if global_ % (micro * dp):
            fail("global_batch_size", f"global_batch_size {global_} is not a multiple of micro_batch_size "
                 f"{micro} x data-parallel {dp}", f"use a multiple of {micro * dp}")


def _absolute_paths(module: ModuleConfig, base: Path) -> ModuleConfig:
    """Relative data, tokenizer and checkpoint paths are relative to the experiment file's folder."""

    def absolute(value: str | None) -> str | None:
        if not value:
            return value
        p = Path(os.path.expandvars(value)).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    data = module.data.model_copy(update={"path": absolute(module.data.path),
                                          "tokenizer": absolute(module.data.tokenizer)})
    ckpt = module.checkpoint.model_copy(update={"dir": absolute(module.checkpoint.dir)})
    return module.model_copy(update={"data": data, "checkpoint": ckpt})


def resolve_module(name: str, experiment: Experiment, doc: YamlDoc, discovery: Discovery,
                   cli: CliOverrides, world_size: int, environ: dict[str, str] | None) -> ResolvedModule:
    module = _absolute_paths(experiment.modules[name], doc.path.parent)
    file = str(doc.path)
    backend = discovery.get(module.framework, file=file, key=f"modules.{name}.framework")
    translator: Translator = backend.spec.load_translator()
    translator.world_size = world_size
    layered = Layered()

    # 1 module_base
    base_file = core_preset_dir() / "module_base.yaml"
    base, base_sources = load_with_extends(base_file, search_dirs=[], environ=environ)
    layered.apply(base, "module_base", sources=base_sources)

    # 2 module preset
    preset_name = module.config or translator.default_module_preset
    search = [backend.spec.preset_dir(), core_preset_dir()]
    preset_path = find_file(preset_name, relative_to=doc.path.parent, search_dirs=search)
    if preset_path is None:
        available = sorted(p.name for p in backend.spec.preset_dir().glob("*.yaml"))
        raise ConfigError(f"module preset '{preset_name}' not found for backend '{backend.name}'", file=file,
                          line=doc.line_of(("modules", name, "config")), key=f"modules.{name}.config",
                          fix="available: " + (", ".join(available) or "none"))
    preset, preset_sources = load_with_extends(preset_path, search_dirs=search, environ=environ,
                                               what="module preset")
    layered.apply(preset, "module preset", sources=preset_sources)
    known = translator.native_keys(layered.data)
    preset_values = dict(layered.data)

    # 3 model
    spec, model_native, model_sources, model_file = _model_for(module, name, doc, backend, environ)
    if spec is not None:
        try:
            translated = translator.translate_model(spec)
        except ConfigError as exc:
            raise exc.located(file=model_file or file, key=f"modules.{name}.model") from None
        layered.apply(translated.values, "model", sources={
            tuple(k.split(".")): model_sources.get((origin,), Source("model", model_file))
            for k, origin in translated.origins.items()})
    elif model_native:
        _check_native(model_native, known=known, preset=preset_values, translator=translator,
                      where="model", doc_file=model_file,
                      line_of=lambda p: (model_sources.get(p) or Source("model")).line)
        layered.apply(model_native, "model", sources=model_sources)

    # 4 neutral sections
    neutral: NativeValues = translator.translate_sections(module, spec)
    base_path = ("modules", name)
    layered.apply(neutral.values, "neutral", sources={
        tuple(k.split(".")): Source("neutral " + origin.split(".")[0], file,
                                    doc.line_of((*base_path, *origin.split("."))))
        for k, origin in neutral.origins.items()}, keep_layer_names=True)
    for level_key in ("trainable", "sink_level", "file_sink_level", "stderr_sink_level"):
        value = getattr(module, level_key)
        if value is not None:
            layered.apply({level_key: value}, "experiment", file=file,
                          lines={(level_key,): doc.line_of((*base_path, level_key))})

    # 5 overrides
    ov_base = (*base_path, "overrides")
    _check_native(module.overrides, known=known, preset=preset_values, translator=translator,
                  where=f"modules.{name}.overrides", doc_file=file, line_of=lambda p: doc.line_of((*ov_base, *p)))
    layered.apply(module.overrides, "overrides", file=file,
                  lines={p: doc.line_of((*ov_base, *p)) or 0 for p in flatten(module.overrides)})

    # 6 command line
    if cli.native:
        _check_native(cli.native, known=known, preset=preset_values, translator=translator,
                      where="command line", doc_file=None, line_of=lambda p: None)
        layered.apply(cli.native, "cli", file="command line")

    _check_parallel(_layout(module, layered, translator, doc, name), spec, world_size)
    resolved = ResolvedModule(
        name=name, framework=backend.name, native=layered.data, sources=layered.sources, module=module,
        model=spec, model_file=model_file, experiment_file=file, world_size=world_size)
    try:
        translator.check(resolved)
    except ConfigError as exc:
        raise exc.located(file=file) from None
    resolved.notices = translator.notices(resolved)
    return resolved


def resolve(path: str | Path, overrides: list[str] | None = None, *, module: str | None = None,
            world_size: int = 1, environ: dict[str, str] | None = None,
            discovery: Discovery | None = None) -> ResolvedExperiment:
    """Load, resolve and validate an experiment. Raises ConfigError for anything the user must fix."""
    path = Path(path)
    env = dict(os.environ) if environ is None else environ
    cli = parse_cli_overrides(overrides or [])
    experiment, doc = load_experiment(path, cli, env)
    discovery = discovery or discover()
    names = list(experiment.modules)
    if module is not None:
        if module not in experiment.modules:
            hint = did_you_mean(module, names)
            raise ConfigError(f"no module '{module}' in the experiment (has: {', '.join(names)})", file=str(path),
                              key="modules", fix=hint)
        names = [module]
    modules = {n: resolve_module(n, experiment, doc, discovery, cli, world_size, env) for n in names}
    used = {m.framework: discovery.backends[m.framework] for m in modules.values()}
    return ResolvedExperiment(file=str(path), experiment=experiment, modules=modules, backends=used)
