"""The worker side of the megatron backend: native config -> PretrainLoop, metrics -> core.

Phases (ARCHITECTURE §5): `build_args` patches fix up the native arguments, `setup` patches change
megatron-core before anything is built (the CPU patches), `before_train` patches change the loop.
`evaluate` (`primus eval`) goes through the same first two phases and builds the same model.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

from loguru import logger

from primus.backends.adapter import Adapter
from primus.runs.evaluate import EvalRequest, EvalResult


class MegatronAdapter(Adapter):
    def _prepare(self) -> tuple[SimpleNamespace, Any]:
        """The native args after the build_args and setup patches, and this rank's device."""
        ctx = self.ctx
        ctx.apply_patches("build_args", checkpoint_dir=ctx.checkpoint_dir, run_dir=ctx.run_dir, rank=ctx.rank)
        args = SimpleNamespace(**ctx.native)
        if ctx.platform == "cpu":
            # imported late: torch reads the thread count at import time
            os.environ.setdefault("OMP_NUM_THREADS", "1")
        ctx.apply_patches("setup")

        import torch

        if ctx.platform == "cpu":
            return args, torch.device("cpu")
        torch.cuda.set_device(ctx.local_rank)
        return args, torch.device("cuda", ctx.local_rank)

    def run(self) -> None:
        ctx = self.ctx
        sft = None
        if ctx.module.kind == "posttrain":  # SFT / LoRA (primus_megatron.posttrain): refusals before any import
            from primus_megatron.posttrain.settings import read_settings

            sft = read_settings(ctx.module, ctx.native)
        args, device = self._prepare()

        from primus_megatron.trainer import PretrainLoop

        make_loop: Any = PretrainLoop
        if sft is not None:
            from functools import partial

            from primus_megatron.posttrain.loop import PostTrainLoop

            make_loop = partial(PostTrainLoop, ctx=ctx, sft=sft)
        loop = make_loop(
            args, checkpoint_dir=ctx.checkpoint_dir, device=device,
            on_step=lambda r: ctx.metrics.train_step(r.step, loss=r.loss, lr=r.lr, grad_norm=r.grad_norm,
                                                     tokens=r.tokens, step_time_s=r.step_time_s),
            on_eval=lambda step, loss: ctx.metrics.eval_step(step, loss=loss),
            stop_requested=lambda: ctx.stop_requested,
            on_damaged=ctx.module.module.checkpoint.on_damaged or "fail",
            hf_path=ctx.module.hf_path, model_spec=ctx.module.model, run_dir=ctx.run_dir,
        )
        ctx.state["loop"] = loop
        try:
            loop.setup()
            ctx.apply_patches("before_train", loop=loop)
            loop.train()
            if loop.stopped_early:
                ctx.stop.request("another rank received SIGTERM; all ranks stopped after the same step")
            ctx.apply_patches("after_train", loop=loop)
            if sft is not None and not loop.stopped_early:
                loop.finish()
        finally:
            loop.close()
        logger.info(f"trained {loop.step} steps")

    def evaluate(self, request: EvalRequest) -> EvalResult | None:
        ctx = self.ctx
        args, device = self._prepare()
        from pathlib import Path

        from primus_megatron.evaluate import evaluate

        root = Path(args.save) if args.save else ctx.checkpoint_dir
        return evaluate(args, request, spec=ctx.module.model, hf_path=ctx.module.hf_path, checkpoint_root=root,
                        device=device)
