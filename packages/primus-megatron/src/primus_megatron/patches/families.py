"""Model-family patches: what megatron-core 0.16's TransformerEngine-free path lacks for DeepSeek
(multi-latent attention) and Llama 4 (chunked attention, attention temperature tuning, q/k L2 norm
on RoPE layers only), and the one routing rule where megatron-core and DeepSeek differ."""

from __future__ import annotations

from typing import Any

from primus.patches.registry import Patch, PatchContext, Undo, replace_attr
from primus_megatron import FRAMEWORK_RANGE


def _needs_sdpa(ctx: PatchContext) -> bool:
    c = ctx.config
    return bool(c.get("multi_latent_attention") or c.get("attention_chunk_size") or c.get("attn_temperature_tuning")
                or c.get("qk_l2_norm"))


def _sdpa_layer_spec(ctx: PatchContext) -> Undo:
    from primus_megatron import layers, trainer

    return replace_attr(trainer, "block_spec", layers.decoder_block_spec)


def _no_te(ctx: PatchContext) -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is None


class _NotTransformerEngine:
    """Stands for TransformerEngine's classes where TE is absent: nothing is an instance of it."""


def _mla_without_te(ctx: PatchContext) -> Undo:
    # Without TransformerEngine, megatron-core's TE extension module imports with mocks in place of
    # TE's classes, so multi_latent_attention's `HAVE_TE` is True and `isinstance(x, TELinear)` raises
    # TypeError while the layer is built.
    from megatron.core.transformer import multi_latent_attention as mla

    undos = [replace_attr(mla, "HAVE_TE", False),
             replace_attr(mla, "TELinear", _NotTransformerEngine),
             replace_attr(mla, "TEColumnParallelLinear", _NotTransformerEngine)]

    def undo() -> None:
        for one in reversed(undos):
            one()

    return undo


def _group_score_top2(ctx: PatchContext) -> Undo:
    # megatron-core scores a group by the sum of its top (topk / group_topk) expert scores; DeepSeek-V3
    # (sigmoid scores; transformers' DeepseekV3) by the sum of its top 2, DeepSeek-V2 (softmax scores,
    # group_limited_greedy) by its best one. They agree at DeepSeek-V3's own size (topk 8 of 4 groups);
    # this makes them agree at every size, so a model routes as transformers does.
    import torch
    from megatron.core.transformer.moe import moe_utils

    original = moe_utils.group_limited_topk
    best = 2 if ctx.config.get("moe_router_score_function") == "sigmoid" else 1

    def group_limited_topk(scores: Any, topk: int, num_tokens: int, num_experts: int, num_groups: int,
                           group_topk: int) -> Any:
        per_group = num_experts // num_groups
        group_scores = scores.view(num_tokens, num_groups, -1).topk(min(best, per_group), dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(num_tokens, num_groups, per_group).reshape(num_tokens, -1)
        masked = scores.masked_fill(~score_mask.bool(), float("-inf"))
        probs, top_indices = torch.topk(masked, k=topk, dim=-1)
        return probs, top_indices

    group_limited_topk.__wrapped__ = original  # type: ignore[attr-defined]
    return replace_attr(moe_utils, "group_limited_topk", group_limited_topk)


_SHAPE_KEYS = ("rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor", "rope_scaling_original_max_positions")


def _llama3_rope_shape(ctx: PatchContext) -> Undo:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from primus_megatron.translate import LLAMA3_ROPE_SHAPE

    shape = {name: ctx.config.get(f"rope_scaling_{name}") for name in LLAMA3_ROPE_SHAPE}
    shape = {name: LLAMA3_ROPE_SHAPE[name] if value is None else value for name, value in shape.items()}
    original = RotaryEmbedding._apply_scaling

    def apply_scaling(self: Any, freqs: Any, factor: float = 8, **_: Any) -> Any:
        return original(self, freqs, factor=factor, low_freq_factor=shape["low_freq_factor"],
                        high_freq_factor=shape["high_freq_factor"],
                        original_max_position_embeddings=shape["original_max_positions"])

    return replace_attr(RotaryEmbedding, "_apply_scaling", apply_scaling)


def _no_jit_fuser(ctx: PatchContext) -> Undo:
    from megatron.core import jit

    return replace_attr(jit, "jit_fuser", jit.noop_decorator)


def _torch_norm_sequence_parallel(ctx: PatchContext) -> Undo:
    import copy

    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__

    def new(cls: Any, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> Any:
        if not config.sequence_parallel:
            return original(cls, config, hidden_size, eps, **kwargs)
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original(cls, plain, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            # each tensor-parallel rank sees its part of the sequence: megatron-core all-reduces the
            # gradients of parameters marked so (finalize_model_grads), as TE's and apex's norms mark theirs
            param.sequence_parallel = True
        return norm

    return replace_attr(torch_norm.WrappedTorchNorm, "__new__", staticmethod(new))


FAMILY_PATCHES = [
    Patch(id="megatron.layers.torch_norm_sequence_parallel", backend="megatron", phase="setup",
          versions=FRAMEWORK_RANGE, target="megatron.core.transformer.torch_norm.WrappedTorchNorm",
          enabled_by="sequence_parallel", enabled_by_default=False,
          description="Sequence parallel with torch's norms (no TransformerEngine or apex): megatron-core's torch "
                      "norm wrapper refuses it; here its weights are marked sequence_parallel so their gradients "
                      "are all-reduced over the tensor-parallel ranks, as TE's and apex's norms are. megatron-core's "
                      "MoE layer trains under tensor parallel only with sequence parallel.",
          apply=_torch_norm_sequence_parallel),
    Patch(id="megatron.cpu.no_jit_fuser", backend="megatron", phase="before_import", versions=FRAMEWORK_RANGE,
          platforms=frozenset({"cpu"}), target="megatron.core.jit.jit_fuser",
          description="megatron-core's fused helpers (MoE routing scores, the q/k L2 norm) run eagerly on the CPU: "
                      "its jit_fuser is torch.compile, whose inductor build took 15-30 s at the first step of a "
                      "tiny DeepSeek or Llama 4 run, longer than the run.",
          notes="Applies before megatron-core is imported (the decorator runs at import).", apply=_no_jit_fuser),
    Patch(id="megatron.rope.llama3_shape", backend="megatron", phase="setup", versions=FRAMEWORK_RANGE,
          target="megatron.core.models.common.embeddings.rotary_pos_embedding.RotaryEmbedding._apply_scaling",
          predicate=lambda ctx: any(ctx.config.get(key) is not None for key in _SHAPE_KEYS),
          predicate_doc="rope_scaling_low_freq_factor, rope_scaling_high_freq_factor or "
                        "rope_scaling_original_max_positions is set",
          description="Llama 3-style RoPE scaling with other low/high frequency factors or original length than "
                      "megatron-core's fixed 1, 4 and 8192 (Llama 4 Scout: 1, 1, 8192); megatron-core's GPT model "
                      "passes only the factor.",
          apply=_llama3_rope_shape),
    Patch(id="megatron.layers.sdpa_core_attention", backend="megatron", phase="setup", versions=FRAMEWORK_RANGE,
          target="primus_megatron.trainer.block_spec", predicate=_needs_sdpa,
          predicate_doc="multi_latent_attention, attention_chunk_size, attn_temperature_tuning or qk_l2_norm is set",
          description="Layers built with Primus's SDPAttention core attention (torch's scaled_dot_product_attention): "
                      "value heads of another size than query/key heads (DeepSeek's multi-latent attention), "
                      "Llama 4's chunked local attention on RoPE layers and temperature tuning on NoPE layers, and "
                      "the q/k L2 norm on RoPE layers only. megatron-core 0.16's local DotProductAttention has one "
                      "head size and neither Llama 4 feature.",
          notes="SDPAttention is the default core attention of every model without TransformerEngine "
                "(primus_megatron.fast_path); this patch keeps it for these models when use_flash_attn: false "
                "asks for megatron-core's local attention. On a GPU with TransformerEngine installed, "
                "multi-latent attention uses megatron-core's TE spec instead (Llama 4's chunked attention and "
                "temperature tuning stay on SDPAttention).",
          apply=_sdpa_layer_spec),
    Patch(id="megatron.layers.mla_without_te", backend="megatron", phase="setup", versions=FRAMEWORK_RANGE,
          target="megatron.core.transformer.multi_latent_attention.HAVE_TE",
          predicate=lambda ctx: bool(ctx.config.get("multi_latent_attention")) and _no_te(ctx),
          predicate_doc="multi_latent_attention is set and TransformerEngine is not installed",
          description="megatron-core's multi-latent attention builds without TransformerEngine: its module sees "
                      "the mocks megatron-core puts in place of TE's classes as TE present, and isinstance() on a "
                      "mock raises while the layer is built.",
          apply=_mla_without_te),
    Patch(id="megatron.moe.group_score_top2", backend="megatron", phase="setup", versions=FRAMEWORK_RANGE,
          target="megatron.core.transformer.moe.moe_utils.group_limited_topk",
          predicate=lambda ctx: bool(ctx.config.get("moe_router_group_topk")),
          predicate_doc="moe_router_group_topk is set (group-limited routing)",
          description="Group-limited routing scores each expert group as DeepSeek does: the sum of its top 2 "
                      "expert scores with sigmoid scores (V3), its best score with softmax scores (V2); "
                      "megatron-core sums the top (topk / group_topk), the same at DeepSeek-V3's own size only.",
          apply=_group_score_top2),
]
