"""What Primus costs on top of MaxText: the same model through `primus run` and through MaxText's own entry.

    python bench/overhead_maxtext.py [--rounds 3] [--steps 40]

Primus runs the tiny Llama 3 example once to generate its MaxText config
(`<run dir>/maxtext/pre_trainer.yml`); then rounds alternate `primus run` and
`python -m maxtext.trainers.pre_train.train <that file>`, so machine noise hits both alike. Both print
MaxText's "completed step: N, seconds: S" lines, which give the step rate after compilation (steps 0
and 1 excluded: they include compilation and the first data), start-up is the wall time to the first
completed step, and peak RSS is the process's ru_maxrss. Not run by the tests.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from overhead import MIN_PAIRS, paired_report  # bench/ is on sys.path when these run as scripts

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "maxtext" / "llama3_tiny-pretrain.yaml"
STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([0-9.]+)")
WARMUP_STEPS = 2


def run_measured(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    first_step_at = None
    step_seconds: dict[int, float] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        m = STEP_LINE.search(line)
        if m:
            step_seconds[int(m.group(1))] = float(m.group(2))
            if first_step_at is None:
                first_step_at = time.monotonic() - start
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{argv[:4]} failed with status {status}")
    timed = [s for step, s in step_seconds.items() if step >= WARMUP_STEPS]
    return {
        "steps_per_s": len(timed) / sum(timed),
        "startup_s": first_step_at or float("nan"),
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "wall_s": time.monotonic() - start,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=MIN_PAIRS)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "JAX_PLATFORMS": "cpu"}
    workspace = Path(tempfile.mkdtemp(prefix="primus-bench-maxtext-"))
    primus = [sys.executable, "-m", "primus", "run", str(EXAMPLE), f"workspace={workspace}",
              f"train.steps={args.steps}", "train.log_interval=1000"]
    config = workspace / "amd" / "root" / "maxtext-llama3-tiny" / "maxtext" / "pre_trainer.yml"

    results: dict[str, list[dict[str, float]]] = {"primus": [], "maxtext": []}
    for i in range(args.rounds):
        results["primus"].append(run_measured([*primus, f"exp_name=primus{i}"], env))
        if i == 0:
            config = workspace / "amd" / "root" / "primus0" / "maxtext" / "pre_trainer.yml"
        direct = [sys.executable, "-m", "maxtext.trainers.pre_train.train", str(config), f"run_name=direct{i}"]
        results["maxtext"].append(run_measured(direct, env))
        print(f"round {i + 1}/{args.rounds}: primus {results['primus'][-1]['steps_per_s']:.1f} steps/s, "
              f"maxtext {results['maxtext'][-1]['steps_per_s']:.1f} steps/s", flush=True)

    print(f"\nsame generated config: {config}")
    print(f"{'':<10}{'steps/s':>10}{'start-up s':>12}{'peak RSS MB':>13}")
    median = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items()}
    for name, m in median.items():
        print(f"{name:<10}{m['steps_per_s']:>10.2f}{m['startup_s']:>12.1f}{m['peak_rss_mb']:>13.0f}")
    paired_report("maxtext", [r["steps_per_s"] for r in results["primus"]],
                  [r["steps_per_s"] for r in results["maxtext"]], other="maxtext")
    return 0


if __name__ == "__main__":
    sys.exit(main())
