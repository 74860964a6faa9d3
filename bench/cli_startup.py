"""CLI start-up time: median wall time of common commands beside `python -c pass`, over 10 runs.

Target: each under 0.3 s on a 2-core machine, with no framework imported (tests/core and
tests/e2e assert the imports through sys.modules).

    python bench/cli_startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _example() -> Path | None:
    for candidate in (ROOT / "examples" / "hf" / "llama3_tiny.yaml", *sorted(ROOT.glob("examples/*/*.yaml"))):
        if candidate.exists():
            return candidate
    return None


def time_command(argv: list[str], runs: int) -> tuple[float, int]:
    samples = []
    code = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        code = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    py = sys.executable
    commands = {
        "python -c pass": [py, "-c", "pass"],
        "primus --help": [py, "-m", "primus", "--help"],
        "primus backends": [py, "-m", "primus", "backends"],
    }
    example = _example()
    if example is not None:
        commands[f"primus config show {example.relative_to(ROOT)}"] = [py, "-m", "primus", "config", "show",
                                                                       str(example)]
    print(f"{'command':<48} {'median s':>9}  exit")
    for name, argv in commands.items():
        median, code = time_command(argv, args.runs)
        flag = "" if name.startswith("python") or median < 0.3 else "  (over the 0.3 s target)"
        print(f"{name:<48} {median:>9.3f}  {code}{flag}")


if __name__ == "__main__":
    main()
