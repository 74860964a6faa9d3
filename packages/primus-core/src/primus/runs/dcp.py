"""Reading torch's distributed checkpoints (DCP) without running code from them, for every torch backend.

DCP's stock reader unpickles without restriction: the `.metadata` file, and every non-tensor value
(its default planner loads them with torch's weights-only guard off). `SafeReader` reads the
metadata through an unpickler that knows only DCP's metadata classes, `SafePlanner` the values
through `torch.load(..., weights_only=True)`; a file that names anything else is refused.
`damage` tells a checkpoint with a file missing or cut short (and names the file) from one that is
refused or does not fit. Used by the torchtitan and hf backends.

Torch is imported by name at run time only (as in `primus.launch.torchrun`): only a torch backend
uses this module, and primus-core itself never depends on torch. `SafeReader` and `SafePlanner`
are built on first use, as subclasses of torch's own reader and planner.
"""

from __future__ import annotations

import importlib
import io
import pickle
from functools import cache
from pathlib import Path
from typing import Any

from primus.errors import ConfigError

METADATA = ".metadata"  # written last by DCP: a folder without it is an unfinished save


def _torch(module: str = "torch") -> Any:
    return importlib.import_module(module)


# ----------------------------------------------------------------------------- restricted unpickling


class UnsafeCheckpoint(pickle.UnpicklingError):
    """A checkpoint file names a Python object that loading would construct or call."""


@cache
def _metadata_globals() -> frozenset[tuple[str, str]]:
    torch, dcp_metadata = _torch(), _torch("torch.distributed.checkpoint.metadata")
    allowed = {("torch.distributed.checkpoint.metadata", name) for name, value in vars(dcp_metadata).items()
               if isinstance(value, type) and value.__module__ == dcp_metadata.__name__}
    allowed |= {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
    allowed |= {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # str -> torch.layout, nothing else
        ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }
    return frozenset(allowed)


class _Restricted(pickle.Unpickler):
    def __init__(self, file: Any, allowed: frozenset[tuple[str, str]], what: str) -> None:
        super().__init__(file)
        self.allowed, self.what = allowed, what

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise UnsafeCheckpoint(f"{self.what} names {module}.{name}, which is not checkpoint data; "
                                   "refused to load it")
        return super().find_class(module, name)


def restricted_loads(data: bytes, allowed: frozenset[tuple[str, str]] = frozenset(), what: str = "pickle") -> Any:
    """pickle.loads that constructs plain values and the `allowed` globals only."""
    return _Restricted(io.BytesIO(data), allowed, what).load()


@cache
def _safe_classes() -> dict[str, type]:
    """SafeReader and SafePlanner: subclasses of DCP's file reader and default load planner."""
    torch = _torch()
    checkpoint = _torch("torch.distributed.checkpoint")
    planner = _torch("torch.distributed.checkpoint.default_planner")
    storage_meta = _torch("torch.distributed.checkpoint.metadata").StorageMeta

    class SafeReader(checkpoint.FileSystemReader):
        """DCP's file reader with the `.metadata` file read by a restricted unpickler."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as stream:
                metadata = _Restricted(stream, _metadata_globals(), f"{path}").load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = storage_meta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(planner.DefaultLoadPlanner):
        """DCP's default load planner, with non-tensor values read by `torch.load(weights_only=True)`."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return {"SafeReader": SafeReader, "SafePlanner": SafePlanner}


def __getattr__(name: str) -> Any:  # `from primus.runs.dcp import SafeReader` builds the classes then
    if name in ("SafeReader", "SafePlanner"):
        return _safe_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def read_full_tensors(path: Path, names: list[str] | None = None, *, prefix: str = "") -> dict[str, Any]:
    """The full tensors `names` (default: every tensor whose name starts with `prefix`) of the DCP
    checkpoint `path`, read in one process whatever layout saved it; a name it lacks is left out."""
    torch, dcp = _torch(), _torch("torch.distributed.checkpoint")
    tensor_metadata = _torch("torch.distributed.checkpoint.metadata").TensorStorageMetadata
    reader, planner = _safe_classes()["SafeReader"], _safe_classes()["SafePlanner"]
    metadata = reader(str(path)).read_metadata()
    entries = metadata.state_dict_metadata
    state: dict[str, Any] = {}
    for name in ([n for n in entries if n.startswith(prefix)] if names is None else names):
        info = entries.get(name)
        if info is None:
            continue
        if not isinstance(info, tensor_metadata):
            if names is None:
                continue
            raise ConfigError(f"checkpoint {path}: {name} is not a tensor")
        state[name] = torch.empty(tuple(info.size), dtype=info.properties.dtype)
    if state:
        dcp.load(state, storage_reader=reader(str(path)), planner=planner(), no_dist=True)
    return state


# ----------------------------------------------------------------------------- damaged checkpoints


def cause_is_damage(exc: BaseException) -> bool:
    """A read error that means a file missing or cut short (not a refused pickle, not a permission
    error, not a model that does not match the checkpoint)."""
    if isinstance(exc, _torch("torch.distributed.checkpoint.api").CheckpointException):
        causes = [failure[0] if isinstance(failure, tuple) else failure for failure in exc.failures.values()]
        return bool(causes) and all(cause_is_damage(cause) for cause in causes)
    if isinstance(exc, UnsafeCheckpoint) or (isinstance(exc, pickle.UnpicklingError)
                                             and str(exc).startswith("Weights only load failed")):
        return False
    if isinstance(exc, (EOFError, pickle.UnpicklingError)):
        return True
    if isinstance(exc, RuntimeError) and "PytorchStreamReader" in str(exc):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, PermissionError)


def damage(path: Path, exc: BaseException) -> str | None:
    """What is wrong with the files of checkpoint `path` that failed to load with `exc`; None when
    the failure is not damage. The metadata is read again (safely) and every data file measured
    against it, so the file is named; DCP itself folds a metadata read error into an AssertionError."""
    try:
        metadata = _safe_classes()["SafeReader"](str(path)).read_metadata()
    except UnsafeCheckpoint:
        return None
    except PermissionError:
        return None
    except (EOFError, pickle.UnpicklingError, OSError, AttributeError, TypeError):
        return f"{METADATA} is truncated or corrupt"
    ends: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        name = str(getattr(info, "relative_path", ""))
        if name:
            ends[name] = max(ends.get(name, 0), int(info.offset) + int(info.length))
    for name, end in sorted(ends.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < end:
            return f"{name} is truncated ({file.stat().st_size} of {end} bytes)"
    return "a file is truncated or corrupt" if cause_is_damage(exc) else None


def first_failure(exc: Any) -> str:
    """The first rank's failure of a DCP CheckpointException, in one line."""
    for failure in exc.failures.values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        return f"{type(cause).__name__}: {cause}".splitlines()[0]
    return "CheckpointException"
