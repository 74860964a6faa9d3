"""Layered values with provenance: every key remembers which layer and file set it.

A `Layered` is the resolved module config being built: each `apply` merges one layer on top and
records, for every leaf it sets, a `Source` (layer name, file, line). `primus config show --explain`
reads those sources back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from primus.config.yamlfile import KeyPath, YamlDoc, deep_merge, flatten, load_yaml, substitute_env
from primus.errors import ConfigError


@dataclass(frozen=True)
class Source:
    layer: str
    file: str | None = None
    line: int | None = None

    def describe(self) -> str:
        where = ""
        if self.file:
            where = f" ({self.file}" + (f":{self.line}" if self.line else "") + ")"
        return f"{self.layer}{where}"


class Layered:
    """A nested mapping plus the source of each leaf."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.sources: dict[KeyPath, Source] = {}

    def apply(self, values: dict[str, Any], layer: str, file: str | None = None,
              lines: dict[KeyPath, int] | None = None, sources: dict[KeyPath, Source] | None = None,
              keep_layer_names: bool = False) -> None:
        """Merge `values` over what is there; leaves get `sources[path]`, else (layer, file, line).

        With `keep_layer_names` the layer names inside `sources` are kept (e.g. "neutral train").
        """
        self.data = deep_merge(self.data, values)
        for path in flatten(values):
            # A leaf that replaces a mapping (or the reverse) drops the stale sources below it.
            for old in [p for p in self.sources if p[: len(path)] == path or path[: len(p)] == p]:
                del self.sources[old]
            if sources and path in sources:
                src = sources[path]
                self.sources[path] = src if keep_layer_names else Source(layer, src.file, src.line)
            else:
                self.sources[path] = Source(layer, file, (lines or {}).get(path))

    def source_of(self, key: str) -> Source | None:
        path = tuple(key.split("."))
        if path in self.sources:
            return self.sources[path]
        # a mapping key: report the first leaf under it
        for p, src in self.sources.items():
            if p[: len(path)] == path:
                return src
        return None


def find_file(name: str, *, relative_to: Path | None, search_dirs: list[Path]) -> Path | None:
    """Resolve a preset reference: absolute, relative to the referring file, then the search dirs."""
    candidate = Path(name).expanduser()
    if candidate.is_absolute():
        return candidate if candidate.exists() else None
    if relative_to is not None and (relative_to / candidate).is_file():
        return (relative_to / candidate).resolve()
    for directory in search_dirs:
        if (directory / candidate).is_file():
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
    path = path.resolve()
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
            raise ConfigError(f"extended file '{base}' not found", file=str(path), line=doc.line_of(("extends",)),
                              key="extends", fix=f"looked next to the file and in {_dirs(search_dirs)}")
        data, sources = load_with_extends(found, search_dirs=search_dirs, environ=environ, what=what,
                                          _stack=(*_stack, path))
        merged.apply(data, "extends", sources=sources)
    merged.apply(doc.data, "file", file=str(path), lines=doc.lines)
    return merged.data, merged.sources


def _dirs(dirs: list[Path]) -> str:
    return ", ".join(str(d) for d in dirs) or "no preset directories"
