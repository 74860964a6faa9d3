"""`primus export` for the hf backend: a checkpoint's weights under the Hugging Face on-disk names.

An hf checkpoint holds the state dict of the unwrapped transformers model: whole in
`checkpoint-<step>/model.pt` (one process, DDP; a LoRA run's: the adapter's matrices only, merged
here into the base of `hf_path`), or as the DCP shards FSDP ranks wrote (`shards/`, whose whole
tensors DCP assembles here in one process), so exporting is a rename: the state-dict names of the
transformers model in memory -> the names of `primus.models.hf.hf_tensor_shapes`. They differ in
two places:

- transformers 5 keeps the routed experts of a MoE layer fused in memory
  (`mlp.experts.gate_up_proj` [E, 2F, H], gate rows first, and `mlp.experts.down_proj` [E, H, F]);
  on disk every expert has its own matrices (`mlp.experts.<e>.gate_proj/up_proj/down_proj` for
  qwen3_moe and deepseek, `block_sparse_moe.experts.<e>.w1/w3/w2` for mixtral, whose router is
  `block_sparse_moe.gate` on disk and `mlp.gate` in memory); Llama 4's fused
  `feed_forward.experts.*` are fused on disk too and keep their names;
- a model with tied embeddings has no `lm_head.weight` on disk.

Runs in one process on the CPU; imports torch and safetensors, never builds the model.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from primus.errors import ConfigError

CHECKPOINT_PREFIX = "checkpoint-"  # the adapter's names, repeated so that export never imports it
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.pt"
SHARDS = "shards"

_FUSED = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)$")
_ROUTER = re.compile(r"^(model\.layers\.\d+\.)mlp\.gate\.weight$")


def to_hf_names(state: Mapping[str, Any], spec: Any) -> dict[str, Any]:
    """The tensors of a transformers state dict under the on-disk names of `hf_tensor_shapes(spec)`
    (views, no copies: the caller makes them contiguous when writing)."""
    mixtral = spec.family == "mixtral"
    expert_names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    out: dict[str, Any] = {}
    for name, tensor in state.items():
        fused = _FUSED.match(name)
        if fused:
            prefix, kind = fused.groups()
            block = f"{prefix}{'block_sparse_moe' if mixtral else 'mlp'}.experts"
            if kind == "gate_up_proj":
                half = tensor.shape[1] // 2
                for e in range(tensor.shape[0]):
                    out[f"{block}.{e}.{expert_names[0]}.weight"] = tensor[e, :half]
                    out[f"{block}.{e}.{expert_names[1]}.weight"] = tensor[e, half:]
            else:
                for e in range(tensor.shape[0]):
                    out[f"{block}.{e}.{expert_names[2]}.weight"] = tensor[e]
            continue
        router = _ROUTER.match(name)
        if router and mixtral:
            out[f"{router.group(1)}block_sparse_moe.gate.weight"] = tensor
            continue
        if mixtral and ".mlp.experts." in name:  # transformers 4: per-expert already, under mlp in memory
            name = name.replace(".mlp.experts.", ".block_sparse_moe.experts.")
        out[name] = tensor
    if spec.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _step_of(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def complete_checkpoints(directory: Path) -> list[Path]:
    """`checkpoint-<step>` directories with their state file, oldest first (the adapter's rule)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def checkpoint_dir_of(module: Any, run_dir: Path) -> Path:
    """Where the run's checkpoints are: `checkpoint.dir`, else `<run dir>/checkpoints` (RunContext's rule)."""
    configured = module.module.checkpoint.dir
    return Path(configured).expanduser().resolve() if configured else Path(run_dir) / "checkpoints"


def find_checkpoint(directory: Path, step: int | None) -> Path:
    """The complete checkpoint of `step`, else the newest; a ConfigError naming `directory` when none."""
    found = complete_checkpoints(directory)
    if step is not None:
        chosen = [p for p in found if _step_of(p) == step]
        if not chosen:
            steps = ", ".join(str(_step_of(p)) for p in found) or "none"
            raise ConfigError(f"{directory} has no complete checkpoint of step {step} (complete: {steps})",
                              key="--step", fix="pass one of the saved steps, or no --step for the newest")
        return chosen[0]
    if not found:
        raise ConfigError(f"{directory} holds no complete checkpoint", key="RUN_DIR",
                          fix="train with checkpoint.interval set (the hf backend saves at its multiples) or "
                              "checkpoint.export: hf (a checkpoint of the last step)")
    return found[-1]


def read_state(checkpoint: Path) -> tuple[dict[str, Any], int]:
    """(the model state dict, the step) of one hf checkpoint; tensors only (weights_only), from
    model.pt or, for a checkpoint saved under FSDP, from its DCP shards (whole tensors assembled in
    one process, through core's safe readers)."""
    import torch

    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        if (checkpoint / SHARDS).is_dir():
            from primus.runs.dcp import read_full_tensors

            model = {name.removeprefix("model."): tensor
                     for name, tensor in read_full_tensors(checkpoint / SHARDS, prefix="model.").items()}
            return model, int(state["step"])
        model = torch.load(checkpoint / MODEL_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ConfigError(f"checkpoint {checkpoint}: {Path(exc.filename or MODEL_FILE).name} is missing") from None
    except (EOFError, RuntimeError, json.JSONDecodeError, UnicodeDecodeError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"checkpoint {checkpoint} cannot be read ({str(exc).splitlines()[0][:200]})") from None
    except BaseException as exc:  # DCP's CheckpointException (a BaseException): a shard file missing or cut short
        if type(exc).__name__ != "CheckpointException":
            raise
        from primus.runs.dcp import damage, first_failure

        why = damage(checkpoint / SHARDS, exc) or first_failure(exc)
        raise ConfigError(f"checkpoint {checkpoint} cannot be read ({SHARDS}/{why})") from None
    if not isinstance(model, dict):
        raise ConfigError(f"checkpoint {checkpoint}: {MODEL_FILE} is not a state dict")
    return model, int(state["step"])


def merged_lora(module: Any, state: Mapping[str, Any]) -> dict[str, Any]:
    """A LoRA run's checkpoint (the adapter's matrices only) merged into its base, `module.hf_path`'s weights:
    W + (alpha / rank) B A for every adapted layer, in float32, under the names on disk."""
    import torch
    from safetensors.torch import load_file

    base = module.hf_path
    if not base or not any(Path(base).glob("*.safetensors")):
        raise ConfigError(f"the LoRA checkpoint's base {base} has no safetensors to merge the adapter into",
                          key="model.hf_path")
    tensors: dict[str, Any] = {}
    for file in sorted(Path(base).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    lora = module.module.finetune.lora_settings
    scale = lora.alpha / lora.rank
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        weight = key.removeprefix("base_model.model.").split(".lora_A.")[0] + ".weight"
        b = state[key.replace(".lora_A.", ".lora_B.")]
        tensors[weight] = tensors[weight].to(torch.float32) + scale * (b.to(torch.float32) @ a.to(torch.float32))
    return tensors


def export_hf(module: Any, run_dir: Path, step: int | None, out_dir: Path) -> int:
    """Core's exporter hook (BackendSpec.exporter): write the checkpoint's weights into `out_dir`."""
    checkpoint = find_checkpoint(checkpoint_dir_of(module, run_dir), step)  # before torch is imported
    import torch
    from safetensors.torch import save_file

    from primus.models.hf import check_tensors, write_weights

    state, saved_step = read_state(checkpoint)
    lora = any(".lora_A." in name for name in state)
    tensors = merged_lora(module, state) if lora else to_hf_names(state, module.model)
    check_tensors(((n, tuple(t.shape)) for n, t in tensors.items()), module.model, f"checkpoint {checkpoint}")
    # an expert's slice of a fused tensor is a view: safetensors writes each tensor from storage of its own
    tensors = {n: t.detach().to(torch.float32).clone() if t._base is not None else t.detach().to(torch.float32)
               .contiguous() for n, t in tensors.items()}
    write_weights(out_dir, tensors, save_file=save_file, nbytes=lambda t: t.numel() * t.element_size())
    return saved_step
