"""Primus's Megatron backend. This module is the entry point and stays light: no torch, no megatron."""

from primus.backends.spec import BackendSpec, framework_range

#: The megatron-core versions this package supports: read from its pyproject's dependency (the one
#: declaration); the spec and the patch modules use this name, never a literal.
FRAMEWORK_RANGE = framework_range("primus-megatron", "megatron-core")

BACKEND = BackendSpec(
    name="megatron",
    framework="megatron-core",
    supported=FRAMEWORK_RANGE,
    presets="primus_megatron.presets",
    preflight="primus_megatron.preflight:process_group",
    adapter="primus_megatron.adapter:MegatronAdapter",
    translator="primus_megatron.translate:MegatronTranslator",
    process_model="torchrun",
    runtime="torch",
    patches="primus_megatron.patches:PATCHES",
    env="primus_megatron.env:ENV",
    data_prepare="primus_megatron.prepare:prepare",
    exporter="primus_megatron.export:export_hf",
    model_families=("llama", "qwen2", "qwen3", "mixtral", "deepseek", "llama4"),
    description="Pretraining on megatron-core: tensor, pipeline, data and expert parallel; dist checkpoints.",
    install_hint="primus-megatron",
)
