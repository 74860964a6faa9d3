"""primus-tinytorch: a template Primus backend (a tiny decoder-only transformer in plain PyTorch).

This module is what the `primus.backends` entry point loads: one `BackendSpec` and nothing else.
`primus backends`, `primus config show` and `primus patches` load every installed backend's entry
point, so nothing here may import torch; the translator, adapter, patches and env are named by
import strings and loaded only when used.

Read the package in this order: this spec, translate.py (light: config in, native keys out),
adapter.py and model.py (heavy: one training process), patches.py, env.py, presets/.
"""

from primus.backends.spec import BackendSpec, framework_range

#: the torch versions this package supports, read from its own pyproject dependency (the one place
#: the range is written); core warns, naming the range, when the installed torch is outside it
FRAMEWORK_RANGE = framework_range("primus-tinytorch", "torch")

BACKEND = BackendSpec(
    name="tinytorch",  # what `framework:` in an experiment names
    framework="torch",  # the framework's *distribution* name: its installed version is checked
    supported=FRAMEWORK_RANGE,
    presets="primus_tinytorch.presets",  # package data: pre_trainer.yaml (and models/ if any)
    translator="primus_tinytorch.translate:TinyTorchTranslator",  # light: never imports torch
    adapter="primus_tinytorch.adapter:TinyTorchAdapter",  # heavy: imported when a run starts
    patches="primus_tinytorch.patches:PATCHES",
    env="primus_tinytorch.env:ENV",
    process_model="torchrun",  # one process per device; more than one process is handed to torchrun
    runtime="torch",  # picks core's environment set for torch backends
    model_families=("llama",),
    # the adapter polls ctx.stop_requested between steps and checkpoints before returning, so the
    # worker may catch SIGTERM for it (False would leave SIGTERM's default: the process dies at once)
    graceful_stop=True,
    description="Template backend: a tiny Llama-style decoder in plain PyTorch trained on mock tokens "
                "(single process, or DDP under torchrun).",
    install_hint="pip install ./examples/backend-template/primus-tinytorch",
)
