"""Megatron's environment entries, on top of core's ROCm torch set (ARCHITECTURE §6)."""

from primus.platform.env import EnvEntry

ENV = [
    # (also on CPU, where it only silences megatron-core's warning about it)
    # megatron-core overlaps TP communication with compute only when kernels are queued in issue
    # order, which needs a single hardware queue per device (Megatron-LM asserts it on GPUs).
    EnvEntry("CUDA_DEVICE_MAX_CONNECTIONS", "1", platforms=frozenset({"rocm", "cuda", "cpu"}), source="megatron",
             why="ordered TP comm/compute overlap (megatron-core requires 1)"),
    # FSDP overlaps its parameter all-gathers and gradient reduce-scatters with compute on several
    # queues; a single queue serializes them (upstream Primus uses 8 with FSDP).
    EnvEntry("CUDA_DEVICE_MAX_CONNECTIONS", "8", platforms=frozenset({"rocm", "cuda"}), source="megatron",
             when_config="use_torch_fsdp2", why="FSDP overlaps all-gather/reduce-scatter with compute"),
    # TransformerEngine's fused attention picks its kernels from these; harmless without TE.
    EnvEntry("NVTE_FUSED_ATTN", "1", platforms=frozenset({"rocm"}), source="megatron",
             why="TransformerEngine fused attention (CK) on ROCm"),
    EnvEntry("NVTE_FLASH_ATTN", "1", platforms=frozenset({"rocm"}), source="megatron",
             why="TransformerEngine flash attention on ROCm"),
    # On CPU, torch would start one thread per core in every rank; tests and tiny runs go faster with one.
    EnvEntry("OMP_NUM_THREADS", "1", platforms=frozenset({"cpu"}), source="megatron",
             why="one intra-op thread per rank on CPU (faster and steadier for tiny models)"),
]
