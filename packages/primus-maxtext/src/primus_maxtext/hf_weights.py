"""Hugging Face weights <-> MaxText's parameter tree, both ways, tensor by tensor.

MaxText keeps a decoder's weights in Flax's `params` collection with the layers stacked on axis 1
(`scan_layers: true`, `param_scan_axis: 1`), projections split into heads, kernels stored
`[in, out]`, and, for the Llama and Mixtral decoder blocks, the 1/sqrt(head_dim) attention scale
folded into the query kernel (T5 style; Qwen 2/3 blocks scale at run time instead). Llama 3.1's
RoPE (`rope_type: llama3.1`) rotates interleaved pairs where transformers rotates the two halves of
a head, so the query and key features are permuted for it; MaxText's default RoPE rotates halves
like transformers and needs nothing.

DeepSeek's block stacks its leading dense layers and its MoE layers apart (`dense_layers`,
`moe_layers`), and Llama 4's scans blocks of `inhomogeneous_layer_cycle_interval` layers
(`layers.layers_<k>` holds layers k, k + cycle, ...): a rule says which Hugging Face layers its
stack holds. Both families' checkpoints rotate interleaved RoPE pairs, as MaxText's YaRN and
Llama 3.1 RoPE do, so their q and k need no permutation; their attention scales at run time.

`rules` says, for each MaxText leaf, which Hugging Face tensor(s) it is made from and how
(`Rule.kind`). `read_leaf` builds any rectangular slice of a leaf from the safetensors files,
reading only the rows and columns that slice needs (`safe_open(...).get_slice(name)[...]`), so a
device shard is built from its own part of the files; `to_hf` does the reverse on whole arrays
for `primus export`. Neither imports jax: the adapter places the slices on devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from primus.errors import ConfigError

if TYPE_CHECKING:
    from primus.models.spec import ModelSpec

#: decoder blocks whose attention does not scale the logits: the query kernel carries 1/sqrt(d)
QUERY_SCALED_BLOCKS = frozenset({"llama2", "mixtral"})
#: MaxText's MoE module name per decoder block (MaxText names it differently per model file)
MOE_MODULE = {"mixtral": "MoeBlock_0", "qwen3_moe": "moe_block"}
#: decoder blocks whose Hugging Face checkpoints rotate interleaved RoPE pairs, as MaxText's RoPE for them does
HF_INTERLEAVED_BLOCKS = frozenset({"deepseek", "llama4"})
LAYER_AXIS = 1  # MaxText's param_scan_axis default, the only one supported


@dataclass(frozen=True)
class Layout:
    """What of the MaxText config decides how weights are laid out."""

    decoder_block: str
    head_dim: int
    interleaved_rope: bool  # llama3.1 RoPE (and yarn with rope_interleave) rotate interleaved pairs
    scan_layers: bool = True
    cycle: int = 1  # Llama 4: layers per scanned block (inhomogeneous_layer_cycle_interval)

    @property
    def permute_rope(self) -> bool:
        """MaxText rotates interleaved pairs where the checkpoint rotates the two halves of a head."""
        return self.interleaved_rope and self.decoder_block not in HF_INTERLEAVED_BLOCKS

    @property
    def query_scale(self) -> float | None:
        return 1.0 / math.sqrt(self.head_dim) if self.decoder_block in QUERY_SCALED_BLOCKS else None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Layout:
        rope = str(config.get("rope_type", "default"))
        interleaved = rope.startswith("llama3.1") or (rope.startswith("yarn") and bool(config.get("rope_interleave", True)))
        layout = cls(decoder_block=str(config.get("decoder_block")), head_dim=int(config["head_dim"]),
                     interleaved_rope=interleaved, scan_layers=bool(config.get("scan_layers", True)),
                     cycle=int(config.get("inhomogeneous_layer_cycle_interval", 1) or 1))
        if int(config.get("param_scan_axis", LAYER_AXIS)) != LAYER_AXIS:
            raise ConfigError("Hugging Face weights need MaxText's param_scan_axis 1", key="param_scan_axis",
                              fix="leave param_scan_axis at its default")
        if not layout.scan_layers and layout.decoder_block in HF_INTERLEAVED_BLOCKS:
            raise ConfigError(f"Hugging Face weights for MaxText's {layout.decoder_block} block need scan_layers: true",
                              key="scan_layers", fix="leave scan_layers at its default")
        return layout


@dataclass(frozen=True)
class Rule:
    """One MaxText leaf: its path in the `params` collection (`layers` marks the stacked decoder
    layers), how it is made (`kind`) and the Hugging Face name template ({i}: layer, {e}: expert).
    A stacked leaf holds Hugging Face layers first, first + stride, ... (`count` of them; all by
    default) on axis `axis`; `shape` is one layer's MaxText shape where `layer_shape` cannot tell."""

    path: tuple[str, ...]
    kind: str  # copy | t | heads | q_heads | out | bias | q_bias | experts_in | experts_out | fused_gate | fused_up
    hf: str
    layered: bool = True
    first: int = 0
    stride: int = 1
    count: int | None = None
    axis: int = LAYER_AXIS
    shape: tuple[int, ...] | None = None

    def layers(self, spec: ModelSpec) -> list[int]:
        """The Hugging Face layer at each position of the stack."""
        count = spec.num_layers if self.count is None else self.count
        return [self.first + j * self.stride for j in range(count)]


def _stacked(rules: list[Rule], prefix: tuple[str, ...], **where: Any) -> list[Rule]:
    """`rules` written for `decoder.layers` moved under `prefix` and restricted to some layers."""
    return [replace(r, path=prefix + r.path[2:], **where) for r in rules]


def _norms(layer: str) -> list[Rule]:
    n = ("decoder", "layers")
    return [Rule((*n, "pre_self_attention_layer_norm", "scale"), "copy", layer + "input_layernorm.weight"),
            Rule((*n, "post_self_attention_layer_norm", "scale"), "copy", layer + "post_attention_layernorm.weight")]


def _attention(spec: ModelSpec, layer: str) -> list[Rule]:
    a = ("decoder", "layers", "self_attention")
    if spec.mla is None:
        return [Rule((*a, "query", "kernel"), "q_heads", layer + "self_attn.q_proj.weight"),
                Rule((*a, "key", "kernel"), "k_heads", layer + "self_attn.k_proj.weight"),
                Rule((*a, "value", "kernel"), "heads", layer + "self_attn.v_proj.weight"),
                Rule((*a, "out", "kernel"), "out", layer + "self_attn.o_proj.weight")]
    m, h, n, attn = spec.mla, spec.hidden_size, spec.num_heads, layer + "self_attn."
    if m.q_lora_rank:
        out = [Rule((*a, "wq_a", "kernel"), "t", attn + "q_a_proj.weight", shape=(h, m.q_lora_rank)),
               Rule((*a, "q_norm", "scale"), "copy", attn + "q_a_layernorm.weight", shape=(m.q_lora_rank,)),
               Rule((*a, "wq_b", "kernel"), "heads", attn + "q_b_proj.weight", shape=(m.q_lora_rank, n, m.qk_head_dim))]
    else:
        out = [Rule((*a, "query", "kernel"), "heads", attn + "q_proj.weight", shape=(h, n, m.qk_head_dim))]
    return out + [
        Rule((*a, "wkv_a", "kernel"), "t", attn + "kv_a_proj_with_mqa.weight",
             shape=(h, m.kv_lora_rank + m.qk_rope_head_dim)),
        Rule((*a, "kv_norm", "scale"), "copy", attn + "kv_a_layernorm.weight", shape=(m.kv_lora_rank,)),
        Rule((*a, "wkv_b", "kernel"), "heads", attn + "kv_b_proj.weight",
             shape=(m.kv_lora_rank, n, m.qk_nope_head_dim + m.v_head_dim)),
        Rule((*a, "out", "kernel"), "out", attn + "o_proj.weight", shape=(n, m.v_head_dim, h))]


def _dense_mlp(spec: ModelSpec, layer: str, block: str = "mlp.") -> list[Rule]:
    m, h, f = ("decoder", "layers", "mlp"), spec.hidden_size, spec.ffn_hidden_size
    return [Rule((*m, "wi_0", "kernel"), "t", layer + block + "gate_proj.weight", shape=(h, f)),
            Rule((*m, "wi_1", "kernel"), "t", layer + block + "up_proj.weight", shape=(h, f)),
            Rule((*m, "wo", "kernel"), "t", layer + block + "down_proj.weight", shape=(f, h))]


def _experts(m: tuple[str, ...], expert: str, names: tuple[str, str, str]) -> list[Rule]:
    return [Rule((*m, "wi_0"), "experts_in", expert + names[0]),
            Rule((*m, "wi_1"), "experts_in", expert + names[1]),
            Rule((*m, "wo"), "experts_out", expert + names[2])]


def _shared_experts(spec: ModelSpec, block: tuple[str, ...], hf: str) -> list[Rule]:
    """MaxText's shared experts: one MLP as wide as all of them together."""
    assert spec.moe is not None
    h, f = spec.hidden_size, spec.moe.shared_experts * (spec.moe.shared_expert_ffn or spec.moe.expert_ffn)
    s = (*block, "shared_experts")
    return [Rule((*s, "wi_0", "kernel"), "t", hf + "gate_proj.weight", shape=(h, f)),
            Rule((*s, "wi_1", "kernel"), "t", hf + "up_proj.weight", shape=(h, f)),
            Rule((*s, "wo", "kernel"), "t", hf + "down_proj.weight", shape=(f, h))]


def _deepseek_rules(spec: ModelSpec, layer: str) -> list[Rule]:
    """MaxText's DeepSeek block: `dense_layers` (the first moe.first_dense_layers), then `moe_layers`."""
    e = spec.moe
    assert e is not None
    common = _norms(layer) + _attention(spec, layer)
    dense = e.first_dense_layers
    out = _stacked(common + _dense_mlp(spec, layer), ("decoder", "dense_layers"), count=dense) if dense else []
    block = ("decoder", "layers", "DeepSeekMoeBlock_0")
    m = (*block, "MoeBlock_0")
    moe = [Rule((*m, "gate", "kernel"), "t", layer + "mlp.gate.weight", shape=(spec.hidden_size, e.experts)),
           *_experts(m, layer + "mlp.experts.{e}.", ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))]
    if e.expert_bias:  # a MoEBiasVar, stacked on axis 0 (MaxText scans only Params on param_scan_axis)
        moe.append(Rule((*m, "gate", "bias"), "copy", layer + "mlp.gate.e_score_correction_bias", axis=0,
                        shape=(e.experts,)))
    if e.shared_experts:
        moe += _shared_experts(spec, block, layer + "mlp.shared_experts.")
    return out + _stacked(common + moe, ("decoder", "moe_layers"), first=dense, count=spec.num_layers - dense)


def _llama4_rules(spec: ModelSpec, layer: str, cycle: int) -> list[Rule]:
    """MaxText's Llama 4 block: `layers.layers_<k>` stacks layers k, k + cycle, ... (one scanned block
    holds a whole pattern of NoPE and MoE layers)."""
    e = spec.moe
    assert e is not None
    h, f, ff = spec.hidden_size, e.expert_ffn, layer + "feed_forward."
    block = ("decoder", "layers", "Llama4MoEBlock_0")
    m = (*block, "MoeBlock_0")
    moe = [Rule((*m, "gate", "kernel"), "t", ff + "router.weight", shape=(h, e.experts)),
           # fused on disk: gate_up_proj [E, H, 2F] (gate columns first), down_proj [E, F, H]
           Rule((*m, "wi_0"), "fused_gate", ff + "experts.gate_up_proj", shape=(e.experts, h, f)),
           Rule((*m, "wi_1"), "fused_up", ff + "experts.gate_up_proj", shape=(e.experts, h, f)),
           Rule((*m, "wo"), "copy", ff + "experts.down_proj", shape=(e.experts, f, h))]
    if e.shared_experts:
        moe += _shared_experts(spec, block, ff + "shared_expert.")
    out: list[Rule] = []
    for k in range(cycle):
        mlp = moe if e.is_moe_layer(k) else _dense_mlp(spec, layer, "feed_forward.")
        out += _stacked(_norms(layer) + _attention(spec, layer) + mlp, ("decoder", "layers", f"layers_{k}"),
                        first=k, stride=cycle, count=spec.num_layers // cycle)
    return out


def rules(spec: ModelSpec, layout: Layout) -> list[Rule]:
    """Every MaxText parameter of `spec` and where it comes from."""
    a, layer = ("decoder", "layers", "self_attention"), "model.layers.{i}."
    out = [Rule(("token_embedder", "embedding"), "copy", "model.embed_tokens.weight", False),
           Rule(("decoder", "decoder_norm", "scale"), "copy", "model.norm.weight", False)]
    if not spec.tie_embeddings:
        out.append(Rule(("decoder", "logits_dense", "kernel"), "t", "lm_head.weight", False))
    if layout.decoder_block == "deepseek":
        return out + _deepseek_rules(spec, layer)
    if layout.decoder_block == "llama4":
        return out + _llama4_rules(spec, layer, layout.cycle)
    out += _norms(layer) + _attention(spec, layer)
    if spec.qkv_bias:
        out += [Rule((*a, "query", "bias"), "q_bias", layer + "self_attn.q_proj.bias"),
                Rule((*a, "key", "bias"), "k_bias", layer + "self_attn.k_proj.bias"),
                Rule((*a, "value", "bias"), "bias", layer + "self_attn.v_proj.bias")]
    if spec.qk_norm:
        out += [Rule((*a, "query_norm", "scale"), "copy", layer + "self_attn.q_norm.weight"),
                Rule((*a, "key_norm", "scale"), "copy", layer + "self_attn.k_norm.weight")]
    if spec.moe is None:
        out += _dense_mlp(spec, layer)
    else:
        module = MOE_MODULE.get(layout.decoder_block)
        if module is None:
            raise ConfigError(f"Hugging Face weights for MaxText's {layout.decoder_block} MoE block are not mapped",
                              key="decoder_block", fix="mixtral and qwen3_moe are")
        m = ("decoder", "layers", module)
        if spec.family == "mixtral":
            gate, expert = layer + "block_sparse_moe.gate.weight", layer + "block_sparse_moe.experts.{e}."
            names = ("w1.weight", "w3.weight", "w2.weight")
        else:
            gate, expert = layer + "mlp.gate.weight", layer + "mlp.experts.{e}."
            names = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")
        out += [Rule((*m, "gate", "kernel"), "t", gate), *_experts(m, expert, names)]
    if not layout.scan_layers:
        return [r for r in out if not r.layered] + [
            Rule(tuple(f"layers_{i}" if p == "layers" else p for p in r.path), r.kind, r.hf.replace("{i}", str(i)), False)
            for i in range(spec.num_layers) for r in out if r.layered]
    return out


def layer_shape(rule: Rule, spec: ModelSpec) -> tuple[int, ...]:
    """The MaxText shape of one layer's (or a global) leaf."""
    if rule.shape is not None:
        return rule.shape
    h, d, e = spec.hidden_size, spec.head_size, spec.moe.experts if spec.moe else 0
    leaf = rule.path[-2] if rule.path[-1] in ("kernel", "bias", "scale") else rule.path[-1]
    n = spec.num_heads if leaf in ("query", "out") else spec.kv_heads
    f = spec.moe.expert_ffn if spec.moe else spec.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "heads": (h, n, d), "q_heads": (h, n, d), "k_heads": (h, n, d), "out": (n, d, h),
        "bias": (n, d), "q_bias": (n, d), "k_bias": (n, d),
        "experts_in": (e, h, f), "experts_out": (e, f, h),
    }
    if rule.kind in shapes:
        return shapes[rule.kind]
    named = {"embedding": (spec.vocab_size, h), "logits_dense": (h, spec.vocab_size), "gate": (h, e),
             "wi_0": (h, f), "wi_1": (h, f), "wo": (f, h), "query_norm": (d,), "key_norm": (d,)}
    return named.get(leaf, (h,))


def leaf_shape(rule: Rule, spec: ModelSpec) -> tuple[int, ...]:
    shape = layer_shape(rule, spec)
    if rule.layered:
        return (*shape[:rule.axis], len(rule.layers(spec)), *shape[rule.axis:])
    return shape


# --------------------------------------------------------------------------- HF -> MaxText


def _rope_to_interleaved(x: np.ndarray) -> np.ndarray:
    """Head features [first half | second half] -> interleaved pairs (last axis)."""
    half = x.shape[-1] // 2
    return np.stack([x[..., :half], x[..., half:]], axis=-1).reshape(x.shape)


def _rope_to_halves(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def _scaled(x: np.ndarray, factor: float, dtype: Any) -> np.ndarray:
    return (x.astype(np.float64) * factor).astype(dtype)


def _span(index: slice, size: int) -> tuple[int, int]:
    start, stop, step = index.indices(size)
    if step != 1:
        raise ValueError("strided shards are not produced by JAX shardings")
    return start, stop


Reader = Callable[[str, tuple[slice, ...]], np.ndarray]


def _layer_slice(rule: Rule, spec: ModelSpec, layout: Layout, name: str, index: tuple[slice, ...],
                 read: Reader, dtype: Any) -> np.ndarray:
    """The MaxText `index` slice of one layer's leaf, read from tensor `name` ({e} still unfilled)."""
    shape = layer_shape(rule, spec)
    spans = [_span(s, n) for s, n in zip(index, shape, strict=True)]
    sl = [slice(a, b) for a, b in spans]
    kind = rule.kind
    d = shape[1] if kind in ("out", "bias", "q_bias", "k_bias") else shape[-1]  # the head size
    permute = layout.permute_rope and kind in ("q_heads", "k_heads", "q_bias", "k_bias")
    if kind == "copy":
        return read(name, tuple(sl)).astype(dtype)
    if kind == "t":
        return read(name, (sl[1], sl[0])).T.astype(dtype)
    if kind in ("heads", "q_heads", "k_heads"):  # [E, N, D] from [N*D, E]
        (h0, h1), rows = spans[1], sl[0]
        x = read(name, (slice(h0 * d, h1 * d), rows)).astype(dtype)
        x = x.reshape(h1 - h0, d, -1).transpose(2, 0, 1)
        if permute:
            x = _rope_to_interleaved(x)
        if kind == "q_heads" and layout.query_scale is not None:
            x = _scaled(x, layout.query_scale, dtype)
        return x[..., sl[2]]
    if kind == "out":  # [N, D, E] from [E, N*D]
        (h0, h1) = spans[0]
        x = read(name, (sl[2], slice(h0 * d, h1 * d))).astype(dtype)
        return x.reshape(-1, h1 - h0, d).transpose(1, 2, 0)[:, sl[1], :]
    if kind in ("bias", "q_bias", "k_bias"):  # [N, D] from [N*D]
        (h0, h1) = spans[0]
        x = read(name, (slice(h0 * d, h1 * d),)).astype(dtype).reshape(h1 - h0, d)
        if permute:
            x = _rope_to_interleaved(x)
        if kind == "q_bias" and layout.query_scale is not None:
            x = _scaled(x, layout.query_scale, dtype)
        return x[:, sl[1]]
    if kind in ("fused_gate", "fused_up"):  # [X, E, F] from columns [0, F) or [F, 2F) of [X, E, 2F]
        offset = 0 if kind == "fused_gate" else shape[2]
        (f0, f1) = spans[2]
        return read(name, (sl[0], sl[1], slice(offset + f0, offset + f1))).astype(dtype)
    if kind in ("experts_in", "experts_out"):  # [X, E, F] from X x [F, E]; [X, F, E] from X x [E, F]
        (x0, x1) = spans[0]
        parts = [read(name.replace("{e}", str(x)), (sl[2], sl[1])).T.astype(dtype) for x in range(x0, x1)]
        return np.stack(parts) if parts else np.zeros((0, spans[1][1] - spans[1][0], spans[2][1] - spans[2][0]), dtype)
    raise AssertionError(f"unknown rule kind {kind}")


def read_leaf(rule: Rule, spec: ModelSpec, layout: Layout, index: tuple[slice, ...], read: Reader,
              dtype: Any = np.float32) -> np.ndarray:
    """The `index` slice (one per axis, as JAX hands a device its shard) of a MaxText leaf."""
    if not rule.layered:
        return _layer_slice(rule, spec, layout, rule.hf, index, read, dtype)
    layers, axis = rule.layers(spec), rule.axis
    i0, i1 = _span(index[axis], len(layers))
    rest = index[:axis] + index[axis + 1:]
    parts = [_layer_slice(rule, spec, layout, rule.hf.replace("{i}", str(i)), rest, read, dtype) for i in layers[i0:i1]]
    if not parts:
        shape = leaf_shape(rule, spec)
        return np.zeros(tuple(_span(s, n)[1] - _span(s, n)[0] for s, n in zip(index, shape, strict=True)), dtype)
    return np.stack(parts, axis=axis)


class SafetensorsReader:
    """Slices of the tensors of a Hugging Face directory, each file opened once (use as a context)."""

    def __init__(self, directory: Path) -> None:
        from primus.models.hf import read_weight_index

        self.index = read_weight_index(Path(directory))
        self._stack = ExitStack()
        self._files: dict[Path, Any] = {}

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _open(self, path: Path, dtype: str) -> Any:
        from safetensors import safe_open

        key = (path, dtype in ("BF16", "F16", "F8_E4M3", "F8_E5M2"))
        if key not in self._files:
            # numpy has no bfloat16: half-precision tensors go through JAX's arrays
            framework = "flax" if key[1] else "numpy"
            self._files[key] = self._stack.enter_context(safe_open(str(path), framework=framework))
        return self._files[key]

    def __call__(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        if name not in self.index:
            raise ConfigError(f"tensor {name} is missing from the Hugging Face weights", key="model.hf_path")
        path, dtype, _ = self.index[name]
        part = self._open(path, dtype).get_slice(name)[index]
        return np.asarray(part.astype("float32") if dtype in ("BF16", "F16", "F8_E4M3", "F8_E5M2") else part)


# --------------------------------------------------------------------------- MaxText -> HF


def _layer_to_hf(rule: Rule, layout: Layout, x: np.ndarray, name: str) -> Iterator[tuple[str, np.ndarray]]:
    kind = rule.kind
    permute = layout.permute_rope and kind in ("q_heads", "k_heads", "q_bias", "k_bias")
    if kind in ("copy", "fused_gate", "fused_up"):  # the fused halves are joined by to_hf
        yield name, x
    elif kind == "t":
        yield name, x.T
    elif kind in ("heads", "q_heads", "k_heads"):
        if kind == "q_heads" and layout.query_scale is not None:
            x = _scaled(x, 1.0 / layout.query_scale, x.dtype)
        if permute:
            x = _rope_to_halves(x)
        yield name, x.transpose(1, 2, 0).reshape(-1, x.shape[0])
    elif kind == "out":
        yield name, x.transpose(2, 0, 1).reshape(x.shape[2], -1)
    elif kind in ("bias", "q_bias", "k_bias"):
        if kind == "q_bias" and layout.query_scale is not None:
            x = _scaled(x, 1.0 / layout.query_scale, x.dtype)
        if permute:
            x = _rope_to_halves(x)
        yield name, x.reshape(-1)
    elif kind in ("experts_in", "experts_out"):
        for e in range(x.shape[0]):
            yield name.replace("{e}", str(e)), x[e].T
    else:
        raise AssertionError(f"unknown rule kind {kind}")


def _leaf(params: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """A leaf of MaxText's parameters: in `params`, else in another variable collection beside it (a
    training checkpoint keeps DeepSeek's selection bias, a MoEBiasVar, under `nnx_aux/model`)."""
    for tree in [params.get("params", params), *(v for k, v in params.items() if k != "params")]:
        node: Any = tree
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                node = None
                break
            node = node[key]
        if node is not None:
            return node
    return None


def to_hf(params: Mapping[str, Any], spec: ModelSpec, layout: Layout) -> dict[str, np.ndarray]:
    """Hugging Face tensors (contiguous numpy arrays) from MaxText's parameter collections."""
    out: dict[str, np.ndarray] = {}
    fused: dict[str, dict[str, np.ndarray]] = {}
    for rule in rules(spec, layout):
        node = _leaf(params, rule.path)
        if node is None:
            raise ConfigError(f"the checkpoint has no parameter {'.'.join(rule.path)} (expected "
                              f"{list(leaf_shape(rule, spec))})")
        array = np.asarray(node)
        if tuple(array.shape) != leaf_shape(rule, spec):
            raise ConfigError(f"checkpoint parameter {'.'.join(rule.path)} has shape {list(array.shape)}, the model "
                              f"implies {list(leaf_shape(rule, spec))}")
        layers = [(rule.hf, array)] if not rule.layered else [
            (rule.hf.replace("{i}", str(i)), np.take(array, j, axis=rule.axis)) for j, i in enumerate(rule.layers(spec))]
        for name, x in layers:
            for hf_name, tensor in _layer_to_hf(rule, layout, x, name):
                if rule.kind in ("fused_gate", "fused_up"):
                    fused.setdefault(hf_name, {})[rule.kind] = tensor
                else:
                    out[hf_name] = np.ascontiguousarray(tensor)
    for name, halves in fused.items():
        out[name] = np.ascontiguousarray(np.concatenate([halves["fused_gate"], halves["fused_up"]], axis=-1))
    return out
