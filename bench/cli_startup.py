"""CLI start-up time: median wall time of common commands beside `python -c pass`, over 10 runs,
then the in-process resolution time of each example experiment after warm-up.

Targets (issue 11, all four backend packages installed, quiet 2-core machine): `--help` < 60 ms,
`backends` < 100 ms, `config show` < 150 ms, `run --dry-run` < 200 ms, and resolving any example
< 5 ms once warm. No framework is imported by any of these (tests/core and tests/e2e assert it).

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
    targets = {"primus --help": 0.060, "primus backends": 0.100}
    example = _example()
    if example is not None:
        shown = example.relative_to(ROOT)
        commands[f"primus config show {shown}"] = [py, "-m", "primus", "config", "show", str(example)]
        commands[f"primus run {shown} --dry-run"] = [py, "-m", "primus", "run", str(example), "--dry-run"]
        targets[f"primus config show {shown}"] = 0.150
        targets[f"primus run {shown} --dry-run"] = 0.200
    print(f"{'command':<60} {'median s':>9} {'target':>7}  exit")
    for name, argv in commands.items():
        median, code = time_command(argv, args.runs)
        target = targets.get(name)
        flag = "" if target is None or median < target else "  (over target)"
        print(f"{name:<60} {median:>9.3f} {target or '':>7}  {code}{flag}")
    resolution_times(args.runs)


def resolution_times(runs: int) -> None:
    """Median in-process `resolve()` time per example, after one warm-up (target < 5 ms).

    Backends are discovered once, as one command does; parsed preset files are reused by identity."""
    from importlib.util import find_spec

    from primus.backends.discovery import discover
    from primus.config.resolve import resolve
    from primus.errors import ConfigError

    discovery = discover()

    print(f"\n{'resolve (in process, warm)':<60} {'median ms':>9}")
    for example in sorted(ROOT.glob("examples/*/*.yaml")):
        if find_spec(f"primus_{example.parent.name}".replace("-", "_")) is None:
            continue
        try:
            resolve(example, world_size=8 if "8B" in example.name else 1, discovery=discovery)
        except ConfigError as exc:
            print(f"{str(example.relative_to(ROOT)):<60} {'error':>9}  {exc}")
            continue
        samples = []
        for _ in range(runs):
            t0 = time.perf_counter()
            resolve(example, world_size=8 if "8B" in example.name else 1, discovery=discovery)
            samples.append(time.perf_counter() - t0)
        print(f"{str(example.relative_to(ROOT)):<60} {statistics.median(samples) * 1000:>9.1f}")


if __name__ == "__main__":
    main()
