"""Llama 4 (text) as a TorchTitan model module: TorchTitan 0.3 ships none (docs/decisions.md).

Built from TorchTitan's own pieces: Qwen 3's decoder and block (grouped-query attention, a dense
FFN or a MoE per layer, its tensor/expert-parallel sharding and `parallelize_qwen3` for FSDP), the
common MoE (sigmoid top-k router, grouped experts, a shared expert) and complex RoPE. What Llama 4
adds is here, each following transformers' `Llama4TextModel`:

- RoPE on three layers of four (`nope_layer_interval`); RoPE layers attend within chunks of
  `attention_chunk_size` tokens, NoPE layers to the whole causal context (two masks per batch);
- on RoPE layers q and k are L2-normalised per head after the rotation (no weight);
- on NoPE layers q is scaled by `log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1`;
- a routed expert's input, not its output, is weighted by the router's sigmoid score.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.components.optimizer import register_moe_load_balancing_hook
from torchtitan.distributed.pipeline_parallel import pipeline_llm
from torchtitan.models import llama3 as L
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
from torchtitan.models.common.attention import AttentionMasksType, GQAttention, get_fixed_block_mask_mod
from torchtitan.models.common.config_utils import (
    get_attention_config,
    make_ffn_config,
    make_gqa_config,
    make_moe_config,
    make_routed_experts_config,
    make_router_config,
)
from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher
from torchtitan.models.deepseek_v3 import _depth_experts_init
from torchtitan.models.qwen3 import parallelize_qwen3
from torchtitan.models.qwen3.model import Qwen3Model, Qwen3TransformerBlock
from torchtitan.protocols.model_spec import ModelSpec

#: the two attention masks of a batch, by the layers that use them
CHUNKED, CAUSAL = "chunked", "causal"


class Llama4Attention(GQAttention):
    """Grouped-query attention with Llama 4's per-layer RoPE, qk L2 norm and temperature tuning."""

    @dataclass(kw_only=True, slots=True)
    class Config(GQAttention.Config):
        use_rope: bool = True
        qk_l2_norm: bool = False
        l2_norm_eps: float = 1e-5
        temperature_tuning: bool = False
        floor_scale: float = 8192.0
        attn_scale: float = 0.1
        chunked: bool = False

    def __init__(self, config: Config):
        super().__init__(config)
        self.use_rope, self.qk_l2_norm, self.l2_norm_eps = config.use_rope, config.qk_l2_norm, config.l2_norm_eps
        self.temperature_tuning, self.floor_scale = config.temperature_tuning, config.floor_scale
        self.attn_scale, self.chunked = config.attn_scale, config.chunked

    def _l2_norm(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        return (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.l2_norm_eps)).type_as(x)

    def forward(self, x_BLD: torch.Tensor, attention_masks: AttentionMasksType | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.qkv_linear(x_BLD)  # (B, L, heads, head_dim)
        if self.use_rope:
            q, k = self.rope(q, k, positions)
            if self.qk_l2_norm:
                q, k = self._l2_norm(q), self._l2_norm(k)
        elif self.temperature_tuning:
            pos = positions if positions is not None else torch.arange(q.shape[1], device=q.device)[None]
            scales = torch.log1p(torch.floor((pos.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scales.expand(q.shape[0], -1)[:, :, None, None]).to(q.dtype)
        if isinstance(attention_masks, dict):
            attention_masks = attention_masks[CHUNKED if self.chunked else CAUSAL]
        out = self.inner_attention(q, k, v, attention_masks=attention_masks, scale=self.scaling,
                                   enable_gqa=self.enable_gqa).contiguous()
        return self.wo(out.flatten(2))


class ScoreBeforeExpertsDispatcher(AllToAllTokenDispatcher):
    """Llama 4 weights a routed expert's input by the router score (transformers' `routed_in *
    router_scores`); TorchTitan weights its output. The scores are applied as the tokens are
    grouped by expert (before the all-to-all under expert parallelism), and the combine step
    then weights by one."""

    @dataclass(kw_only=True, slots=True)
    class Config(AllToAllTokenDispatcher.Config):
        pass

    def _local_reorder(self, x_TD: torch.Tensor, topk_scores_TK: torch.Tensor,
                       topk_expert_ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        routed, token_indices, scores = super()._local_reorder(x_TD, topk_scores_TK, topk_expert_ids_TK)
        routed = (routed.to(torch.float32) * scores.reshape(-1, 1)).to(routed.dtype)
        return routed, token_indices, torch.ones_like(scores)


class Llama4Model(Qwen3Model):
    """Qwen 3's decoder with Llama 4's two attention masks."""

    @dataclass(kw_only=True, slots=True)
    class Config(Qwen3Model.Config):
        attention_chunk_size: int | None = None

    def __init__(self, config: Config):
        super().__init__(config)
        self.attention_chunk_size = config.attention_chunk_size

    def get_attention_masks(self, positions: torch.Tensor) -> AttentionMasksType | None:
        causal = super().get_attention_masks(positions)
        if self.attention_chunk_size is None:
            return {CAUSAL: causal, CHUNKED: causal}
        attention = self.config.first_attention
        chunked = self._create_flex_attention_mask(positions, attention, [
            *_document_mask_mods(positions), get_fixed_block_mask_mod(self.attention_chunk_size)])
        return {CAUSAL: causal, CHUNKED: chunked}


def _document_mask_mods(positions: torch.Tensor) -> list[Any]:
    from torchtitan.models.common.attention import (
        get_causal_mask_mod,
        get_efficient_causal_mask_mod_for_packed_document,
    )

    return [get_causal_mask_mod(), get_efficient_causal_mask_mod_for_packed_document(positions)]


def _rope(model: dict[str, Any], head_dim: int) -> ComplexRoPE.Config:
    from primus_torchtitan.model import _rope_kwargs

    return ComplexRoPE.Config(**_rope_kwargs(model, head_dim))


def build_config(model: dict[str, Any], attn_backend: str) -> Llama4Model.Config:
    """The model config from the native `model:` keys (a neutral Llama 4 spec's translation)."""
    dim, vocab, heads = int(model["dim"]), int(model["vocab_size"]), int(model["n_heads"])
    n_layers, kv_heads = int(model["n_layers"]), int(model.get("n_kv_heads") or heads)
    head_dim = int(model.get("head_dim") or dim // heads)
    eps = float(model.get("norm_eps") or 1e-5)
    options, moe = model.get("llama4") or {}, model.get("moe")
    nope, interval = options.get("nope_layer_interval"), int((moe or {}).get("layer_interval") or 1)
    rope = _rope(model, head_dim)
    inner = get_attention_config(attn_backend)
    layers = []
    for i in range(n_layers):
        use_rope = nope is None or (i + 1) % int(nope) != 0
        gqa = make_gqa_config(dim=dim, n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim,
                              wqkv_param_init=L._LINEAR_INIT, wo_param_init=L._depth_init(i),
                              inner_attention=dataclasses.replace(inner), fuse_qkv=True, rope=rope)
        attention = Llama4Attention.Config(
            **{f.name: getattr(gqa, f.name) for f in dataclasses.fields(gqa)},
            use_rope=use_rope, qk_l2_norm=bool(options.get("qk_l2_norm")), l2_norm_eps=eps,
            temperature_tuning=bool(options.get("attn_temperature_tuning")),
            floor_scale=float(options.get("attn_floor_scale") or 8192), attn_scale=float(options.get("attn_scale") or 0.1),
            chunked=use_rope and options.get("attention_chunk_size") is not None)
        is_moe = moe is not None and (i + 1) % interval == 0
        layers.append(Qwen3TransformerBlock.Config(
            attention=attention,
            attention_norm=RMSNorm.Config(normalized_shape=dim, eps=eps, param_init=L._NORM_INIT),
            ffn_norm=RMSNorm.Config(normalized_shape=dim, eps=eps, param_init=L._NORM_INIT),
            feed_forward=None if is_moe else make_ffn_config(
                dim=dim, hidden_dim=int(model["hidden_dim"]), w1_param_init=L._LINEAR_INIT,
                w2w3_param_init=L._depth_init(i)),
            moe=_moe(moe, dim, i) if is_moe else None))
    return Llama4Model.Config(
        dim=dim, vocab_size=vocab, attention_chunk_size=options.get("attention_chunk_size"),
        tok_embeddings=Embedding.Config(num_embeddings=vocab, embedding_dim=dim, param_init=L._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, eps=eps, param_init=L._NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab, param_init=L._output_linear_init(dim)),
        layers=layers, enable_weight_tying=bool(model.get("tie_embeddings")))


def _moe(moe: dict[str, Any], dim: int, layer: int) -> Any:
    experts, top_k, hidden = int(moe["experts"]), int(moe["top_k"]), int(moe["expert_ffn"])
    routed = make_routed_experts_config(dim=dim, hidden_dim=hidden, num_experts=experts, top_k=top_k,
                                        param_init=_depth_experts_init(layer), comm_backend="standard")
    routed.token_dispatcher = ScoreBeforeExpertsDispatcher.Config(num_experts=experts, top_k=top_k)
    shared = None
    if moe.get("shared_experts"):
        shared = make_ffn_config(dim=dim, hidden_dim=int(moe.get("shared_expert_ffn") or hidden),
                                 w1_param_init=L._LINEAR_INIT, w2w3_param_init=L._depth_init(layer))
    return make_moe_config(
        num_experts=experts, load_balance_coeff=None, shared_experts=shared, routed_experts=routed,
        router=make_router_config(dim=dim, num_experts=experts, gate_param_init=L._depth_init(layer), top_k=top_k,
                                  score_func="sigmoid", route_norm=False, route_scale=1.0))


def model_spec(model: dict[str, Any], attn_backend: str) -> ModelSpec:
    return ModelSpec(name="llama4", flavor="custom", model=build_config(model, attn_backend),
                     parallelize_fn=parallelize_qwen3, pipelining_fn=pipeline_llm,
                     post_optimizer_build_fn=register_moe_load_balancing_hook, state_dict_adapter=None)
