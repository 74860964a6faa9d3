"""Environment entries of the tinytorch backend, set as defaults before the adapter is imported.

Core already sets its ROCm base set for every `runtime="torch"` backend (HSA, HIP, RCCL/NCCL,
TorchInductor); a backend adds only what its own loop needs. A value the user's shell sets wins,
and the experiment's `env:` wins over both. `primus env --backend tinytorch --platform cuda` shows
what would be set and why.
"""

from __future__ import annotations

from primus.platform.env import EnvEntry

ENV = [
    EnvEntry("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True", platforms=frozenset({"cuda"}),
             why="growable segments: less fragmentation when activation sizes vary", source="tinytorch"),
]
