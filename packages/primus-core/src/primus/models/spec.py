"""`ModelSpec`: a decoder-only transformer described once, in no framework's vocabulary."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

Family = Literal["llama", "qwen2", "qwen3", "mixtral", "deepseek", "llama4"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RopeScaling(_Strict):
    type: Literal["llama3", "yarn", "linear", "dynamic"]
    factor: float = Field(gt=0)
    original_max_positions: PositiveInt | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None


class MoESpec(_Strict):
    experts: PositiveInt
    top_k: PositiveInt
    expert_ffn: PositiveInt = Field(description="FFN hidden size of one routed expert.")
    shared_experts: int = Field(0, ge=0)
    shared_expert_ffn: PositiveInt | None = Field(None, description="FFN size of ONE shared expert (default expert_ffn).")
    first_dense_layers: int = Field(0, ge=0, description="Leading layers that use a dense FFN.")
    router_aux_loss_coef: float = 0.0
    norm_topk_prob: bool = True
    score_function: Literal["softmax", "sigmoid"] = Field(
        "softmax", description="Router scores: softmax over experts (Mixtral, Qwen, DeepSeek-V2) or a sigmoid per "
                               "expert (DeepSeek-V3, Llama 4).")
    expert_bias: bool = Field(False, description="A learned per-expert bias added to the scores for top-k selection "
                                                 "only (DeepSeek-V3's aux-loss-free balancing).")
    groups: PositiveInt | None = Field(None, description="Group-limited routing: experts split into this many groups.")
    top_k_groups: PositiveInt | None = Field(None, description="Groups a token may route to (with `groups`).")
    routed_scaling_factor: float = Field(1.0, gt=0, description="Multiplier on the routed experts' output.")
    layer_interval: PositiveInt = Field(1, description="Every Nth layer is a MoE layer, the others dense (Llama 4 "
                                                       "Maverick: 2); layer i is MoE when (i + 1) % N == 0.")

    @model_validator(mode="after")
    def _routing(self) -> MoESpec:
        if self.top_k > self.experts:
            raise ValueError(f"moe.top_k ({self.top_k}) cannot exceed moe.experts ({self.experts})")
        if (self.groups is None) != (self.top_k_groups is None):
            raise ValueError("moe.groups and moe.top_k_groups are set together (group-limited routing)")
        if self.groups is not None and self.top_k_groups is not None:
            if self.experts % self.groups:
                raise ValueError(f"moe.groups ({self.groups}) must divide moe.experts ({self.experts})")
            if self.top_k_groups > self.groups:
                raise ValueError(f"moe.top_k_groups ({self.top_k_groups}) cannot exceed moe.groups ({self.groups})")
            if self.top_k > self.top_k_groups * (self.experts // self.groups):
                raise ValueError(f"moe.top_k ({self.top_k}) exceeds the experts in moe.top_k_groups "
                                 f"({self.top_k_groups} x {self.experts // self.groups})")
        return self

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` (0-based) has routed experts."""
        return index >= self.first_dense_layers and (index + 1) % self.layer_interval == 0


class MLASpec(_Strict):
    """Multi-head latent attention (DeepSeek V2/V3)."""

    q_lora_rank: PositiveInt | None = None
    kv_lora_rank: PositiveInt
    qk_nope_head_dim: PositiveInt
    qk_rope_head_dim: PositiveInt
    v_head_dim: PositiveInt

    @model_validator(mode="after")
    def _dims(self) -> MLASpec:
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"mla.qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (RoPE rotates pairs)")
        return self

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class ModelSpec(_Strict):
    family: Family
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    num_kv_heads: PositiveInt | None = Field(None, description="Default: num_heads (no GQA).")
    head_dim: PositiveInt | None = Field(None, description="Default: hidden_size / num_heads.")
    ffn_hidden_size: PositiveInt
    max_position_embeddings: PositiveInt
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = False
    qkv_bias: bool = Field(False, description="Bias on q, k, v projections (Qwen 2.5).")
    qk_norm: bool = Field(False, description="RMSNorm on q and k per head (Qwen 3).")
    moe: MoESpec | None = None
    mla: MLASpec | None = None
    mtp_layers: int = Field(0, ge=0, description="Multi-token prediction modules after the last layer "
                                                 "(DeepSeek-V3: 1); trained with an extra loss, not used to sample.")
    # Llama 4 (family llama4)
    nope_layer_interval: PositiveInt | None = Field(
        None, description="Every Nth layer uses no RoPE (Llama 4: 4); layer i is NoPE when (i + 1) % N == 0.")
    attention_chunk_size: PositiveInt | None = Field(
        None, description="RoPE layers attend within chunks of this many tokens (Llama 4's local attention).")
    qk_l2_norm: bool = Field(False, description="L2-normalise q and k per head, no weight (Llama 4, RoPE layers).")
    attn_temperature_tuning: bool = Field(
        False, description="Scale q on NoPE layers by log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1 "
                           "(Llama 4).")
    attn_floor_scale: PositiveInt = 8192
    attn_scale: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        kv = self.kv_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv})")
        if self.head_dim is None and self.mla is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) "
                             "or head_dim must be set")
        if self.mla is not None:
            if self.family != "deepseek":
                raise ValueError(f"mla (latent attention) is DeepSeek's; family {self.family!r} does not build it")
            if self.head_dim is not None or self.num_kv_heads not in (None, self.num_heads):
                raise ValueError("with mla, the head dims come from mla.qk_nope_head_dim, mla.qk_rope_head_dim and "
                                 "mla.v_head_dim: leave head_dim and num_kv_heads unset")
            if self.qk_norm or self.qkv_bias:
                raise ValueError("mla has its own q/kv norms: qk_norm and qkv_bias do not apply")
        if self.mtp_layers and self.family != "deepseek":
            raise ValueError(f"mtp_layers (multi-token prediction) is built for DeepSeek-V3 only, not {self.family!r}")
        llama4_only = {k: getattr(self, k) for k in ("nope_layer_interval", "attention_chunk_size", "qk_l2_norm",
                                                     "attn_temperature_tuning") if getattr(self, k)}
        if llama4_only and self.family != "llama4":
            raise ValueError(f"{', '.join(llama4_only)}: Llama 4 attention options; family {self.family!r} does not "
                             "build them (family: llama4)")
        if self.moe is not None and self.moe.first_dense_layers >= self.num_layers:
            raise ValueError(f"moe.first_dense_layers ({self.moe.first_dense_layers}) leaves no MoE layer of "
                             f"{self.num_layers}")
        return self

    def uses_rope(self, index: int) -> bool:
        """Whether layer `index` (0-based) applies RoPE (Llama 4's NoPE layers do not)."""
        return self.nope_layer_interval is None or (index + 1) % self.nope_layer_interval != 0

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def parameter_count(self) -> int:
        """Approximate parameters (embeddings included), for summaries and MFU. Multi-token prediction
        modules are not counted (model cards count the main model, DeepSeek-V3's 671B)."""
        h, layers = self.hidden_size, self.num_layers
        if self.mla:
            m = self.mla
            q_in = m.q_lora_rank or h
            attn = (h * m.q_lora_rank if m.q_lora_rank else 0) + q_in * self.num_heads * (
                m.qk_nope_head_dim + m.qk_rope_head_dim)
            attn += h * (m.kv_lora_rank + m.qk_rope_head_dim)
            attn += m.kv_lora_rank * self.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
            attn += self.num_heads * m.v_head_dim * h
        else:
            q = self.num_heads * self.head_size
            kv = self.kv_heads * self.head_size
            attn = h * (q + 2 * kv) + q * h
        dense_ffn = 3 * h * self.ffn_hidden_size
        if self.moe:
            e = self.moe
            moe_ffn = e.experts * 3 * h * e.expert_ffn + h * e.experts
            moe_ffn += e.shared_experts * 3 * h * (e.shared_expert_ffn or e.expert_ffn)
            moe_layers = sum(e.is_moe_layer(i) for i in range(layers))
            ffn_total = (layers - moe_layers) * dense_ffn + moe_layers * moe_ffn
        else:
            ffn_total = layers * dense_ffn
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return layers * attn + ffn_total + emb
