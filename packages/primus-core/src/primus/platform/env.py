"""The environment registry: variables each platform wants, applied as defaults (ARCHITECTURE §6).

Precedence: the experiment's `env:` wins over the user's shell, which wins over these defaults.
`mode="merge"` merges a flag list (XLA_FLAGS) flag by flag: a flag the user set keeps its value.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class EnvEntry:
    name: str
    value: str
    platforms: frozenset[str] = frozenset({"rocm"})
    arch: str | None = None  # only on this gfx arch
    mode: Literal["default", "merge"] = "default"
    when: str | None = None  # only when this environment variable is "1" (e.g. PRIMUS_DETERMINISTIC)
    when_config: str | None = None  # only when this native config key is truthy (e.g. use_torch_fsdp2)
    why: str = ""
    source: str = "core"  # "core" or the backend's name


@dataclass(frozen=True)
class EnvDecision:
    entry: EnvEntry
    applied: bool
    value: str | None  # the value the variable ends with
    reason: str


def env_entries(names: Iterable[str], **common: object) -> list[EnvEntry]:
    """Shorthand: `env_entries(["A=1", "B=2"], platforms=...)`."""
    out = []
    for item in names:
        name, _, value = item.partition("=")
        out.append(EnvEntry(name=name, value=value, **common))  # type: ignore[arg-type]
    return out


def _merge_flags(current: str, wanted: str) -> str:
    flags = shlex.split(current)
    have = {f.split("=", 1)[0] for f in flags}
    for flag in shlex.split(wanted):
        if flag.split("=", 1)[0] not in have:
            flags.append(flag)
    return " ".join(flags)


def plan_env(entries: Iterable[EnvEntry], *, platform: str, arch: str | None, environ: Mapping[str, str],
             experiment_env: Mapping[str, object] | None = None,
             config: Mapping[str, object] | None = None) -> tuple[dict[str, str], list[EnvDecision]]:
    """What to set: (changes to apply, one decision per entry). `environ` is left untouched.

    `config` is the resolved native config of the module being run (for `when_config` entries);
    without one, those entries do not apply.
    """
    current = dict(environ)
    changes: dict[str, str] = {}
    decisions: list[EnvDecision] = []
    # Later entries of the same name override earlier ones on the platforms they share (a backend
    # refines core's value); entries for disjoint platforms both stay (JAX_PLATFORMS=cpu on CPU,
    # =rocm on ROCm), as at most one of them can apply.
    latest: dict[tuple[str, str | None, str | None, str | None], list[EnvEntry]] = {}
    for e in entries:
        key = (e.name, e.arch, e.when, e.when_config)
        latest[key] = [old for old in latest.get(key, []) if not old.platforms & e.platforms] + [e]
    # Conditional and arch-specific entries come last so that, when they apply, they win.
    ordered = sorted((e for group in latest.values() for e in group),
                     key=lambda e: (e.when is not None or e.when_config is not None, e.arch is not None))
    for e in ordered:
        if platform not in e.platforms:
            decisions.append(EnvDecision(e, False, current.get(e.name), f"not on {platform}"))
            continue
        if e.arch and e.arch != arch:
            decisions.append(EnvDecision(e, False, current.get(e.name), f"only on {e.arch}"))
            continue
        if e.when and environ.get(e.when) != "1":
            decisions.append(EnvDecision(e, False, current.get(e.name), f"only when {e.when}=1"))
            continue
        if e.when_config and not (config or {}).get(e.when_config):
            decisions.append(EnvDecision(e, False, current.get(e.name), f"only when {e.when_config} is on"))
            continue
        if e.mode == "merge":
            merged = _merge_flags(current.get(e.name, ""), e.value)
            if merged != current.get(e.name, ""):
                changes[e.name] = current[e.name] = merged
            decisions.append(EnvDecision(e, True, merged, "merged"))
        elif e.name in environ:
            decisions.append(EnvDecision(e, False, environ[e.name], "already set by the user"))
        else:
            changes[e.name] = current[e.name] = e.value
            decisions.append(EnvDecision(e, True, e.value, "default"))
    for name, value in (experiment_env or {}).items():
        text = ("1" if value else "0") if isinstance(value, bool) else str(value)
        changes[name] = text
    return changes, decisions


# ---------------------------------------------------------------- core's sets (shared/notes/rocm-env.md)

ROCM_TORCH_BASE: list[EnvEntry] = [
    *env_entries(
        [
            "HSA_ENABLE_SDMA=1",
            "GPU_MAX_HW_QUEUES=2",
            "TORCH_NCCL_HIGH_PRIORITY=1",
            "NCCL_CHECKS_DISABLE=1",
            "NCCL_IB_GID_INDEX=3",
            "NCCL_CROSS_NIC=0",
            "NCCL_PXN_DISABLE=1",
            "NCCL_P2P_NET_CHUNKSIZE=524288",
            "RCCL_MSCCL_ENABLE=0",
            "RCCL_MSCCLPP_ENABLE=0",
            "RCCL_MSCCLPP_FORCE_ENABLE=0",
            "RCCL_MSCCLPP_THRESHOLD=1073741824",
            "TORCH_NCCL_USE_TENSOR_REGISTER_ALLOCATOR_HOOK=0",
            "NVTE_USE_CAST_TRANSPOSE_TRITON=1",
            "NVTE_USE_OPTIMIZED_HIPIFIED_CAST_TRANSPOSE=0",
            "NVTE_ROCM_ENABLE_MXFP8=1",
        ],
        platforms=frozenset({"rocm"}),
        why="upstream ROCm defaults for torch backends",
    ),
    EnvEntry("HSA_NO_SCRATCH_RECLAIM", "1", why="scratch reclaim crashed MoE runs"),
    EnvEntry("CUDA_DEVICE_MAX_CONNECTIONS", "1", platforms=frozenset({"rocm", "cuda"}),
             why="keeps compute/communication overlap ordered"),
    EnvEntry("NVTE_CK_USES_BWD_V3", "1", why="CK fused attention backward v3 (TransformerEngine)"),
    EnvEntry("RCCL_WARP_SPEED_AUTO", "0", arch="gfx950", why="NaN risk on gfx950 otherwise"),
]

DETERMINISTIC: list[EnvEntry] = env_entries(
    ["NCCL_ALGO=Ring", "NVTE_ALLOW_NONDETERMINISTIC_ALGO=0", "ROCBLAS_DEFAULT_ATOMICS_MODE=0",
     "TORCH_COMPILE_DISABLE=1"],
    platforms=frozenset({"rocm", "cuda"}), when="PRIMUS_DETERMINISTIC", why="deterministic mode",
)

AINIC: list[EnvEntry] = env_entries(
    ["NCCL_IB_TC=104", "NCCL_IB_FIFO_TC=192", "NCCL_IB_SL=0", "NCCL_IB_GID_INDEX=1", "NCCL_IB_ROCE_VERSION_NUM=2",
     "NCCL_MAX_P2P_CHANNELS=56"],
    platforms=frozenset({"rocm"}), when="USING_AINIC", why="AMD AINIC network",
)


def core_entries(runtime: str) -> list[EnvEntry]:
    """Core's entries for a backend's runtime: the ROCm torch set for torch, deterministic mode for all."""
    entries = list(ROCM_TORCH_BASE) if runtime == "torch" else []
    return entries + DETERMINISTIC + AINIC
