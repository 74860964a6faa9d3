"""Hugging Face weights <-> megatron-core's GPTModel (the local, TransformerEngine-free layer spec).

The interchange names are core's (`primus.models.hf.hf_tensor_shapes`). What differs in megatron:

- attention: one fused `linear_qkv` whose rows are grouped per query group, `[q heads of the
  group, its k head, its v head]` (so a tensor-parallel rank holds whole groups), bias likewise
  (qwen2); `linear_proj` is o_proj, split by columns; `q_layernorm`/`k_layernorm` are qwen3's norms;
- MLP: `linear_fc1` is `[gate; up]` (each tensor-parallel rank holds its share of both, stacked),
  `linear_fc2` is down_proj, split by columns; the norm before it is `pre_mlp_layernorm`;
- MoE: `mlp.router` is the gate; expert `e` lives on expert-parallel rank `e // local_experts`
  as `mlp.experts.local_experts.<e % local_experts>` (its fc1/fc2 split over the expert
  tensor-parallel ranks);
- embedding and output layer: split by vocabulary rows over tensor-parallel ranks, the vocabulary
  padded to a multiple of make_vocab_size_divisible_by x TP (padding rows are zero here);
- layers: a pipeline stage (or virtual chunk) numbers its layers from 0; `layer_number` is global.

Loading reads each tensor through `safetensors.safe_open(...).get_slice(name)[...]`, so a rank
reads only the rows/columns it holds, never a whole model. Exporting works on the global tensors
of a torch_dist checkpoint (megatron's sharded keys: one tensor per parameter kind, layers stacked
along a leading axis), in one process.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from primus.errors import ConfigError
from primus.models.hf import read_weight_index
from primus.models.spec import ModelSpec

LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)\.weight$")


def _moe_prefix(spec: ModelSpec) -> tuple[str, str, tuple[str, str, str]]:
    """(router name, expert prefix, (gate, up, down) names) of a MoE layer in HF's naming."""
    if spec.family == "mixtral":
        return "block_sparse_moe.gate.weight", "block_sparse_moe.experts", ("w1", "w3", "w2")
    if spec.family == "llama4":  # experts fused on disk: experts.gate_up_proj [E, H, 2F], down_proj [E, F, H]
        return "feed_forward.router.weight", "feed_forward.experts", ("gate_up_proj", "gate_up_proj", "down_proj")
    return "mlp.gate.weight", "mlp.experts", ("gate_proj", "up_proj", "down_proj")


def _mlp_prefix(spec: ModelSpec) -> str:
    """A dense layer's MLP in HF's naming (Llama 4 calls it feed_forward)."""
    return "feed_forward." if spec.family == "llama4" else "mlp."


def _shared_prefix(spec: ModelSpec) -> str:
    """The shared experts of a MoE layer (one MLP of shared_experts x their size) in HF's naming."""
    return "feed_forward.shared_expert." if spec.family == "llama4" else "mlp.shared_experts."


#: megatron's MLA parameters -> (HF tensor, how a tensor-parallel rank slices it: "rank" rows of a
#: low-rank projection, "heads" rows per head, "cols" the output projection's columns, None whole)
MLA_TENSORS: dict[str, tuple[str, str | None]] = {
    "self_attention.linear_q_proj.weight": ("self_attn.q_proj.weight", "heads"),
    "self_attention.linear_q_down_proj.weight": ("self_attn.q_a_proj.weight", "rank"),
    "self_attention.linear_q_up_proj.weight": ("self_attn.q_b_proj.weight", "heads"),
    "self_attention.linear_kv_down_proj.weight": ("self_attn.kv_a_proj_with_mqa.weight", "rank"),
    "self_attention.linear_kv_up_proj.weight": ("self_attn.kv_b_proj.weight", "heads"),
    "self_attention.q_layernorm.weight": ("self_attn.q_a_layernorm.weight", None),
    "self_attention.kv_layernorm.weight": ("self_attn.kv_a_layernorm.weight", None),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", "cols"),
}


@dataclass(frozen=True)
class Ranks:
    """Where this process sits: tensor, expert and expert-tensor parallel rank and size."""

    tp_rank: int = 0
    tp: int = 1
    ep_rank: int = 0
    ep: int = 1
    etp_rank: int = 0
    etp: int = 1

    @classmethod
    def current(cls) -> Ranks:
        from megatron.core import parallel_state as mpu

        return cls(tp_rank=mpu.get_tensor_model_parallel_rank(), tp=mpu.get_tensor_model_parallel_world_size(),
                   ep_rank=mpu.get_expert_model_parallel_rank(), ep=mpu.get_expert_model_parallel_world_size(),
                   etp_rank=mpu.get_expert_tensor_parallel_rank(), etp=mpu.get_expert_tensor_parallel_world_size())


class SliceReader:
    """Reads row/column ranges of the tensors of a Hugging Face directory (safetensors only).

    Each read opens its file and closes it again: safetensors maps the whole file, and the pages a
    slice touches (every page of a tensor for a column slice) would otherwise stay in this rank's
    resident set until the end of the load."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.index = read_weight_index(self.directory)
        self.bytes_read = 0

    def _read(self, name: str, index: Any) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.index:
            raise ConfigError(f"{self.directory}: tensor {name} is missing", key="model.hf_path",
                              fix="the weights do not match config.json")
        with safe_open(str(self.index[name][0]), framework="pt", device="cpu") as f:
            out = f.get_slice(name)[index].clone()  # owned memory, not a view of the mapping
        self.bytes_read += out.numel() * out.element_size()
        return out

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(name, slice(start, stop))

    def cols(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._read(name, (slice(None), slice(start, stop)))

    def whole(self, name: str) -> torch.Tensor:
        return self._read(name, slice(None))

    def close(self) -> None:
        return None


def _share(total: int, rank: int, size: int, what: str) -> tuple[int, int]:
    if total % size:
        raise ConfigError(f"{what} ({total}) does not divide over {size} ranks")
    part = total // size
    return rank * part, (rank + 1) * part


class HfToMegatron:
    """The local tensor of each megatron parameter of this rank, read from a Hugging Face directory."""

    def __init__(self, spec: ModelSpec, reader: SliceReader, ranks: Ranks) -> None:
        self.spec, self.reader, self.ranks = spec, reader, ranks

    # -- pieces

    def vocab_rows(self, name: str, local_rows: int) -> torch.Tensor:
        """Rows [r * local, (r + 1) * local) of the padded vocabulary; padding rows are zero."""
        start = self.ranks.tp_rank * local_rows
        stop = start + local_rows
        vocab = self.spec.vocab_size
        out = torch.zeros(local_rows, self.spec.hidden_size, dtype=torch.float32)
        if start < vocab:
            out[: min(stop, vocab) - start] = self.reader.rows(name, start, min(stop, vocab))
        return out

    def qkv(self, layer: str, kind: str) -> torch.Tensor:
        """The fused QKV rows (kind "weight" or "bias") of this rank's query groups, interleaved per group."""
        s, r = self.spec, self.ranks
        d, groups = s.head_size, s.kv_heads
        per_group = s.num_heads // groups
        g0, g1 = _share(groups, r.tp_rank, r.tp, "the key/value heads")
        q = self.reader.rows(f"{layer}self_attn.q_proj.{kind}", g0 * per_group * d, g1 * per_group * d)
        k = self.reader.rows(f"{layer}self_attn.k_proj.{kind}", g0 * d, g1 * d)
        v = self.reader.rows(f"{layer}self_attn.v_proj.{kind}", g0 * d, g1 * d)
        n = g1 - g0
        tail = q.shape[1:]
        fused = torch.cat([q.reshape(n, per_group * d, *tail), k.reshape(n, d, *tail), v.reshape(n, d, *tail)], dim=1)
        return fused.reshape(n * (per_group + 2) * d, *tail)

    def gated_fc1(self, gate: str, up: str, ffn: int, rank: int, size: int) -> torch.Tensor:
        a, b = _share(ffn, rank, size, "the MLP hidden size")
        return torch.cat([self.reader.rows(gate, a, b), self.reader.rows(up, a, b)], dim=0)

    def fc2(self, down: str, ffn: int, rank: int, size: int) -> torch.Tensor:
        a, b = _share(ffn, rank, size, "the MLP hidden size")
        return self.reader.cols(down, a, b)

    # -- one parameter

    def tensor(self, name: str, param: torch.Tensor, layer_number: Callable[[int], int]) -> torch.Tensor:
        """The local value of parameter `name` (a GPTModel chunk's local name) on this rank."""
        s, r = self.spec, self.ranks
        if name == "embedding.word_embeddings.weight":
            return self.vocab_rows("model.embed_tokens.weight", param.shape[0])
        if name == "output_layer.weight":
            return self.vocab_rows("model.embed_tokens.weight" if s.tie_embeddings else "lm_head.weight",
                                   param.shape[0])
        if name == "decoder.final_layernorm.weight":
            return self.reader.whole("model.norm.weight")
        m = LAYER.match(name)
        if m is None:
            raise ConfigError(f"megatron parameter {name} has no Hugging Face tensor", key="model.hf_path")
        layer = f"model.layers.{layer_number(int(m.group(1)))}."
        rest = m.group(2)
        if s.mla is not None and rest in MLA_TENSORS:
            return self.mla(layer, rest, param)
        simple = {
            "input_layernorm.weight": "input_layernorm.weight",
            "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
            "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
            "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
        }
        if rest in simple:
            return self.reader.whole(layer + simple[rest])
        if rest == "self_attention.linear_qkv.weight":
            return self.qkv(layer, "weight")
        if rest == "self_attention.linear_qkv.bias":
            return self.qkv(layer, "bias")
        if rest == "self_attention.linear_proj.weight":
            a, b = _share(s.num_heads * s.head_size, r.tp_rank, r.tp, "the attention heads")
            return self.reader.cols(layer + "self_attn.o_proj.weight", a, b)
        mlp = layer + _mlp_prefix(s)
        if rest == "mlp.linear_fc1.weight":
            return self.gated_fc1(mlp + "gate_proj.weight", mlp + "up_proj.weight", s.ffn_hidden_size, r.tp_rank, r.tp)
        if rest == "mlp.linear_fc2.weight":
            return self.fc2(mlp + "down_proj.weight", s.ffn_hidden_size, r.tp_rank, r.tp)
        if s.moe is not None:
            router, experts, (gate, up, down) = _moe_prefix(s)
            if rest == "mlp.router.weight":
                return self.reader.whole(layer + router)
            if rest == "mlp.router.expert_bias":
                return self.reader.whole(layer + router.replace(".weight", ".e_score_correction_bias"))
            shared = layer + _shared_prefix(s)
            size = s.moe.shared_experts * (s.moe.shared_expert_ffn or s.moe.expert_ffn)
            if rest == "mlp.shared_experts.linear_fc1.weight":
                return self.gated_fc1(shared + "gate_proj.weight", shared + "up_proj.weight", size, r.tp_rank, r.tp)
            if rest == "mlp.shared_experts.linear_fc2.weight":
                return self.fc2(shared + "down_proj.weight", size, r.tp_rank, r.tp)
            e = EXPERT.match(rest)
            if e is not None:
                local = s.moe.experts // r.ep
                index = r.ep_rank * local + int(e.group(1))
                if s.family == "llama4":
                    return self.fused_expert(f"{layer}{experts}.", index, e.group(2))
                expert = f"{layer}{experts}.{index}."
                if e.group(2) == "linear_fc1":
                    return self.gated_fc1(expert + f"{gate}.weight", expert + f"{up}.weight", s.moe.expert_ffn,
                                          r.etp_rank, r.etp)
                return self.fc2(expert + f"{down}.weight", s.moe.expert_ffn, r.etp_rank, r.etp)
        raise ConfigError(f"megatron parameter {name} has no Hugging Face tensor for a {s.family} model "
                          "(moe_grouped_gemm is not loaded)", key="model.hf_path")

    def mla(self, layer: str, rest: str, param: torch.Tensor) -> torch.Tensor:
        """A multi-latent attention tensor: low-rank projections split by rows over tensor-parallel
        ranks (megatron gathers their outputs), per-head projections by heads, o_proj by columns."""
        s, r = self.spec, self.ranks
        assert s.mla is not None
        hf, how = MLA_TENSORS[rest]
        name = layer + hf
        if how is None:
            return self.reader.whole(name)
        if how == "rank":
            return self.reader.rows(name, *_share(param.shape[0] * r.tp, r.tp_rank, r.tp, hf))
        h0, h1 = _share(s.num_heads, r.tp_rank, r.tp, "the attention heads")
        per_head = param.shape[1 if how == "cols" else 0] // (h1 - h0)
        if how == "cols":
            return self.reader.cols(name, h0 * per_head, h1 * per_head)
        return self.reader.rows(name, h0 * per_head, h1 * per_head)

    def fused_expert(self, experts: str, index: int, which: str) -> torch.Tensor:
        """Expert `index` of Llama 4's fused on-disk tensors, in megatron's [out, in] layout: fc1 is
        [gate; up] (this expert-tensor-parallel rank's share of each), fc2 the down projection."""
        s, r = self.spec, self.ranks
        assert s.moe is not None
        f = s.moe.expert_ffn
        a, b = _share(f, r.etp_rank, r.etp, "the expert hidden size")
        if which == "linear_fc1":
            gate = self.reader._read(experts + "gate_up_proj", (index, slice(None), slice(a, b)))
            up = self.reader._read(experts + "gate_up_proj", (index, slice(None), slice(f + a, f + b)))
            return torch.cat([gate.t(), up.t()], dim=0)
        return self.reader._read(experts + "down_proj", (index, slice(a, b), slice(None))).t()


def _chunks(model: list[Any]) -> Iterator[Any]:
    """The GPTModels of `model` (unwrapping DDP/FSDP wrappers)."""
    for chunk in model:
        yield getattr(chunk, "module", chunk)


@torch.no_grad()
def load_hf_into(model: list[Any], spec: ModelSpec, directory: str | Path) -> int:
    """Copy the Hugging Face weights of `directory` into this rank's model chunks (before the
    DDP/FSDP wrapper and the optimizer are built). Returns the bytes this rank read."""
    reader = SliceReader(directory)
    convert = HfToMegatron(spec, reader, Ranks.current())
    try:
        for gpt in _chunks(model):
            layers = gpt.decoder.layers if hasattr(gpt, "decoder") else []

            def global_layer(local: int, layers: Any = layers) -> int:
                return int(layers[local].layer_number) - 1

            tensors = [*gpt.named_parameters(),
                       *((name, b) for name, b in gpt.named_buffers() if name.endswith("router.expert_bias"))]
            for name, param in tensors:
                value = convert.tensor(name, param, global_layer)
                if tuple(value.shape) != tuple(param.shape):
                    raise ConfigError(f"{directory}: megatron parameter {name} is {list(param.shape)} on this rank, "
                                      f"the Hugging Face tensors give {list(value.shape)}", key="model.hf_path")
                param.copy_(value.to(param.dtype))
    finally:
        reader.close()
    return reader.bytes_read


def load_and_describe(model: list[Any], spec: ModelSpec, directory: str | Path) -> str:
    """`load_hf_into`, and one line for the log: what this rank read, how long it took, its peak RSS."""
    import resource
    import time

    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux

    before, started = peak(), time.perf_counter()
    read = load_hf_into(model, spec, directory)
    return (f"loaded {directory}: {read / 2**20:.1f} MiB read on this rank in {time.perf_counter() - started:.2f} s, "
            f"peak RSS {peak():.0f} MiB ({before:.0f} MiB with the model built, before loading)")


# ------------------------------------------------------------------------------------------- export


#: HF tensor of a layer -> megatron's sharded checkpoint keys (layers stacked on axis 0), first found
#: wins: the local layer spec saves its norms under TransformerEngine's fused names when it can
CHECKPOINT_KEYS: dict[str, tuple[str, ...]] = {
    "input_layernorm.weight": ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    "post_attention_layernorm.weight": ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    "self_attn.o_proj.weight": ("self_attention.linear_proj.weight",),
    "self_attn.q_norm.weight": ("self_attention.q_layernorm.weight",),
    "self_attn.k_norm.weight": ("self_attention.k_layernorm.weight",),
}


class MegatronToHf:
    """Hugging Face tensors from megatron's global (unsharded) checkpoint tensors, `tensors`:
    sharded key -> tensor (e.g. `decoder.layers.self_attention.linear_qkv.weight`, layers
    stacked along axis 0; experts along axis 1)."""

    def __init__(self, spec: ModelSpec, tensors: dict[str, torch.Tensor], what: str) -> None:
        self.spec, self.tensors, self.what = spec, tensors, what

    def get(self, *keys: str) -> torch.Tensor:
        for key in keys:
            if key in self.tensors:
                return self.tensors[key]
        raise ConfigError(f"{self.what} has no tensor {keys[0]}: not a checkpoint of this model",
                          fix="export a checkpoint of this run")

    def layer(self, i: int, *keys: str) -> torch.Tensor:
        """Layer `i`'s tensor under the first of `keys` found: its own key (`decoder.layers.<i>.<key>`,
        as megatron saves layers that differ, e.g. dense and MoE), else row i of the stacked one."""
        for key in keys:
            if f"decoder.layers.{i}.{key}" in self.tensors:
                return self.tensors[f"decoder.layers.{i}.{key}"]
        return self.get(*(f"decoder.layers.{key}" for key in keys))[i]

    def tensors_hf(self) -> Iterator[tuple[str, torch.Tensor]]:
        s = self.spec
        vocab = s.vocab_size
        yield "model.embed_tokens.weight", self.get("embedding.word_embeddings.weight")[:vocab]
        yield "model.norm.weight", self.get("decoder.final_layernorm.weight")
        if not s.tie_embeddings:
            yield "lm_head.weight", self.get("output_layer.weight")[:vocab]
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            for hf in ("input_layernorm.weight", "post_attention_layernorm.weight"):
                yield p + hf, self.layer(i, *CHECKPOINT_KEYS[hf])
            yield from self._attention(i, p)
            if s.moe is not None and s.moe.is_moe_layer(i):
                yield from self._moe(i, p)
            else:
                mlp, f = p + _mlp_prefix(s), s.ffn_hidden_size
                fc1 = self.layer(i, "mlp.linear_fc1.weight")
                yield mlp + "gate_proj.weight", fc1[:f]
                yield mlp + "up_proj.weight", fc1[f:]
                yield mlp + "down_proj.weight", self.layer(i, "mlp.linear_fc2.weight")

    def _attention(self, i: int, p: str) -> Iterator[tuple[str, torch.Tensor]]:
        s = self.spec
        if s.mla is not None:
            lora = s.mla.q_lora_rank is not None
            for megatron, (hf, _) in MLA_TENSORS.items():
                if megatron == "self_attention.linear_q_proj.weight" and lora:
                    continue
                if megatron.split(".")[1] in ("linear_q_down_proj", "linear_q_up_proj", "q_layernorm") and not lora:
                    continue
                yield p + hf, self.layer(i, megatron)
            return
        yield p + "self_attn.o_proj.weight", self.layer(i, *CHECKPOINT_KEYS["self_attn.o_proj.weight"])
        if s.qk_norm:
            for hf in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
                yield p + hf, self.layer(i, *CHECKPOINT_KEYS[hf])
        d, groups = s.head_size, s.kv_heads
        per_group = s.num_heads // groups
        for kind in ("weight", "bias") if s.qkv_bias else ("weight",):
            fused = self.layer(i, f"self_attention.linear_qkv.{kind}")
            tail = fused.shape[1:]
            grouped = fused.reshape(groups, (per_group + 2) * d, *tail)
            yield p + f"self_attn.q_proj.{kind}", grouped[:, : per_group * d].reshape(-1, *tail)
            yield p + f"self_attn.k_proj.{kind}", grouped[:, per_group * d: (per_group + 1) * d].reshape(-1, *tail)
            yield p + f"self_attn.v_proj.{kind}", grouped[:, (per_group + 1) * d:].reshape(-1, *tail)

    def _moe(self, i: int, p: str) -> Iterator[tuple[str, torch.Tensor]]:
        s = self.spec
        moe = s.moe
        assert moe is not None
        router_name, experts, (gate, up, down) = _moe_prefix(s)
        yield p + router_name, self.layer(i, "mlp.router.weight")
        if moe.expert_bias:
            yield p + router_name.replace(".weight", ".e_score_correction_bias"), self.layer(i, "mlp.router.expert_bias")
        if moe.shared_experts:
            shared, f = p + _shared_prefix(s), moe.shared_experts * (moe.shared_expert_ffn or moe.expert_ffn)
            fc1 = self.layer(i, "mlp.shared_experts.linear_fc1.weight")
            yield shared + "gate_proj.weight", fc1[:f]
            yield shared + "up_proj.weight", fc1[f:]
            yield shared + "down_proj.weight", self.layer(i, "mlp.shared_experts.linear_fc2.weight")
        fc1 = self.layer(i, "mlp.experts.experts.linear_fc1.weight")  # [experts, 2F, H]
        fc2 = self.layer(i, "mlp.experts.experts.linear_fc2.weight")  # [experts, H, F]
        if s.family == "llama4":  # fused on disk: gate_up_proj [E, H, 2F], down_proj [E, F, H]
            yield f"{p}{experts}.gate_up_proj", fc1.transpose(1, 2)
            yield f"{p}{experts}.down_proj", fc2.transpose(1, 2)
            return
        f = moe.expert_ffn
        for e in range(moe.experts):
            x = f"{p}{experts}.{e}."
            yield x + f"{gate}.weight", fc1[e][:f]
            yield x + f"{up}.weight", fc1[e][f:]
            yield x + f"{down}.weight", fc2[e]
