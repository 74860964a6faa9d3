"""TFLOP/s and MFU from one formula on every backend (issue 17).

- `flops_per_token(spec, seq_length)`: training FLOPs per token of a `ModelSpec`: 6 x the parameters
  a token passes through (routed experts: only its top-k; the embedding lookup is free, the output
  projection is not) plus the attention scores and their weighted sum, 6 x layers x seq x heads x
  (qk head dim + v head dim), the usual PaLM / Megatron convention, causal masking not discounted.
- `peak_tflops(device_name)`: the dense bf16 peak of one device, from the table below, by the
  device's marketing name (an arch such as gfx942 is shared by MI300X, MI300A, MI308X and MI325X, so
  it never decides alone). An unknown device has no peak and its MFU is not reported: never another
  device's figure. `PRIMUS_PEAK_TFLOPS` sets it by hand.
- `device_name()`: read without importing a framework: `PRIMUS_DEVICE_NAME`, NVIDIA's
  `/proc/driver/nvidia/gpus/*/information`, amdgpu's `/sys/class/drm/card*/device/product_name`.

The metrics writer adds `tflops` (per device) and `mfu` (0-1, None without a peak) to every training
line when the module has a `ModelSpec`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from primus.models.spec import ModelSpec

#: dense bf16 TFLOP/s of one device (vendor data sheets, no sparsity), matched in order on the name
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"MI355X", 2516.6),
    (r"MI350X", 2306.9),
    (r"MI325X", 1307.4),
    (r"MI300X", 1307.4),
    (r"MI300A", 980.6),
    (r"MI250X", 383.0),
    (r"MI250\b", 362.1),
    (r"B200", 2250.0),
    (r"H200", 989.4),
    (r"H100.*PCIe", 756.0),
    (r"H100", 989.4),
    (r"A100", 312.0),
)

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
DRM_CARDS = Path("/sys/class/drm")


def _attention_params(spec: ModelSpec) -> tuple[int, int]:
    """(projection parameters of one layer's attention, qk + v head dims summed over heads)."""
    h = spec.hidden_size
    if spec.mla:
        m = spec.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        q_in = m.q_lora_rank or h
        params = (h * m.q_lora_rank if m.q_lora_rank else 0) + q_in * spec.num_heads * qk
        params += h * (m.kv_lora_rank + m.qk_rope_head_dim)
        params += m.kv_lora_rank * spec.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
        params += spec.num_heads * m.v_head_dim * h
        return params, spec.num_heads * (qk + m.v_head_dim)
    q, kv = spec.num_heads * spec.head_size, spec.kv_heads * spec.head_size
    return h * (q + 2 * kv) + q * h, 2 * q


def active_parameters(spec: ModelSpec) -> int:
    """Parameters one token's forward multiplies by (routed experts: top-k of them), output head
    included, embedding lookup not."""
    h = spec.hidden_size
    attention, _ = _attention_params(spec)
    dense_ffn = 3 * h * spec.ffn_hidden_size
    if spec.moe:
        e = spec.moe
        moe_ffn = e.top_k * 3 * h * e.expert_ffn + h * e.experts  # the router scores every expert
        moe_ffn += e.shared_experts * 3 * h * (e.shared_expert_ffn or e.expert_ffn)
        moe_layers = sum(e.is_moe_layer(i) for i in range(spec.num_layers))
        ffn = (spec.num_layers - moe_layers) * dense_ffn + moe_layers * moe_ffn
    else:
        ffn = spec.num_layers * dense_ffn
    return spec.num_layers * attention + ffn + spec.vocab_size * h


def flops_per_token(spec: ModelSpec, seq_length: int) -> float:
    """Training (forward + backward) FLOPs per token at `seq_length` (module docstring)."""
    _, head_dims = _attention_params(spec)
    return 6.0 * active_parameters(spec) + 6.0 * spec.num_layers * seq_length * head_dims


def peak_tflops(name: str | None, environ: dict[str, str] | None = None) -> float | None:
    env = os.environ if environ is None else environ
    forced = env.get("PRIMUS_PEAK_TFLOPS")
    if forced:
        try:
            value = float(forced)
        except ValueError:
            return None
        return value if value > 0 else None
    if not name:
        return None
    return next((peak for pattern, peak in PEAK_BF16_TFLOPS if re.search(pattern, name, re.I)), None)


def device_name(environ: dict[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    if env.get("PRIMUS_DEVICE_NAME"):
        return env["PRIMUS_DEVICE_NAME"]
    try:
        for info in sorted(NVIDIA_GPUS.glob("*/information")):
            match = re.search(r"^Model:\s*(.+)$", info.read_text(), re.M)
            if match:
                return match.group(1).strip()
        for product in sorted(DRM_CARDS.glob("card*/device/product_name")):
            text = product.read_text().strip()
            if text:
                return text
    except OSError:
        return None
    return None


class ThroughputModel:
    """What the metrics writer needs to turn tokens/s into TFLOP/s and MFU."""

    def __init__(self, flops_per_token: float, world_size: int, peak_tflops: float | None) -> None:
        self.flops_per_token = flops_per_token
        self.world_size = max(int(world_size), 1)
        self.peak_tflops = peak_tflops

    def figures(self, tokens_per_s: float) -> dict[str, float | None]:
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        mfu = tflops / self.peak_tflops if self.peak_tflops else None
        return {"tflops": float(f"{tflops:.6g}"), "mfu": float(f"{mfu:.6g}") if mfu is not None else None}
