"""Which accelerator platform this process runs on: rocm (with gfx arch), cuda or cpu, and how many
devices it may use.

Reads files and asks vendor tools; never imports torch or jax, and never fails: a machine without
GPUs is quietly "cpu". `PRIMUS_PLATFORM` forces the platform (the arch and the device count are still
read from the devices of that kind); `PRIMUS_GFX_ARCH` forces the arch.

The device count is what the runtime will show this process, not what the machine holds:
- ROCm: `ROCR_VISIBLE_DEVICES` selects from the physical GPUs, then `HIP_VISIBLE_DEVICES` (or, when it
  is unset, `CUDA_VISIBLE_DEVICES`, which HIP honours too) selects from what ROCr shows;
- CUDA: `CUDA_VISIBLE_DEVICES`;
- each is a comma list of indices or UUIDs (`GPU-...`); the empty string shows no device; the list
  ends at the first entry the runtime would not accept (an index out of range, a repeat, `-1`);
- a Slurm allocation caps the count: `SLURM_STEP_GPUS`, else `SLURM_GPUS_ON_NODE`, else
  `SLURM_JOB_GPUS` (on clusters that constrain devices through cgroups the sysfs tree still lists
  every GPU of the node).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

KFD_NODES = Path("/sys/class/kfd/kfd/topology/nodes")
DEV_KFD = Path("/dev/kfd")
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")

PLATFORMS = ("rocm", "cuda", "cpu")
DEFAULT_ROCM_ARCH = "gfx942"  # a forced ROCm platform on a host whose devices cannot be read


@dataclass(frozen=True)
class Platform:
    kind: str  # "rocm" | "cuda" | "cpu"
    arch: str | None = None  # gfx arch on ROCm, e.g. "gfx942"
    devices: int = 0  # devices this process may use (visibility variables and Slurm applied)
    physical: int | None = None  # devices the node holds, when fewer are visible
    forced: bool = False  # PRIMUS_PLATFORM chose the kind

    @property
    def gpu(self) -> bool:
        return self.kind in ("rocm", "cuda")

    def describe(self) -> str:
        text = self.kind + (f" ({self.arch})" if self.arch else "")
        if self.devices:
            text += f", {self.devices} device(s)"
        if self.physical is not None and self.physical != self.devices:
            text += f" visible of {self.physical}"
        return text


# ------------------------------------------------------------------------------------ devices on ROCm

@dataclass(frozen=True)
class _KfdGpu:
    arch: str
    uuid: str | None  # "GPU-<16 hex digits>", as ROCR_VISIBLE_DEVICES accepts it


def _kfd_gpus() -> list[_KfdGpu]:
    """The GPU nodes of the KFD topology, in ROCr's order (CPU nodes have gfx_target_version 0)."""
    gpus: list[tuple[int, _KfdGpu]] = []
    try:
        nodes = list(KFD_NODES.glob("*/properties"))
    except OSError:
        return []
    for props in nodes:
        try:
            text = props.read_text()
        except OSError:
            continue
        m = re.search(r"^gfx_target_version\s+(\d+)", text, re.M)
        if not m or int(m.group(1)) <= 0:
            continue
        v = int(m.group(1))
        major, minor, step = v // 10000, (v // 100) % 100, v % 100
        u = re.search(r"^unique_id\s+(\d+)", text, re.M)
        uuid = f"GPU-{int(u.group(1)):016x}" if u and int(u.group(1)) else None
        try:
            order = int(props.parent.name)
        except ValueError:
            order = 1 << 30
        gpus.append((order, _KfdGpu(f"gfx{major}{minor:x}{step:x}", uuid)))
    return [g for _, g in sorted(gpus, key=lambda item: item[0])]


def _gfx_from_rocminfo() -> str | None:
    tool = shutil.which("rocminfo")
    if not tool:
        return None
    try:
        out = subprocess.run([tool], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\b(gfx9[0-9a-f]{2}|gfx1[0-9a-f]{3})\b", out)
    return m.group(1) if m else None


# ------------------------------------------------------------------------------------ devices on CUDA

def _cuda_uuids() -> list[str | None]:
    """One entry per NVIDIA GPU (its UUID when the driver says it)."""
    try:
        if NVIDIA_GPUS.is_dir():
            out: list[str | None] = []
            for gpu in sorted(NVIDIA_GPUS.iterdir()):
                try:
                    info = (gpu / "information").read_text()
                except OSError:
                    info = ""
                m = re.search(r"GPU UUID:\s*(\S+)", info)
                out.append(m.group(1) if m else None)
            return out
    except OSError:
        pass
    tool = shutil.which("nvidia-smi")
    if tool:
        try:
            out_text = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        found = []
        for line in out_text.splitlines():
            if line.startswith("GPU "):
                m = re.search(r"UUID:\s*(GPU-[0-9A-Za-z-]+)", line)
                found.append(m.group(1) if m else None)
        return found
    return []


# ------------------------------------------------------------------------------------ visibility

def parse_visible(value: str | None) -> list[str] | None:
    """A *_VISIBLE_DEVICES value as the runtimes read it: None when unset, [] when empty."""
    if value is None:
        return None
    return [part.strip() for part in value.split(",")] if value.strip() else []


def select_visible(ids: list[str | None], value: str | None) -> list[int]:
    """Which of `ids` (positions 0..n-1, with their UUIDs where known) a visibility list keeps, in
    its order. The list ends at the first entry the runtime would refuse: not an index in range and
    not a known UUID (any UUID counts when none is known), or a repeat."""
    wanted = parse_visible(value)
    if wanted is None:
        return list(range(len(ids)))
    known_uuids = {u.lower(): i for i, u in enumerate(ids) if u}
    chosen: list[int] = []
    for token in wanted:
        index: int | None = None
        if re.fullmatch(r"\d+", token):
            index = int(token) if int(token) < len(ids) else None
        elif token.upper().startswith(("GPU-", "MIG-")):
            if known_uuids:
                index = next((i for u, i in known_uuids.items() if u.startswith(token.lower())), None)
            else:  # UUIDs the node does not tell us: trust the list, in order
                index = next((i for i in range(len(ids)) if i not in chosen), None)
        if index is None or index in chosen:
            break
        chosen.append(index)
    return chosen


def _slurm_list(value: str) -> int:
    """How many GPU ids a Slurm list names: `0,1,4-7` is 6."""
    count = 0
    for part in value.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        if m:
            count += max(int(m.group(2)) - int(m.group(1)) + 1, 0)
        elif part:
            count += 1
    return count


def slurm_gpus(environ: Mapping[str, str]) -> int | None:
    """GPUs the Slurm allocation gives this node (the step's when there is one), or None outside one."""
    step = environ.get("SLURM_STEP_GPUS")
    if step is not None and step.strip():
        return _slurm_list(step)
    on_node = environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if on_node.isdigit():
        return int(on_node)
    job = environ.get("SLURM_JOB_GPUS")
    if job is not None and job.strip():
        return _slurm_list(job)
    return None


def visible_count(kind: str, ids: list[str | None], environ: Mapping[str, str]) -> int:
    """How many of the node's devices of this kind the runtime shows this process."""
    if kind == "rocm":
        rocr = select_visible(ids, environ.get("ROCR_VISIBLE_DEVICES"))
        after_rocr = [ids[i] for i in rocr]
        hip = environ.get("HIP_VISIBLE_DEVICES")
        count = len(select_visible(after_rocr, hip if hip is not None else environ.get("CUDA_VISIBLE_DEVICES")))
    elif kind == "cuda":
        count = len(select_visible(ids, environ.get("CUDA_VISIBLE_DEVICES")))
    else:
        return 0
    allocated = slurm_gpus(environ)
    return min(count, allocated) if allocated is not None else count


# ------------------------------------------------------------------------------------ detection

def _rocm(env: Mapping[str, str], *, forced: bool) -> Platform | None:
    gpus = _kfd_gpus()
    arch = env.get("PRIMUS_GFX_ARCH") or (gpus[0].arch if gpus else None)
    if not gpus and not DEV_KFD.exists() and not forced:
        return None
    if not arch and (gpus or DEV_KFD.exists()):
        arch = _gfx_from_rocminfo()
    if not arch and not forced:
        return None
    ids = [g.uuid for g in gpus]
    return Platform("rocm", arch or DEFAULT_ROCM_ARCH, visible_count("rocm", ids, env),
                    physical=len(ids), forced=forced)


def _cuda(env: Mapping[str, str], *, forced: bool) -> Platform | None:
    ids = _cuda_uuids()
    if not ids and not forced:
        return None
    return Platform("cuda", None, visible_count("cuda", ids, env), physical=len(ids), forced=forced)


def detect_platform(environ: Mapping[str, str] | None = None) -> Platform:
    env = os.environ if environ is None else environ
    forced = env.get("PRIMUS_PLATFORM")
    if forced == "rocm":
        return _rocm(env, forced=True)  # type: ignore[return-value]
    if forced == "cuda":
        return _cuda(env, forced=True)  # type: ignore[return-value]
    if forced == "cpu":
        return Platform("cpu", forced=True)
    return _rocm(env, forced=False) or _cuda(env, forced=False) or Platform("cpu")
