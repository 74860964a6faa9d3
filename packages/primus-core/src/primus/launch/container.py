"""Containers: docker or podman with the ROCm devices, host IPC and network (ARCHITECTURE §8).

The workspace, the experiment's folder and the data folders are mounted at the same paths, so run
directories and configs mean the same inside and out. Environment values pass as separate argv
items (`-e NAME=value`), never through a shell.
"""

from __future__ import annotations

import os
from pathlib import Path

from primus.config.schema import ContainerSection
from primus.errors import ConfigError

#: Variables a container always receives when set: Primus's own and the launch contract's.
PASS_THROUGH = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "GPUS_PER_NODE", "PRIMUS_PATCHES",
                "PRIMUS_PLATFORM", "PRIMUS_DISABLE_BACKENDS", "HF_HOME", "SLURM_JOB_ID", "SLURM_NODEID",
                "SLURM_NNODES", "SLURM_JOB_NODELIST")


def container_argv(c: ContainerSection, *, mounts: list[Path], env: dict[str, str], inner: list[str],
                   workdir: Path) -> list[str]:
    if not c.image:
        raise ConfigError("a container launch needs an image", key="launch.container.image",
                          fix="set launch.container.image or pass --image")
    argv = [c.runtime, "run", "--rm", "--ipc", "host", "--network", "host", "--group-add", "video",
            "--shm-size", c.shm_size, "--security-opt", "seccomp=unconfined"]
    for device in c.devices:
        argv += ["--device", device]
    seen: set[str] = set()
    for path in mounts:
        text = str(path.resolve())
        if text not in seen:
            seen.add(text)
            argv += ["-v", f"{text}:{text}"]
    for m in c.mounts:
        argv += ["-v", m]
    for name, value in sorted(env.items()):
        argv += ["-e", f"{name}={value}"]
    for name in (*PASS_THROUGH, *c.env):
        if name in os.environ and name not in env:
            argv += ["-e", name]  # the value is taken from the caller's environment, unquoted by nobody
    argv += ["-w", str(workdir.resolve()), *c.extra_args, c.image, *inner]
    return argv
