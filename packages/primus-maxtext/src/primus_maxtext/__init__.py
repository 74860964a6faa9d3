"""Primus backend for JAX MaxText.

This module is what the `primus.backends` entry point loads: a `BackendSpec` and nothing else, so
`primus backends` never imports jax or maxtext. Translator, adapter, patches and env are named by
import strings and loaded when used.
"""

from primus.backends.spec import BackendSpec, framework_range

#: The maxtext versions this package supports: read from its pyproject's dependency (the one
#: declaration); the spec and the patch modules use this name, never a literal.
FRAMEWORK_RANGE = framework_range("primus-maxtext", "maxtext")

BACKEND = BackendSpec(
    name="maxtext",
    framework="maxtext",
    supported=FRAMEWORK_RANGE,
    presets="primus_maxtext.presets",
    adapter="primus_maxtext.adapter:MaxTextAdapter",
    translator="primus_maxtext.translate:MaxTextTranslator",
    process_model="per-host",
    runtime="jax",
    patches="primus_maxtext.patches:PATCHES",
    env="primus_maxtext.env:ENV",
    exporter="primus_maxtext.export:export_hf",
    model_families=("llama", "qwen2", "qwen3", "mixtral", "deepseek", "llama4"),
    # MaxText's loop checkpoints on preemption only through JAX's own preemption notifier; Primus
    # cannot ask it to stop after a step yet, so SIGTERM keeps its default action (the process ends;
    # resume: auto continues from the last interval checkpoint)
    graceful_stop=False,
    description=(
        "Pretraining through MaxText's own training entry (`maxtext.trainers.pre_train.train`), run "
        "in-process with a MaxText config that Primus generates from the experiment and keeps in the run "
        "directory (`<run dir>/maxtext/<module>.yml`), so the run can be repeated without Primus. One "
        "process per host; JAX's coordinator comes from MASTER_ADDR / MASTER_PORT / NNODES / NODE_RANK. "
        "Native keys are MaxText's `base.yml` keys, checked before anything starts."
    ),
    install_hint="pip install primus-maxtext",
)
