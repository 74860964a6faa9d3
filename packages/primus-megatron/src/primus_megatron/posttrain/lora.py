"""LoRA on megatron-core's tensor-parallel linear layers, and its peft adapter (written by us).

Each adapted layer computes `base(x) + (alpha / r) * B (A dropout(x))` with the base frozen:

- **Column-parallel** (`linear_qkv`, `linear_fc1`; output rows sharded over TP): A (r, in) is whole and the same on
  every TP rank; B (out / tp, r) is sharded like the base weight. `h = A x` is computed on every rank, then passes
  megatron's copy-to-TP region (identity forward, all-reduce backward), so A's gradient sums every shard's part.
- **Row-parallel** (`linear_proj`, `linear_fc2`; input columns sharded): A (r, in / tp) is sharded like the base
  weight, `A x` is all-reduced over TP (megatron's reduce-from-TP region), B (out, r) is whole on every rank.

So every gradient is complete on its rank without further communication, any TP layout trains the same adapter,
and the sharded matrices carry megatron's tensor-parallel attributes (the grad norm counts them once). A starts
as peft's (Kaiming-uniform, drawn for the whole matrix from a generator seeded by the run's seed and the layer,
then sliced), B at zero. The fused layers share one A among the projections they hold (q/k/v, gate/up); a target
left out of a fused layer has its rows of B held at zero. Routed experts are not adapted (core's rule).

At the end the adapters are gathered over TP and the pipeline to rank 0 and written as a peft adapter (core's
`write_adapter`), and, with `finetune.lora.merge`, the base model with `W + (alpha / r) B A` as `<run dir>/hf/`.
Checkpoints of a LoRA run hold A and B (sharded as above), their optimizer state, the schedule, the step and the
RNG, never the frozen base: a resumed run loads the base from `hf_path` again (PostTrainLoop).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from loguru import logger
from megatron.core import parallel_state as mpu
from megatron.core import tensor_parallel

from primus.errors import ConfigError
from primus.posttrain.lora import adapter_key, module_path, write_adapter

#: megatron's layer name -> (where it sits in a TransformerLayer, column- or row-parallel, HF targets it holds)
LAYERS = {"linear_qkv": ("self_attention", "column", ("q_proj", "k_proj", "v_proj")),
          "linear_proj": ("self_attention", "row", ("o_proj",)),
          "linear_fc1": ("mlp", "column", ("gate_proj", "up_proj")),
          "linear_fc2": ("mlp", "row", ("down_proj",))}


class LoraLinear(torch.nn.Module):
    """A megatron ColumnParallelLinear / RowParallelLinear with a LoRA update; same call and return values."""

    def __init__(self, base: torch.nn.Module, *, parallel: str, rank: int, alpha: float, dropout: float,
                 full_a: torch.Tensor, b_rows: int, b_mask: torch.Tensor | None) -> None:
        super().__init__()
        self.base, self.parallel, self.scale = base, parallel, alpha / rank
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        weight = base.weight
        tp, tp_rank = mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank()
        if parallel == "row":
            cols = full_a.shape[1] // tp
            full_a = full_a[:, tp_rank * cols:(tp_rank + 1) * cols]
        self.lora_A = torch.nn.Parameter(full_a.to(weight.dtype).to(weight.device).contiguous())
        self.lora_B = torch.nn.Parameter(torch.zeros(b_rows, rank, dtype=weight.dtype, device=weight.device))
        sharded = self.lora_B if parallel == "column" else self.lora_A
        tensor_parallel.set_tensor_model_parallel_attributes(sharded, True, 0 if parallel == "column" else 1, 1)
        self.register_buffer("b_mask", b_mask.to(weight.dtype).to(weight.device)[:, None] if b_mask is not None
                             else None, persistent=False)

    def b(self) -> torch.Tensor:
        return self.lora_B if self.b_mask is None else self.lora_B * self.b_mask

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        out, bias = self.base(x, *args, **kwargs)
        h = F.linear(self.dropout(x), self.lora_A)
        if self.parallel == "column":
            h = tensor_parallel.copy_to_tensor_model_parallel_region(h)
        else:
            h = tensor_parallel.reduce_from_tensor_model_parallel_region(h)
        return out + F.linear(h, self.b()) * self.scale, bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> Any:
        """The base layer's keys as they were, plus `lora_A` / `lora_B` sharded over TP as the parameters are
        (a LoRA checkpoint keeps only these: PostTrainLoop.checkpoint_filter)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        axis = {"lora_B": 0} if self.parallel == "column" else {"lora_A": 1}
        state.update(make_sharded_tensors_for_checkpoint({"lora_A": self.lora_A, "lora_B": self.lora_B}, prefix,
                                                         axis, sharded_offsets))
        return state


def _rows_mask(name: str, targets: tuple[str, ...], config: Any) -> torch.Tensor | None:
    """Which output rows of this rank's fused layer belong to a targeted projection (None: all of them)."""
    held = LAYERS[name][2]
    if all(t in targets for t in held):
        return None
    tp = mpu.get_tensor_model_parallel_world_size()
    if name == "linear_fc1":
        f = config.ffn_hidden_size // tp
        return torch.cat([torch.full((f,), "gate_proj" in targets), torch.full((f,), "up_proj" in targets)])
    d = config.kv_channels
    groups = (config.num_query_groups or config.num_attention_heads) // tp
    per_group = config.num_attention_heads // (config.num_query_groups or config.num_attention_heads)
    one = torch.cat([torch.full((per_group * d,), "q_proj" in targets), torch.full((d,), "k_proj" in targets),
                     torch.full((d,), "v_proj" in targets)])
    return one.repeat(groups)


def _layers(chunk: Any) -> list[Any]:
    gpt = getattr(chunk, "module", chunk)
    return list(gpt.decoder.layers) if hasattr(gpt, "decoder") else []


def add_lora(model: list[torch.nn.Module], lora: Any, *, seed: int) -> list[LoraLinear]:
    """Freeze every parameter of `model` and put LoRA on the target layers; returns the adapted layers."""
    from megatron.core.transformer.mlp import MLP

    targets = lora.targets()
    if mpu.get_tensor_model_parallel_world_size() > 1 and model[0].config.sequence_parallel:
        raise ConfigError("LoRA with sequence_parallel is not built", key="sequence_parallel",
                          fix="set sequence_parallel: false for LoRA runs")
    for chunk in model:
        for p in chunk.parameters():
            p.requires_grad_(False)
    adapted = []
    for chunk in model:
        for layer in _layers(chunk):
            for name, (parent_name, parallel, held) in LAYERS.items():
                parent = getattr(layer, parent_name, None)
                if not any(t in targets for t in held) or parent is None or not hasattr(parent, name):
                    continue
                if parent_name == "mlp" and not isinstance(parent, MLP):
                    continue  # a MoE layer: its experts are not adapted
                base = getattr(parent, name)
                if "LayerNorm" in type(base).__name__:
                    raise ConfigError(f"LoRA on {type(base).__name__} (a fused norm + linear) is not built",
                                      key="finetune.lora", fix="run LoRA with the local layer spec")
                fan_in = base.input_size
                gen = torch.Generator().manual_seed(int(seed) * 100_003 + layer.layer_number * 10 + list(LAYERS).index(name))
                full_a = torch.empty(lora.rank, fan_in)
                bound = 1 / math.sqrt(fan_in)  # peft's kaiming_uniform_(a=sqrt(5)) on (r, in)
                full_a.uniform_(-bound, bound, generator=gen)
                module = LoraLinear(base, parallel=parallel, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                    full_a=full_a, b_rows=base.weight.shape[0],
                                    b_mask=_rows_mask(name, targets, chunk.config) if parallel == "column" else None)
                module.layer_number, module.name = layer.layer_number, name
                setattr(parent, name, module)
                adapted.append(module)
    trainable = sum(p.numel() for m in adapted for p in (m.lora_A, m.lora_B))
    logger.info(f"LoRA: rank {lora.rank}, alpha {lora.alpha:g} on {len(adapted)} linear layers of this rank "
                f"({', '.join(targets)}); {trainable:,} trainable parameters here, the base frozen")
    return adapted


def base_fingerprint(model: list[torch.nn.Module]) -> str:
    """A digest of every frozen parameter's bytes on this rank (checks the base stays bit-identical)."""
    h = hashlib.sha256()
    for chunk in model:
        for name, p in getattr(chunk, "module", chunk).named_parameters():  # unwrapped: DDP's names differ
            if not p.requires_grad:
                h.update(name.encode())
                h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- export


def _gather(t: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """Each TP rank's `t`, in TP rank order (every TP rank calls)."""
    size = mpu.get_tensor_model_parallel_world_size()
    if size == 1:
        return [t]
    parts = [torch.empty_like(t) for _ in range(size)]
    torch.distributed.all_gather(parts, t.contiguous(), group=mpu.get_tensor_model_parallel_group())
    return parts


def _hf_matrices(m: LoraLinear, spec: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """HF projection name -> (A (r, in), B (out, r)) of one adapted layer, whole (every TP rank calls)."""
    a = m.lora_A.detach().float().cpu()
    b = m.b().detach().float().cpu()
    held = LAYERS[m.name][2]
    if m.parallel == "row":
        return {held[0]: (torch.cat(_gather(a, 1), dim=1), b)}
    parts = _gather(b, 0)
    if m.name == "linear_fc1":
        half = parts[0].shape[0] // 2
        return {"gate_proj": (a, torch.cat([p[:half] for p in parts])),
                "up_proj": (a, torch.cat([p[half:] for p in parts]))}
    d, groups = spec.head_size, spec.kv_heads
    per_group = spec.num_heads // groups
    grouped = torch.cat(parts).reshape(groups, (per_group + 2) * d, -1)
    return {"q_proj": (a, grouped[:, :per_group * d].reshape(-1, a.shape[0])),
            "k_proj": (a, grouped[:, per_group * d:(per_group + 1) * d].reshape(-1, a.shape[0])),
            "v_proj": (a, grouped[:, (per_group + 1) * d:].reshape(-1, a.shape[0]))}


def adapter_tensors(layers: list[LoraLinear], spec: Any, targets: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The whole job's adapter as peft keys -> tensors, on global rank 0 (others: {}). Every rank calls."""
    mine: dict[str, torch.Tensor] = {}
    for m in layers:
        for target, (a, b) in _hf_matrices(m, spec).items():
            if target in targets:
                path = module_path(m.layer_number - 1, target)
                # a fused layer's shared A is written once per projection (safetensors refuses shared memory)
                mine[adapter_key(path, "A")], mine[adapter_key(path, "B")] = a.clone(), b.contiguous()
    keep = mpu.get_tensor_model_parallel_rank() == 0 and mpu.get_data_parallel_rank() == 0
    everyone: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine if keep else {})
    out: dict[str, torch.Tensor] = {}
    for part in everyone:
        out.update(part)
    return out


def merge_into(base_dir: Path, tensors: dict[str, torch.Tensor], lora: Any, out_dir: Path) -> None:
    """`base_dir`'s model with every adapted weight W replaced by W + (alpha / r) B A, written atomically."""
    from safetensors.torch import load_file, save_file

    from primus.models.hf import TOKENIZER_FILES, write_weights

    weights: dict[str, torch.Tensor] = {}
    for file in sorted(base_dir.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    scale = lora.alpha / lora.rank
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[len("base_model.model."):-len(".lora_A.weight")]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        w = weights[path + ".weight"]
        weights[path + ".weight"] = (w.float() + scale * (b @ a)).to(w.dtype)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(tmp, weights, save_file=save_file, nbytes=lambda t: t.numel() * t.element_size())
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, tmp / name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def write_outputs(loop: Any, run_dir: Path) -> None:
    """`<run dir>/adapter/` and, with lora.merge, `<run dir>/hf/` (every rank calls; global rank 0 writes)."""
    from safetensors.torch import save_file

    sft, spec = loop.sft, loop.model_spec
    if spec is None:
        raise ConfigError("LoRA needs a model spec to name the adapter's modules", key="model",
                          fix="use model: {hf_path: DIR}")
    same = base_fingerprint(loop.model) == loop.base_digest
    flags = torch.tensor([0 if same else 1], dtype=torch.int32)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    if flags.item():
        raise RuntimeError("LoRA: a base weight changed during training")
    tensors = adapter_tensors(loop.lora_layers, spec, sft.lora.targets())
    if torch.distributed.get_rank() == 0:
        logger.info("LoRA: base weights bit-identical after training (every rank)")
        adapter = write_adapter(run_dir / "adapter", tensors, spec=spec, lora=sft.lora, base_model=sft.hf_path,
                                save_file=save_file, tokenizer_dir=Path(sft.tokenizer_dir))
        logger.info(f"LoRA adapter written to {adapter} ({len(tensors) // 2} modules)")
        if sft.lora.merge:
            merge_into(Path(sft.hf_path), tensors, sft.lora, run_dir / "hf")
            logger.info(f"merged model (base + adapter) written to {run_dir / 'hf'}")
    torch.distributed.barrier()
