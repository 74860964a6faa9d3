"""The worker entry: one per training process (ARCHITECTURE §4.7).

`primus run` calls `run_worker` in-process for a single process, or execs torchrun with
`python -m primus.runs.worker RUN_DIR MODULE`; each worker reads the resolved config back from the
run directory, sets up logging, applies patches by phase and hands over to the backend's adapter.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from primus.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ConfigError
from primus.runs.signals import EXIT_INTERRUPTED

if TYPE_CHECKING:
    from primus.backends.adapter import RunContext


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _os_cause(exc: OSError) -> str:
    """One line naming what the machine refused, and where."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    hint = {errno.ENOSPC: "free space on that filesystem, then resume",
            errno.EDQUOT: "free quota on that filesystem, then resume",
            errno.EROFS: "choose a writable workspace or checkpoint.dir",
            errno.EACCES: "fix the permissions or choose another workspace",
            errno.EPERM: "fix the permissions or choose another workspace"}.get(exc.errno or 0)
    return f"{exc.strerror or exc}{where}" + (f"; {hint}" if hint else "")


def _status_best_effort(metrics, state: str, **extra) -> None:
    """The status file may be on the full or read-only disk that caused the failure."""
    try:
        metrics.set_status(state, **extra)
    except OSError:
        pass


def _throughput(resolved, backend, world_size: int):
    """TFLOP/s and MFU for the metrics (primus.runs.flops), when the model is a ModelSpec."""
    from primus.config.rules import resolved_dimension
    from primus.runs.flops import ThroughputModel, device_name, flops_per_token, peak_tflops

    if resolved.model is None:
        return None
    seq_length = resolved_dimension(resolved, backend.spec.load_translator(), "seq_length")
    if not isinstance(seq_length, int) or seq_length <= 0:
        return None
    name = device_name()
    peak = peak_tflops(name)
    if name and peak is None:
        logger.info(f"no peak TFLOP/s known for {name}: MFU is not reported (set PRIMUS_PEAK_TFLOPS)")
    return ThroughputModel(flops_per_token(resolved.model, seq_length), world_size, peak)


def worker_context(record_dir: Path, run_dir: Path, module_name: str, *, evaluating: bool = False):
    """(RunContext, backend, platform) of this process, from the resolved config recorded in
    `record_dir` (the run directory, or an evaluation's folder inside it): rank and world from the
    launcher's environment, logging, the backend's patches and the metrics writer."""
    from primus.backends.adapter import RunContext
    from primus.backends.discovery import discover
    from primus.patches.registry import PatchContext, PatchSet
    from primus.platform.detect import detect_platform
    from primus.runs.logs import setup_logging
    from primus.runs.metrics import MetricsWriter
    from primus.runs.rundir import read_module

    resolved, data = read_module(record_dir, module_name)
    # torchrun sets RANK/WORLD_SIZE; a per-host (JAX) launch sets PRIMUS_PROCESS_ID/PRIMUS_NUM_PROCESSES
    rank = _int_env("RANK", _int_env("PRIMUS_PROCESS_ID", 0))
    world_size = _int_env("WORLD_SIZE", _int_env("PRIMUS_NUM_PROCESSES", 1))
    native = resolved.native
    setup_logging(run_dir=record_dir, module=module_name, rank=rank,
                  stderr_level=native.get("stderr_sink_level") or "INFO",
                  file_level=native.get("file_sink_level") or "DEBUG",
                  sink_level=native.get("sink_level"))
    platform = detect_platform()
    backend = discover().get(resolved.framework)
    patches = PatchSet(backend.spec.load_patches())
    pctx = PatchContext(backend=backend.name, platform=platform.kind, arch=platform.arch,
                        framework_version=backend.framework_version, config=native, world_size=world_size)
    metrics = MetricsWriter(record_dir / "metrics.jsonl", total_steps=0 if evaluating else resolved.total_steps,
                            rank=rank, module=module_name, attempt=int(data.get("attempt") or 1),
                            throughput=None if evaluating else _throughput(resolved, backend, world_size),
                            status_path=record_dir / "logs" / module_name / f"rank-{rank}" / "status.json")
    ctx = RunContext(module=resolved, run_dir=run_dir, platform=platform.kind, arch=platform.arch, rank=rank,
                     local_rank=_int_env("LOCAL_RANK", 0), world_size=world_size, patches=patches,
                     patch_context=pctx, metrics=metrics)
    return ctx, backend, platform


def run_worker(run_dir: Path, module_name: str) -> int:
    run_dir = run_dir.resolve()
    ctx, backend, platform = worker_context(run_dir, run_dir, module_name)
    metrics, patches, rank, world_size = ctx.metrics, ctx.patches, ctx.rank, ctx.world_size
    total = ctx.module.total_steps
    if backend.spec.graceful_stop:
        ctx.stop.install()
    metrics.set_status("running")
    try:
        ctx.apply_patches("before_import")
        adapter_cls = backend.spec.load_adapter_class()
        logger.info(f"training {module_name} with {backend.name} ({backend.spec.framework} "
                    f"{backend.framework_version}) on {platform.describe()}, rank {rank}/{world_size}")
        adapter_cls(ctx).run()
    except ConfigError as exc:
        metrics.set_status("config-error", error=str(exc))
        logger.bind(file_only=True).error(f"configuration error: {exc}")
        # one line for the user: under Primus's torchrun entry that entry prints it from status.json,
        # since the agent may kill rank 0 before it prints once another rank has failed first
        if os.environ.get("PRIMUS_LAUNCHER") != "torchrun" and (rank == 0 or world_size == 1):
            print(f"primus: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # a second Ctrl-C, or a backend that cannot stop between steps
        metrics.set_status("interrupted")
        logger.error("interrupted at once: no checkpoint was written for the steps since the last one")
        return EXIT_INTERRUPTED
    except OSError as exc:  # the machine, not the code: disk full, read-only, permission
        cause = _os_cause(exc)
        _status_best_effort(metrics, "failed", error=cause)
        logger.bind(file_only=True).opt(exception=exc).error(f"training failed on rank {rank}: {cause}")
        print(f"primus: error: training failed on rank {rank}: {cause}", file=sys.stderr)
        return EXIT_FAILURE
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # a failure in training (some framework errors are BaseExceptions): exit 1
        _status_best_effort(metrics, "failed", error=f"{type(exc).__name__}: {exc}")
        logger.error(f"training failed on rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        return EXIT_FAILURE
    finally:
        patches.undo_all()
    if rank == 0:
        _record_checkpoints(ctx, module_name)
    if ctx.stop_requested and (metrics.last_step is None or metrics.last_step < total):
        # the checkpoint is written and the process is leaving: a further SIGTERM (Slurm and
        # torchrun may both send one) must not turn exit 143 into death by signal during shutdown,
        # when Python puts its own handlers back to the default
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stopped_by_sigint = ctx.stop.signum == signal.SIGINT
        metrics.set_status("interrupted" if stopped_by_sigint else "preempted")
        logger.warning(f"{module_name} stopped by {ctx.stop.reason} at step {metrics.last_step} after a checkpoint; "
                       "run the same command again to resume")
        if os.environ.get("PRIMUS_LAUNCHER") == "torchrun":
            # torchrun would count a non-zero worker as a crash (and restart it); Primus's torchrun
            # entry turns the stop into 143/130 from the status files
            return EXIT_OK
        return ctx.stop.exit_code
    metrics.set_status("done")
    if world_size == 1 and os.environ.get("PRIMUS_LAUNCHER") != "torchrun":
        code = export_when_asked(run_dir, module_name)  # under torchrun, Primus's torchrun entry does it
        if code != EXIT_OK:
            return code
    if rank == 0:
        logger.info(metrics.summary_line(checkpoints=ctx.checkpoint_dir, run_dir=run_dir))
    return EXIT_OK


def _record_checkpoints(ctx: RunContext, module_name: str) -> None:
    from primus.runs.resume import record_checkpoints

    try:
        record_checkpoints(ctx.run_dir, module_name, ctx.checkpoint_dir, ctx.metrics.attempt)
    except OSError as exc:  # bookkeeping only: the checkpoints themselves are complete
        logger.warning(f"could not record this attempt's checkpoints in {ctx.run_dir}: {_os_cause(exc)}")


def export_when_asked(run_dir: Path, module_name: str) -> int:
    """`checkpoint.export: hf` once the job's processes are done; a failure is one line, exit 1 (the
    training itself finished: its checkpoints stay, and `primus export` can be run by hand)."""
    from primus.runs.export import export_after_run

    try:
        export_after_run(run_dir, module_name)
    except (ConfigError, OSError) as exc:
        text = exc if isinstance(exc, ConfigError) else _os_cause(exc)
        print(f"primus: error: training finished, but checkpoint.export failed: {text}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m primus.runs.worker RUN_DIR MODULE", file=sys.stderr)
        return EXIT_USAGE
    return run_worker(Path(args[0]), args[1])


if __name__ == "__main__":
    sys.exit(main())
