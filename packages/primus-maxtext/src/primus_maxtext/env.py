"""Environment entries of the maxtext backend (ARCHITECTURE §6, shared/notes/rocm-env.md).

Core adds only its deterministic-mode and AINIC entries for a JAX backend (its ROCm base set is for
torch), so the JAX/XLA settings upstream Primus uses on AMD GPUs live here. XLA_FLAGS is merged
flag by flag: a flag the user already set keeps the user's value. JAX_PLATFORMS names the platform
Primus planned for (cpu, rocm or cuda), so JAX on a GPU node cannot come up on the CPU unnoticed. `XLA_GPU_AUTOTUNE_LEVEL`, when set, replaces the
autotune level below (applied by the adapter before JAX starts).
"""

from __future__ import annotations

from primus.platform.env import EnvEntry, env_entries

ROCM = frozenset({"rocm"})

XLA_GPU_FLAGS = " ".join([
    "--xla_gpu_memory_limit_slop_factor=95",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=8589934592",
    "--xla_gpu_all_gather_combine_threshold_bytes=8589934592",
    "--xla_gpu_enable_command_buffer=''",
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_enable_cublaslt=true",
    "--xla_gpu_autotune_level=4",
    "--xla_gpu_enable_all_gather_combine_by_dim=false",
])

ENV: list[EnvEntry] = [
    EnvEntry("XLA_FLAGS", XLA_GPU_FLAGS, platforms=ROCM, mode="merge", source="maxtext",
             why="upstream XLA settings for MaxText on AMD GPUs: collective combining, latency-hiding "
                 "scheduler, hipBLASLt GEMMs, autotuning"),
    EnvEntry("XLA_PYTHON_CLIENT_MEM_FRACTION", ".97", platforms=ROCM, source="maxtext",
             why="let XLA preallocate nearly all GPU memory"),
    EnvEntry("TF_CPP_MIN_LOG_LEVEL", "2", platforms=ROCM, source="maxtext", why="quiet XLA's C++ logging"),
    *env_entries(
        ["NVTE_ALLOW_NONDETERMINISTIC_ALGO=1", "NVTE_USE_HIPBLASLT=1", "NVTE_FUSED_ATTN=1", "NVTE_FUSED_ATTN_CK=1",
         "NVTE_FUSED_ATTN_AOTRITON=0", "NVTE_CK_USES_BWD_V3=1", "NVTE_CK_USES_FWD_V3=1",
         "NVTE_CK_IS_V3_ATOMIC_FP32=0", "NVTE_CK_HOW_V3_BF16_CVT=2"],
        platforms=ROCM, source="maxtext", why="TransformerEngine (JAX) fused attention through CK on ROCm",
    ),
    *env_entries(["GPU_MAX_HW_QUEUES=2", "HIP_FORCE_DEV_KERNARG=1", "HSA_FORCE_FINE_GRAIN_PCIE=1"],
                 platforms=ROCM, source="maxtext", why="upstream HIP runtime settings for MaxText"),
    EnvEntry("HSA_NO_SCRATCH_RECLAIM", "1", platforms=ROCM, arch="gfx942", source="maxtext",
             why="scratch reclaim crashed MoE runs on MI300X/MI325X"),
    EnvEntry("RCCL_WARP_SPEED_AUTO", "0", platforms=ROCM, arch="gfx950", source="maxtext",
             why="NaN risk on MI350X/MI355X otherwise"),
    EnvEntry("JAX_PLATFORMS", "cpu", platforms=frozenset({"cpu"}), source="maxtext",
             why="run JAX on the host without probing for accelerators"),
    # on a GPU node JAX must not fall back to the CPU with a warning: naming the platform makes a
    # missing or broken GPU plugin an error at start-up
    EnvEntry("JAX_PLATFORMS", "rocm", platforms=ROCM, source="maxtext",
             why="JAX on the AMD GPUs, or an error at start-up, never a silent fall-back to the CPU"),
    EnvEntry("JAX_PLATFORMS", "cuda", platforms=frozenset({"cuda"}), source="maxtext",
             why="JAX on the NVIDIA GPUs, or an error at start-up, never a silent fall-back to the CPU"),
]
