"""One node's start: `python -m primus.launch.node ...`, run once per node by srun (or by hand, or
inside a container).

Works out this node's rank and the rendezvous host (the allocation's first node under Slurm, else
NODE_RANK and MASTER_ADDR), then plans again for this node: the platform and arch it detects, the
devices it may use (visibility variables and the Slurm allocation), the environment for that
platform (what the submitting host planned for the target is replaced, what the user set is kept),
and the network interface to the rendezvous host. A GPU target on a node that shows no GPU, or more
processes than visible GPUs, is refused (exit 2, one line). Then it execs that node's launcher:
torchrun for torch backends, the single JAX process for per-host backends, optionally inside a
container.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from primus.errors import EXIT_USAGE, ConfigError


def _slurm_first_node_addr(environ: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if environ is None else environ
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        names = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=30).stdout.split()
        if not names:
            return None
        info = subprocess.run(["scontrol", "show", "node", names[0]], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"NodeAddr=(\S+)", info)
    return m.group(1) if m else names[0]


def node_rank_and_master(environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    env = os.environ if environ is None else environ
    if "SLURM_NODEID" in env:
        return int(env["SLURM_NODEID"]), _slurm_first_node_addr(env) or socket.gethostname()
    return int(env.get("NODE_RANK", "0")), env.get("MASTER_ADDR", "127.0.0.1")


def _why_no_gpu(environ: Mapping[str, str]) -> str:
    said = [f"{v}={environ[v]!r}" for v in ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES",
                                           "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS")
            if v in environ]
    return ", ".join(said) if said else "no GPU device found"


@dataclass
class NodePlan:
    argv: list[str]
    env: dict[str, str]  # the whole environment to exec with
    planned: dict[str, str] = field(default_factory=dict)  # what this node set (platform env, interface)
    platform: str = "cpu"
    notes: list[str] = field(default_factory=list)
    detected: str = ""  # what detection said, e.g. "rocm (gfx950), 8 device(s)"


def _module_config(run_dir: Path, module: str) -> tuple[object | None, dict[str, object]]:
    """The resolved module and the experiment's `env:` from the run directory (None before it exists)."""
    try:
        from primus.runs.rundir import read_module

        m, data = read_module(run_dir, module)
    except (OSError, KeyError, TypeError, ValueError):
        return None, {}
    return m, dict((data.get("experiment") or {}).get("env") or {})


def plan_node(args: argparse.Namespace, environ: Mapping[str, str]) -> NodePlan:
    """This node's command and environment; ConfigError (exit 2) for what it cannot run."""
    from primus.launch.network import socket_ifname_env
    from primus.launch.plan import LaunchOptions, config_fingerprint, plan_launch
    from primus.launch.target import GPU_KINDS, platform_env, strip_planned
    from primus.platform.detect import detect_platform

    run_dir = Path(args.run_dir)
    rank, master = node_rank_and_master(environ)
    module, exp_env = _module_config(run_dir, args.module)
    base = strip_planned(environ, exp_env)
    host = socket.gethostname()
    node = detect_platform(base)
    target = args.platform if args.platform not in (None, "", "auto") else None
    notes: list[str] = []
    if target in GPU_KINDS and (not node.gpu or not node.devices):
        raise ConfigError(f"the job's target is {target} but node {host} shows no GPU ({_why_no_gpu(base)}): "
                          f"it would train on its CPUs", key="--platform",
                          fix="ask Slurm for GPUs (--gpus-per-node), check the *_VISIBLE_DEVICES variables, "
                              "or run with --platform cpu")
    if target in GPU_KINDS and node.kind != target:
        notes.append(f"the job's target is {target} but node {host} is {node.describe()}: planned for {node.kind}")
    platform, arch = (node.kind, node.arch) if target != "cpu" else ("cpu", None)
    if platform in GPU_KINDS and args.nproc_per_node > node.devices:
        raise ConfigError(f"{args.nproc_per_node} processes per node but node {host} shows {node.describe()} "
                          f"({_why_no_gpu(base)}): each process needs its own GPU", key="--nproc-per-node",
                          fix=f"use --nproc-per-node {node.devices} or fewer, or ask for more GPUs")
    if platform in GPU_KINDS and target is None and args.nproc_per_node < node.devices:
        notes.append(f"node {host} shows {node.describe()} but the job starts {args.nproc_per_node} process(es) per "
                     "node: the submit host could not tell; submit with --platform and --gpus-per-node to use them")
    planned: dict[str, str] = {}
    if module is not None:
        from primus.backends.discovery import discover

        backend = discover().get(module.framework)  # type: ignore[attr-defined]
        planned = platform_env([backend], {args.module: module}, platform=platform, arch=arch, environ=base,
                               experiment_env=exp_env)
    if target == "cpu" and node.gpu:
        planned["PRIMUS_PLATFORM"] = "cpu"
    if args.nnodes > 1:
        planned.update(socket_ifname_env(master, base, exp_env))

    opts = LaunchOptions(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=rank,
                         master_addr=master, master_port=args.master_port, max_restarts=args.max_restarts)
    plan = plan_launch(args.process_model, run_dir, args.module, opts, entry=args.entry,
                       fingerprint=config_fingerprint(module) if module is not None else None)
    contract = {"NODE_RANK": str(rank), "MASTER_ADDR": master, "MASTER_PORT": str(args.master_port),
                "NNODES": str(args.nnodes)}
    env = {**base, **planned, **plan.env, **contract}
    argv = plan.argv if plan.kind != "in-process" else [sys.executable, "-m", args.entry, str(run_dir), args.module]
    if args.container:
        import yaml

        from primus.config.schema import ContainerSection
        from primus.launch.container import container_argv

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        section = ContainerSection.model_validate(cfg["experiment"]["launch"]["container"])
        argv = container_argv(section, mounts=[run_dir], workdir=run_dir, platform=platform, environ=env,
                              env={**planned, **plan.env, "NODE_RANK": str(rank), "MASTER_ADDR": master},
                              inner=["python", *argv[1:]])
    return NodePlan(argv, env, planned, platform, notes, node.describe())


def _record(run_dir: Path, rank: int, plan: NodePlan) -> None:
    """`logs/node-<rank>.json`: what this node detected and set (best effort: the run goes on without it)."""
    try:
        from primus.runs.files import write_json

        write_json(run_dir / "logs" / f"node-{rank}.json",
                   {"host": socket.gethostname(), "platform": plan.platform, "detected": plan.detected,
                    "env_set": plan.planned, "argv": plan.argv, "notes": plan.notes})
    except (OSError, ImportError):
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m primus.launch.node")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--module", required=True)
    p.add_argument("--process-model", default="torchrun")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument("--platform", choices=["rocm", "cuda", "cpu", "auto"], default="auto",
                   help="the job's target platform (auto: what this node detects)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="what the job asked Slurm for (informative)")
    p.add_argument("--container", action="store_true", help="wrap in the experiment's container settings")
    p.add_argument("--entry", default="primus.runs.worker", help="worker module (preflight uses its own)")
    p.add_argument("--dry-run", action="store_true", help="print this node's plan and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        plan = plan_node(args, os.environ)
    except ConfigError as exc:
        print(f"primus: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for note in plan.notes:
        print(f"primus: warning: {note}", file=sys.stderr)
    if args.dry_run:
        print(f"platform    {plan.platform}")
        for k, v in sorted(plan.planned.items()):
            print(f"  {k}={v}")
        import shlex

        print("command     " + shlex.join(plan.argv))
        return 0
    rank = int(plan.env["NODE_RANK"])
    _record(run_dir, rank, plan)
    if rank == 0 and args.entry == "primus.runs.worker":
        from primus.runs.resume import RunLock

        try:  # the job's first node holds the run directory until the job ends
            RunLock(run_dir).acquire()
        except ConfigError as exc:
            print(f"primus: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    sys.stdout.flush()
    os.execvpe(plan.argv[0], plan.argv, plan.env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
