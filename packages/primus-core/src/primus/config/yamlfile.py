"""Safe YAML loading that remembers where every key came from, and refuses hostile input.

Only a safe loader is used: a tag that asks for a Python object is refused before anything is
constructed. Alongside the data, `load_yaml` returns a map from key path to line number so that
every later error can point at the line the user wrote.

A config file can come from anywhere (a shared directory, an `extends:` path, a model preset named
on the command line), so loading is bounded: only regular files are opened (a FIFO would block, a
device such as /dev/zero never ends), their size is capped before they are read, and the YAML is
checked for nesting depth and for alias expansion (a "billion laughs" document is a few hundred
bytes that expands to billions of values) before anything is built from it.

Scalars are typed as YAML 1.1 does (pyyaml), plus the YAML 1.2 float spellings users write every
day: `1e-3`, `1E+5`, `-2e4`, `-.5` are floats, not strings.
"""

from __future__ import annotations

import copy
import errno
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from primus.errors import ConfigError

KeyPath = tuple[str, ...]

MIB = 1024 * 1024
# Limits on one config file. The largest real ones (Primus and upstream Primus module presets) are
# under 100 KB, a few hundred keys and 6 levels deep; each limit is far above that and far below
# what would take seconds or hundreds of MiB to load.
MAX_FILE_BYTES = 4 * MIB
MAX_DEPTH = 64  # nested mappings/lists, counted after aliases are expanded
MAX_NODES = 20_000  # keys, values and list items, counted after aliases are expanded
MAX_SCALAR_CHARS = 64 * 1024  # a command-line value longer than this stays text

# YAML 1.2 floats that YAML 1.1 reads as strings: an exponent without a dot (`1e-3`, `1E+5`) or a
# signed leading-dot fraction (`-.5`). Forms YAML 1.1 already types (`1.5`, `.5`, `1.0e-3`, `.inf`)
# are left to its own resolver; integers never match (a dot or an exponent is required).
_YAML12_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+(?:[eE][-+]?[0-9]+)?|[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+)$")


# the constructor's own errors for a tagged value it cannot build (`!!int abc`, `!!timestamp x`, an
# integer of more digits than Python converts), beyond yaml.YAMLError
_CONSTRUCT_ERRORS = (ValueError, TypeError, AttributeError, OverflowError)


class _ValueNotBuilt(yaml.YAMLError):
    """A scalar the constructor could not build, with the mark of its node."""

    def __init__(self, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


class _LocatedConstruction:
    """Loader mixin: a value that cannot be built is reported at its node, not as a bare ValueError."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)  # type: ignore[misc]
        except _CONSTRUCT_ERRORS as exc:
            # the first clause is the problem; later ones can be advice for Python programmers
            raise _ValueNotBuilt(str(exc).split(";")[0], node.start_mark) from None


def _primus_loader(base: type) -> type:
    """A subclass of the safe loader `base` that types YAML 1.2 floats and locates construction
    errors; `base` itself is unchanged."""
    loader = type(f"Primus{base.__name__}", (_LocatedConstruction, base), {})
    # the resolver table is a class attribute shared with yaml.SafeLoader: give the subclass its own
    loader.yaml_implicit_resolvers = {ch: list(rs) for ch, rs in base.yaml_implicit_resolvers.items()}
    loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+.0123456789"))
    return loader


# libyaml's safe loader when pyyaml was built with it (several times faster), else pure Python
_SafeLoader = _primus_loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader))

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


@dataclass
class YamlDoc:
    """A loaded YAML mapping with the line of each key path (1-based)."""

    path: Path
    data: dict[str, Any]
    lines: dict[KeyPath, int] = field(default_factory=dict)
    #: key path -> the `${VAR}` text its value was substituted from (provenance names it)
    env_refs: dict[KeyPath, str] = field(default_factory=dict)

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


# --------------------------------------------------------------------------- which files may be read

_FILE_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
               stat.S_IFSOCK: "socket", stat.S_IFDIR: "directory"}


def _stat_problem(exc: OSError | ValueError) -> tuple[str, str | None]:
    """(what is wrong, fix) for a path that os.stat or os.open refused."""
    if isinstance(exc, ValueError):  # os functions refuse a path with a NUL character
        return "path has a NUL character", "check the path"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return "not found", "check the path"
    if exc.errno == errno.ELOOP:
        return "path is a symlink loop", "point the symlink at a YAML file"
    return f"cannot be read ({exc.strerror})", None


def _kind_problem(mode: int) -> tuple[str, str | None] | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, expected a YAML file", None
    kind = _FILE_KINDS.get(stat.S_IFMT(mode), "special file")
    return f"is a {kind}, not a regular file", "Primus reads config from regular YAML files only"


def file_problem(path: Path | str) -> tuple[str, str | None] | None:
    """Why `path` cannot be read as a config file, as (what is wrong, fix); None when it can.

    Symlinks are followed (a link to a YAML file is fine); anything but a regular file is refused
    without being opened, since opening a FIFO blocks until a writer comes.
    """
    try:
        info = os.stat(path)
    except (OSError, ValueError) as exc:
        return _stat_problem(exc)
    return _kind_problem(info.st_mode)


def is_regular_file(path: Path | str) -> bool:
    """True for a regular file or a symlink to one; False for anything else, including broken paths."""
    return file_problem(path) is None


def _too_large(what: str, shown: str) -> ConfigError:
    return ConfigError(f"{what} is larger than the {MAX_FILE_BYTES // MIB} MiB a config file may be", file=shown,
                       fix="config files are small YAML; check that this is the file you meant")


def _read_config_text(path: Path, what: str) -> str:
    """The text of a regular file of at most MAX_FILE_BYTES, never reading more than that."""
    shown = str(path)
    problem = file_problem(path)
    if problem is not None:
        raise ConfigError(f"{what} {problem[0]}", file=shown, fix=problem[1])
    # the path may have been replaced since the stat: a non-blocking open returns at once even for a
    # FIFO, and the checks are repeated on what was actually opened
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (OSError, ValueError) as exc:
        message, fix = _stat_problem(exc)
        raise ConfigError(f"{what} {message}", file=shown, fix=fix) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        problem = _kind_problem(info.st_mode)
        if problem is not None:
            raise ConfigError(f"{what} {problem[0]}", file=shown, fix=problem[1])
        if info.st_size > MAX_FILE_BYTES:
            raise _too_large(what, shown)
        raw = handle.read(MAX_FILE_BYTES + 1)  # a file that grew after the stat is still cut off
    if len(raw) > MAX_FILE_BYTES:
        raise _too_large(what, shown)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text", file=shown) from None


# --------------------------------------------------------------------------- bounded YAML


def _line(mark: Any) -> int | None:
    return mark.line + 1 if mark is not None else None


def _check_events(text: str, shown: str) -> None:
    """Refuse deep nesting and too many nodes from the event stream, before a node tree exists.

    Composing recurses once per nesting level (the pure-Python composer hits Python's recursion
    limit near 300 levels) and keeps every node in memory, so both are checked on events first.
    """
    depth = nodes = 0
    loader = _SafeLoader(text)
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise _too_deep(shown, _line(event.start_mark))
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            if isinstance(event, (yaml.CollectionStartEvent, yaml.ScalarEvent, yaml.AliasEvent)):
                nodes += 1
                if nodes > MAX_NODES:
                    raise _too_many(shown, _line(event.start_mark))
    finally:
        loader.dispose()


def _too_deep(shown: str, line: int | None) -> ConfigError:
    return ConfigError(f"YAML is nested more than {MAX_DEPTH} levels deep", file=shown, line=line,
                       fix="a config is a few levels of mappings; flatten this structure")


def _too_many(shown: str, line: int | None) -> ConfigError:
    return ConfigError(f"YAML holds more than {MAX_NODES} values (counting each use of an alias `*name` "
                       "in full)", file=shown, line=line,
                       fix="a config holds a few hundred values; use fewer or smaller aliases")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node, shown: str) -> None:
    """Refuse a node graph whose aliases expand it past MAX_NODES or MAX_DEPTH, or loop back on it.

    An alias re-uses its anchor's node object, so the graph stays small while the data built from
    it (and every walk over that data) grows with each use. The expanded size and depth of each node
    are computed once and remembered, so this walk is linear in the graph, not in the expansion; it
    is iterative, so no document can drive it into Python's recursion limit.
    """
    size: dict[int, int] = {}  # id(node) -> nodes in its expanded subtree, itself included
    depth: dict[int, int] = {}  # id(node) -> nested collections in its expanded subtree
    open_nodes: set[int] = set()  # the path from the root to the node being walked
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            children = _children(node)
            open_nodes.discard(key)
            size[key] = 1 + sum(size[id(child)] for child in children)
            is_collection = not isinstance(node, yaml.ScalarNode)
            depth[key] = is_collection + max((depth[id(child)] for child in children), default=0)
            if size[key] > MAX_NODES:
                raise _too_many(shown, _line(node.start_mark))
            if depth[key] > MAX_DEPTH:
                raise _too_deep(shown, _line(node.start_mark))
        elif key in open_nodes:
            raise ConfigError("YAML alias refers to a mapping or list that contains it", file=shown,
                              line=_line(node.start_mark), fix="a config cannot hold a recursive structure")
        elif key not in size:  # a node reached again through an alias costs nothing more
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))


def _load_document(text: str, shown: str) -> tuple[yaml.Node | None, Any]:
    """(node tree, data) of a single-document YAML text, within the limits above.

    Raises ConfigError for a limit and yaml.YAMLError for bad YAML or a value that cannot be built.
    """
    _check_events(text, shown)
    # compose once (the node tree keeps line numbers), check it, then construct from it, safely
    loader = _SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_expansion(node, shown)
        return node, loader.construct_document(node)
    finally:
        loader.dispose()


# parsed files by identity (path, inode, size, mtime): one process resolves the same presets again
# and again (config show of several modules, the bench, tests); a changed file has a new identity
_PARSED: dict[tuple[str, int, int, int], tuple[dict[str, Any], dict[KeyPath, int]]] = {}
_PARSED_MAX = 256


def _identity(path: Path) -> tuple[str, int, int, int] | None:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return (str(path), info.st_ino, info.st_size, info.st_mtime_ns) if stat.S_ISREG(info.st_mode) else None


def load_yaml(path: Path, *, what: str = "file") -> YamlDoc:
    """Load one YAML mapping safely. Empty files, non-mappings, syntax errors and input past the
    limits above are ConfigErrors. The caller owns the returned data (a fresh copy each call)."""
    identity = _identity(path)
    if identity is not None and identity in _PARSED:
        data, lines = _PARSED[identity]
        return YamlDoc(path=path, data=copy.deepcopy(data), lines=dict(lines))
    doc = _parse_file(path, what)
    if identity is not None:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[identity] = (copy.deepcopy(doc.data), dict(doc.lines))
    return doc


def _parse_file(path: Path, what: str) -> YamlDoc:
    shown = str(path)
    text = _read_config_text(path, what)
    try:
        node, data = _load_document(text, shown)
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        raise ConfigError(
            f"YAML tag refused: {exc.problem}",
            file=shown,
            line=mark.line + 1 if mark else None,
            fix="Primus reads plain YAML only; remove the tag",
        ) from None
    except _ValueNotBuilt as exc:
        raise ConfigError(f"YAML value cannot be read: {exc.problem}", file=shown, line=_line(exc.problem_mark),
                          fix="write it as a plain number, string or list") from None
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


def _is_plain(value: Any) -> bool:
    """Only strings, numbers, bools, None, and lists and mappings of them (no dates, bytes, sets)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, list):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(_is_plain(k) and _is_plain(v) for k, v in value.items())
    return False


def parse_scalar(text: str) -> Any:
    """Type a `key=value` value from the command line the way a YAML file types it.

    Integers, floats (YAML 1.1 and 1.2 spellings: `3.0e-3`, `1e-3`, `.5`, `.inf`), bools, null and
    flow lists/mappings (`[1, 2]`) are typed; anything else, including text longer than
    MAX_SCALAR_CHARS, invalid YAML, dates and other tagged values, is returned as the text itself.
    Never raises.
    """
    if not text or len(text) > MAX_SCALAR_CHARS:
        return text
    try:
        _, value = _load_document(text, "command line")
    # a value the user typed is never an error here: whatever YAML cannot type plainly stays text
    except (ConfigError, yaml.YAMLError):
        return text
    return value if _is_plain(value) else text


def _typed_scalar(text: str) -> Any:
    """Type a substituted scalar the way YAML would have typed it if written literally."""
    value = parse_scalar(text)
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
        doc.env_refs[key_path] = ", ".join(m.group(0) for m in _ENV_REF.finditer(value))
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
