"""Primus's overhead on TorchTitan: the same model and settings through `primus run` and through
`python -m torchtitan.train` directly, alternating. Not run by the tests.

    python bench/overhead_torchtitan.py [--steps 30] [--rounds 2] [--experiment EXP]

The direct run goes through torchtitan's own entry point (`torchtitan.train.main`, under torchrun
as torchtitan expects) with a small wrapper that applies the same CPU patches and registers a
config function producing the same `Trainer.Config` Primus builds for the experiment. Throughput
comes from TorchTitan's own per-step measurement on both sides (tokens/s, divided by the tokens
of one step), steps 2.. only; peak RSS from wait4() of each launcher and its children.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from overhead import MIN_PAIRS, paired_report  # bench/ is on sys.path when these run as scripts

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPERIMENT = ROOT / "examples" / "torchtitan" / "llama3_tiny_cpu.yaml"
TPS_LINE = re.compile(r"step:\s*(\d+).*?tps:\s*([\d,]+)")

WRAPPER = '''
"""Runs torchtitan.train.main() with Primus's CPU patches and the Trainer.Config Primus would build."""
import json, os, sys
from primus.patches.registry import PatchContext, PatchSet
from primus.platform.detect import detect_platform
from primus_torchtitan.patches import PATCHES

SETTINGS = json.loads(os.environ["BENCH_NATIVE"])
_ctx = PatchContext(backend="torchtitan", platform=detect_platform().kind, framework_version="0.3.0",
                    config=SETTINGS, state={"world_size": int(os.environ.get("WORLD_SIZE", "1"))})
# only the patches that let torchtitan run here: the logging route is Primus's, not torchtitan's
_patches = PatchSet([p for p in PATCHES if p.id != "torchtitan.route_logging"])
_patches.apply_phase("before_import", _ctx)
import torchtitan.train  # noqa: E402
_patches.apply_phase("setup", _ctx)


def primus_bench():
    from primus_torchtitan.adapter import build_trainer_config
    out = os.environ["BENCH_OUT"]
    config = build_trainer_config(SETTINGS, run_dir=out, checkpoint_dir=os.path.join(out, "checkpoints"))
    _ctx.state["titan_config"] = config
    _patches.apply_phase("build_args", _ctx)
    return config


if __name__ == "__main__":
    torchtitan.train.main()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_measured(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB of the process tree, combined output)."""
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(argv)}\n{output[-4000:]}")
    return wall, usage.ru_maxrss / 1024, output


def steps_per_s(tps_by_step: dict[int, float], tokens_per_step: int) -> float:
    rates = [tps / tokens_per_step for step, tps in sorted(tps_by_step.items()) if step > 1]
    return statistics.median(rates)  # median: the machine is shared, single steps stall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", type=Path, default=DEFAULT_EXPERIMENT)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=MIN_PAIRS)
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from primus.config.resolve import resolve

    # checkpoints off on both sides: the bench measures training steps
    overrides = [f"train.steps={args.steps}", "train.log_interval=1", "overrides.checkpoint.enable=false"]
    native = resolve(args.experiment, overrides).modules["pre_trainer"].native
    tokens_per_step = native["training"]["local_batch_size"] * native["training"]["seq_len"]

    results: dict[str, list[tuple[float, float, float]]] = {"primus": [], "torchtitan": []}
    with tempfile.TemporaryDirectory() as tmp:
        wrapper_dir = Path(tmp) / "wrapper"
        wrapper_dir.mkdir()
        (wrapper_dir / "primus_bench_titan.py").write_text(textwrap.dedent(WRAPPER))
        for round_ in range(args.rounds):
            # Primus: `primus run`, one process in-process
            ws = Path(tmp) / f"primus-{round_}"
            wall, rss, _ = run_measured(
                [sys.executable, "-m", "primus", "run", str(args.experiment), f"workspace={ws}", *overrides],
                dict(os.environ))
            metrics = [json.loads(x) for x in next(ws.rglob("metrics.jsonl")).read_text().splitlines()]
            tps = {m["step"]: m["tokens_per_s"] for m in metrics}
            results["primus"].append((steps_per_s(tps, tokens_per_step), wall, rss))

            # TorchTitan directly: python -m torchtitan.train's main(), under torchrun
            out = Path(tmp) / f"titan-{round_}"
            env = {**os.environ, "BENCH_NATIVE": json.dumps(native), "BENCH_OUT": str(out),
                   "PYTHONPATH": f"{wrapper_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            wall, rss, output = run_measured(
                [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port",
                 str(free_port()), "-m", "primus_bench_titan", "--module", "primus_bench_titan",
                 "--config", "primus_bench"], env)
            tps = {int(m.group(1)): float(m.group(2).replace(",", "")) for m in TPS_LINE.finditer(output)}
            if len(tps) < 2:
                sys.exit(f"no step lines in torchtitan's output:\n{output[-3000:]}")
            results["torchtitan"].append((steps_per_s(tps, tokens_per_step), wall, rss))
            print(f"round {round_ + 1}: primus {results['primus'][-1][0]:.2f} steps/s, "
                  f"torchtitan {results['torchtitan'][-1][0]:.2f} steps/s", flush=True)

    print(f"\n{args.experiment.name}, {args.steps} steps, {args.rounds} alternating rounds")
    print(f"{'path':<11} {'steps/s':>8} {'wall s':>8} {'peak RSS MiB':>13}")
    summary = {}
    for name, rows in results.items():
        rate = statistics.mean(r[0] for r in rows)
        wall = statistics.mean(r[1] for r in rows)
        rss = max(r[2] for r in rows)
        summary[name] = rate
        print(f"{name:<11} {rate:8.2f} {wall:8.1f} {rss:13.0f}")
    paired_report(args.experiment.name, [r[0] for r in results["primus"]], [r[0] for r in results["torchtitan"]],
                  other="torchtitan")


if __name__ == "__main__":
    main()
