"""LoRA's backend-neutral half: which Hugging Face modules get adapters, and the peft adapter directory.

Every backend trains `W x + (alpha / r) * B (A dropout(x))` on the linear layers `finetune.lora.target_modules`
names (Hugging Face's names: q_proj ... down_proj; routed experts are not adapted) and, at the end, hands its
A and B matrices here under Hugging Face module paths. This writes what `peft.PeftModel.from_pretrained`
loads: `adapter_config.json` and `adapter_model.safetensors` (keys
`base_model.model.<module path>.lora_A.weight`, shape (r, in), and `.lora_B.weight`, shape (out, r)).
A backend that fuses projections (megatron's fused QKV or gate/up) shares one A among the fused outputs: it
writes that A under each module's name, which is the same update.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from primus.errors import ConfigError
from primus.models.spec import ModelSpec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def module_path(layer: int, target: str) -> str:
    """The Hugging Face module path of `target` in decoder layer `layer`."""
    return f"model.layers.{layer}.{'self_attn' if target in ATTENTION else 'mlp'}.{target}"


def adapted_modules(spec: ModelSpec, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Module path -> (in, out) features of every linear layer that gets an adapter. MLP targets apply
    to dense MLP layers only (a MoE layer's routed experts and router are not adapted)."""
    if spec.mla is not None:
        raise ConfigError("LoRA on multi-head latent attention (DeepSeek) is not built", key="finetune.lora",
                          fix="use finetune.method: full")
    h, d = spec.hidden_size, spec.head_size
    dims = {"q_proj": (h, spec.num_heads * d), "k_proj": (h, spec.kv_heads * d), "v_proj": (h, spec.kv_heads * d),
            "o_proj": (spec.num_heads * d, h), "gate_proj": (h, spec.ffn_hidden_size),
            "up_proj": (h, spec.ffn_hidden_size), "down_proj": (spec.ffn_hidden_size, h)}
    out = {}
    for layer in range(spec.num_layers):
        dense = spec.moe is None or not spec.moe.is_moe_layer(layer)
        for t in targets:
            if t in ATTENTION or dense:
                out[module_path(layer, t)] = dims[t]
    if not out:
        raise ConfigError("no layer of this model has the LoRA target modules (MLP targets adapt dense layers only)",
                          key="finetune.lora.target_modules", fix="add attention targets: q_proj, k_proj, v_proj, o_proj")
    return out


def adapter_config(lora: Any, targets: tuple[str, ...], base_model: str | None) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": sorted(targets), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None, "inference_mode": True,
            "base_model_name_or_path": base_model, "init_lora_weights": True}


def adapter_key(path: str, which: str) -> str:
    return f"base_model.model.{path}.lora_{which}.weight"


def write_adapter(out_dir: Path, tensors: Mapping[str, Any], *, spec: ModelSpec, lora: Any, base_model: str | None,
                  save_file: Callable[..., None], tokenizer_dir: Path | None = None) -> Path:
    """Write a peft adapter directory atomically (a temporary sibling renamed into place).

    `tensors`: peft keys (`adapter_key`) -> tensors in the caller's framework; `save_file` is that
    framework's safetensors writer. Every adapted module must have both matrices of the right shapes.
    """
    from primus.models.hf import TOKENIZER_FILES

    targets = lora.targets()
    expected = {}
    for path, (fan_in, fan_out) in adapted_modules(spec, targets).items():
        expected[adapter_key(path, "A")] = (lora.rank, fan_in)
        expected[adapter_key(path, "B")] = (fan_out, lora.rank)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        missing = sorted(set(expected) - set(got))[:3]
        extra = sorted(set(got) - set(expected))[:3]
        wrong = [f"{k} {got[k]} != {expected[k]}" for k in expected if k in got and got[k] != expected[k]][:3]
        raise RuntimeError(f"adapter tensors do not match the model: missing {missing}, unexpected {extra}, "
                           f"misshapen {wrong}")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(dict(tensors), str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(lora, targets, base_model), indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
