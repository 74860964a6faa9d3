"""A launch plan is the worker command plus the environment, rendered for a launcher.

Primus never manages processes itself: one process runs in-process, more are handed to torchrun
(`os.execvpe`, so signals reach the launcher and its exit code is ours).
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from primus.errors import ConfigError


@dataclass(frozen=True)
class LaunchOptions:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    max_restarts: int = 0

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @classmethod
    def from_args(cls, *, nproc_per_node: int | None, nnodes: int | None, node_rank: int | None,
                  master_addr: str | None, master_port: int | None, max_restarts: int | None = None,
                  default_nproc: int = 1, environ: dict[str, str] | None = None) -> LaunchOptions:
        """Command-line values win; then NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE."""
        env = os.environ if environ is None else environ

        def pick(value: int | str | None, var: str, default: int | str, cast: type) -> int | str:
            if value is not None:
                return value
            raw = env.get(var)
            if raw in (None, ""):
                return default
            try:
                return cast(raw)
            except ValueError:
                raise ConfigError(f"{var}={raw!r} is not a valid {cast.__name__}", key=var,
                                  fix=f"unset {var} or give a number") from None

        opts = cls(
            nproc_per_node=int(pick(nproc_per_node, "GPUS_PER_NODE", default_nproc, int)),
            nnodes=int(pick(nnodes, "NNODES", 1, int)),
            node_rank=int(pick(node_rank, "NODE_RANK", 0, int)),
            master_addr=str(pick(master_addr, "MASTER_ADDR", "127.0.0.1", str)),
            master_port=int(pick(master_port, "MASTER_PORT", 29500, int)),
            max_restarts=int(max_restarts if max_restarts is not None else 0),
        )
        if opts.nproc_per_node < 1 or opts.nnodes < 1:
            raise ConfigError(f"--nproc-per-node ({opts.nproc_per_node}) and --nnodes ({opts.nnodes}) must be "
                              "at least 1", key="launch", fix="give a positive number of processes and nodes")
        if not 1 <= opts.master_port <= 65535:
            raise ConfigError(f"--master-port {opts.master_port} is not a TCP port", key="launch",
                              fix="use a port in 1..65535 (MASTER_PORT counts too)")
        if opts.max_restarts < 0:
            raise ConfigError(f"--max-restarts {opts.max_restarts} is negative", key="launch", fix="use 0 or more")
        if not 0 <= opts.node_rank < opts.nnodes:
            raise ConfigError(f"--node-rank {opts.node_rank} is outside 0..{opts.nnodes - 1}", key="launch")
        return opts


@dataclass
class LaunchPlan:
    kind: str  # "in-process" | "torchrun"
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def render(self) -> str:
        if self.kind == "in-process":
            return "in-process (one worker in this process)"
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (f"{env} " if env else "") + shlex.join(self.argv)


WORKER = "primus.runs.worker"
PREFLIGHT = "primus.preflight.worker"
EVALUATE = "primus.runs.evaluate"  # `primus eval`: the adapter's evaluate instead of run


def worker_argv(run_dir: Path, module: str, entry: str = WORKER) -> list[str]:
    return ["-m", entry, str(run_dir), module]


RDZV_TIMEOUT_S = 300  # how long nodes wait for each other before the job fails with one line


def rendezvous_timeout() -> int:
    """PRIMUS_RDZV_TIMEOUT seconds (default 300): the nodes' join timeout at rendezvous."""
    raw = os.environ.get("PRIMUS_RDZV_TIMEOUT", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else RDZV_TIMEOUT_S


def config_fingerprint(module) -> str:
    """What every node of one job must agree on, hashed: the backend, the model, the tokenizer's
    contents and the training, parallel and fine-tuning settings (not paths, which may be node-local)."""
    import hashlib
    import json

    from primus.runs.resume import run_shape

    shape = {k: v for k, v in run_shape(module).items() if k != "data"}
    settings = {s: getattr(module.module, s).model_dump(exclude_none=True) for s in ("train", "parallel", "finetune")}
    text = json.dumps({"shape": shape, "settings": settings, "steps": module.total_steps}, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def rendezvous_id(run_dir: Path, fingerprint: str | None = None) -> str:
    """One id per job, the same on every node: Slurm's job id when there is one, else derived from
    what every node of one job shares — the experiment's name (the run directory's last part), not
    its full path, which differs between node-local workspaces. `fingerprint` (`config_fingerprint`)
    is appended, so nodes started with different configurations never meet: they fail at the join
    timeout with one line instead of training different models together."""
    job = os.environ.get("SLURM_JOB_ID")
    suffix = f"-{fingerprint}" if fingerprint else ""
    if job:
        return f"slurm-{job}{suffix}"
    import hashlib

    return "primus-" + hashlib.sha1(Path(run_dir).name.encode()).hexdigest()[:12] + suffix


def plan_launch(process_model: str, run_dir: Path, module: str, opts: LaunchOptions,
                entry: str = WORKER, fingerprint: str | None = None, job_dir: Path | None = None) -> LaunchPlan:
    """`job_dir`: the run directory the rendezvous id is derived from when it is not `run_dir` (an
    evaluation's own folder is named by the time each node started it)."""
    if opts.world_size == 1 and opts.nnodes == 1 and entry in (WORKER, EVALUATE):
        return LaunchPlan("in-process")
    if process_model == "torchrun":
        # torchrun through Primus's entry: same arguments, but a graceful stop exits 143/130, not 1
        argv = [sys.executable, "-m", "primus.launch.torchrun", "--nproc-per-node", str(opts.nproc_per_node),
                "--nnodes", str(opts.nnodes)]
        if opts.nnodes > 1:
            # c10d rendezvous: nodes may start in any order; the store lives at the first node
            argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{opts.master_addr}:{opts.master_port}",
                     "--rdzv-id", rendezvous_id(job_dir or run_dir, fingerprint), "--node-rank", str(opts.node_rank),
                     "--rdzv-conf", f"join_timeout={rendezvous_timeout()}"]
        else:
            argv += ["--node-rank", "0", "--master-addr", opts.master_addr, "--master-port", str(opts.master_port)]
        if opts.max_restarts:
            argv += ["--max-restarts", str(opts.max_restarts)]
        return LaunchPlan("torchrun", argv + worker_argv(run_dir, module, entry), {"PRIMUS_LAUNCHER": "torchrun"})
    # per-host (JAX): one process on this host; the coordinator comes from the environment
    env = {"PRIMUS_COORDINATOR": f"{opts.master_addr}:{opts.master_port}", "PRIMUS_NUM_PROCESSES": str(opts.nnodes),
           "PRIMUS_PROCESS_ID": str(opts.node_rank)}
    return LaunchPlan("per-host", [sys.executable, *worker_argv(run_dir, module, entry)], env)
