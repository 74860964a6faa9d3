"""Hugging Face weights in and out of TorchTitan's Llama 3, Qwen 3, DeepSeek-V3 and this package's
Llama 4 (imports torch, not torchtitan).

The names are TorchTitan's *stock* state-dict names (what its checkpoints hold: `wq`/`wk`/`wv`
separately, even though the live module fuses them into one `wqkv` parameter) and the
transformers names of `primus.models.hf.hf_tensor_shapes`. Every tensor maps one to one, rows
reordered in two places:

- Llama 3's RoPE in TorchTitan rotates interleaved pairs (complex numbers), transformers rotates
  halves: the rows of each q/k head are permuted (row `2i + j` of a TorchTitan head is row
  `j * head_dim/2 + i` of the transformers head). Qwen 3 rotates halves in both: no permutation.
- The live `wqkv` parameter groups its rows per kv head: the q heads of group g, then k head g,
  then v head g (TorchTitan's `FusedQKVLinear` layout).

DeepSeek and Llama 4 rotate interleaved pairs in transformers too (DeepSeek-V3's `rope_interleave`,
Llama 4's complex RoPE): no row is permuted. Their routed experts are stacked `[E, out, in]`
tensors in TorchTitan: one transformers tensor per expert (DeepSeek), or a slice of the last
dimension of Llama 4's `[E, in, 2 x out]` `gate_up_proj` (transposed). DeepSeek-V3's selection
bias is the buffer `moe.expert_bias_E` (transformers' `gate.e_score_correction_bias`).

Loading (`load_into`) reads, for each parameter of the parallelized model, only the rows and
columns its local shard covers (a DTensor's placements give them: FSDP's and TP's `Shard`, and
`_StridedShard` when both shard one dimension), with `safetensors.safe_open(...).get_slice`:
no rank ever materialises a tensor it does not own. Exporting (`to_hf`) works on full tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from primus.errors import ConfigError

#: wrappers TorchTitan (activation checkpointing, torch.compile, FSDP) may put into a parameter name
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


#: TorchTitan model modules whose weights map to transformers' (a model spec's `custom` flavor)
FAMILIES = ("llama3", "qwen3", "deepseek_v3", "llama4")


@dataclass(frozen=True)
class Layout:
    """The geometry the name mapping needs, from the native `model:` keys."""

    family: str  # TorchTitan's model name: one of FAMILIES
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied: bool
    moe_layers: tuple[int, ...] = ()  # layers with routed experts (the others have a dense FFN)
    experts: int = 0
    shared_experts: bool = False
    expert_bias: bool = False
    q_lora: bool = False  # DeepSeek-V3's low-rank q projection (V2-Lite: one q projection)
    mtp_layers: int = 0  # DeepSeek-V3's multi-token prediction modules (not part of transformers' model)

    @classmethod
    def from_native(cls, model: Mapping[str, Any]) -> Layout:
        name = str(model.get("name"))
        if name not in FAMILIES or model.get("flavor") != "custom":
            raise ConfigError(f"Hugging Face weights map to TorchTitan's {', '.join(FAMILIES)} built from a model "
                              f"spec, not model {name} flavor {model.get('flavor')}", key="model",
                              fix="use model: {hf_path: DIR} or a neutral model preset")
        heads, n_layers = int(model["n_heads"]), int(model["n_layers"])
        moe: Mapping[str, Any] = model.get("moe") or {}
        interval, dense = int(moe.get("layer_interval") or 1), int(moe.get("first_dense_layers") or 0)
        return cls(family=name, n_layers=n_layers, n_heads=heads,
                   n_kv_heads=int(model.get("n_kv_heads") or heads),
                   head_dim=int(model.get("head_dim") or int(model["dim"]) // heads),
                   tied=bool(model.get("tie_embeddings")),
                   moe_layers=tuple(i for i in range(n_layers) if i >= dense and (i + 1) % interval == 0) if moe else (),
                   experts=int(moe.get("experts") or 0), shared_experts=bool(moe.get("shared_experts")),
                   expert_bias=bool(moe.get("expert_bias")),
                   q_lora=bool((model.get("mla") or {}).get("q_lora_rank")),
                   mtp_layers=int(model.get("mtp_layers") or 0))

    @property
    def permutes_rope(self) -> bool:
        return self.family == "llama3"


@dataclass(frozen=True)
class Experts:
    """A stacked TorchTitan expert tensor `[E, out, in]` and where transformers keeps it: one
    `[out, in]` tensor per expert (DeepSeek: `names` has E entries), or part `part` of `parts` of
    the last dimension of one `[E, in, parts x out]` tensor (Llama 4's `gate_up_proj`, `down_proj`)."""

    names: tuple[str, ...]
    part: int = 0
    parts: int = 1

    @property
    def fused(self) -> bool:
        return len(self.names) == 1


# --------------------------------------------------------------------------- names and row orders


_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _attention(layout: Layout) -> dict[str, str]:
    if layout.family == "deepseek_v3":
        names = {"attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
                 "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
                 "attention.wkv_b.weight": "self_attn.kv_b_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight"}
        if layout.q_lora:
            names.update({"attention.wq_a.weight": "self_attn.q_a_proj.weight",
                          "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
                          "attention.wq_b.weight": "self_attn.q_b_proj.weight"})
        else:
            names["attention.wq.weight"] = "self_attn.q_proj.weight"
        return names
    names = {f"attention.qkv_linear.w{x}.weight": f"self_attn.{x}_proj.weight" for x in "qkv"}
    names["attention.wo.weight"] = "self_attn.o_proj.weight"
    if layout.family == "qwen3":
        names.update({"attention.q_norm.weight": "self_attn.q_norm.weight",
                      "attention.k_norm.weight": "self_attn.k_norm.weight"})
    return names


def _per_layer(layout: Layout, layer: int) -> dict[str, str]:
    names = {**_attention(layout), "attention_norm.weight": "input_layernorm.weight",
             "ffn_norm.weight": "post_attention_layernorm.weight"}
    hf_ffn = "feed_forward" if layout.family == "llama4" else "mlp"
    if layer not in layout.moe_layers:
        names.update({f"feed_forward.{t}.weight": f"{hf_ffn}.{h}.weight" for t, h in _MLP.items()})
        return names
    if layout.family == "llama4":
        names["moe.router.gate.weight"] = "feed_forward.router.weight"
        shared = "feed_forward.shared_expert"
    else:
        names["moe.router.gate.weight"] = "mlp.gate.weight"
        shared = "mlp.shared_experts"
    if layout.shared_experts:
        names.update({f"moe.shared_experts.{t}.weight": f"{shared}.{h}.weight" for t, h in _MLP.items()})
    if layout.expert_bias:
        names["moe.expert_bias_E"] = "mlp.gate.e_score_correction_bias"
    return names


def stock_names(layout: Layout) -> dict[str, str]:
    """TorchTitan stock name -> transformers name, every tensor of the model that maps one to one
    (the stacked expert tensors are `expert_tensors`')."""
    out = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "lm_head.weight": "model.embed_tokens.weight" if layout.tied else "lm_head.weight"}
    for i in range(layout.n_layers):
        out.update({f"layers.{i}.{t}": f"model.layers.{i}.{h}" for t, h in _per_layer(layout, i).items()})
    return out


def expert_tensors(layout: Layout) -> dict[str, Experts]:
    """TorchTitan's stacked expert tensors (`[E, out, in]`) -> their transformers tensors."""
    out = {}
    for i in layout.moe_layers:
        stock = f"layers.{i}.moe.routed_experts.inner_experts."
        if layout.family == "llama4":
            hf = f"model.layers.{i}.feed_forward.experts."
            out.update({f"{stock}w1_EFD": Experts((f"{hf}gate_up_proj",), 0, 2),
                        f"{stock}w3_EFD": Experts((f"{hf}gate_up_proj",), 1, 2),
                        f"{stock}w2_EDF": Experts((f"{hf}down_proj",))})
        else:
            for t, h in _MLP.items():
                suffix = "EDF" if t == "w2" else "EFD"
                out[f"{stock}{t}_{suffix}"] = Experts(tuple(f"model.layers.{i}.mlp.experts.{e}.{h}.weight"
                                                            for e in range(layout.experts)))
    return out


def all_stock_names(layout: Layout) -> list[str]:
    return [*stock_names(layout), *expert_tensors(layout)]


def _rope_rows(heads: int, head_dim: int) -> torch.Tensor:
    """For each TorchTitan (interleaved-pair) row of a q/k projection, its transformers row."""
    half = head_dim // 2
    within = torch.arange(head_dim)
    hf_within = (within % 2) * half + within // 2  # row 2i+j of a head is row j*half+i
    return (torch.arange(heads)[:, None] * head_dim + hf_within[None, :]).reshape(-1)


def stock_rows(layout: Layout, stock: str) -> torch.Tensor | None:
    """For each row of stock tensor `stock`, the row of its transformers tensor (None: the same)."""
    if not layout.permutes_rope:
        return None
    if stock.endswith("qkv_linear.wq.weight"):
        return _rope_rows(layout.n_heads, layout.head_dim)
    if stock.endswith("qkv_linear.wk.weight"):
        return _rope_rows(layout.n_kv_heads, layout.head_dim)
    return None


@dataclass(frozen=True)
class Sources:
    """Where each row of one live parameter comes from: transformers tensor `names[which[r]]`,
    row `rows[r]` (both None for a parameter that is one transformers tensor, row for row)."""

    names: tuple[str, ...]
    which: torch.Tensor | None = None
    rows: torch.Tensor | None = None


def _fused_qkv_sources(layout: Layout, prefix: str, hf: Mapping[str, str]) -> Sources:
    hd, kv, hpk = layout.head_dim, layout.n_kv_heads, layout.n_heads // layout.n_kv_heads
    r = torch.arange(kv * (hpk + 2) * hd)
    group, slot, w = r // ((hpk + 2) * hd), (r // hd) % (hpk + 2), r % hd
    stock_row = torch.where(slot < hpk, (group * hpk + slot) * hd + w, group * hd + w)
    which = torch.clamp(slot - hpk + 1, min=0)  # 0: q, 1: k, 2: v
    parts = [f"{prefix}wq.weight", f"{prefix}wk.weight", f"{prefix}wv.weight"]
    rows = stock_row.clone()
    for i, part in enumerate(parts):
        order = stock_rows(layout, part)
        if order is not None:
            mask = which == i
            rows[mask] = order[stock_row[mask]]
    return Sources(names=tuple(hf[p] for p in parts), which=which, rows=rows)


def live_name(name: str) -> str:
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def sources_for(layout: Layout, name: str, hf: Mapping[str, str]) -> Sources:
    """The transformers rows of live parameter `name` (wrapper prefixes removed)."""
    if name.endswith("qkv_linear.wqkv.weight"):
        return _fused_qkv_sources(layout, name[: -len("wqkv.weight")], hf)
    if name not in hf:
        raise ConfigError(f"TorchTitan parameter {name} has no Hugging Face tensor to load from", key="model.hf_path")
    order = stock_rows(layout, name)
    if order is None:
        return Sources(names=(hf[name],))
    return Sources(names=(hf[name],), which=torch.zeros_like(order), rows=order)


# --------------------------------------------------------------------------- local shards


def _chunk(indices: torch.Tensor, parts: int, index: int) -> torch.Tensor:
    """DTensor's `Shard` split: chunks of ceil(n / parts), the last ones shorter or empty."""
    size = -(-indices.numel() // parts)
    return indices[index * size:(index + 1) * size]


def local_indices(tensor: Any) -> list[torch.Tensor]:
    """For each dimension, the global indices the local shard of `tensor` holds, in order."""
    from torch.distributed.tensor import DTensor

    indices = [torch.arange(n) for n in tensor.shape]
    if not isinstance(tensor, DTensor):
        return indices
    mesh = tensor.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return [i[:0] for i in indices]
    for m, placement in enumerate(tensor.placements):
        dim = getattr(placement, "dim", None)  # Shard and _StridedShard (whose is_shard() is False)
        if dim is None:
            continue
        dim, parts, index = dim % tensor.dim(), mesh.size(m), coordinate[m]
        split = int(getattr(placement, "split_factor", 1) or 1)
        if split > 1:  # the dimension was cut in `split` pieces first (by a later mesh dimension)
            pieces = [_chunk(indices[dim], split, k) for k in range(split)]
            indices[dim] = torch.cat([_chunk(p, parts, index) for p in pieces])
        else:
            indices[dim] = _chunk(indices[dim], parts, index)
    local = tensor.to_local()
    got = tuple(int(i.numel()) for i in indices)
    if got != tuple(local.shape):
        raise RuntimeError(f"cannot place the local shard of a tensor with placements {tensor.placements}: "
                           f"computed {list(got)}, local shard {list(local.shape)}")
    return indices


def _is_range(indices: torch.Tensor, lo: int, hi: int) -> bool:
    """Whether `indices` is lo, lo+1, ..., hi-1 (then the span read is the shard: no gather copy)."""
    return indices.numel() == hi - lo and bool((indices == torch.arange(lo, hi)).all())


class SliceReader:
    """Opens the safetensors files of a model directory lazily and reads slices of tensors."""

    def __init__(self, index: Mapping[str, tuple[Path, str, tuple[int, ...]]]) -> None:
        self.index = index
        self._stack = ExitStack()
        self._open: dict[Path, Any] = {}
        self.bytes_read = 0

    def __enter__(self) -> SliceReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def release(self) -> None:
        """Close the files: safetensors maps them, and the pages a read touched stay resident
        (counted in the rank's RSS) until the mapping goes; released after every parameter, a
        rank's peak is its own shards plus one tensor's span, not the files it read."""
        self._stack.close()
        self._stack = ExitStack()
        self._open.clear()

    def _slice(self, name: str) -> Any:
        """safetensors' lazy view of tensor `name` (its file opened once until `release`)."""
        from safetensors import safe_open

        path = self.index[name][0]
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
        return self._open[path].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.index[name][2]

    def read(self, name: str, rows: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
        """Rows `rows` (and columns `cols`) of tensor `name`: the span they cover is read, no more."""
        view = self._slice(name)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        if cols is None:
            block = view[lo:hi]
            out = block if _is_range(rows, lo, hi) else block[rows - lo]
        else:
            c0, c1 = int(cols.min()), int(cols.max()) + 1
            block = view[lo:hi, c0:c1]
            out = block if _is_range(rows, lo, hi) else block[rows - lo]
            out = out if _is_range(cols, c0, c1) else out[:, cols - c0]
        self.bytes_read += block.numel() * block.element_size()
        return out

    def read_experts(self, spec: Experts, experts: torch.Tensor, rows: torch.Tensor,
                     cols: torch.Tensor) -> torch.Tensor:
        """`[experts, rows, cols]` of a stacked TorchTitan expert tensor from its transformers tensors."""
        if not spec.fused:
            return torch.stack([self.read(spec.names[int(e)], rows, cols) for e in experts])
        lo, hi = int(experts.min()), int(experts.max()) + 1
        block = self._slice(spec.names[0])[lo:hi]  # [e, in, parts x out]
        self.bytes_read += block.numel() * block.element_size()
        width = block.shape[-1] // spec.parts
        block = block[experts - lo][:, :, spec.part * width:(spec.part + 1) * width]
        return block[:, cols][:, :, rows].transpose(1, 2)


def _named_parameters(model_parts: Iterable[Any], buffers: bool = False) -> Iterator[tuple[str, Any]]:
    seen: set[int] = set()
    for part in model_parts:
        for name, param in (part.named_buffers() if buffers else part.named_parameters()):
            if id(param) not in seen:
                seen.add(id(param))
                yield live_name(name), param


@torch.no_grad()
def load_into(model_parts: Iterable[Any], layout: Layout, hf_dir: Path) -> int:
    """Copy the transformers weights of `hf_dir` into the (parallelized) model's parameters, each
    rank reading only its own shards. Returns the bytes read on this rank."""
    from primus.models.hf import read_weight_index

    if layout.mtp_layers:
        raise ConfigError("Hugging Face weights load into a model without multi-token prediction (transformers' "
                          "DeepSeek-V3 has no MTP module)", key="mtp_layers", fix="set mtp_layers: 0")
    index = read_weight_index(hf_dir)
    hf, experts = stock_names(layout), expert_tensors(layout)

    def missing(hf_name: str, name: str) -> ConfigError:
        return ConfigError(f"{hf_dir}: tensor {hf_name} is missing (TorchTitan's {name} loads from it)",
                           key="model.hf_path")

    with SliceReader(index) as reader:
        for name, buffer in _named_parameters(model_parts, buffers=True):
            if name in hf:  # DeepSeek-V3's per-expert selection bias (replicated: read whole)
                if hf[name] not in index:
                    raise missing(hf[name], name)
                buffer.copy_(reader.read(hf[name], torch.arange(buffer.shape[0]), None))
        for name, param in _named_parameters(model_parts):
            if name in experts:
                spec = experts[name]
                for hf_name in spec.names:
                    if hf_name not in index:
                        raise missing(hf_name, name)
                local = param.to_local() if hasattr(param, "to_local") else param
                if local.numel():
                    local.copy_(reader.read_experts(spec, *local_indices(param)))
                reader.release()
                continue
            sources = sources_for(layout, name, hf)
            for hf_name in sources.names:
                if hf_name not in index:
                    raise missing(hf_name, name)
            idx = local_indices(param)
            local = param.to_local() if hasattr(param, "to_local") else param
            if local.numel() == 0:
                continue
            rows = idx[0]
            cols = idx[1] if local.dim() == 2 else None
            if sources.which is None:
                out = reader.read(sources.names[0], rows, cols)
            else:
                out = torch.empty(local.shape, dtype=local.dtype)
                which = sources.which[rows]
                for i, hf_name in enumerate(sources.names):
                    mask = which == i
                    if bool(mask.any()):
                        out[mask] = reader.read(hf_name, sources.rows[rows[mask]], cols).to(out.dtype)
            if tuple(out.shape) != tuple(local.shape):
                raise ConfigError(f"{hf_dir}: tensor {sources.names[0]} gives a {list(out.shape)} shard, TorchTitan's "
                                  f"{name} holds {list(local.shape)}", key="model.hf_path")
            local.copy_(out)  # casts a bf16/fp16 file to the parameter's dtype on the way
            reader.release()
        return reader.bytes_read


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


# --------------------------------------------------------------------------- export


def to_hf(stock: Mapping[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Full stock TorchTitan tensors -> transformers tensors (rows put back in transformers' order)."""
    out: dict[str, torch.Tensor] = {}
    for name, hf_name in stock_names(layout).items():
        if name == "lm_head.weight" and layout.tied:
            continue
        if name not in stock:
            if name == "tok_embeddings.weight" and layout.tied and "lm_head.weight" in stock:
                name = "lm_head.weight"  # a tied model may keep only one of the two
            else:
                raise ConfigError(f"the checkpoint has no tensor {name} (transformers' {hf_name})")
        tensor = stock[name]
        order = stock_rows(layout, name)
        if order is not None:
            permuted = torch.empty_like(tensor)
            permuted[order] = tensor
            tensor = permuted
        out[hf_name] = tensor.contiguous()
    fused: dict[str, list[Any]] = {}
    for name, spec in expert_tensors(layout).items():
        if name not in stock:
            raise ConfigError(f"the checkpoint has no tensor {name} (transformers' {spec.names[0]})")
        tensor = stock[name]
        if not spec.fused:
            out.update({hf_name: tensor[e].contiguous() for e, hf_name in enumerate(spec.names)})
            continue
        parts = fused.setdefault(spec.names[0], [None] * spec.parts)
        parts[spec.part] = tensor.transpose(1, 2)  # [E, in, out]
    out.update({hf_name: torch.cat(parts, dim=-1).contiguous() for hf_name, parts in fused.items()})
    return out
