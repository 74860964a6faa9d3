"""Upstream Primus's example experiments through this Primus: how many resolve and dry-run.

    python bench/upstream_examples.py EXAMPLES_DIR [--backend megatron ...] [--nproc-per-node 8] [--nnodes 1] [-v]

EXAMPLES_DIR is a checkout or export of upstream's `examples/` folder (github AMD-AGI/Primus), e.g.

    git --git-dir=<primus.git> archive HEAD examples | tar -x -C /tmp/upstream
    python bench/upstream_examples.py /tmp/upstream/examples

Every `EXAMPLES_DIR/<backend>/configs/**/*.yaml` of the chosen backends (default: megatron,
torchtitan, maxtext; a backend this interpreter does not have installed is reported as skipped:
maxtext needs the Python 3.12 environment) runs as `primus run FILE --nproc-per-node 8 --dry-run`
(`--nnodes N` added when given),
in-process through `primus.cli.main.main`, in a scratch working directory, with its output captured.

Prints, per backend: files that resolved and dry-ran (`ok`), files refused on purpose in one line
(a model family the backend does not build, a post-training module: `refused`), and the rest
(`failed`), then a tally of the one-line reasons (location and fix stripped, quoted names and
numbers generalized) with up to three examples each; `-v` lists every file with its reason.
A file refused only because its parallel layout needs more processes than the nodes given (upstream
runs Llama 3.1 405B at TP8 x PP8 and Mixtral 8x22B at PP4 x EP8 on several nodes, setting NNODES in
its launch scripts) is run again at 2, 4, 8 and 16 nodes, and counts as ok at the first that fits,
shown as `ok (N nodes)`; `--no-auto-nodes` turns that off.
Exit code 0 whatever the counts: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BACKENDS = ("megatron", "torchtitan", "maxtext")

# the one-line refusals that count as the intended outcome for a file this Primus cannot run
REFUSALS = (
    re.compile(r"model family '[^']+'( \(upstream's [^)]*\))? is not supported by the \S+ backend"),
    re.compile(r"post-training is not installed"),
    # megatron-core's own TransformerConfig refuses the same layout (num_layers % pipeline size != 0
    # with no uneven first/last stage), so upstream's file cannot run as written there either:
    # Llama 3.1 405B's 126 layers at PP 8; Qwen3 235B's 94 at PP 4 relies on
    # pipeline_model_parallel_layout, which this backend does not build yet
    re.compile(r"pipeline \(\d+\) does not divide the model's \d+ layers"),
)


@dataclass
class Outcome:
    file: Path
    status: str  # ok | refused | failed | skipped
    reason: str = ""


def _installed_backends() -> set[str]:
    from primus.backends.discovery import discover

    return set(discover().backends)


def _reason(stderr: str, examples_dir: Path) -> str:
    """The error line of a failed run, without `primus: error:` and its file:line location."""
    lines = [ln for ln in stderr.splitlines() if ln.startswith("primus: error:")]
    if not lines:
        tail = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        return tail[-1] if tail else "(no error line; exit code != 0)"
    text = lines[-1][len("primus: error:"):].strip()
    text = text.replace(str(examples_dir) + os.sep, "")
    return re.sub(r"^\S+\.ya?ml(:\d+)?: ", "", text)


def _template(reason: str) -> str:
    """A reason with the parts that differ between files generalized, for the tally."""
    text = re.sub(r" \((did you mean|known keys|available|looked|use |set |write |the preset|built by|no installed"
                  r"|run a ).*\)$", "", reason)
    text = re.sub(r"^modules\.[^.]+\.", "", text)
    text = re.sub(r" \((upstream's )?[^ ()]+\.yaml\)", "", text)
    text = re.sub(r"'[^']*'", "'…'", text)
    text = re.sub(r"\b\d+(\.\d+)?(e[-+]?\d+)?\b", "N", text)
    return text


def _is_experiment(file: Path) -> bool:
    """Upstream's configs folders also hold other YAML (TransformerEngine precision recipes, ...)."""
    import yaml

    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError:
        return True  # let primus say what is wrong with it
    return isinstance(data, dict) and ("modules" in data or "extends" in data)


def run_one(file: Path, nproc: int, examples_dir: Path, nnodes: int = 1) -> Outcome:
    from primus.cli.main import main

    if not _is_experiment(file):
        return Outcome(file, "skipped", "not an experiment file (no modules:)")
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["run", str(file), "--nproc-per-node", str(nproc), "--nnodes", str(nnodes), "--dry-run"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    except Exception as exc:  # a traceback is a bug: tallied with its type
        return Outcome(file, "failed", f"crash: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if code == 0:
        return Outcome(file, "ok")
    reason = _reason(err.getvalue(), examples_dir)
    status = "refused" if any(p.search(reason) for p in REFUSALS) else "failed"
    return Outcome(file, status, reason)


# the one-line refusals of a layout that needs a bigger job, not a different file
NEEDS_MORE_PROCESSES = re.compile(r"does not divide the world size|does not divide data x context parallel")
NODE_COUNTS = (2, 4, 8, 16)


def run_fitting(file: Path, nproc: int, examples_dir: Path, nnodes: int, auto_nodes: bool) -> Outcome:
    """`run_one`, and for a layout bigger than the job, again on more nodes (module docstring)."""
    outcome = run_one(file, nproc, examples_dir, nnodes)
    if not auto_nodes or outcome.status != "failed" or not NEEDS_MORE_PROCESSES.search(outcome.reason):
        return outcome
    for more in (n for n in NODE_COUNTS if n > nnodes):
        retry = run_one(file, nproc, examples_dir, more)
        if retry.status == "ok":
            return Outcome(file, "ok", f"{more} nodes")
        if not NEEDS_MORE_PROCESSES.search(retry.reason):
            return retry
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("examples_dir", type=Path, help="upstream's examples/ folder")
    parser.add_argument("--backend", action="append", help="repeatable; default: " + ", ".join(DEFAULT_BACKENDS))
    parser.add_argument("--nproc-per-node", type=int, default=8)
    parser.add_argument("--nnodes", type=int, default=1, help="upstream runs its largest layouts on several nodes")
    parser.add_argument("--no-auto-nodes", dest="auto_nodes", action="store_false",
                        help="do not retry a layout bigger than the job on more nodes")
    parser.add_argument("-v", "--verbose", action="store_true", help="every file with its outcome")
    args = parser.parse_args()
    examples_dir = args.examples_dir.resolve()
    if not examples_dir.is_dir():
        parser.error(f"{examples_dir} is not a folder")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    installed = _installed_backends()
    totals: dict[str, Counter[str]] = {}
    outcomes: dict[str, list[Outcome]] = {}
    started = time.perf_counter()
    home = Path.cwd()
    with tempfile.TemporaryDirectory(prefix="primus-upstream-") as scratch:
        os.chdir(scratch)  # upstream's `workspace: ./output` lands nowhere near the repository
        try:
            for backend in args.backend or DEFAULT_BACKENDS:
                files = sorted((examples_dir / backend / "configs").rglob("*.yaml"))
                if backend not in installed:
                    print(f"{backend}: skipped ({len(files)} files; the backend is not installed in {sys.executable})")
                    continue
                outcomes[backend] = [run_fitting(f, args.nproc_per_node, examples_dir, args.nnodes, args.auto_nodes)
                                     for f in files]
                totals[backend] = Counter(o.status for o in outcomes[backend])
        finally:
            os.chdir(home)

    for backend, results in outcomes.items():
        c = totals[backend]
        n = len(results) - c["skipped"]
        share = 100.0 * c["ok"] / n if n else 0.0
        settled = 100.0 * (c["ok"] + c["refused"]) / n if n else 0.0
        more_nodes = sum(1 for o in results if o.status == "ok" and o.reason)
        print(f"\n== {backend}: {c['ok']} of {n} ok ({share:.1f}%; {more_nodes} of them on more nodes), "
              f"{c['refused']} refused ({settled:.1f}% ok or refused), {c['failed']} failed"
              + (f"; {c['skipped']} skipped (not experiment files)" if c["skipped"] else ""))
        by_template: dict[str, list[Outcome]] = defaultdict(list)
        for o in results:
            if o.status not in ("ok", "skipped"):
                by_template[f"[{o.status}] {_template(o.reason)}"].append(o)
        for template, items in sorted(by_template.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            print(f"  {len(items):4d}  {template}")
            for example in sorted({o.reason for o in items})[:3]:
                print(f"          e.g. {example[:200]}")
        if args.verbose:
            for o in results:
                print(f"  {o.status:8s} {o.file.relative_to(examples_dir)}" + (f"  {o.reason}" if o.reason else ""))
    print(f"\n{sum(len(r) for r in outcomes.values())} files in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
