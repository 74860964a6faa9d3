"""MaxText's own key set: the keys and defaults of its `configs/base.yml`, shipped as package data.

The translator checks native keys against this file without importing maxtext or jax. It is
generated from the installed maxtext (`python -m primus_maxtext.base_config`), and a test fails when
it no longer matches the installed `base.yml`.
"""

from __future__ import annotations

import json
import sys
from functools import cache
from importlib import resources, util
from pathlib import Path
from typing import Any

import yaml

KEY_FILE = "maxtext_base_keys.json"


def installed_base_yml() -> Path:
    """`configs/base.yml` of the installed maxtext, found without importing it."""
    spec = util.find_spec("maxtext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("maxtext is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "configs" / "base.yml"


def read_base_yml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@cache
def base_defaults() -> dict[str, Any]:
    """MaxText's base.yml keys with their default values, as shipped with this package."""
    text = resources.files("primus_maxtext").joinpath(KEY_FILE).read_text(encoding="utf-8")
    return json.loads(text)["keys"]


def render_key_file(defaults: dict[str, Any], maxtext_version: str) -> str:
    return json.dumps({"maxtext_version": maxtext_version, "keys": defaults}, indent=1, sort_keys=True) + "\n"


def main() -> int:
    from importlib.metadata import version

    out = Path(__file__).with_name(KEY_FILE)
    out.write_text(render_key_file(read_base_yml(installed_base_yml()), version("maxtext")), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
