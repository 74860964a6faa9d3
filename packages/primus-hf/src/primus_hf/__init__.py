"""Primus backend for Hugging Face transformers.

This module is what the `primus.backends` entry point loads: a `BackendSpec` and nothing else, so
that `primus backends` never imports torch or transformers. The translator, adapter, patches and
env are named by import strings and loaded when used.
"""

from primus.backends.spec import BackendSpec, framework_range

#: The transformers versions this package supports: read from its pyproject's dependency (the one
#: declaration); the spec and the patch modules use this name, never a literal.
FRAMEWORK_RANGE = framework_range("primus-hf", "transformers")

BACKEND = BackendSpec(
    name="hf",
    framework="transformers",
    supported=FRAMEWORK_RANGE,
    presets="primus_hf.presets",
    preflight="primus_hf.preflight:process_group",
    adapter="primus_hf.adapter:HFAdapter",
    translator="primus_hf.translate:HFTranslator",
    process_model="torchrun",
    runtime="torch",
    patches="primus_hf.patches:PATCHES",
    env="primus_hf.env:ENV",
    exporter="primus_hf.export:export_hf",
    model_families=("llama", "qwen2", "qwen3", "mixtral", "deepseek", "llama4"),
    description=(
        "Causal-LM pretraining on Hugging Face transformers models: a model built from a neutral "
        "preset (llama, qwen2, qwen3, qwen3 MoE, mixtral) or loaded from a local directory "
        "(`hf_path`), trained by a Primus loop that reads TrainingArguments names, with DDP "
        "(NCCL/RCCL on GPUs, gloo on CPU) or FSDP, exact resume, and HF-format model output."
    ),
    install_hint="pip install primus-hf",
)
