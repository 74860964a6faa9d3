"""Containers: docker or podman (`run`), or Apptainer/Singularity (`exec`), per platform (ARCHITECTURE §8).

- ROCm: the devices /dev/kfd and /dev/dri and the video group (docker/podman), `--rocm` (apptainer);
- CUDA: `--gpus all` (docker/podman; the visibility variables pass in and select inside), `--nv`
  (apptainer);
- CPU: no devices.

The workspace, the experiment's folder and the data folders are mounted at the same paths, so run
directories and configs mean the same inside and out. Environment values pass as separate argv
items (`-e NAME=value`, apptainer `--env NAME=value`), never through a shell. The caller's
communication, visibility and runtime variables (NCCL_*, RCCL_*, HSA_*, HIP_*, *_VISIBLE_DEVICES,
GLOO_SOCKET_IFNAME, ...) pass in by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from primus.config.schema import ContainerSection
from primus.errors import ConfigError

#: Variables a container always receives when set: Primus's own and the launch contract's.
PASS_THROUGH = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "PRIMUS_PATCHES",
                "PRIMUS_PLATFORM", "PRIMUS_GFX_ARCH", "PRIMUS_DISABLE_BACKENDS", "HF_HOME", "SLURM_JOB_ID",
                "SLURM_NODEID", "SLURM_NNODES", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_GPUS",
                "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "GLOO_SOCKET_IFNAME", "PRIMUS_RDZV_TIMEOUT",
                "PRIMUS_DETERMINISTIC", "USING_AINIC")
#: ... and every variable with one of these prefixes or suffixes.
PASS_PREFIXES = ("NCCL_", "RCCL_", "HSA_", "HIP_", "ROCR_", "TORCH_NCCL_", "UCX_")
PASS_SUFFIXES = ("_VISIBLE_DEVICES",)

ROCM_DEVICES = ("/dev/kfd", "/dev/dri")
APPTAINER = ("apptainer", "singularity")


def passed_names(environ: Mapping[str, str], allow: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The caller's variables a container receives by name."""
    names = [n for n in environ
             if n in PASS_THROUGH or n in allow or n.startswith(PASS_PREFIXES) or n.endswith(PASS_SUFFIXES)]
    return sorted(set(names))


def _mount_args(runtime: str, mounts: list[Path], extra: list[str]) -> list[str]:
    flag = "--bind" if runtime in APPTAINER else "-v"
    out: list[str] = []
    seen: set[str] = set()
    for path in mounts:
        text = str(path.resolve())
        if text not in seen:
            seen.add(text)
            out += [flag, f"{text}:{text}"]
    for m in extra:
        out += [flag, m]
    return out


def container_argv(c: ContainerSection, *, mounts: list[Path], env: dict[str, str], inner: list[str],
                   workdir: Path, platform: str = "rocm", environ: Mapping[str, str] | None = None) -> list[str]:
    if not c.image:
        raise ConfigError("a container launch needs an image", key="launch.container.image",
                          fix="set launch.container.image or pass --image")
    caller = os.environ if environ is None else environ
    if c.runtime in APPTAINER:
        # apptainer shares the host's network, IPC and /dev/shm and passes the caller's environment
        # through by default; Primus's own values go in with --env
        argv = [c.runtime, "exec"]
        if platform == "rocm":
            argv.append("--rocm")
        elif platform == "cuda":
            argv.append("--nv")
        argv += _mount_args(c.runtime, mounts, c.mounts)
        for name, value in sorted(env.items()):
            argv += ["--env", f"{name}={value}"]
        argv += ["--pwd", str(workdir.resolve()), *c.extra_args, c.image, *inner]
        return argv
    argv = [c.runtime, "run", "--rm", "--ipc", "host", "--network", "host"]
    devices = list(c.devices) if c.devices is not None else (list(ROCM_DEVICES) if platform == "rocm" else [])
    if platform == "rocm":
        argv += ["--group-add", "video"]
    argv += ["--shm-size", c.shm_size, "--security-opt", "seccomp=unconfined"]
    if platform == "cuda":
        argv += ["--gpus", "all"]  # CUDA_VISIBLE_DEVICES passes in and selects, as outside
    for device in devices:
        argv += ["--device", device]
    argv += _mount_args(c.runtime, mounts, c.mounts)
    for name, value in sorted(env.items()):
        argv += ["-e", f"{name}={value}"]
    for name in passed_names(caller, c.env):
        if name not in env:
            argv += ["-e", name]  # the value is taken from the caller's environment, unquoted by nobody
    argv += ["-w", str(workdir.resolve()), *c.extra_args, c.image, *inner]
    return argv
