"""`model: {hf_path: DIR}` under FSDP: each rank reads only the rows of the weights it keeps.

`from_pretrained` on every rank would hold the whole model per rank before `fully_shard` cuts it.
Instead the model is built with its parameters on the meta device (buffers such as the rotary
frequencies stay real), sharded, given empty local storage, and every local shard is filled from
the safetensors files with `safe_open(...).get_slice(name)[rows]`. FSDP2 shards every parameter on
dim 0 in `torch.chunk` pieces, so rank r of w keeps rows [r*c, min((r+1)*c, n)) with c = ceil(n/w).

The names on disk are `primus.models.hf.hf_tensor_shapes`'s (see `primus_hf.export`): a fused
transformers 5 expert tensor (`mlp.experts.gate_up_proj` [E, 2F, H], `mlp.experts.down_proj`)
is sharded over experts and filled from each local expert's own matrices (Llama 4's fused experts
are fused on disk too: their rows are read directly). Buffers saved with the weights (DeepSeek-V3's
expert bias) are read whole.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from primus.errors import ConfigError

_FUSED = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^(model\.layers\.\d+\.)mlp\.gate\.weight$")


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers are left where they are."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def shard_rows(rows: int, rank: int, world: int) -> tuple[int, int]:
    """The rows [start, end) FSDP2's dim-0 shard of `rows` rows gives `rank` of `world`."""
    chunk = math.ceil(rows / world)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


class SafetensorsReader:
    """Slices of the tensors of a model directory, by on-disk name. Each read opens (maps) the file
    and closes it again: pages of a mapping count in the process's resident memory for as long as
    it is open, so keeping the files open would show every page a rank touched, shards included,
    on top of its copies."""

    def __init__(self, index: dict[str, tuple[Path, str, tuple[int, ...]]]) -> None:
        from safetensors import safe_open

        self.index = index
        self._open = safe_open

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        if name not in self.index:
            raise ConfigError(f"tensor {name} is missing from the model directory", key="model.hf_path")
        with self._open(str(self.index[name][0]), framework="pt", device="cpu") as f:
            return f.get_slice(name)[start:end].clone()


def fill_shards(model: torch.nn.Module, reader: SafetensorsReader, family: str, rank: int, world: int) -> None:
    """Copy every parameter's local rows (FSDP2 dim-0 shards, or whole tensors) from `reader`, and
    every buffer the directory holds."""
    mixtral = family == "mixtral"
    experts = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        rows = param.shape[0]
        start, end = shard_rows(rows, rank, world) if hasattr(param, "to_local") else (0, rows)
        if local.shape[0] != end - start:
            raise RuntimeError(f"{name}: local shard of {local.shape[0]} rows, expected rows {start}..{end}")
        value = _read_rows(reader, name, start, end, tuple(local.shape), mixtral, experts)
        with torch.no_grad():
            if tuple(value.shape) != tuple(local.shape):
                raise ConfigError(f"tensor {name}: rows {start}..{end} read as {list(value.shape)}, the model's "
                                  f"shard is {list(local.shape)}", key="model.hf_path")
            local.copy_(value.to(local.dtype))
    for name, buffer in model.named_buffers():  # saved buffers (DeepSeek-V3's expert bias) are whole on every rank
        if name in reader.index:
            with torch.no_grad():
                buffer.copy_(reader.rows(name, 0, buffer.shape[0]).to(buffer.dtype))


def _read_rows(reader: SafetensorsReader, name: str, start: int, end: int, shape: tuple[int, ...], mixtral: bool,
               experts: tuple[str, str, str]) -> torch.Tensor:
    """Rows [start, end) of the model's parameter `name`, from its on-disk tensors."""
    fused = _FUSED.match(name)
    if not fused:
        router = _ROUTER.match(name)
        disk = f"{router.group(1)}block_sparse_moe.gate.weight" if router and mixtral else name
        return reader.rows(disk, start, end)
    prefix, kind = fused.groups()
    block = f"{prefix}{'block_sparse_moe' if mixtral else 'mlp'}.experts"
    pieces = []
    for e in range(start, end):  # the rows of a fused expert tensor are experts
        if kind == "gate_up_proj":
            half = shape[1] // 2
            pieces.append(torch.cat([reader.rows(f"{block}.{e}.{experts[0]}.weight", 0, half),
                                     reader.rows(f"{block}.{e}.{experts[1]}.weight", 0, half)], 0))
        else:
            pieces.append(reader.rows(f"{block}.{e}.{experts[2]}.weight", 0, shape[1]))
    return torch.stack(pieces) if pieces else torch.empty(0, *shape[1:])


def sharded_from_hf(path: Path, *, config_kwargs: dict[str, Any], shard: Callable[[torch.nn.Module], Any],
                    device: torch.device, rank: int, world: int) -> torch.nn.Module:
    """The model of `path` built on meta, sharded by `shard`, its local shards read from disk."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from primus.models.hf import read_hf_config, read_weight_index, spec_from_hf

    config = AutoConfig.from_pretrained(str(path))
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **config_kwargs)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    shard(model)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    family = spec_from_hf(read_hf_config(path)).family
    fill_shards(model, SafetensorsReader(read_weight_index(path)), family, rank, world)  # tied: filled once
    return model
