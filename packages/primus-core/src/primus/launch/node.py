"""One node's start: `python -m primus.launch.node ...`, run once per node by srun (or by hand).

Works out this node's rank and the rendezvous host (the allocation's first node under Slurm, else
NODE_RANK and MASTER_ADDR), then execs that node's launcher: torchrun for torch backends, the
single JAX process for per-host backends, optionally inside a container.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from pathlib import Path


def _slurm_first_node_addr() -> str | None:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
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


def node_rank_and_master() -> tuple[int, str]:
    if "SLURM_NODEID" in os.environ:
        return int(os.environ["SLURM_NODEID"]), _slurm_first_node_addr() or socket.gethostname()
    return int(os.environ.get("NODE_RANK", "0")), os.environ.get("MASTER_ADDR", "127.0.0.1")


def main(argv: list[str] | None = None) -> int:
    from primus.launch.plan import LaunchOptions, plan_launch

    p = argparse.ArgumentParser(prog="python -m primus.launch.node")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--module", required=True)
    p.add_argument("--process-model", default="torchrun")
    p.add_argument("--nproc-per-node", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument("--container", action="store_true", help="wrap in the experiment's container settings")
    p.add_argument("--entry", default="primus.runs.worker", help="worker module (preflight uses its own)")
    args = p.parse_args(argv)

    run_dir = Path(args.run_dir)
    rank, master = node_rank_and_master()
    if rank == 0 and args.entry == "primus.runs.worker":
        from primus.errors import ConfigError
        from primus.runs.resume import RunLock

        try:  # the job's first node holds the run directory until the job ends
            RunLock(run_dir).acquire()
        except ConfigError as exc:
            print(f"primus: error: {exc}", file=sys.stderr)
            return 2
    opts = LaunchOptions(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=rank,
                         master_addr=master, master_port=args.master_port, max_restarts=args.max_restarts)
    plan = plan_launch(args.process_model, run_dir, args.module, opts, entry=args.entry)
    env = {**os.environ, **plan.env, "NODE_RANK": str(rank), "MASTER_ADDR": master,
           "MASTER_PORT": str(args.master_port), "NNODES": str(args.nnodes)}
    argv_exec = plan.argv if plan.kind != "in-process" else [sys.executable, "-m", args.entry,
                                                             str(run_dir), args.module]
    if args.container:
        import yaml

        from primus.config.schema import ContainerSection
        from primus.launch.container import container_argv

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        section = ContainerSection.model_validate(cfg["experiment"]["launch"]["container"])
        inner = ["python", *argv_exec[1:]]
        argv_exec = container_argv(section, mounts=[run_dir], workdir=run_dir,
                                   env={**plan.env, "NODE_RANK": str(rank), "MASTER_ADDR": master}, inner=inner)
    sys.stdout.flush()
    os.execvpe(argv_exec[0], argv_exec, env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
