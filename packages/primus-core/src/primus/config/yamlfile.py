"""Safe YAML loading that remembers where every key came from.

Only `yaml.SafeLoader` is used: a tag that asks for a Python object is refused before anything is
constructed. Alongside the data, `load_yaml` returns a map from key path to line number so that
every later error can point at the line the user wrote.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from primus.errors import ConfigError

KeyPath = tuple[str, ...]

# libyaml's safe loader when pyyaml was built with it (several times faster), else pure Python
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


@dataclass
class YamlDoc:
    """A loaded YAML mapping with the line of each key path (1-based)."""

    path: Path
    data: dict[str, Any]
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line_of(self, key_path: KeyPath) -> int | None:
        """The line of `key_path` or of its nearest ancestor that has one."""
        for n in range(len(key_path), 0, -1):
            line = self.lines.get(tuple(key_path[:n]))
            if line:
                return line
        return None


def _record_lines(node: yaml.Node, prefix: KeyPath, lines: dict[KeyPath, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                path = (*prefix, str(key_node.value))
                lines[path] = key_node.start_mark.line + 1
                _record_lines(value_node, path, lines)


def load_yaml(path: Path, *, what: str = "file") -> YamlDoc:
    """Load one YAML mapping safely. Empty files, non-mappings and syntax errors are ConfigErrors."""
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} not found", file=shown, fix="check the path") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} is a directory, expected a YAML file", file=shown) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text", file=shown) from None
    try:
        # compose once (the node tree keeps line numbers), then construct from it, safely
        loader = _SafeLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        raise ConfigError(
            f"YAML tag refused: {exc.problem}",
            file=shown,
            line=mark.line + 1 if mark else None,
            fix="Primus reads plain YAML only; remove the tag",
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"YAML syntax error: {problem}",
            file=shown,
            line=mark.line + 1 if mark else None,
            fix="fix the YAML syntax on that line",
        ) from None
    if data is None:
        raise ConfigError(f"{what} is empty", file=shown, fix="an experiment needs at least `modules:`")
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a YAML mapping, found {type(data).__name__}", file=shown, line=1)
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _record_lines(node, (), lines)
    return YamlDoc(path=path, data=data, lines=lines)


def _typed_scalar(text: str) -> Any:
    """Type a substituted scalar the way YAML would have typed it if written literally."""
    if text == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (str, int, float, bool)) or value is None else text


def substitute_env(doc: YamlDoc, environ: dict[str, str] | None = None) -> None:
    """Replace `${VAR}` and `${VAR:default}` in every string of `doc`, in place.

    A value that is exactly one reference is re-typed after substitution (`${STEPS:10}` is the
    integer 10); a reference inside a longer string stays text.
    """
    env = os.environ if environ is None else environ

    def sub_string(value: str, key_path: KeyPath) -> Any:
        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"environment variable ${{{name}}} is not set",
                file=str(doc.path),
                line=doc.line_of(key_path),
                key=".".join(key_path),
                fix=f"export {name}=... or write ${{{name}:default}}",
            )

        whole = _ENV_REF.fullmatch(value)
        replaced = _ENV_REF.sub(replace, value)
        return _typed_scalar(replaced) if whole else replaced

    def walk(value: Any, key_path: KeyPath) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*key_path, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key_path) for v in value]
        if isinstance(value, str) and "${" in value:
            return sub_string(value, key_path)
        return value

    doc.data = walk(doc.data, ())


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `top` merged over `base`, recursively for nested mappings; `top` wins."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def flatten(data: dict[str, Any], prefix: KeyPath = ()) -> dict[KeyPath, Any]:
    """Leaf key paths of a nested mapping (an empty mapping counts as a leaf)."""
    out: dict[KeyPath, Any] = {}
    for key, value in data.items():
        path = (*prefix, str(key))
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out
