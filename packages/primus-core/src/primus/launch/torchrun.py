"""`python -m primus.launch.torchrun ARGS`: torchrun, with Primus's exit-code contract (issue 15).

Plain torchrun turns a SIGTERM (preemption, `scancel`, `kill`) into an exception in its agent:
it kills the workers, prints a long traceback and exits 1, so a job that stopped gracefully with a
checkpoint looks like a crash. Here the agent forwards SIGTERM and SIGINT to its workers instead,
the workers stop at the next step boundary with a checkpoint and exit 0 (they tell the truth in
their status.json), and this entry then exits 143 after SIGTERM, 130 after Ctrl-C, as a single
process does. Everything else is torchrun's own behaviour and arguments.

Torch is imported by name at run time only: this module runs only where a torch backend launched
it, and primus-core itself never depends on torch.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from pathlib import Path

from primus.runs.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED

LAUNCHER_ENV = "PRIMUS_LAUNCHER"  # set to "torchrun" for the workers: a graceful stop exits 0
_received: list[int] = []


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (the agent's workers), from /proc."""
    out = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat_file.parent.name))
    return out


def _forward_to_workers(signum: int, frame: object) -> None:
    """The agent's handler: pass the signal on to its workers, once; they stop after a checkpoint."""
    if signum in _received:
        return
    _received.append(signum)
    for child in _children(os.getpid()):
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass


def _rank_statuses(run_dir: Path | None, since: float) -> list[dict]:
    """The status.json of each rank of this launch (older files belong to earlier attempts), by rank."""
    if run_dir is None:
        return []
    statuses = []
    for status in run_dir.glob("logs/*/rank-*/status.json"):
        try:
            if status.stat().st_mtime < since:
                continue
            data = json.loads(status.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            statuses.append(data)
    return sorted(statuses, key=lambda d: d.get("rank") if isinstance(d.get("rank"), int) else 1 << 30)


def _stopped_ranks(run_dir: Path | None, since: float) -> set[str]:
    """The states the ranks of this launch wrote."""
    return {d.get("state") for d in _rank_statuses(run_dir, since)}


def _config_error(run_dir: Path | None, since: float) -> str | None:
    """The configuration error the lowest rank that found one wrote, for the one line the user sees."""
    for data in _rank_statuses(run_dir, since):
        if data.get("state") == "config-error":
            return str(data.get("error") or "a rank stopped on a configuration error; its log file says which")
    return None


def _run_dir_of(argv: list[str]) -> Path | None:
    """The worker command is `-m primus.runs.worker RUN_DIR MODULE` at the end of torchrun's args."""
    for i, arg in enumerate(argv[:-2]):
        if arg == "-m" and argv[i + 1].startswith("primus."):
            return Path(argv[i + 2])
    return None


NEW_RUN_DIR_ENV = "PRIMUS_NEW_RUN_DIR"  # set by `primus run` when this command created the run dir


def _remove_new_run_dir(run_dir: Path | None) -> None:
    """Exit 2 promises nothing on disk: a run directory this command created goes again."""
    import shutil

    if run_dir is not None and os.environ.get(NEW_RUN_DIR_ENV) == str(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)


def _arg(args: list[str], name: str) -> str:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else "?"


def main(argv: list[str] | None = None) -> int:
    import time

    started = time.time()
    args = list(sys.argv[1:] if argv is None else argv)
    elastic_api = importlib.import_module("torch.distributed.elastic.multiprocessing.api")
    elastic_api._terminate_process_handler = _forward_to_workers  # the agent installs it by name
    run = importlib.import_module("torch.distributed.run")
    code = 0
    try:
        run.main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # ChildFailedError and friends: torchrun's own report is in the log
        if type(exc).__name__ == "RendezvousTimeoutError":
            print(f"primus: error: the nodes did not all join the rendezvous ({_arg(args, '--rdzv-id')} at "
                  f"{_arg(args, '--rdzv-endpoint')}) within {_arg(args, '--rdzv-conf')}: start every node with "
                  "the same experiment, exp_name, --nnodes and --master-addr/--master-port; nodes whose "
                  "model or training settings differ never meet, since the id carries their fingerprint "
                  "(PRIMUS_RDZV_TIMEOUT sets the wait)", file=sys.stderr)
            return 1
        error = None if _received else _config_error(_run_dir_of(args), started)
        if error is not None:
            print(f"primus: error: {error}", file=sys.stderr)  # one line; no launcher traceback
            _remove_new_run_dir(_run_dir_of(args))
            return 2
        if not _received:
            raise  # a rank failed: torchrun's own report names it and its error file
        print(f"primus: error: stopping on {signal.Signals(_received[0]).name}, a rank failed on the way out "
              f"({type(exc).__name__}); the ranks' log files say which", file=sys.stderr)
        code = 1
    states = _stopped_ranks(_run_dir_of(args), started)
    if code == 0 and (signal.SIGINT in _received or "interrupted" in states):
        return EXIT_INTERRUPTED
    if code == 0 and (signal.SIGTERM in _received or "preempted" in states):
        return EXIT_PREEMPTED
    run_dir = _run_dir_of(args)
    if code == 0 and run_dir is not None and _arg(args, "--node-rank") in ("0", "?") and _is_training(args):
        from primus.runs.worker import export_when_asked

        return export_when_asked(run_dir, _module_of(args))  # every rank has finished
    return code


def _module_of(argv: list[str]) -> str:
    """MODULE of the worker command `-m primus.runs.worker RUN_DIR MODULE`."""
    i = argv.index("primus.runs.worker")
    return argv[i + 2]


def _is_training(args: list[str]) -> bool:
    return "primus.runs.worker" in args


if __name__ == "__main__":
    sys.exit(main())
