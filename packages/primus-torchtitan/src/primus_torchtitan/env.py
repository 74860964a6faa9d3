"""Environment entries of the torchtitan backend (ARCHITECTURE §6).

Core already applies the ROCm set every torch backend shares (HSA, RCCL/NCCL, TransformerEngine,
deterministic mode) because this backend's runtime is "torch". What is added here is specific to
how TorchTitan runs.
"""

from primus.platform.env import EnvEntry

ENV: list[EnvEntry] = [
    EnvEntry("TORCH_NCCL_AVOID_RECORD_STREAMS", "1", platforms=frozenset({"rocm", "cuda"}),
             why="FSDP2 frees all-gather buffers without recordStream; TorchTitan's recommended setting",
             source="torchtitan"),
    EnvEntry("GLOO_SOCKET_IFNAME", "lo", platforms=frozenset({"cpu"}),
             why="CPU runs are single-host: gloo over loopback avoids picking an unroutable interface",
             source="torchtitan"),
]
