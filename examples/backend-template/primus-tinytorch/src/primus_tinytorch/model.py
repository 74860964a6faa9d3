"""A tiny Llama-style decoder in plain PyTorch: the "framework" this template backend trains.

Pre-norm blocks (RMSNorm -> attention with rotary embeddings and grouped key/value heads ->
RMSNorm -> SwiGLU MLP), a final norm and a head that may share the embedding matrix. Attention is
`scaled_dot_product_attention`, which picks a fused kernel where the device has one. A real
backend drives its framework here instead; nothing in this file knows about Primus.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None
    ffn_hidden_size: int
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool

    @classmethod
    def from_native(cls, native: dict[str, Any]) -> ModelArgs:
        """The model's native keys (presets/pre_trainer.yaml), by field name."""
        return cls(**{f.name: native[f.name] for f in fields(cls)})

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


def rotary_tables(args: ModelArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position x frequency pair, [positions, head_size / 2]."""
    half = args.head_size // 2
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(args.max_position_embeddings, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head by the position's angle (Llama's layout)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_size = args.num_heads, args.num_kv_heads, args.head_size
        self.q = nn.Linear(args.hidden_size, self.heads * self.head_size, bias=False)
        self.kv = nn.Linear(args.hidden_size, 2 * self.kv_heads * self.head_size, bias=False)
        self.out = nn.Linear(self.heads * self.head_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q(x).view(batch, seq, self.heads, self.head_size).transpose(1, 2)
        k, v = self.kv(x).view(batch, seq, 2, self.kv_heads, self.head_size).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.kv_heads != self.heads:  # grouped-query attention: each kv head serves a group of q heads
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate = nn.Linear(args.hidden_size, args.ffn_hidden_size, bias=False)
        self.up = nn.Linear(args.hidden_size, args.ffn_hidden_size, bias=False)
        self.down = nn.Linear(args.ffn_hidden_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.mlp = SwiGLU(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class TinyDecoder(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)
        self.head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        # buffers follow the model to its device; not persistent: they are recomputed, never saved
        cos, sin = rotary_tables(args)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init_weights)
        if args.tie_embeddings:  # after init: the head *is* the embedding matrix
            self.head.weight = self.embed.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of `tokens` [batch, seq] against `targets` [batch, seq]."""
        seq = tokens.shape[1]
        cos, sin = self.cos[:seq], self.sin[:seq]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
