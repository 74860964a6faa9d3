"""`ModelSpec`: a decoder-only transformer described once, in no framework's vocabulary."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

Family = Literal["llama", "qwen2", "qwen3", "mixtral", "deepseek"]


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


class MLASpec(_Strict):
    """Multi-head latent attention (DeepSeek V2/V3)."""

    q_lora_rank: PositiveInt | None = None
    kv_lora_rank: PositiveInt
    qk_nope_head_dim: PositiveInt
    qk_rope_head_dim: PositiveInt
    v_head_dim: PositiveInt


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

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        kv = self.kv_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({kv})")
        if self.head_dim is None and self.mla is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) "
                             "or head_dim must be set")
        if self.moe and self.moe.top_k > self.moe.experts:
            raise ValueError("moe.top_k cannot exceed moe.experts")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def parameter_count(self) -> int:
        """Approximate parameters (embeddings included), for summaries and MFU."""
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
            ffn_total = e.first_dense_layers * dense_ffn + (layers - e.first_dense_layers) * moe_ffn
        else:
            ffn_total = layers * dense_ffn
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return layers * attn + ffn_total + emb
