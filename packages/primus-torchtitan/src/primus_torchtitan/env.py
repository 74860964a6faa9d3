"""Environment entries of the torchtitan backend (ARCHITECTURE §6).

Core already applies the ROCm set every torch backend shares (HSA, RCCL/NCCL, TransformerEngine,
deterministic mode, AINIC) because this backend's runtime is "torch"; TorchTitan itself needs no
variable beyond those, so this list is empty. It is where a TorchTitan-specific entry would go.
"""

from primus.platform.env import EnvEntry

ENV: list[EnvEntry] = []
