"""Environment entries of the hf backend (ARCHITECTURE §6).

Core already sets the ROCm torch base set for every torch backend (`core_entries("torch")`): HSA,
HIP, RCCL/NCCL and TorchInductor defaults. The hf loop needs nothing beyond it: it tokenizes once
in the main process before any fork and reaches no hub at run time, so no HF_* or tokenizers
variable changes its behaviour. The list stays, empty, so the docs say so and entries have a home.
"""

from __future__ import annotations

from primus.platform.env import EnvEntry

ENV: list[EnvEntry] = []
