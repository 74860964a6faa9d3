"""Reading a local corpus the same way on every backend: documents in file order, and a bad line
named by file and line number (issue 15), never a traceback from deep inside a data loader.

A `.jsonl` corpus has one JSON object per line with the text under `text_key`; any other file is
plain text, one document per line. Blank lines are skipped. A line that is not JSON, not an object,
or lacks the text field is a ConfigError (exit 2) naming `file:line`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from primus.errors import ConfigError


def read_documents(path: Path | str, text_key: str = "text", *, as_json: bool | None = None,
                   key: str = "data.path") -> Iterator[str]:
    """The documents of a local corpus, in file order. `as_json`: whether lines are JSON objects
    (default: a `.jsonl` or `.json` suffix); `key`: the config key that named the file, for errors."""
    path = Path(path)
    if as_json is None:
        as_json = path.suffix in (".jsonl", ".json")
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError("is not UTF-8 text", file=str(path), line=number, key=key) from None
            if not as_json:
                yield line.rstrip("\r\n")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"is not a JSON line ({exc.msg})", file=str(path), line=number, key=key,
                                  fix="one JSON object per line, e.g. {\"text\": \"...\"}") from None
            text = record.get(text_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ConfigError(f"has no text field '{text_key}'", file=str(path), line=number, key="data.text_key",
                                  fix="set data.text_key to the field holding the text")
            yield text
