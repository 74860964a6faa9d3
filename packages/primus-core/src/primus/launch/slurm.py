"""Slurm: an sbatch script whose one task per node runs `primus.launch.node` (ARCHITECTURE §8).

Every user string that reaches the script is shell-quoted; the script lands in the run directory
beside Slurm's output. Primus submits with `sbatch --parsable` and, with --wait, follows the job
through `scontrol show job` (sbatch --wait polls slowly) and returns its exit code.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from primus.config.schema import SlurmSection
from primus.errors import ConfigError

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE"}


def _single_line(value: str, key: str) -> str:
    """A value bound for one line of the script: a newline (or any control character) would end an
    `#SBATCH` comment and start a shell command, so it is refused, not quoted."""
    bad = next((c for c in value if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise ConfigError(f"{value!r} holds the control character {bad!r}, which cannot go into a batch script",
                          key=key, fix="use a value without newlines or control characters")
    return value


def _option(text: str) -> str:
    """One extra sbatch option as an #SBATCH line: `--name=value`, `--name value` or `--flag`."""
    text = text.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH"):].strip()
    if "=" in text.split(" ", 1)[0]:
        name, _, value = text.partition("=")
    else:
        name, _, value = text.partition(" ")
    _single_line(text, "launch.slurm.sbatch")
    if not re.fullmatch(r"--?[A-Za-z][A-Za-z0-9-]*", name):
        raise ConfigError(f"sbatch option {text!r} must be one option such as --qos=high", key="launch.slurm.sbatch")
    return f"#SBATCH {name}={shlex.quote(value.strip())}" if value.strip() else f"#SBATCH {name}"


def job_name(exp_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", exp_name)[:64] or "primus"


def render_sbatch(*, exp_name: str, run_dir: Path, nnodes: int, gpus_per_node: int, slurm: SlurmSection,
                  env: dict[str, str], node_command: list[str]) -> str:
    out_dir = run_dir / "slurm"
    _single_line(str(out_dir), "workspace / work_group / user_name / exp_name")
    for key in ("partition", "account", "time", "signal"):
        _single_line(str(getattr(slurm, key) or ""), f"launch.slurm.{key}")
    for name in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"environment name {name!r} is not a shell variable name", key="env",
                              fix="use letters, digits and _ only")
    for arg in [*slurm.srun_args, *node_command]:
        _single_line(arg, "launch.slurm.srun_args")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name(exp_name)}",
        f"#SBATCH --nodes={int(nnodes)}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={shlex.quote(str(out_dir / 'slurm-%j.out'))}",
    ]
    if gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={int(gpus_per_node)}")
    for key in ("partition", "account", "time"):
        value = getattr(slurm, key)
        if value:
            lines.append(f"#SBATCH --{key}={shlex.quote(str(value))}")
    if slurm.signal:
        lines.append(f"#SBATCH --signal={shlex.quote(slurm.signal)}")
    if slurm.requeue:
        lines.append("#SBATCH --requeue")
    lines += [_option(o) for o in slurm.sbatch]
    lines += ["", "# Written by `primus run --launcher slurm`; one task per node starts that node's processes.",
              "set -euo pipefail"]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items())]
    srun = ["srun", "--nodes", str(int(nnodes)), "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
            *slurm.srun_args]
    lines += ["", "exec " + shlex.join(srun + node_command), ""]
    return "\n".join(lines)


def submit(script: Path) -> str:
    tool = shutil.which("sbatch")
    if tool is None:
        raise ConfigError("sbatch not found on this machine", key="launch.launcher",
                          fix="run on a Slurm login node or use --launcher local")
    r = subprocess.run([tool, "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise ConfigError(f"sbatch refused the job: {r.stderr.strip() or r.stdout.strip()}", file=str(script))
    return r.stdout.strip().split(";")[0]


def job_state(job_id: str) -> tuple[str, int | None]:
    r = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=60)
    state = re.search(r"JobState=(\S+)", r.stdout)
    code = re.search(r"\bExitCode=(\d+):(\d+)", r.stdout)
    exit_code = None
    if code:
        status, signal = int(code.group(1)), int(code.group(2))
        exit_code = status if status or not signal else 128 + signal
    return (state.group(1) if state else "UNKNOWN"), exit_code


def wait(job_id: str, *, timeout_s: float = 7 * 24 * 3600, poll_s: float = 1.0) -> int:
    """Follow a job until it ends; its exit code (1 when Slurm ended it without one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state, code = job_state(job_id)
        if state in TERMINAL:
            if state == "COMPLETED":
                return 0
            return code if code else 1
        time.sleep(poll_s)
    return 1
