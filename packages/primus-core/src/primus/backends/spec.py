"""`BackendSpec`: what a backend package tells core, as plain data.

A backend package's top-level `__init__` builds one of these and nothing else, so loading every
entry point stays cheap. Everything heavy is named by an import string and loaded on use:

- `translator` (light): turns neutral sections and model specs into native keys, knows the native
  key set, checks the config before anything is created. Must not import the framework.
- `patches`, `env` (light): the backend's patch and env records; patch functions import the
  framework inside their bodies.
- `adapter` (heavy): runs training; imported only when a run of this backend starts.
"""

from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

ProcessModel = Literal["torchrun", "per-host"]
Runtime = Literal["torch", "jax"]


def load_object(ref: str) -> Any:
    """Import `"package.module:attribute"`."""
    module_name, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj


# lower bounds first, as people write ranges; metadata stores them sorted as text ("<0.17,>=0.16")
_OPERATOR_ORDER = {"===": 0, "==": 0, "~=": 1, ">=": 2, ">": 2, "!=": 3, "<=": 4, "<": 4}
# a Requires-Dist line as build backends write it: name, optional [extras], specifiers, optional marker
_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*\(?([^;()@]*)\)?\s*(;.*)?$")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _parse_requirement(line: str) -> tuple[str, str, bool]:
    """(normalized name, specifiers, has a marker) of one Requires-Dist line.

    A regular expression rather than packaging.requirements, whose import (markers, tags, logging,
    subprocess) would cost every `primus` command about 10 ms; anything unusual goes to packaging.
    """
    match = _REQUIREMENT.match(line)
    if match:
        return _normalized(match[1]), match[2].strip(), match[3] is not None
    from packaging.requirements import Requirement

    requirement = Requirement(line)
    return _normalized(requirement.name), str(requirement.specifier), requirement.marker is not None


@functools.cache
def framework_range(dist: str, framework: str) -> str:
    """The version range that distribution `dist` requires of `framework`, read from its installed
    metadata (its pyproject's dependency): the one place a backend package declares its range.

    `dist`'s unconditional requirement on `framework` counts; lines behind a marker (an extra, a
    Python version) do not. Cached: a backend's entry point and its patch modules ask once.
    """
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    try:
        requirements = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        raise LookupError(f"{dist} is not installed, so the range of {framework} it supports is unknown "
                          f"(pip install {dist}; an editable install also writes its metadata)") from None
    wanted = _normalized(framework)
    for line in requirements:
        name, specifiers, has_marker = _parse_requirement(line)
        if name == wanted and not has_marker:
            ordered = sorted(SpecifierSet(specifiers), key=lambda s: (_OPERATOR_ORDER.get(s.operator, 5), s.version))
            return ",".join(str(s) for s in ordered)
    raise LookupError(f"{dist} declares no dependency on {framework}; its pyproject.toml must name the range")


@dataclass(frozen=True)
class BackendSpec:
    name: str
    framework: str  # the framework's distribution name, e.g. "transformers"
    # PEP 440 range of the framework, e.g. ">=5.0,<6": Primus's backends pass
    # framework_range(<their distribution>, framework), so their pyproject's dependency is the one
    # declaration; a literal works too
    supported: str
    presets: str  # package holding module presets (and models/), read with importlib.resources
    adapter: str  # "primus_hf.adapter:HFAdapter"
    translator: str  # "primus_hf.translate:HFTranslator"
    process_model: ProcessModel = "torchrun"
    runtime: Runtime = "torch"  # picks core's env set (the ROCm torch set for "torch")
    patches: str | None = None  # "primus_hf.patches:PATCHES"
    env: str | None = None  # "primus_hf.env:ENV"
    # "primus_megatron.data:prepare": f(resolved_module) -> str, converts local data to the
    # backend's own format ahead of a run (`primus data prepare`); returns a one-line summary
    data_prepare: str | None = None
    # "primus_hf.preflight:process_group": () -> (torch, torch.distributed, device) with the job's
    # process group open, for `primus preflight`'s collective test (core never imports a framework)
    preflight: str | None = None
    # "primus_megatron.export:export_hf": f(module, run_dir, step | None, out_dir) -> step; writes
    # the checkpoint's weights (step, else the newest) under Hugging Face names into out_dir with
    # primus.models.hf.write_weights (`primus export`; core adds config.json and the tokenizer)
    exporter: str | None = None
    model_families: tuple[str, ...] = ()
    # the adapter polls RunContext.stop_requested between steps and checkpoints before returning;
    # False: the worker leaves SIGTERM's default action (the process ends at once) rather than
    # swallow a preemption signal the training loop would never look at
    graceful_stop: bool = True
    description: str = ""
    install_hint: str = ""  # what to pip install; default "primus-<name>"
    extra: dict[str, Any] = field(default_factory=dict)

    def preset_dir(self) -> Path:
        return Path(str(resources.files(self.presets)))

    def load_translator(self) -> Any:
        return load_object(self.translator)()

    def load_adapter_class(self) -> Any:
        return load_object(self.adapter)

    def load_patches(self) -> list[Any]:
        return list(load_object(self.patches)) if self.patches else []

    def load_env(self) -> list[Any]:
        return list(load_object(self.env)) if self.env else []
