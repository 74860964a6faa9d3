"""MaxText's checkpoints (Orbax, `<checkpoint dir>/<step>/`) checked before MaxText restores one.

MaxText always restores the newest step Orbax lists and has no fallback: a file of it missing or
truncated ends in a deep traceback (tensorstore's OUT_OF_RANGE surfacing as Orbax's "incompatible
handler"). So before JAX starts, the newest step is checked whole without reading any array: its
JSON metadata parse, and every value the OCDBT databases reference lies inside its data file
(tensorstore's `ocdbt.dump` reads only the manifest and B+tree nodes). A damaged step is, with
`checkpoint.on_damaged: fail` (the default), a one-line error naming it; with `previous`, it is moved
aside (`<step>.damaged`, which Orbax does not list and never deletes) and the newest older complete
step is what MaxText restores.

Orbax writes JSON and tensorstore arrays only: nothing in a MaxText checkpoint is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from loguru import logger

from primus.runs.resume import refuse_damaged

JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding")


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be restored: a file missing, truncated or unreadable."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def steps(checkpoint_dir: Path) -> list[Path]:
    """The step directories Orbax lists (integer names), oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    return sorted((p for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _check_json(step: Path, path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpoint(step, f"{path.relative_to(step)} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpoint(step, f"{path.relative_to(step)} cannot be read ({_first_line(exc)})") from None


def _check_ocdbt(step: Path, item: Path) -> None:
    """Every B+tree node of the item's OCDBT database reads, and every value it references lies
    inside its data file."""
    import tensorstore as ts

    base = ts.KvStore.open(item.resolve().as_uri() + "/").result()
    pending: list[str | None] = [None]  # None: the manifest
    seen: set[str] = set()
    while pending:
        location = pending.pop()
        try:
            node = ts.ocdbt.dump(base, location).result()
        except ValueError as exc:  # tensorstore's error for a missing, truncated or corrupt file
            where = (item / "manifest.ocdbt" if location is None else _location(item, location)[0]).relative_to(step)
            raise DamagedCheckpoint(step, f"{where} cannot be read ({_first_line(exc)})") from None
        stack: list[object] = [node]
        while stack:
            value = stack.pop()
            if isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, list):
                stack.extend(value)
            elif isinstance(value, str) and value.count(":") >= 4:
                kind = value.split(":", 1)[0]
                if kind in ("btreenode", "versionnode") and value not in seen:
                    seen.add(value)
                    pending.append(value)
                elif kind == "value":
                    _check_value(step, item, value)


def _location(item: Path, location: str) -> tuple[Path, int]:
    """`<kind>:<prefix>:<file>:<offset>:<length>` in the database at `item` -> (its file, the end of its bytes)."""
    rest, offset, length = location.split(":", 1)[1].rsplit(":", 2)
    prefix, name = rest.split(":", 1)
    return item / unquote(prefix) / unquote(name), int(offset) + int(length)


def _check_value(step: Path, item: Path, location: str) -> None:
    path, end = _location(item, location)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DamagedCheckpoint(step, f"{path.relative_to(step)} is missing") from None
    if size < end:
        raise DamagedCheckpoint(step, f"{path.relative_to(step)} is truncated ({size:,} of at least {end:,} bytes)")


def check_complete(step: Path) -> None:
    """Raise DamagedCheckpoint naming the first file of `step` that is missing, truncated or unreadable."""
    metadata = _check_json(step, step / "_CHECKPOINT_METADATA")
    handlers = metadata.get("item_handlers") if isinstance(metadata, dict) else None
    for name in handlers if isinstance(handlers, dict) else ():
        if not (step / name).is_dir():
            raise DamagedCheckpoint(step, f"{name}/ is missing (_CHECKPOINT_METADATA lists it)")
    for item in sorted(p for p in step.iterdir() if p.is_dir()):
        for name in JSON_FILES:
            if (item / name).exists():
                _check_json(step, item / name)
        for path in sorted((item / "array_metadatas").glob("*")) + sorted(item.glob("*.json")):
            if path.is_file():
                _check_json(step, path)
        if (item / "manifest.ocdbt").exists():
            _check_ocdbt(step, item)
        elif (item / "d").is_dir() or any(item.glob("ocdbt.process_*")):  # an OCDBT database without its root
            raise DamagedCheckpoint(step, f"{(item / 'manifest.ocdbt').relative_to(step)} is missing")


def _move_aside(path: Path) -> Path | None:
    """`<step>` -> `<step>.damaged` (or `.damaged-2`, ...): kept, but no longer listed by Orbax. None
    when another process of the job moved it first."""
    target, n = path.with_name(f"{path.name}.damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    try:
        path.rename(target)
    except FileNotFoundError:
        return None
    return target


def resolve_damaged(checkpoint_dir: Path, on_damaged: str | None, *, process_id: int = 0) -> Path | None:
    """Make sure the step MaxText will restore is complete; returns it (None: nothing to restore).

    Every process of the job checks (read-only, so they decide alike on a shared filesystem); with
    `previous` each moves a damaged step aside, tolerating a peer that moved it first.
    """
    candidates = steps(checkpoint_dir)[::-1]
    for i, path in enumerate(candidates):
        try:
            check_complete(path)
            return path
        except DamagedCheckpoint as exc:
            reason = exc.reason
        except FileNotFoundError:  # moved aside by a peer while this process read it
            if path.exists():
                raise
            continue
        older = candidates[i + 1] if i + 1 < len(candidates) else None
        refuse_damaged(path, reason, older=older, on_damaged=on_damaged)
        aside = _move_aside(path)  # None: a peer process moved it
        (logger.warning if process_id == 0 else logger.info)(
            f"checkpoint {path} is damaged ({reason}): moved aside to "
            f"{aside.name if aside else path.name + '.damaged'} and resuming from step {older.name} "
            "(checkpoint.on_damaged: previous)")
    return None
