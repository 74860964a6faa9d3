"""The field names (and plain defaults) of `transformers.TrainingArguments`, as package data.

Native keys of the hf backend are TrainingArguments names. Checking a key must not import
transformers (config resolution stays light), so the field list ships as `training_arguments.json`
and a test asserts it matches the installed transformers. Refresh it after a transformers upgrade:

    python -m primus_hf.training_args
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

DATA_FILE = "training_arguments.json"
NOT_PLAIN = "<not a plain value>"  # default that JSON cannot hold (an enum, a factory object)


@cache
def training_arguments() -> dict[str, Any]:
    """{field name: default} of TrainingArguments, read from the package data."""
    data = json.loads(resources.files("primus_hf").joinpath(DATA_FILE).read_text())
    return data["fields"]


def recorded_version() -> str:
    return json.loads(resources.files("primus_hf").joinpath(DATA_FILE).read_text())["transformers"]


def _plain(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return NOT_PLAIN
    return value


def current_fields() -> dict[str, Any]:
    """The installed transformers' TrainingArguments fields (imports transformers)."""
    import dataclasses

    from transformers import TrainingArguments

    out: dict[str, Any] = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = None
        out[f.name] = _plain(getattr(value, "value", value))  # enums keep their string value
    return out


def main() -> None:
    import transformers

    path = resources.files("primus_hf").joinpath(DATA_FILE)
    payload = {"transformers": transformers.__version__, "fields": current_fields()}
    with open(str(path), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, sort_keys=False)
        f.write("\n")
    print(f"wrote {len(payload['fields'])} TrainingArguments fields of transformers "
          f"{payload['transformers']} to {path}")


if __name__ == "__main__":
    main()
