"""Which accelerator platform this process runs on: rocm (with gfx arch), cuda or cpu.

Reads files and asks vendor tools; never imports torch or jax, and never fails: a machine without
GPUs is quietly "cpu". `PRIMUS_PLATFORM` (and `PRIMUS_GFX_ARCH`) override detection.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

KFD_NODES = Path("/sys/class/kfd/kfd/topology/nodes")


@dataclass(frozen=True)
class Platform:
    kind: str  # "rocm" | "cuda" | "cpu"
    arch: str | None = None  # gfx arch on ROCm, e.g. "gfx942"
    devices: int = 0

    def describe(self) -> str:
        text = self.kind + (f" ({self.arch})" if self.arch else "")
        return text + (f", {self.devices} device(s)" if self.devices else "")


def _gfx_from_kfd() -> tuple[str | None, int]:
    archs = []
    try:
        for props in sorted(KFD_NODES.glob("*/properties")):
            text = props.read_text()
            m = re.search(r"^gfx_target_version\s+(\d+)", text, re.M)
            if m and int(m.group(1)) > 0:
                v = int(m.group(1))
                major, minor, step = v // 10000, (v // 100) % 100, v % 100
                archs.append(f"gfx{major}{minor:x}{step:x}")
    except OSError:
        return None, 0
    return (archs[0] if archs else None), len(archs)


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


def _cuda_devices() -> int:
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return len(list(proc.iterdir()))
    tool = shutil.which("nvidia-smi")
    if tool:
        try:
            out = subprocess.run([tool, "-L"], capture_output=True, text=True, timeout=10).stdout
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            return 0
    return 0


def detect_platform(environ: dict[str, str] | None = None) -> Platform:
    env = os.environ if environ is None else environ
    forced = env.get("PRIMUS_PLATFORM")
    if forced in ("rocm", "cuda", "cpu"):
        arch = env.get("PRIMUS_GFX_ARCH") if forced == "rocm" else None
        return Platform(forced, arch or ("gfx942" if forced == "rocm" else None))
    arch, count = _gfx_from_kfd()
    if arch or Path("/dev/kfd").exists():
        arch = arch or _gfx_from_rocminfo()
        if arch:
            return Platform("rocm", arch, count)
    n = _cuda_devices()
    if n:
        return Platform("cuda", None, n)
    return Platform("cpu")
