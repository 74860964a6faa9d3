"""Primus's training overhead: the same job through `primus run` and through a plain script.

    python bench/overhead.py hf [--rounds 3 --steps 300]
    python bench/overhead.py megatron [...]            (plain side: bench/overhead_megatron.py)
    python bench/overhead.py torchtitan | maxtext [...]   (bench/overhead_<backend>.py)

Both sides train the same tiny model with the same settings; runs alternate between the sides.
What is compared is the training loop: the wall time from the end of step 1 to the end of step N,
read from Primus's rank-0 log timestamps (so metrics.jsonl, the progress line and the status file
are all inside it) and printed by the plain script. Start-up (imports, model build) is left out
because on a shared 2-core machine it varies by more than the loop takes. Prints steps/s of each
side, the ratio of each alternating pair (primus / plain, so the machine's drift between pairs
cancels) as median with min-max (target >= 0.99), the loop time per step of each side and the peak
RSS of each process. At least 7 pairs (`paired_report` is shared by every backend's bench).
Not run by the tests; uses OMP_NUM_THREADS=1 as they do.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HF_EXPERIMENT = """
work_group: bench
user_name: bench
exp_name: overhead
workspace: {workspace}
modules:
  pre_trainer:
    framework: hf
    config: pre_trainer.yaml
    model: llama3_tiny.yaml
    train: {{steps: {steps}, lr: 3.0e-3, warmup_steps: 2, lr_schedule: cosine, micro_batch_size: 8,
             global_batch_size: 8, seq_length: 64, seed: 1234, weight_decay: 0.1, grad_clip: 1.0, log_interval: 1}}
    data: {{mock: true}}
    overrides: {{disable_last_saving: true, save_strategy: "no"}}
"""
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \S+\s+step (\d+)/(\d+) ")


MIN_PAIRS = 7


def paired_report(name: str, primus: list[float], plain: list[float], *, other: str = "plain") -> float:
    """Print and return the median of the per-pair ratios primus[i] / plain[i] (steps/s of the two
    sides of round i, run back to back), with their min-max and each side's median step time."""
    ratios = sorted(p / q for p, q in zip(primus, plain, strict=True))
    median = statistics.median(ratios)
    print(f"\n{name}: {len(ratios)} alternating pairs; steps/s primus {statistics.median(primus):.2f}, "
          f"{other} {statistics.median(plain):.2f}")
    print(f"loop time per step: primus {1000 / statistics.median(primus):.2f} ms, "
          f"{other} {1000 / statistics.median(plain):.2f} ms")
    print(f"ratio primus/{other} per pair: median {median:.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f}; "
          f"target >= 0.99)" + ("" if len(ratios) >= MIN_PAIRS else f"  [fewer than {MIN_PAIRS} pairs]"))
    return median


def run_child(argv: list[str], env: dict[str, str]) -> tuple[str, int]:
    """Output and peak RSS (KiB) of one child process (run from the repository root)."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0)
        text = out.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"{' '.join(argv)} failed ({code}):\n{text[-4000:]}")
    return text, usage.ru_maxrss


def primus_loop_seconds(workspace: Path, steps: int, module: str = "pre_trainer") -> float:
    """Seconds from the end of step 1 to the end of step N, from the rank-0 log of the run in `workspace`."""
    log = next(workspace.rglob(f"logs/{module}/rank-0/primus.log"))
    stamps = {}
    for line in log.read_text().splitlines():
        m = LOG_LINE.match(line)
        if m and int(m.group(3)) == steps:
            stamps[int(m.group(2))] = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f")
    return (stamps[steps] - stamps[1]).total_seconds()


def measure_hf(side: str, steps: int, workdir: Path, env: dict[str, str]) -> tuple[float, int]:
    """(seconds for steps 2..N, peak RSS KiB) of one run of `side`."""
    if side == "plain":
        text, rss = run_child([sys.executable, str(ROOT / "bench" / "plain_hf.py"), "--steps", str(steps)], env)
        return float(re.search(r"loop_s=(\S+)", text).group(1)), rss
    workspace = Path(tempfile.mkdtemp(dir=workdir))
    exp = workspace / "overhead.yaml"
    exp.write_text(textwrap.dedent(HF_EXPERIMENT).format(steps=steps, workspace=workspace).lstrip())
    _, rss = run_child([sys.executable, "-m", "primus", "run", str(exp)], env)
    return primus_loop_seconds(workspace, steps), rss


def measure_megatron(side: str, steps: int, workdir: Path, env: dict[str, str]) -> tuple[float, int]:
    from overhead_megatron import measure  # bench/ is on sys.path when this file runs as a script

    return measure(side, steps, workdir, env)


def check_megatron(steps: int) -> None:
    from overhead_megatron import check_settings

    check_settings(steps)


BACKENDS = {"hf": measure_hf, "megatron": measure_megatron}
CHECKS = {"megatron": check_megatron}  # before the first round: both sides must train the same thing


def main() -> None:
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        backend = sys.argv.pop(1)
        other = Path(__file__).with_name(f"overhead_{backend}.py")
        if backend not in BACKENDS and other.exists():  # the backends with a bench script of their own
            import runpy

            sys.argv[0] = str(other)
            runpy.run_path(str(other), run_name="__main__")
            return
        sys.argv[1:1] = ["--backend", backend]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="hf")
    parser.add_argument("--rounds", type=int, default=MIN_PAIRS)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    measure = BACKENDS[args.backend]
    if args.backend in CHECKS:
        CHECKS[args.backend](args.steps)

    rates: dict[str, list[float]] = {"primus": [], "plain": []}
    peak_rss: dict[str, int] = {"primus": 0, "plain": 0}
    with tempfile.TemporaryDirectory(prefix="primus-bench-") as tmp:
        for round_index in range(args.rounds):
            for side in (["primus", "plain"] if round_index % 2 == 0 else ["plain", "primus"]):
                seconds, rss = measure(side, args.steps, Path(tmp), env)
                rates[side].append((args.steps - 1) / seconds)
                peak_rss[side] = max(peak_rss[side], rss)
                print(f"round {round_index + 1} {side:>6}: {rates[side][-1]:7.2f} steps/s, peak RSS {rss / 1024:.0f} MiB",
                      flush=True)

    paired_report(args.backend, rates["primus"], rates["plain"])
    print(f"peak RSS: primus {peak_rss['primus'] / 1024:.0f} MiB, plain {peak_rss['plain'] / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
