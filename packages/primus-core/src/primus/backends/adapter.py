"""The heavy half of a backend: what runs in each worker process.

Core builds a `RunContext` and calls `Adapter.run()`. The adapter translates the resolved config
into the framework's objects, calls `ctx.apply_patches(phase)` at each phase, trains, and reports
every logged step through `ctx.metrics`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from primus.config.resolve import ResolvedModule
from primus.patches.registry import PatchContext, PatchSet, Phase
from primus.runs.evaluate import EvalRequest, EvalResult
from primus.runs.metrics import MetricsWriter
from primus.runs.signals import StopFlag


@dataclass
class RunContext:
    module: ResolvedModule
    run_dir: Path
    platform: str
    arch: str | None
    rank: int
    local_rank: int
    world_size: int
    patches: PatchSet
    patch_context: PatchContext
    metrics: MetricsWriter
    state: dict[str, Any] = field(default_factory=dict)
    stop: StopFlag = field(default_factory=StopFlag)

    @property
    def stop_requested(self) -> bool:
        """True once SIGTERM arrived: finish the step, save a checkpoint, return from `run`."""
        return self.stop.requested

    @property
    def native(self) -> dict[str, Any]:
        return self.module.native

    @property
    def checkpoint_dir(self) -> Path:
        configured = self.module.module.checkpoint.dir
        return Path(configured).expanduser().resolve() if configured else self.run_dir / "checkpoints"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or "LOCAL_RANK" in os.environ

    def apply_patches(self, phase: Phase, **state: Any) -> list[str]:
        """Apply `phase`'s patches; `state` (model, args, trainer, ...) is visible to them.

        Phases come in the order of `primus.patches.registry.PHASES`, each once (core applies
        `before_import` before the adapter is imported). State passed at one phase stays visible at
        the later ones; a patch that applies and names a key in `Patch.needs` that was never
        passed fails with its id, the phase and the key (docs/patches-and-env.md lists what each
        backend passes where).
        """
        self.patch_context.state.update(state)
        return self.patches.apply_phase(phase, self.patch_context)


class Adapter:
    """Subclass per backend; `run` trains and returns normally or raises."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def run(self) -> None:
        raise NotImplementedError

    def evaluate(self, request: EvalRequest) -> EvalResult | None:
        """`primus eval`: the summed token loss of the model (its init, or `request.checkpoint`) on
        `primus.runs.evaluate.blocks_for(request, ...)`; rank 0 returns it, other ranks None."""
        raise NotImplementedError
