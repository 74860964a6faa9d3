"""Where the time of Primus's training loop goes: a profile of steps 2..N of one `primus run`.

    python bench/overhead_profile.py EXPERIMENT [--steps 200] [--top 8] [--save FILE] [key=value ...]
    python bench/overhead_profile.py examples/maxtext/llama3_tiny-pretrain.yaml --python .nox/maxtext/bin/python

`bench/overhead.py` compares Primus with a plain script by wall time, which on a shared machine
moves by more than the difference it looks for. This answers the same question from inside one
run: a sitecustomize on PYTHONPATH starts cProfile on rank 0 when step 1 is recorded (the
`MetricsWriter.train_step` every backend calls) and stops it when step N is, so start-up, model
build and compilation are outside the window. The profiled time is then split:

- **primus**: the self time of every function in a Primus package (`primus`, `primus_<backend>`),
  plus the whole time of the Python functions they call outside the frameworks (the standard
  library, loguru, pydantic, yaml) and the own time of the C builtins they call: the metrics stream,
  logs, status file, stop flag, the data pipeline Primus builds, patches' own work;
- **framework**: everything else (torch, transformers, megatron, torchtitan, jax, maxtext, numpy,
  and the C methods they run).

It prints the loop time per step, Primus's time per step and its share, and Primus's most costly
functions. A share at or under 1% is the overhead target (primus/plain >= 0.99) met from the inside.
cProfile slows Python code (Primus's and the frameworks' alike), so the share, not the absolute
times, is the figure. Not run by the tests; uses OMP_NUM_THREADS=1 as they do.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in every Python process of the launch; only rank 0's training loop is profiled.
SITECUSTOMIZE = '''
import os

if os.environ.get("PRIMUS_PROFILE_OUT") and os.environ.get("RANK", "0") == "0":
    import cProfile
    import importlib.util
    import json
    import time

    from primus.runs import metrics as _metrics

    _record = _metrics.MetricsWriter.train_step
    _profile = cProfile.Profile()
    _window = {}

    def _packages():
        names = ["primus", "primus_hf", "primus_megatron", "primus_torchtitan", "primus_maxtext"]
        found = [importlib.util.find_spec(n) for n in names]
        return [d for spec in found if spec is not None for d in (spec.submodule_search_locations or [])]

    def train_step(self, step, *args, **kwargs):
        out = _record(self, step, *args, **kwargs)
        last = int(os.environ["PRIMUS_PROFILE_LAST_STEP"])
        if int(step) == 1 and not _window:
            _window["start"] = time.perf_counter()
            _profile.enable()
        elif int(step) == last and "start" in _window and "seconds" not in _window:
            _profile.disable()
            _window["seconds"] = time.perf_counter() - _window["start"]
            out_dir = os.environ["PRIMUS_PROFILE_OUT"]
            _profile.dump_stats(os.path.join(out_dir, "loop.prof"))
            with open(os.path.join(out_dir, "loop.json"), "w") as f:
                json.dump({"seconds": _window["seconds"], "steps": last - 1, "packages": _packages()}, f)
        return out

    _metrics.MetricsWriter.train_step = train_step
'''

OTHER_PACKAGES = ("loguru", "pydantic", "pydantic_core", "yaml")  # libraries Primus's own work uses
FRAMEWORK_BUILTIN = re.compile(r"torch|jax|xla|numpy|megatron|transformers|safetensors|_C\.")


def classify(func: tuple[str, int, str], primus_dirs: list[str], stdlib: str) -> str:
    """'primus', 'other' (stdlib and the small libraries Primus uses) or 'framework'."""
    path, _, name = func
    if path == "~":  # a C function: a framework's kernel or method, or a builtin of Python's
        return "framework" if FRAMEWORK_BUILTIN.search(name) else "other"
    if any(path.startswith(d + os.sep) for d in primus_dirs):
        return "primus"
    if path.startswith(stdlib + os.sep) and "site-packages" not in path:
        return "other"
    if any(f"{os.sep}{pkg}{os.sep}" in path for pkg in OTHER_PACKAGES):
        return "other"
    return "framework"


def attribute(stats: pstats.Stats, primus_dirs: list[str]) -> tuple[float, dict[str, float]]:
    """Seconds of Primus's own work and its split by Primus function (self time plus the non-framework
    calls it makes)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    kinds = {func: classify(func, primus_dirs, stdlib) for func in stats.stats}
    per_function: dict[str, float] = {}
    for func, (_, _, self_time, _, callers) in stats.stats.items():
        label = lambda f: f"{Path(f[0]).parent.name}/{Path(f[0]).name}:{f[1]}({f[2]})"  # noqa: E731
        if kinds[func] == "primus":
            per_function[label(func)] = per_function.get(label(func), 0.0) + self_time
        elif kinds[func] == "other":
            # a Python function of the standard library counts whole; a C builtin by its own time only,
            # since next(), map() or a sort key call back into whatever they were given
            whole = func[0] != "~"
            for caller, edge in callers.items():
                if kinds.get(caller) == "primus":
                    per_function[label(caller)] = per_function.get(label(caller), 0.0) + edge[3 if whole else 2]
    return sum(per_function.values()), per_function


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the backend's environment")
    parser.add_argument("--save", type=Path, help="keep the profile here (read it with python -m pstats)")
    args, overrides = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="primus-profile-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "TOKENIZERS_PARALLELISM": "false", "PRIMUS_PROFILE_OUT": tmp, "PRIMUS_PROFILE_LAST_STEP": str(args.steps),
               "PRIMUS_WORKSPACE": str(tmp_path / "ws"),
               "PYTHONPATH": os.pathsep.join(p for p in (tmp, os.environ.get("PYTHONPATH")) if p)}
        argv = [args.python, "-m", "primus", "run", str(args.experiment.resolve()), f"train.steps={args.steps}",
                "train.log_interval=1", *overrides]
        result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0 or not (tmp_path / "loop.json").exists():
            sys.exit(f"{' '.join(argv)} exited {result.returncode} without a profile:\n{result.stderr[-4000:]}")
        window = json.loads((tmp_path / "loop.json").read_text())
        stats = pstats.Stats(str(tmp_path / "loop.prof"))
        if args.save:
            args.save.write_bytes((tmp_path / "loop.prof").read_bytes())
    primus_s, per_function = attribute(stats, window["packages"])
    steps, seconds = window["steps"], window["seconds"]
    print(f"{args.experiment.name}: steps 2..{args.steps} profiled on rank 0")
    print(f"loop time per step {1000 * seconds / steps:.2f} ms (under cProfile); Primus's own work "
          f"{1000 * primus_s / steps:.3f} ms per step = {100 * primus_s / seconds:.2f}% of the loop (target <= 1%)")
    for name, secs in sorted(per_function.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {1000 * secs / steps:8.3f} ms/step  {name}")


if __name__ == "__main__":
    main()
