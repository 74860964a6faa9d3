"""The launch target: the platform, arch and GPUs per node of the nodes that will run the job.

The host that runs `primus run` is not always one of them: a Slurm login node usually has no GPU.
The target comes from `--platform` / `--gpus-per-node`, else the experiment's `launch.platform`,
`launch.arch` and `launch.slurm.gpus_per_node`, else this host (for Slurm only when this host has
GPUs: a GPU-less login node says nothing about the compute nodes, which then decide themselves).
Whatever the submitting host planned, each node plans again in `primus.launch.node` for what it
sees (docs/launch.md, "Target and submit host").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from primus.errors import ConfigError
from primus.platform.detect import Platform

#: The names of the variables Primus planned for the target (exported by the batch script or passed
#: into a container), so that the node can plan again instead of taking them for the user's own.
PLANNED_VAR = "PRIMUS_PLANNED_ENV"
GPU_KINDS = ("rocm", "cuda")


@dataclass(frozen=True)
class Target:
    platform: str | None  # None: each compute node decides
    arch: str | None
    gpus_per_node: int | None  # None: unknown here
    source: str  # where the platform came from
    host: Platform

    @property
    def gpu(self) -> bool:
        return self.platform in GPU_KINDS

    @property
    def differs_from_host(self) -> bool:
        return self.platform is not None and (self.platform != self.host.kind
                                              or (self.gpu and not self.host.devices))

    def describe(self) -> str:
        if self.platform is None:
            return f"decided on each compute node ({self.source})"
        text = self.platform + (f" ({self.arch})" if self.arch else "")
        if self.gpu and self.gpus_per_node:
            text += f", {self.gpus_per_node} GPU(s) per node"
        elif self.gpu:
            text += ", GPUs per node unknown" if self.gpus_per_node is None else ", no GPUs requested from Slurm"
        return f"{text} (from {self.source})"


def resolve_target(*, host: Platform, launcher: str, cli_platform: str | None = None, cli_gpus: int | None = None,
                   exp_platform: str | None = None, exp_arch: str | None = None,
                   exp_gpus: int | None = None) -> Target:
    if cli_platform:
        platform, source = cli_platform, "--platform"
    elif exp_platform:
        platform, source = exp_platform, "launch.platform"
    elif launcher == "slurm" and not host.gpu:
        platform, source = None, f"this host is {host.kind} without GPUs; --platform or launch.platform sets it"
    else:
        platform, source = host.kind, "this host"
    arch = exp_arch if platform == "rocm" else None
    if platform == "rocm" and not arch and host.kind == "rocm":
        arch = host.arch
    if platform == "cpu":
        gpus: int | None = 0
    elif cli_gpus is not None:
        gpus = cli_gpus
    elif exp_gpus is not None:
        gpus = exp_gpus
    elif platform is not None and platform == host.kind and host.devices:
        gpus = host.devices
    else:
        gpus = None
    return Target(platform, arch, gpus, source, host)


def check_target(target: Target, *, nproc_per_node: int, nproc_given: bool, launcher: str,
                 dry_run: bool) -> tuple[Target, list[str]]:
    """Settle what the launch needs (GPUs per node for a GPU target) and refuse what cannot run
    (exit 2). Returns the settled target and notes for the user."""
    notes: list[str] = []
    if target.gpu and target.gpus_per_node is None:
        if nproc_given:
            target = Target(target.platform, target.arch, nproc_per_node, target.source, target.host)
        elif launcher == "slurm":
            raise ConfigError(f"cannot tell from this host ({target.host.kind}) how many GPUs a {target.platform} "
                              "node has", key="--gpus-per-node",
                              fix="pass --gpus-per-node N (or set launch.slurm.gpus_per_node)")
    if target.gpu and target.gpus_per_node and nproc_per_node > target.gpus_per_node:
        raise ConfigError(f"{nproc_per_node} processes per node but the target has {target.gpus_per_node} GPU(s) "
                          "per node: each process needs its own GPU", key="--nproc-per-node",
                          fix=f"use --nproc-per-node {target.gpus_per_node} or fewer (or raise --gpus-per-node)")
    if target.platform is None:
        notes.append("this host has no GPUs and no target platform was given: each compute node plans its own "
                     "platform and environment, but Slurm is asked for no GPUs; pass --platform rocm|cuda and "
                     "--gpus-per-node N on a GPU cluster")
    elif target.differs_from_host:
        host = target.host.describe() if target.host.kind != "cpu" else "cpu (no GPUs)"
        if launcher == "slurm":
            notes.append(f"this host is {host}, the target is {target.platform}: the environment shown is planned "
                         f"for the target, and each compute node plans again for what it detects")
        elif target.gpu and (target.host.kind != target.platform or not target.host.devices):
            message = f"the target is {target.platform} but this host is {host}"
            if not dry_run:
                raise ConfigError(message, key="--platform",
                                  fix="run on a node of the target platform, or use --launcher slurm")
            notes.append(message + ": a real run here would refuse")
        else:
            notes.append(f"this host is {host}, the target is {target.platform}")
    return target, notes


def platform_env(backends: Iterable[object], modules: Mapping[str, object], *, platform: str | None,
                 arch: str | None, environ: Mapping[str, str],
                 experiment_env: Mapping[str, object] | None) -> dict[str, str]:
    """The environment core and the backends want for `platform` (None: only the experiment's
    `env:`, the nodes plan the rest). `backends` are discovered backends, `modules` resolved modules."""
    from primus.platform.env import core_entries, plan_env

    if platform is None:
        return {k: (("1" if v else "0") if isinstance(v, bool) else str(v)) for k, v in (experiment_env or {}).items()}
    out: dict[str, str] = {}
    for backend in backends:
        entries = core_entries(backend.spec.runtime) + backend.spec.load_env()  # type: ignore[attr-defined]
        native: dict[str, object] = {}
        for m in modules.values():
            if m.framework == backend.name:  # type: ignore[attr-defined]
                native.update(m.native)  # type: ignore[attr-defined]
        changes, _ = plan_env(entries, platform=platform, arch=arch, environ=environ,
                              experiment_env=experiment_env, config=native)
        out.update(changes)
    return out


def planned_marker(env: Mapping[str, str], experiment_env: Mapping[str, object] | None) -> dict[str, str]:
    """`PRIMUS_PLANNED_ENV=A,B,...`: the planned names a node may plan again (not the experiment's own)."""
    names = sorted(n for n in env if n not in (experiment_env or {}) and n != PLANNED_VAR)
    return {PLANNED_VAR: ",".join(names)} if names else {}


def strip_planned(environ: Mapping[str, str], experiment_env: Mapping[str, object] | None) -> dict[str, str]:
    """The environment without what the submitting host planned for the target (the experiment's
    `env:` stays): what the user really set, for the node to plan again on."""
    planned = {n for n in environ.get(PLANNED_VAR, "").split(",") if n} - set(experiment_env or {})
    return {k: v for k, v in environ.items() if k not in planned and k != PLANNED_VAR}
