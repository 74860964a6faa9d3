"""Pipeline feature patches: upstream Primus's `pp_warmup` and `dump_pp_data`.

`pp_warmup` runs one forward/backward of a real batch before step 1, so the first step does not pay
for lazy initialization on every stage (allocator growth, communicator set-up, kernel selection);
it leaves the weights, gradients and RNG streams exactly as they were, so the loss curve is the same.

`dump_pp_data` times every microbatch's forward and backward on every rank and writes, per rank,
`<run dir>/pp_data/rank-<r>.json` in Chrome's trace format (open the files in Perfetto or
chrome://tracing: one process per pipeline stage, one row per rank), with the step and microbatch of
each event. Clocks are wall-clock microseconds, comparable across the ranks of one node; on a GPU they
come from device events (the kernels' run time, not their launch time).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loguru import logger

from primus.patches.registry import Patch, PatchContext, Undo, replace_attr
from primus_megatron import FRAMEWORK_RANGE

SCHEDULES = "megatron.core.pipeline_parallel.schedules"


# --------------------------------------------------------------------------- pp_warmup


def _rng_snapshot() -> tuple[Any, Any, Any]:
    import torch
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, {k: v.clone() for k, v in tracker.get_states().items()}


def _rng_restore(snapshot: tuple[Any, Any, Any]) -> None:
    import torch
    from megatron.core import tensor_parallel

    cpu, cuda, tracked = snapshot
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    tensor_parallel.get_cuda_rng_tracker().set_states(tracked)


def _pp_warmup(ctx: PatchContext) -> None:
    import torch

    loop = ctx.state["loop"]
    started = time.perf_counter()
    rng = _rng_snapshot()
    loop._forward_backward(loop.train_data, 0, forward_only=False)
    for chunk in loop.model:
        chunk.zero_grad_buffer()
    loop.optimizer.zero_grad()
    _rng_restore(rng)
    torch.distributed.barrier()
    logger.info(f"pp_warmup: one forward/backward on every stage took {time.perf_counter() - started:.2f} s")


# --------------------------------------------------------------------------- dump_pp_data


class ScheduleRecorder:
    """Collects (kind, step, microbatch, start, end) for every forward and backward of this rank.

    On a GPU the times are device events recorded on the current stream around each call (what the
    kernels took, not how long queueing them took), placed on the wall clock by one event recorded
    after a synchronize at the start; they are read when the dump is written. On CPU, where work
    is done when the call returns, the wall clock itself.
    """

    def __init__(self, loop: Any) -> None:
        import torch

        self.loop = loop
        self.events: list[dict[str, Any]] = []
        self.seen: Counter[tuple[str, int]] = Counter()
        self.pending: list[tuple[dict[str, Any], Any, Any]] = []  # (event, start, end) device events
        self.origin: Any = None
        if getattr(loop, "device", None) is not None and loop.device.type == "cuda":
            torch.cuda.synchronize()
            self.origin_us = time.time_ns() // 1000
            self.origin = torch.cuda.Event(enable_timing=True)
            self.origin.record()

    def _mark(self) -> Any:
        import torch

        if self.origin is None:
            return time.time_ns() // 1000
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def resolve(self) -> None:
        """Device events -> wall-clock microseconds (waits for the device)."""
        import torch

        if not self.pending:
            return
        torch.cuda.synchronize()
        for event, start, end in self.pending:
            event["start_us"] = self.origin_us + round(self.origin.elapsed_time(start) * 1000)
            event["end_us"] = self.origin_us + round(self.origin.elapsed_time(end) * 1000)
        self.pending.clear()

    def timed(self, kind: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            import torch

            phase = kind if torch.is_grad_enabled() or kind == "backward" else "eval-forward"
            step = self.loop.step
            microbatch = self.seen[(phase, step)]
            self.seen[(phase, step)] += 1
            start = self._mark()
            try:
                return fn(*args, **kwargs)
            finally:
                end = self._mark()
                event = {"kind": phase, "step": step, "microbatch": microbatch, "start_us": start, "end_us": end}
                if kwargs.get("vp_stage") is not None:
                    event["model_chunk"] = kwargs["vp_stage"]
                if self.origin is not None:
                    self.pending.append((event, start, end))
                self.events.append(event)

        return wrapper

    def write(self, path: Path, rank: int, pp_rank: int, pp_size: int) -> None:
        try:
            self.resolve()
        except RuntimeError as exc:  # the device failed (the dump is written after a failure too)
            logger.warning(f"dump_pp_data: device times unreadable ({exc}); writing the events already read")
            unread = {id(event) for event, _, _ in self.pending}
            self.events = [e for e in self.events if id(e) not in unread]
        trace: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": pp_rank, "args": {"name": f"pipeline stage {pp_rank}"}},
            {"ph": "M", "name": "thread_name", "pid": pp_rank, "tid": rank, "args": {"name": f"rank {rank}"}},
        ]
        for e in self.events:
            label = {"forward": "F", "backward": "B", "eval-forward": "E"}[e["kind"]]
            trace.append({"ph": "X", "name": f"{label}{e['microbatch']}", "cat": e["kind"], "pid": pp_rank,
                          "tid": rank, "ts": e["start_us"], "dur": max(e["end_us"] - e["start_us"], 1),
                          "args": {k: v for k, v in e.items() if k not in ("start_us", "end_us")}})
        body = {"traceEvents": trace, "displayTimeUnit": "ms",
                "primus": {"rank": rank, "pipeline_rank": pp_rank, "pipeline_size": pp_size, "events": self.events}}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(path)


def _dump_pp_data(ctx: PatchContext) -> Undo:
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import schedules

    recorder = ScheduleRecorder(ctx.state["loop"])
    rank, pp_rank, pp_size = (ctx.state["rank"], mpu.get_pipeline_model_parallel_rank(),
                              mpu.get_pipeline_model_parallel_world_size())
    path = Path(ctx.state["run_dir"]) / "pp_data" / f"rank-{rank}.json"
    undos = [replace_attr(schedules, "forward_step", recorder.timed("forward", schedules.forward_step)),
             replace_attr(schedules, "backward_step", recorder.timed("backward", schedules.backward_step))]

    def undo_and_write() -> None:
        for u in reversed(undos):
            u()
        recorder.write(path, rank, pp_rank, pp_size)  # also after a failure or SIGTERM: what ran is there
        logger.info(f"dump_pp_data: {len(recorder.events)} schedule events written to {path}")

    return undo_and_write


PIPELINE_PATCHES: list[Patch] = [
    # dump first, so a warm-up's microbatches are in the timeline too (as step 0)
    Patch(id="megatron.pipeline.dump_pp_data", backend="megatron", phase="before_train", kind="feature",
          versions=FRAMEWORK_RANGE, target=f"{SCHEDULES}.forward_step", enabled_by="dump_pp_data",
          enabled_by_default=False,
          description="Writes each rank's forward/backward timeline to `<run dir>/pp_data/rank-<r>.json`.",
          notes=f"also wraps `{SCHEDULES}.backward_step`; Chrome trace format (Perfetto)",
          apply=_dump_pp_data, needs=("loop", "run_dir", "rank")),
    Patch(id="megatron.pipeline.pp_warmup", backend="megatron", phase="before_train", kind="feature",
          target="primus_megatron.trainer.PretrainLoop._forward_backward", enabled_by="pp_warmup",
          enabled_by_default=False,
          description="One forward/backward on every stage before step 1, so step 1 does not pay for warm-up.",
          notes="weights, gradients and RNG streams are left as they were: the loss curve is unchanged",
          apply=_pp_warmup, needs=("loop",)),
]
