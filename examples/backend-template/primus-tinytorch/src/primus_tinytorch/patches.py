"""The tinytorch backend's patches: data plus a function, applied by core's registry by phase.

A patch function imports what it changes inside its body (this module is loaded by `primus patches`
and the docs generator, which must not import torch) and returns its undo; core undoes every
applied patch in reverse order when the run ends, also after a failure.

Phases, in order: before_import (core, before this package's adapter is imported; no run state),
build_args, setup, before_train, after_train. What this adapter passes at each, for `needs`:
build_args: `settings` (adapter.Settings); setup: `device`; before_train: `model`, `optimizer`.
"""

from __future__ import annotations

from primus.patches.registry import Patch, PatchContext, Undo


def _intra_op_threads(ctx: PatchContext) -> Undo:
    """torch.set_num_threads(intra_op_threads), restored afterwards.

    Why a patch and not an env variable: OMP_NUM_THREADS also sizes every other OpenMP pool in the
    process, and a user's shell value wins over env defaults; this key sets torch's intra-op pool only,
    from the experiment, and shows in `primus patches` with the reason it applies or not.
    """
    import torch
    from loguru import logger

    before = torch.get_num_threads()
    threads = int(ctx.config_value("intra_op_threads"))
    torch.set_num_threads(threads)
    logger.info(f"tinytorch.intra_op_threads: torch intra-op threads {before} -> {threads}")

    def undo() -> None:
        torch.set_num_threads(before)

    return undo


PATCHES = [
    Patch(
        id="tinytorch.intra_op_threads",
        backend="tinytorch",
        target="torch.set_num_threads",
        # before any tensor work: core applies before_import before the adapter (which builds the
        # model) is imported. No `needs`: core passes no run state at this phase. A patch at a later
        # phase names the state it reads, e.g. needs=("model",) at before_train.
        phase="before_import",
        kind="feature",
        enabled_by="intra_op_threads",  # 0 (the preset's default) leaves torch's own choice
        enabled_by_default=False,
        description="Sets torch's intra-op thread count from `intra_op_threads`.",
        apply=_intra_op_threads,
    ),
]
