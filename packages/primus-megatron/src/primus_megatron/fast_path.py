"""Which fast path a megatron run takes, decided once from the native config and the platform.

`decide()` is read by the translator's dry-run summary (the target platform) and by the trainer
when it builds the model (the device it runs on), so what `primus run --dry-run` prints is what the
run does. Light on purpose: no torch, no megatron. TransformerEngine's presence is asked through
`transformer_engine_installed()` (its import spec), the one seam a test replaces.

The choices, each with its reason:
- layer spec: TransformerEngine's when TE is installed and the platform is a GPU (or
  `transformer_impl: transformer_engine` asks for it: refused where TE cannot run); megatron-core's
  local spec otherwise, or with `transformer_impl: local`.
- attention: TE's fused attention with the TE spec; else Primus's SDPAttention
  (torch's scaled_dot_product_attention: flash / memory-efficient kernels on ROCm, CUDA and CPU);
  megatron-core's local DotProductAttention (the full score matrix) only with `use_flash_attn: false`.
- precision: bf16/fp16/fp32 as given (fp32 on CPU), and fp8 (`fp8: e4m3 | hybrid`, `fp8_recipe`)
  only through TE on a GPU whose arch TE runs fp8 on (FP8_RECIPES); anything else is a ConfigError.
- fusions (bias+activation, bias+dropout, masked softmax, RoPE): on a GPU, off on CPU.
- overlap of the gradient reduce and the parameter gather: `null` in the preset means on with a GPU
  (the parameter gather with the distributed optimizer only), off on CPU; true/false as written wins.
- data: on a GPU, `num_workers` DataLoader workers build the training batches into pinned memory,
  one batch ahead per worker; on CPU they are built in the training process (the cores train).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from primus.errors import ConfigError

FP8_FORMATS = ("e4m3", "hybrid")
# fp8 recipe -> the GPU archs TransformerEngine runs it on (CUDA "smXY" with a minimum, ROCm gfx names)
FP8_RECIPES: dict[str, tuple[int, frozenset[str]]] = {
    "delayed": (89, frozenset({"gfx942", "gfx950"})),
    "tensorwise": (89, frozenset({"gfx942", "gfx950"})),
    "blockwise": (90, frozenset()),
    "mxfp8": (100, frozenset({"gfx950"})),
}
# Llama 4's attention features exist on SDPAttention only
_SDPA_ONLY = ("attention_chunk_size", "attn_temperature_tuning")


def transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


@dataclass(frozen=True)
class FastPath:
    spec: str  # "transformer_engine" | "local"
    attention: str  # "te" | "sdpa" | "local"
    why: str  # why this spec and attention
    precision: str  # "bf16", "fp16", "fp32", "bf16 + fp8 hybrid (delayed recipe)"
    fp8: str | None
    fp8_recipe: str | None
    fusions: bool  # bias+activation, bias+dropout; masked softmax (local attention); RoPE (TE spec)
    fusions_why: str
    overlap_grad_reduce: bool
    overlap_param_gather: bool
    overlap_why: str
    data_workers: int  # DataLoader workers for the training batches (0: built inline, as on CPU)

    def lines(self) -> dict[str, str]:
        """The dry-run lines (key: value)."""
        attention = {"te": "TransformerEngine fused attention", "sdpa": "SDPA (torch scaled_dot_product_attention)",
                     "local": "local (megatron-core DotProductAttention, full score matrix)"}[self.attention]
        fused = ["bias+activation", "bias+dropout"] + (["masked softmax"] if self.attention == "local" else []) + (
            ["RoPE"] if self.spec == "transformer_engine" else [])
        return {
            "attention": f"{attention}; {self.why}",
            "spec": f"{self.spec} layer spec",
            "precision": self.precision,
            "fusions": f"{', '.join(fused)} {'on' if self.fusions else 'off'} ({self.fusions_why})",
            "overlap": f"grad reduce {'on' if self.overlap_grad_reduce else 'off'}, param gather "
                       f"{'on' if self.overlap_param_gather else 'off'} ({self.overlap_why})",
            "data": (f"{self.data_workers} workers, pinned memory, 1 batch of prefetch per worker"
                     if self.data_workers else "batches built in the training process"
                     + (" (num_workers: 0)" if self.fusions else " (CPU)")),
        }


def _arch_runs(recipe: str, platform: str, arch: str | None) -> bool | None:
    """Whether TE runs `recipe` on this GPU (None: the arch is not known here)."""
    min_sm, gfx = FP8_RECIPES[recipe]
    if arch is None:
        return None
    if platform == "rocm":
        return arch.split(":")[0] in gfx
    return arch.startswith("sm") and arch[2:].isdigit() and int(arch[2:]) >= min_sm


def decide(native: Mapping[str, Any], platform: str, arch: str | None = None, *,
           te: bool | None = None) -> FastPath:
    """The fast path for `native` (resolved Megatron arguments) on `platform` ("cpu" | "rocm" | "cuda";
    arch: a gfx name on ROCm, "sm90" on CUDA, None when not known). `te`: whether TransformerEngine is
    installed (default: asked of this Python). Raises ConfigError for what cannot work there."""
    gpu = platform in ("rocm", "cuda")
    te_installed = transformer_engine_installed() if te is None else te
    impl = native.get("transformer_impl")
    if impl not in (None, "local", "transformer_engine"):
        raise ConfigError(f"transformer_impl {impl!r} is not a layer implementation", key="transformer_impl",
                          fix="write local or transformer_engine (or leave it unset: TE where installed on a GPU)")
    sdpa_only = [key for key in _SDPA_ONLY if native.get(key)]
    fp8 = native.get("fp8") or None
    recipe = native.get("fp8_recipe") or ("delayed" if fp8 else None)

    if not te_installed:
        te_missing = "TransformerEngine is not installed"
    elif not gpu:
        te_missing = f"TransformerEngine needs a GPU ({platform})"
    elif sdpa_only:
        te_missing = f"{sdpa_only[0]} is built on SDPAttention only"
    else:
        te_missing = ""
    if impl == "transformer_engine" and te_missing:
        raise ConfigError(f"transformer_impl: transformer_engine: {te_missing}", key="transformer_impl",
                          fix="install transformer_engine on the GPU nodes, or drop transformer_impl")
    if fp8:
        _check_fp8(fp8, recipe, te_missing or ("transformer_impl is local" if impl == "local" else ""),
                   platform, arch)

    if not te_missing and impl != "local":
        spec, attention, why = "transformer_engine", "te", "TransformerEngine installed on " + platform
    else:
        spec = "local"
        why = "transformer_impl: local" if impl == "local" and not te_missing else te_missing
        if native.get("use_flash_attn") is False and not native.get("multi_latent_attention") and not sdpa_only:
            attention, why = "local", "use_flash_attn: false"
        else:
            attention = "sdpa"

    if native.get("bf16"):
        precision = "bf16"
    elif native.get("fp16"):
        precision = "fp16"
    else:
        precision = "fp32"
    if not gpu:
        precision = "fp32 (CPU)"
    if fp8:
        precision += f" + fp8 {fp8} ({recipe} recipe)"

    grad, gather = native.get("overlap_grad_reduce"), native.get("overlap_param_gather")
    distopt = bool(native.get("use_distributed_optimizer")) and not native.get("use_torch_fsdp2")
    if not gpu:
        overlap_grad, overlap_gather, overlap_why = False, False, "CPU"
    else:
        overlap_grad = True if grad is None else bool(grad)
        overlap_gather = distopt if gather is None else bool(gather) and distopt
        overlap_why = "GPU default" if grad is None and gather is None else "as written"
        if not distopt:
            overlap_why += "; the param gather needs the distributed optimizer"
    return FastPath(spec=spec, attention=attention, why=why, precision=precision, fp8=fp8, fp8_recipe=recipe,
                    fusions=gpu, fusions_why="GPU" if gpu else "CPU: they need GPU kernels",
                    overlap_grad_reduce=overlap_grad, overlap_param_gather=overlap_gather, overlap_why=overlap_why,
                    data_workers=int(native.get("num_workers") or 0) if gpu else 0)


def _check_fp8(fp8: Any, recipe: Any, te_missing: str, platform: str, arch: str | None) -> None:
    if fp8 not in FP8_FORMATS:
        raise ConfigError(f"fp8 {fp8!r} is not an fp8 format", key="fp8", fix="write " + " or ".join(FP8_FORMATS))
    if recipe not in FP8_RECIPES:
        raise ConfigError(f"fp8_recipe {recipe!r} is not one this backend runs", key="fp8_recipe",
                          fix="write one of " + ", ".join(FP8_RECIPES))
    if te_missing:
        raise ConfigError(f"fp8 runs through TransformerEngine's layers: {te_missing}", key="fp8",
                          fix="drop fp8 (train in bf16), or run on GPUs with transformer_engine installed")
    if _arch_runs(recipe, platform, arch) is False:
        min_sm, gfx = FP8_RECIPES[recipe]
        where = ", ".join([f"sm{min_sm}+"] + sorted(gfx))
        raise ConfigError(f"fp8_recipe {recipe} does not run on {platform} {arch}", key="fp8_recipe",
                          fix=f"it runs on {where}; pick another recipe or drop fp8")


__all__ = ["FP8_RECIPES", "FastPath", "decide", "transformer_engine_installed"]
