"""Patch records and the machinery that decides, applies and undoes them.

A patch is data plus a function. Core decides whether it applies (selection by PRIMUS_PATCHES,
platform, framework version, enabling key or predicate) and applies it at its phase; `apply`
returns the undo. A patch whose target is missing in the installed framework fails loudly with its
id and the framework version, unless it is optional.

Phases run once each, in the order of PHASES, for every backend. At each phase the adapter passes
run state (`ctx.apply_patches(phase, model=..., ...)`) into `PatchContext.state`, where it stays
for the later phases; a patch names the keys it reads in `needs`, and a patch that applies with a
needed key missing fails with its id, its phase and the key, before its function runs.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from packaging.specifiers import SpecifierSet
from packaging.version import Version

Phase = Literal["before_import", "build_args", "setup", "before_train", "after_train"]
PHASES: tuple[Phase, ...] = ("before_import", "build_args", "setup", "before_train", "after_train")
ALL_PLATFORMS = frozenset({"rocm", "cuda", "cpu"})

Undo = Callable[[], None]


@dataclass
class PatchContext:
    """What a patch sees when deciding and applying."""

    backend: str
    platform: str
    framework_version: str | None
    config: dict[str, Any] = field(default_factory=dict)  # the module's resolved native keys
    arch: str | None = None
    world_size: int = 1
    state: dict[str, Any] = field(default_factory=dict)  # objects the adapter shares (model, args, ...)
    phase: Phase | None = None  # the phase being applied, or the last one applied in this run

    def config_value(self, key: str, default: Any = None) -> Any:
        """A native config value; a dotted key also walks nested sections (`primus_turbo.enable_x`)."""
        if key in self.config:
            return self.config[key]
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


@dataclass(frozen=True)
class Patch:
    id: str
    backend: str
    target: str  # dotted name it changes, e.g. "torch.distributed.set_timeout"
    phase: Phase
    description: str
    apply: Callable[[PatchContext], Undo | None]
    versions: str = ""  # PEP 440 range of the framework; "" = any
    platforms: frozenset[str] = ALL_PLATFORMS
    enabled_by: str | None = None  # native config key that must be truthy
    enabled_by_default: bool = True  # value assumed when enabled_by is missing from the config
    # native config key that must be falsy: upstream's `disable_*` flags (missing: disabled)
    disabled_by: str | None = None
    predicate: Callable[[PatchContext], bool] | None = None
    predicate_doc: str = ""  # when the predicate holds, for the docs
    optional: bool = False  # a missing target skips the patch instead of failing
    kind: Literal["feature", "platform"] = "platform"
    check_target: bool = True  # False for targets that exist only after an import or are being added
    notes: str = ""  # for the generated patch notes: caveats, related keys, where output goes
    # keys of PatchContext.state that `apply` reads (passed by the adapter at this phase or earlier)
    needs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"patch {self.id}: unknown phase '{self.phase}' (phases: {', '.join(PHASES)})")
        # a bare string would be read as its letters; a list would make the record unhashable
        needs = (self.needs,) if isinstance(self.needs, str) else tuple(self.needs)
        object.__setattr__(self, "needs", needs)

    @property
    def flag(self) -> str | None:
        """The config key a user turns this patch on or off with, if any."""
        return self.enabled_by or self.disabled_by


@dataclass(frozen=True)
class PatchDecision:
    patch: Patch
    applies: bool
    reason: str


class PatchTargetMissing(RuntimeError):
    pass


class PatchStateMissing(RuntimeError):
    """A patch that applies needs run state that the adapter has not passed."""


class PatchPhaseOrder(RuntimeError):
    """A phase was applied after a later one (or twice) in the same run."""


def resolve_target(dotted: str) -> Any:
    """Import the longest importable module prefix of `dotted`, then walk attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _selection(environ: dict[str, str] | os._Environ[str]) -> tuple[str, set[str]]:
    raw = environ.get("PRIMUS_PATCHES", "all").strip()
    if raw in ("", "all"):
        return "all", set()
    if raw == "none":
        return "none", set()
    return "ids", {p.strip() for p in raw.split(",") if p.strip()}


class PatchSet:
    """The patches of one backend, applied phase by phase, undone in reverse."""

    def __init__(self, patches: Iterable[Patch], environ: dict[str, str] | None = None) -> None:
        self.patches = list(patches)
        ids = [p.id for p in self.patches]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"duplicate patch ids: {sorted(dup)}")
        self.environ = os.environ if environ is None else environ
        self._undo: list[tuple[str, Undo]] = []
        self.applied: list[str] = []

    def decide(self, patch: Patch, ctx: PatchContext) -> PatchDecision:
        mode, ids = _selection(self.environ)
        if mode == "none":
            return PatchDecision(patch, False, "PRIMUS_PATCHES=none")
        if mode == "ids" and patch.id not in ids:
            return PatchDecision(patch, False, "not selected by PRIMUS_PATCHES")
        if ctx.platform not in patch.platforms:
            return PatchDecision(patch, False, f"platform {ctx.platform} not in {sorted(patch.platforms)}")
        if patch.versions:
            if ctx.framework_version is None:
                return PatchDecision(patch, False, "framework not installed")
            if Version(ctx.framework_version) not in SpecifierSet(patch.versions):
                return PatchDecision(patch, False, f"framework {ctx.framework_version} outside {patch.versions}")
        if patch.enabled_by is not None:
            value = ctx.config_value(patch.enabled_by, patch.enabled_by_default)
            if not value:
                return PatchDecision(patch, False, f"{patch.enabled_by} is off")
        if patch.disabled_by is not None and ctx.config_value(patch.disabled_by, True):
            return PatchDecision(patch, False, f"{patch.disabled_by} is on")
        if patch.predicate is not None and not patch.predicate(ctx):
            return PatchDecision(patch, False, f"condition not met: {patch.predicate_doc or 'predicate'}")
        reason = "selected" if mode == "ids" else "applies"
        if patch.enabled_by:
            reason = f"{patch.enabled_by} is on"
        elif patch.disabled_by:
            reason = f"{patch.disabled_by} is off"
        return PatchDecision(patch, True, reason)

    def explain(self, ctx: PatchContext) -> list[PatchDecision]:
        return [self.decide(p, ctx) for p in self.patches]

    def apply_phase(self, phase: Phase, ctx: PatchContext) -> list[str]:
        """Apply the patches of `phase` that should apply; returns their ids.

        `ctx` is the run's context: phases must come in the order of PHASES, each at most once
        (phases without patches may be skipped).
        """
        if phase not in PHASES:
            raise ValueError(f"unknown patch phase '{phase}' (phases, in order: {', '.join(PHASES)})")
        if ctx.phase is not None and PHASES.index(phase) <= PHASES.index(ctx.phase):
            again = "again" if phase == ctx.phase else f"after phase '{ctx.phase}'"
            raise PatchPhaseOrder(
                f"{ctx.backend}: patch phase '{phase}' applied {again} in the same run; phases run once each, "
                f"in the order {' -> '.join(PHASES)}"
            )
        ctx.phase = phase
        done = []
        for patch in self.patches:
            if patch.phase != phase or not self.decide(patch, ctx).applies:
                continue
            missing = [key for key in patch.needs if key not in ctx.state]
            if missing:
                passed = ", ".join(sorted(ctx.state)) or "nothing"
                raise PatchStateMissing(
                    f"patch {patch.id} (phase {phase}) needs run state {', '.join(repr(k) for k in missing)}, "
                    f"which {ctx.backend}'s adapter has not passed by this phase (passed so far: {passed}); "
                    f"the adapter passes it as ctx.apply_patches('{phase}', {missing[0]}=...) or at an earlier "
                    f"phase, or PRIMUS_PATCHES can leave the patch out"
                )
            if patch.check_target and phase != "before_import":
                try:
                    resolve_target(patch.target)
                except (ImportError, AttributeError):
                    if patch.optional:
                        continue
                    raise PatchTargetMissing(
                        f"patch {patch.id}: target {patch.target} not found in {ctx.backend}'s framework "
                        f"{ctx.framework_version or '(not installed)'}; set PRIMUS_PATCHES to skip it"
                    ) from None
            undo = patch.apply(ctx)
            if undo is not None:
                self._undo.append((patch.id, undo))
            done.append(patch.id)
            self.applied.append(patch.id)
        return done

    def undo_all(self) -> None:
        while self._undo:
            _, undo = self._undo.pop()
            undo()


def replace_attr(owner: Any, name: str, new: Any) -> Undo:
    """Set `owner.name = new` and return the undo (restores or deletes)."""
    missing = object()
    old = getattr(owner, name, missing)
    setattr(owner, name, new)

    def undo() -> None:
        if old is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, old)

    return undo


def patches_markdown(backend: str, patches: list[Patch]) -> str:
    """The generated patch-notes table of one backend (docs/backends/<backend>.md)."""
    lines = [
        "| id | kind | phase | target | versions | platforms | enabled by | what it does | needs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in patches:
        enabled = f"`{p.enabled_by}`" if p.enabled_by else (p.predicate_doc or "always")
        if p.enabled_by:
            enabled += " (default on)" if p.enabled_by_default else " (default off)"
        elif p.disabled_by:
            enabled = f"`{p.disabled_by}: false`"
        lines.append(
            f"| `{p.id}` | {p.kind} | {p.phase} | `{p.target}` | {p.versions or 'any'} | "
            f"{', '.join(sorted(p.platforms))} | {enabled} | {p.description} | "
            f"{', '.join(f'`{k}`' for k in p.needs) or '-'} |"
        )
    if not patches:
        lines.append("| (none) | | | | | | | | |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return f"`{text}`"


def flags_markdown(patches: list[Patch], defaults: dict[str, Any]) -> str:
    """Upstream's patch-notes layout: one row per config flag that turns feature patches on or off.

    `defaults` are the backend module preset's values (the flag's default as a user sees it).
    """
    rows: dict[str, list[Patch]] = {}
    for p in patches:
        if p.kind == "feature" and p.flag:
            rows.setdefault(p.flag, []).append(p)
    lines = ["| argument | default | description | patched targets | notes |", "|---|---|---|---|---|"]
    for flag, group in rows.items():
        default = defaults.get(flag, group[0].enabled_by_default if group[0].enabled_by else True)
        description = group[0].description  # the flag's main patch comes first
        targets = ", ".join(dict.fromkeys(f"`{p.target}`" for p in group))
        notes = []
        for p in group:
            where = [] if p.platforms == ALL_PLATFORMS else [f"on {', '.join(sorted(p.platforms))}"]
            if p.versions:
                where.append(f"{p.versions}")
            if p.predicate_doc:
                where.append(f"when {p.predicate_doc}")
            text = " ".join(part for part in (p.notes, "; ".join(where)) if part)
            notes.append(f"`{p.id}`" + (f": {text}" if text else ""))
        lines.append(f"| `{flag}` | {_cell(default)} | {description} | {targets} | {'<br>'.join(notes)} |")
    if len(lines) == 2:
        lines.append("| (none) | | | | |")
    return "\n".join(lines) + "\n"
