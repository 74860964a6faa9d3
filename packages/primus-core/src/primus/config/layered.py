"""Layered values with provenance: every key remembers which layer and file set it.

A `Layered` is the resolved module config being built: each `apply` merges one layer on top and
records, for every leaf it sets, a `Source` (layer name, file, line). `primus config show --explain`
reads those sources back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from primus.config.yamlfile import (
    KeyPath,
    YamlDoc,
    deep_merge,
    file_problem,
    flatten,
    is_regular_file,
    load_yaml,
    substitute_env,
)
from primus.errors import ConfigError


@dataclass(frozen=True)
class Source:
    """Where a value came from: its layer, the file and line that set it (`command line` for the
    cli layer, with the `key=value` item as typed), and for a derived value the keys it came from.
    """

    layer: str
    file: str | None = None
    line: int | None = None
    item: str | None = None  # the command-line item, e.g. "train.steps=10"
    origins: tuple[str, ...] = ()  # derived values: the neutral or native keys they were computed from
    env: str | None = None  # the `${VAR}` reference the written value was substituted from

    @property
    def where(self) -> str:
        """`file:line`, `command line: key=value`, or ''."""
        if self.item is not None:
            return f"command line: {self.item}"
        if self.file:
            return self.file + (f":{self.line}" if self.line else "")
        return ""

    def describe(self) -> str:
        if self.origins:
            return f"{self.layer} from {', '.join(self.origins)}"
        where = ", ".join(filter(None, (self.where, f"from {self.env}" if self.env else "")))
        return f"{self.layer} ({where})" if where else self.layer


COMMAND_LINE = "command line"


class Layered:
    """A nested mapping plus the source of each leaf."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.sources: dict[KeyPath, Source] = {}

    def apply(self, values: dict[str, Any], layer: str, file: str | None = None,
              lines: dict[KeyPath, int] | None = None, sources: dict[KeyPath, Source] | None = None,
              keep_layer_names: bool = False, env_refs: dict[KeyPath, str] | None = None) -> None:
        """Merge `values` over what is there; leaves get `sources[path]`, else (layer, file, line).

        With `keep_layer_names` the layer names inside `sources` are kept (e.g. "neutral train").
        """
        before = self.data
        self.data = deep_merge(self.data, values)
        for path in flatten(values):
            # A leaf that replaces a mapping (or the reverse) drops the stale sources around it:
            # ancestors by lookup, descendants only when a mapping was really replaced (linear time)
            for n in range(1, len(path)):
                self.sources.pop(path[:n], None)
            if isinstance(_at(before, path), dict):
                for old in [p for p in self.sources if len(p) > len(path) and p[: len(path)] == path]:
                    del self.sources[old]
            if sources and path in sources:
                src = sources[path]
                self.sources[path] = src if keep_layer_names else Source(layer, src.file, src.line, src.item,
                                                                         src.origins, src.env)
            else:
                self.sources[path] = Source(layer, file, (lines or {}).get(path), env=(env_refs or {}).get(path))

    def source_of(self, key: str) -> Source | None:
        path = tuple(key.split("."))
        if path in self.sources:
            return self.sources[path]
        # a mapping key: report the first leaf under it
        for p, src in self.sources.items():
            if p[: len(path)] == path:
                return src
        return None


def _at(data: Any, path: KeyPath) -> Any:
    for part in path:
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def find_file(name: str, *, relative_to: Path | None, search_dirs: list[Path]) -> Path | None:
    """Resolve a preset reference: absolute, relative to the referring file, then the search dirs.

    Only regular files (or symlinks to one) are found: a FIFO, a device or a symlink loop is skipped.
    """
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        return candidate if is_regular_file(candidate) else None
    if relative_to is not None and is_regular_file(relative_to / candidate):
        return (relative_to / candidate).resolve()
    for directory in search_dirs:
        if is_regular_file(directory / candidate):
            return (directory / candidate).resolve()
    return None


def load_with_extends(
    path: Path,
    *,
    search_dirs: list[Path],
    environ: dict[str, str] | None = None,
    what: str = "preset",
    _stack: tuple[Path, ...] = (),
) -> tuple[dict[str, Any], dict[KeyPath, Source]]:
    """Load a YAML file and its `extends:` chain (one path or a list; later wins; the file wins).

    Returns the merged data (without `extends`) and the file/line of every leaf.
    """
    try:
        path = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: RuntimeError before Python 3.13, OSError after
        problem, fix = file_problem(path) or ("path cannot be resolved", None)
        raise ConfigError(f"{what} {problem}", file=str(path), fix=fix) from None
    if path in _stack:
        chain = " -> ".join(p.name for p in (*_stack, path))
        raise ConfigError(f"`extends` cycle: {chain}", file=str(_stack[-1]), key="extends",
                          fix="remove one of the extends entries")
    doc: YamlDoc = load_yaml(path, what=what)
    substitute_env(doc, environ)
    bases = doc.data.pop("extends", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError("`extends` must be a path or a list of paths", file=str(path),
                          line=doc.line_of(("extends",)), key="extends")

    merged = Layered()
    for base in bases:
        found = find_file(base, relative_to=path.parent, search_dirs=search_dirs)
        if found is None:
            # name what is wrong with the file next to this one (a FIFO, a device), if there is one
            beside = path.parent / Path(base).expanduser()
            problem, fix = file_problem(beside) or ("not found", None)
            if problem == "not found":
                fix = f"looked next to the file and in {_dirs(search_dirs)}"
            raise ConfigError(f"extended file '{base}' {problem}", file=str(path), line=doc.line_of(("extends",)),
                              key="extends", fix=fix)
        data, sources = load_with_extends(found, search_dirs=search_dirs, environ=environ, what=what,
                                          _stack=(*_stack, path))
        merged.apply(data, "extends", sources=sources)
    merged.apply(doc.data, "file", file=str(path), lines=doc.lines, env_refs=doc.env_refs)
    return merged.data, merged.sources


def _dirs(dirs: list[Path]) -> str:
    return ", ".join(str(d) for d in dirs) or "no preset directories"
