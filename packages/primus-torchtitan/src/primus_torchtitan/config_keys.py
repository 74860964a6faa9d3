"""TorchTitan's configuration keys (dotted paths of `Trainer.Config`) and defaults, as package data.

Native keys of the torchtitan backend are TorchTitan's own dotted names (`training.steps`,
`parallelism.tensor_parallel_degree`, ...). Checking a key must not import torchtitan, so the key
list ships as `torchtitan_config_keys.json`, and a test asserts it matches the installed
torchtitan. Refresh it after a torchtitan upgrade:

    python -m primus_torchtitan.config_keys
"""

from __future__ import annotations

import dataclasses
import json
from functools import cache
from importlib import resources
from typing import Any

DATA_FILE = "torchtitan_config_keys.json"
NOT_PLAIN = "<not a plain value>"
#: config registry functions whose configs are walked; their union is the key set (components
#: such as the dataloader are polymorphic, and each function picks its own classes)
SOURCES = ("torchtitan.models.llama3.config_registry:llama3_debugmodel",
           "torchtitan.models.qwen3.config_registry:qwen3_debugmodel")


@cache
def _payload() -> dict[str, Any]:
    return json.loads(resources.files("primus_torchtitan").joinpath(DATA_FILE).read_text())


def config_keys() -> dict[str, Any]:
    """{dotted key: default} of TorchTitan's Trainer.Config, read from the package data."""
    return _payload()["keys"]


def recorded_version() -> str:
    return _payload()["torchtitan"]


def model_flavors() -> dict[str, list[str]]:
    """{TorchTitan model module: its flavors}, read from the package data."""
    return _payload()["flavors"]


def _plain(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return NOT_PLAIN
    return value


def _walk(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    for f in dataclasses.fields(obj):
        if f.name.startswith("_") or f.name == "model_spec":  # model_spec is set in code, not by keys
            continue
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _walk(value, key + ".", out)
        else:
            out.setdefault(key, _plain(value))


def current_keys() -> dict[str, Any]:
    """The installed torchtitan's keys (imports torchtitan; CPU patches must already apply)."""
    from primus.backends.spec import load_object

    out: dict[str, Any] = {}
    for ref in SOURCES:
        _walk(load_object(ref)(), "", out)
    return dict(sorted(out.items()))


#: model modules whose flavors are recorded: the families this backend builds, and deepseek_v3
FLAVOR_TABLES = {"llama3": "torchtitan.models.llama3:llama3_configs",
                 "qwen3": "torchtitan.models.qwen3:qwen3_configs",
                 "deepseek_v3": "torchtitan.models.deepseek_v3:deepseekv3_configs"}


def current_flavors() -> dict[str, list[str]]:
    from primus.backends.spec import load_object

    out = {}
    for module, ref in FLAVOR_TABLES.items():
        try:
            out[module] = sorted(load_object(ref))
        except (ImportError, AttributeError):
            continue
    return out


def main() -> None:
    from primus.patches.registry import PatchContext
    from primus.platform.detect import detect_platform
    from primus_torchtitan.patches import PATCHES

    import_patches = [p for p in PATCHES if p.phase == "before_import"]
    ctx = PatchContext(backend="torchtitan", platform=detect_platform().kind, framework_version=None)
    for patch in import_patches:
        if ctx.platform in patch.platforms:
            patch.apply(ctx)
    import torchtitan

    path = resources.files("primus_torchtitan").joinpath(DATA_FILE)
    payload = {"torchtitan": torchtitan.__version__, "flavors": current_flavors(), "keys": current_keys()}
    with open(str(path), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    print(f"wrote {len(payload['keys'])} keys of torchtitan {payload['torchtitan']} to {path}")


if __name__ == "__main__":
    main()
