"""The heavy half of the tinytorch backend: one training process.

Core's worker builds a `RunContext` (the resolved config, run directory, rank, metrics writer, stop
flag, patches), applies the `before_import` patches, imports this module and calls `run()`. The
adapter's duties, all visible below:

- apply the patch phases in order: build_args -> setup -> before_train -> after_train, passing the
  run state later patches may read (`ctx.apply_patches(phase, key=value)`);
- report every logged step with `ctx.metrics.train_step(...)` (rank 0 writes metrics.jsonl);
- poll `ctx.stop_requested` between steps; on SIGTERM finish the step, checkpoint, return
  (the worker then exits 143);
- write checkpoints under `ctx.checkpoint_dir`, atomically, and continue from the newest one when
  `resume: auto`, so a resumed run reaches the losses of one never stopped;
- raise ConfigError for a mistake in the user's input (exit 2), anything else for a failure (exit 1).

Order: settings -> process group and device -> model, optimizer, schedule -> resume -> train.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from loguru import logger
from torch.nn.parallel import DistributedDataParallel

from primus.backends.adapter import Adapter
from primus.errors import ConfigError
from primus_tinytorch.model import ModelArgs, TinyDecoder

MOCK_SUCCESSORS = 4  # likely next tokens per token: the loss can fall towards ln(4) = 1.39


@dataclass(frozen=True)
class Settings:
    """The native keys the loop reads, typed once (presets/pre_trainer.yaml has their defaults)."""

    steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    lr_schedule: str
    micro_batch_size: int
    global_batch_size: int
    grad_accum_steps: int  # derived by the translator from the batch sizes
    seq_length: int
    seed: int
    weight_decay: float
    grad_clip: float
    log_interval: int
    save_interval: int  # 0: checkpoints only at the end and when stopped
    keep_last: int
    resume: str

    @classmethod
    def from_native(cls, n: dict[str, Any]) -> Settings:
        return cls(steps=int(n["steps"]), lr=float(n["lr"]), min_lr=float(n["min_lr"]),
                   warmup_steps=int(n["warmup_steps"]), lr_schedule=n["lr_schedule"],
                   micro_batch_size=int(n["micro_batch_size"]), global_batch_size=int(n["global_batch_size"]),
                   grad_accum_steps=int(n["grad_accum_steps"]), seq_length=int(n["seq_length"]),
                   seed=int(n["seed"]), weight_decay=float(n["weight_decay"]), grad_clip=float(n["grad_clip"]),
                   log_interval=int(n["log_interval"]), save_interval=int(n["save_interval"]),
                   keep_last=int(n["keep_last"]), resume=n["resume"])

    def lr_factor(self, index: int) -> float:
        """Multiplier of `lr` at optimizer step `index` (0-based): linear warmup, then the decay."""
        if index < self.warmup_steps:
            return (index + 1) / self.warmup_steps
        progress = (index - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        floor = self.min_lr / self.lr
        if self.lr_schedule == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        if self.lr_schedule == "linear":
            return floor + (1 - floor) * (1 - progress)
        return 1.0


class MockTokens:
    """Seeded, learnable synthetic tokens: a Markov chain where each token has a few likely successors.

    A batch is a pure function of (seed, step, micro step, rank), so a resumed run reads exactly what
    the stopped one would have read, with no sampler state to save.
    """

    def __init__(self, vocab_size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(vocab_size, (vocab_size, MOCK_SUCCESSORS), generator=generator)
        self.vocab_size, self.seed = vocab_size, seed

    def batch(self, step: int, micro: int, rank: int, size: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        mixed = ((self.seed * 1_000_003 + step) * 1_000_003 + micro) * 1_000_003 + rank
        generator = torch.Generator().manual_seed(mixed % 2**63)
        token = torch.randint(self.vocab_size, (size,), generator=generator)
        choices = torch.randint(MOCK_SUCCESSORS, (size, seq), generator=generator)
        chain = [token]
        for t in range(seq):
            chain.append(self.successors[chain[-1], choices[:, t]])
        tokens = torch.stack(chain, dim=1)  # [size, seq + 1]
        return tokens[:, :-1], tokens[:, 1:]


class TinyTorchAdapter(Adapter):
    def run(self) -> None:
        ctx = self.ctx
        s = Settings.from_native(ctx.native)
        ctx.apply_patches("build_args", settings=s)
        device = self._start_process_group()
        try:
            ctx.apply_patches("setup", device=device)
            torch.manual_seed(s.seed)  # the same initial weights on every rank (DDP broadcasts them too)
            model = TinyDecoder(ModelArgs.from_native(ctx.native)).to(device)
            optimizer = self._optimizer(model, s)
            # a plain function: LambdaLR's state_dict records None for it (a callable object or bound
            # method would have its __dict__ saved and restored)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda index: s.lr_factor(index))
            start = self.resume(model, optimizer, scheduler, s, device)
            # DDP all-reduces gradients during backward; `model` stays the unwrapped module (saved, loaded)
            train_model = DistributedDataParallel(model) if dist.is_initialized() else model
            ctx.apply_patches("before_train", model=model, optimizer=optimizer)
            if self.train(model, train_model, optimizer, scheduler, s, start, device):
                ctx.apply_patches("after_train")
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    # ------------------------------------------------------------------ setup

    def _start_process_group(self) -> torch.device:
        """Under torchrun (`--nproc-per-node N`) each process joins the group; alone, none is needed."""
        cuda = torch.cuda.is_available()  # ROCm torch reports its GPUs here too
        device = torch.device("cuda", self.ctx.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if self.ctx.distributed and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")  # torchrun's env:// rendezvous
        return device

    @staticmethod
    def _optimizer(model: torch.nn.Module, s: Settings) -> torch.optim.Optimizer:
        """AdamW without weight decay on norm weights (the 1-D parameters), as is usual."""
        params = list(model.parameters())  # a tied head shares the embedding's Parameter: listed once
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95))

    # ------------------------------------------------------------------ the loop

    def train(self, model: torch.nn.Module, train_model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, s: Settings, start: int, device: torch.device) -> bool:
        """Steps start+1..steps; False when stopped by SIGTERM (after a checkpoint)."""
        data = MockTokens(model.args.vocab_size, s.seed)
        tokens_per_step = s.global_batch_size * s.seq_length  # the whole job's, as train_step expects
        logger.info(f"tinytorch: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}, "
                    f"steps {start + 1}..{s.steps}, global batch {s.global_batch_size} x {s.seq_length} tokens")
        train_model.train()
        for step in range(start + 1, s.steps + 1):
            began = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            for micro in range(s.grad_accum_steps):
                tokens, targets = data.batch(step, micro, self.ctx.rank, s.micro_batch_size, s.seq_length)
                last = micro == s.grad_accum_steps - 1
                # DDP would all-reduce on every backward; only the last micro step's is needed
                with nullcontext() if last or train_model is model else train_model.no_sync():
                    loss = train_model(tokens.to(device), targets.to(device)) / s.grad_accum_steps
                    loss.backward()
                loss_sum += loss.detach()
            # clip_grad_norm_ returns the norm before clipping; an infinite limit only measures it
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip or math.inf)
            lr = scheduler.get_last_lr()[0]  # the lr this step used
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            if step % s.log_interval == 0 or step == s.steps:
                self.ctx.metrics.train_step(step, loss=self._mean_over_ranks(loss_sum), lr=lr,
                                            grad_norm=float(grad_norm), tokens=tokens_per_step,
                                            step_time_s=time.perf_counter() - began)
            stopping = self._stop_requested(device) and step < s.steps
            if stopping or step == s.steps or (s.save_interval and step % s.save_interval == 0):
                self.save(step, model, optimizer, scheduler, s)
            if stopping:
                logger.warning(f"tinytorch: stopped after step {step}; rerun with resume: auto to continue")
                return False
        return True

    def _stop_requested(self, device: torch.device) -> bool:
        """SIGTERM seen by any rank: every rank stops after the same step (and reports preempted)."""
        stop = self.ctx.stop_requested
        if not dist.is_initialized():
            return stop
        flag = torch.tensor([1.0 if stop else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not stop:
            self.ctx.stop.request("another rank received SIGTERM")
        return bool(flag.item())

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        if dist.is_initialized():
            value = value.clone()
            dist.all_reduce(value)
            value /= self.ctx.world_size
        return float(value)

    # ------------------------------------------------------------------ checkpoints

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, s: Settings) -> None:
        """`step-<n>.pt` written under a temporary name, synced, then renamed: a crash leaves either
        the whole file or none. Rank 0 writes (every rank holds the same replica); all ranks wait."""
        if self.ctx.rank == 0:
            directory = self.ctx.checkpoint_dir
            directory.mkdir(parents=True, exist_ok=True)
            final = directory / f"step-{step:08d}.pt"
            tmp = directory / f".tmp-{final.name}"
            state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(),
                     "global_batch_size": s.global_batch_size, "seq_length": s.seq_length}
            with tmp.open("wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            for old in checkpoints(directory)[:-s.keep_last]:
                old.unlink()
            logger.info(f"tinytorch: checkpoint {final}")
        if dist.is_initialized():
            dist.barrier()

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, s: Settings, device: torch.device) -> int:
        """The step to continue after: the newest checkpoint's with `resume: auto`, else 0.

        Nothing random happens after the model is built (the data is a function of the step), so
        weights, optimizer and schedule are the whole state."""
        found = checkpoints(self.ctx.checkpoint_dir) if s.resume == "auto" else []
        if not found:
            return 0
        state = torch.load(found[-1], map_location=device, weights_only=True)  # tensors and plain data only
        if (state["global_batch_size"], state["seq_length"]) != (s.global_batch_size, s.seq_length):
            # the user's input contradicts what is on disk: a ConfigError, so the worker exits 2
            raise ConfigError(f"checkpoint {found[-1].name} was written with global batch "
                              f"{state['global_batch_size']} x seq {state['seq_length']}, this run has "
                              f"{s.global_batch_size} x {s.seq_length}", key="checkpoint.resume",
                              fix="keep the batch and sequence length, or give the run a new exp_name")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        logger.info(f"tinytorch: resumed from {found[-1]} at step {state['step']}")
        return int(state["step"])


def checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (temporary files excluded), oldest first."""
    if not directory.is_dir():
        return []
    return sorted(directory.glob("step-*.pt"), key=lambda p: int(p.stem.removeprefix("step-")))
