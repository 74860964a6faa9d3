"""Primus backend for TorchTitan.

This module is what the `primus.backends` entry point loads: a `BackendSpec` and nothing else, so
`primus backends` never imports torch or torchtitan. The translator, adapter, patches and env are
named by import strings and loaded when used.
"""

from primus.backends.spec import BackendSpec, framework_range

#: The torchtitan versions this package supports: read from its pyproject's dependency (the one
#: declaration); the spec and the patch modules use this name, never a literal.
FRAMEWORK_RANGE = framework_range("primus-torchtitan", "torchtitan")

BACKEND = BackendSpec(
    name="torchtitan",
    framework="torchtitan",
    supported=FRAMEWORK_RANGE,
    presets="primus_torchtitan.presets",
    preflight="primus_torchtitan.preflight:process_group",
    adapter="primus_torchtitan.adapter:TorchTitanAdapter",
    translator="primus_torchtitan.translate:TorchTitanTranslator",
    process_model="torchrun",
    runtime="torch",
    patches="primus_torchtitan.patches:PATCHES",
    env="primus_torchtitan.env:ENV",
    exporter="primus_torchtitan.export:export_hf",
    model_families=("llama", "qwen3", "deepseek", "llama4"),
    description=(
        "Pretraining through TorchTitan's own Trainer (FSDP2, tensor parallel, distributed "
        "checkpointing): Llama 3, Qwen 3, DeepSeek-V3 (and V2-Lite) and Llama 4 models from a neutral "
        "preset or a TorchTitan flavor, "
        "synthetic or local JSONL data, and full supervised fine-tuning with loss masking (post_trainer), "
        "with a registered patch layer that also trains on CPU."
    ),
    install_hint="pip install primus-torchtitan",
)
