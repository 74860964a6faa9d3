"""Primus's TransformerEngine-free layer specs: megatron-core's local spec with an SDPA core attention.

megatron-core 0.16's local `DotProductAttention` takes one head size for keys and values, so its
local spec cannot build multi-latent attention (DeepSeek's query/key heads are nope + rope dims
wide, its value heads `v_head_dim`), and it has neither Llama 4's chunked local attention nor its
attention temperature tuning. `SDPAttention` below is a core attention on
`torch.nn.functional.scaled_dot_product_attention` that handles all three and serves dense models
too: it is the default core attention without TransformerEngine (primus_megatron.fast_path decides;
megatron-core's local DotProductAttention only with `use_flash_attn: false`). It is selected per layer
in `decoder_block_spec`, which the trainer's `block_spec` calls (and patch
megatron.layers.sdpa_core_attention puts in its place for the models only SDPAttention builds).

With TransformerEngine's spec (fast_path: TE installed on a GPU), `decoder_block_spec(..., use_te=True)`
keeps megatron-core's own TE spec and refuses what only SDPAttention does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset


class SDPAttention(MegatronModule):
    """Core attention: [s, b, heads, dim] query/key/value in, [s, b, heads * v_dim] out.

    Key/value heads may be fewer than query heads (grouped-query attention) and the value head
    size may differ from the query/key head size (multi-latent attention). Class attributes set
    per layer by `decoder_block_spec`: `chunk_size` (attend only within chunks of that many
    tokens, Llama 4's local attention) and `temperature` (floor_scale, scale: Llama 4's query
    scaling on NoPE layers, log(floor((pos + 1) / floor_scale) + 1) * scale + 1).
    """

    chunk_size: int | None = None
    temperature: tuple[int, float] | None = None

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: Any, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, cp_comm_type: str | None = None,
                 pg_collection: Any = None) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not split the sequence (context parallel needs TransformerEngine)")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: Any = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params: Any = None) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention takes neither packed sequences nor an attention bias")
        sq, batch, heads, _ = query.shape
        sk, kv_heads = key.shape[0], key.shape[2]
        if self.temperature is not None:
            floor_scale, scale = self.temperature
            positions = torch.arange(sq, device=query.device, dtype=torch.float32)
            factor = torch.log1p(torch.floor((positions + 1.0) / floor_scale)) * scale + 1.0
            query = query * factor.view(sq, 1, 1, 1).to(query.dtype)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        if kv_heads != heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
        mask = None
        if self.chunk_size is not None or attention_mask is not None:
            i = torch.arange(sq, device=q.device).view(-1, 1) + (sk - sq)
            j = torch.arange(sk, device=q.device).view(1, -1)
            mask = j <= i
            if self.chunk_size is not None:
                mask = mask & (i // self.chunk_size == j // self.chunk_size)
            if attention_mask is not None:  # megatron's mask: True where attention is not allowed
                mask = mask & ~attention_mask.bool()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0)
        # [b, n, s, dv] -> [s, b, n * dv]
        return out.permute(2, 0, 1, 3).reshape(sq, batch, heads * v.shape[-1])


def _core_attention(chunk_size: int | None, temperature: tuple[int, float] | None) -> type[SDPAttention]:
    if chunk_size is None and temperature is None:
        return SDPAttention
    name = "SDPAttention" + (f"_chunk{chunk_size}" if chunk_size else "") + ("_tuned" if temperature else "")
    return type(name, (SDPAttention,), {"chunk_size": chunk_size, "temperature": temperature})


def decoder_block_spec(config: TransformerConfig, args: Any, *, vp_stage: int | None,
                       use_te: bool = False) -> TransformerBlockSubmodules:
    """megatron-core's decoder block spec (dense/MoE layers by `moe_layer_freq`, MLA when
    `multi_latent_attention`) for this pipeline stage, with SDPAttention as core attention in every
    layer: chunked on RoPE layers and temperature-tuned on NoPE layers (Llama 4), and the q/k L2 norm
    on RoPE layers only (Llama 4's rule)."""
    chunk = getattr(args, "attention_chunk_size", None)
    tuning = bool(getattr(args, "attn_temperature_tuning", False))
    l2_norm = bool(getattr(args, "qk_l2_norm", False))
    if use_te:
        if chunk or tuning:
            raise ValueError("attention_chunk_size and attn_temperature_tuning are built on SDPAttention only; "
                             "TransformerEngine's attention does not have them")
        return get_gpt_decoder_block_spec(config, use_transformer_engine=True, normalization=args.normalization,
                                          qk_l2_norm=l2_norm, vp_stage=vp_stage)
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=args.normalization,
                                       qk_l2_norm=l2_norm, vp_stage=vp_stage)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    no_rope = config.no_rope_freq or [0] * config.num_layers
    layer_specs = []
    for local, spec in enumerate(block.layer_specs):
        index = offset + local
        rope = not no_rope[index]
        spec = copy.deepcopy(spec)
        attention = spec.submodules.self_attention.submodules
        temperature = (int(args.attn_floor_scale), float(args.attn_scale)) if tuning and not rope else None
        attention.core_attention = _core_attention(chunk if rope else None, temperature)
        if l2_norm and not rope:
            attention.q_layernorm = IdentityOp
            attention.k_layernorm = IdentityOp
        layer_specs.append(spec)
    return TransformerBlockSubmodules(layer_specs=layer_specs, layer_norm=block.layer_norm)


__all__ = ["SDPAttention", "decoder_block_spec"]
