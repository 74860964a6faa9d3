"""The heavy half of the hf backend: one training process.

A plain PyTorch loop around a transformers causal LM, reading TrainingArguments names from the
resolved config. It is written out instead of driving `transformers.Trainer` so that what resume
restores (weights, optimizer, scheduler, RNG, data position = step) is explicit and exact, metrics
come straight from the step, and nothing runs per step that a hand-written loop would not.

Order: settings -> process group and device -> data -> model -> wrap (DDP/FSDP) -> optimizer and
schedule -> resume -> train (log, eval, checkpoint) -> final model.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from loguru import logger

from primus.backends.adapter import Adapter, RunContext
from primus.errors import ConfigError, TrainingError
from primus.runs.evaluate import EvalRequest, EvalResult
from primus_hf.data import SampleOrder, load_blocks, micro_batch

CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"  # written last: a checkpoint directory without it is incomplete
SHARDS = "shards"  # under FSDP: the model and optimizer as torch distributed-checkpoint (DCP) shards


@dataclass(frozen=True)
class LoopSettings:
    """The native keys the loop reads, typed once."""

    max_steps: int
    micro_batch_size: int
    eval_batch_size: int
    accumulation: int
    seq_length: int
    seed: int
    logging_steps: int
    eval_every: int  # 0: no evaluation
    eval_iters: int
    save_every: int  # 0: no periodic checkpoints
    keep_last: int | None
    exit_at_step: int
    max_grad_norm: float
    on_damaged: str  # "fail" or "previous": a newest checkpoint that cannot be loaded

    @classmethod
    def from_native(cls, n: dict[str, Any]) -> LoopSettings:
        micro = int(n["per_device_train_batch_size"])
        return cls(
            max_steps=int(n["max_steps"]),
            micro_batch_size=micro,
            eval_batch_size=int(n.get("per_device_eval_batch_size") or micro),
            accumulation=int(n["gradient_accumulation_steps"]),
            seq_length=int(n["seq_length"]),
            seed=int(n["seed"]),
            logging_steps=max(1, int(n.get("logging_steps") or 1)),
            eval_every=int(n.get("eval_steps") or 0) if n.get("eval_strategy") == "steps" else 0,
            eval_iters=max(1, int(n.get("eval_iters") or 1)),
            save_every=int(n.get("save_steps") or 0) if n.get("save_strategy") == "steps" else 0,
            keep_last=n.get("save_total_limit"),
            exit_at_step=int(n.get("exit_at_step") or 0),
            max_grad_norm=float(n.get("max_grad_norm") or 0.0),
            on_damaged=str(n.get("on_damaged_checkpoint") or "fail"),
        )


class HFAdapter(Adapter):
    def __new__(cls, ctx: RunContext) -> HFAdapter:
        # a post_trainer module (ctx.module.kind == "posttrain") runs this loop on core's SFT rows
        if cls is HFAdapter and getattr(ctx.module, "kind", "pretrain") == "posttrain":
            from primus_hf.posttrain import SFTAdapter

            cls = SFTAdapter
        return super().__new__(cls)

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.settings = LoopSettings.from_native(ctx.native)
        self.rank, self.world_size = ctx.rank, ctx.world_size
        if ctx.native.get("fsdp") and ctx.world_size == 1:
            # one process has nothing to shard, and no process group for FSDP to shard over
            logger.info("parallel.fsdp on one process: nothing to shard, the model stays whole")
            ctx.native["fsdp"] = False
        self.presharded = False  # build_model already applied fully_shard (FSDP loading hf_path slices)
        self.rank0_init: dict[str, torch.Tensor] | None = None  # FSDP: rank 0's random init, sent to every rank

    # ======================================================================= the run

    def _start(self) -> None:
        """What a training run and `primus eval` both begin with: the build_args and setup patch
        phases around the process group, then the seeds."""
        s = self.settings
        self.ctx.apply_patches("build_args", settings=s)
        self.device = self._init_distributed()
        self.ctx.apply_patches("setup", device=self.device)
        torch.manual_seed(s.seed)
        random.seed(s.seed)

    def run(self) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight loading/saving bars would interleave with the progress line
        n, s = self.ctx.native, self.settings
        self._start()
        model = self.build_model()
        self.load_data(model)
        if not n.get("fsdp"):  # FSDP moves each layer to the device as it shards it: never the whole model
            model.to(self.device)
        if n.get("gradient_checkpointing"):
            model.gradient_checkpointing_enable()
        self.model = model  # the unwrapped model: saved, and what the state dicts are keyed by
        self.train_model = self._wrap(model)
        if n.get("torch_compile"):  # train.compile: the wrapped model's forward and backward through inductor
            self.train_model = torch.compile(self.train_model)
        self.optimizer = self._optimizer(model)
        self.scheduler = self._scheduler(self.optimizer)
        self.autocast, self.scaler = self._precision()

        start = 0
        checkpoint = self.resume_point()
        if checkpoint is not None:
            start = self.resume(checkpoint)
        self.ctx.apply_patches("before_train", model=model, optimizer=self.optimizer, adapter=self,
                               metrics=self.ctx.metrics, run_dir=self.ctx.run_dir)
        logger.info(f"training {type(model).__name__} ({_count(model) / 1e6:.2f}M parameters) on {self.device}: "
                    f"steps {start + 1}..{s.max_steps}, global batch {self.global_batch} x {s.seq_length} tokens, "
                    f"{len(self.blocks.train)} train / {len(self.blocks.valid)} held-out blocks")
        finished = self.train(start)
        # every rank logs this to its own file: replicas that drifted apart would show here
        logger.debug(f"parameter checksum {_checksum(model):.12e}")
        if finished:
            self.save_final_model()
        self.ctx.apply_patches("after_train")
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def load_data(self, model: torch.nn.Module) -> None:
        """`self.blocks` (rows indexed by sample) and `self.order` (the read order)."""
        n, s = self.ctx.native, self.settings
        self.blocks = load_blocks(n, getattr(model.config, "vocab_size", None))
        self.shifted = n.get("data_blocks") == "eval"  # rows of seq_length + 1: inputs [:-1], labels [1:]
        self.order = SampleOrder(len(self.blocks.train), s.seed, shuffle=not self.shifted)

    # ======================================================================= primus eval

    @torch.no_grad()
    def evaluate(self, request: EvalRequest) -> EvalResult | None:
        """`primus eval`: the summed token loss of the model on core's evaluation blocks.

        The model is built as training builds it (same seed, same DDP/FSDP layout) and holds its
        init (the hf_path weights, else the seeded random init) or a checkpoint's weights. Block i
        goes to rank i % world; every rank runs the same number of forwards (FSDP gathers in each);
        the loss is summed in float64 and all-reduced."""
        from transformers.utils import logging as hf_logging

        from primus.runs.evaluate import blocks_for, shard

        hf_logging.disable_progress_bar()
        s = self.settings
        self._start()
        checkpoint = self._eval_checkpoint(request.checkpoint)
        model = self.build_model(weights=checkpoint is None or not self.checkpoints_hold_every_weight)
        encode, eos_id, vocab = _eval_tokenizer(Path(request.tokenizer))
        model_vocab = int(model.config.vocab_size)
        if vocab > model_vocab:
            raise ConfigError(f"tokenizer {request.tokenizer} has {vocab} tokens but the model's vocab_size is "
                              f"{model_vocab}", key="data.tokenizer", fix="evaluate with the model's own tokenizer")
        n = self.ctx.native
        if not n.get("fsdp"):  # FSDP moves each layer to the device as it shards it (fully_shard)
            model.to(self.device)
        self.model = model
        self.train_model = self._wrap(model) if n.get("fsdp") else model  # DDP replicas: the model itself
        if n.get("fsdp"):  # no backward follows: the root's parameters (embeddings) are freed after each forward too
            self.train_model.set_reshard_after_forward(True)
        self.autocast, _ = self._precision()
        step = None
        if checkpoint is not None:
            try:
                if (checkpoint / SHARDS).is_dir():
                    self._load_shards(checkpoint, optimizer=False)
                else:
                    state = self._read(checkpoint, "model.pt", _mapped_tensors, here=self._reads_for_all_ranks())
                    self.load_model_state(state, checkpoint)
                    del state
            except DamagedCheckpoint as exc:
                raise ConfigError(f"checkpoint {exc.path} cannot be loaded: {exc.reason}", key="--checkpoint",
                                  fix="evaluate another checkpoint of the run (--checkpoint DIR)") from None
            step = int(json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))["step"])
            logger.info(f"evaluating the weights of {checkpoint} (step {step})")
        blocks = blocks_for(request, encode, eos_id)
        mine = torch.tensor(shard(blocks, self.rank, self.world_size), dtype=torch.long).view(-1, len(blocks[0]))
        batch = max(1, s.eval_batch_size)
        batches = -(-len(mine) // batch)
        if n.get("fsdp") and dist.is_initialized():  # every rank joins every sharded forward
            count = torch.tensor([batches], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            batches = int(count.item())
        self.train_model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        for b in range(batches):
            rows = mine[b * batch:(b + 1) * batch]
            real = len(rows) > 0
            if not real:  # a rank with fewer blocks: a forward whose loss is not counted
                rows = torch.tensor(blocks[0], dtype=torch.long).view(1, -1)
            rows = rows.to(self.device)
            with self.autocast():
                logits = self.train_model(input_ids=rows[:, :-1]).logits
            if real:
                losses = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                           rows[:, 1:].reshape(-1), reduction="none")
                loss_sum += losses.double().sum()
                tokens += losses.numel()
        totals = torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64, device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(totals)
            dist.barrier()
            dist.destroy_process_group()
        logger.info(f"scored {int(totals[1].item())} tokens in {len(blocks)} blocks")
        if self.rank != 0:
            return None
        return EvalResult(loss_sum=float(totals[0].item()), tokens=int(totals[1].item()), step=step)

    def _eval_checkpoint(self, which: str | None) -> Path | None:
        """None (the init), "latest" (the newest complete checkpoint of the run) or a directory."""
        if which is None:
            return None
        if which == "latest":
            found = complete_checkpoints(self.checkpoint_dir)
            if not found:
                raise ConfigError(f"{self.checkpoint_dir} holds no complete checkpoint", key="--checkpoint",
                                  fix="train the run first (with checkpoint.interval), or leave --checkpoint out "
                                      "to evaluate the model's init")
            return found[-1]
        path = Path(which)
        if not (path / STATE_FILE).is_file() or not ((path / "model.pt").is_file() or (path / SHARDS).is_dir()):
            raise ConfigError(f"{path} is not a complete hf checkpoint (no {STATE_FILE}, or neither model.pt nor "
                              f"{SHARDS}/)",
                              key="--checkpoint", fix="pass latest, or a checkpoint-<step> directory of an hf run")
        return path

    @property
    def global_batch(self) -> int:
        s = self.settings
        return s.micro_batch_size * self.world_size * s.accumulation

    # ======================================================================= setup

    def _init_distributed(self) -> torch.device:
        n = self.ctx.native
        use_gpu = torch.cuda.is_available() and not n.get("use_cpu")
        device = torch.device("cuda", self.ctx.local_rank) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(device)
            if n.get("tf32") is not None:
                torch.backends.cuda.matmul.allow_tf32 = bool(n["tf32"])
                torch.backends.cudnn.allow_tf32 = bool(n["tf32"])
        if self.ctx.distributed and not dist.is_initialized():
            backend = n.get("ddp_backend") or ("nccl" if use_gpu else "gloo")
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=int(n.get("ddp_timeout") or 1800)))
        return device

    def build_model(self, weights: bool = True) -> torch.nn.Module:
        """From `hf_path` (weights when the directory has them and `weights`) or from `model_config`."""
        from transformers import AutoConfig, AutoModelForCausalLM

        n = self.ctx.native
        kwargs = {"attn_implementation": n["attn_implementation"]} if n.get("attn_implementation") else {}
        hf_path = n.get("hf_path") or self.ctx.module.hf_path  # native (a hub id) or core's `model: {hf_path}`
        if hf_path:
            path = Path(hf_path)
            has_weights = path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin")))
            if weights and self._slice_loading(path):
                from primus_hf.sharded_load import sharded_from_hf

                logger.info(f"loading {path} under FSDP: each rank reads only its shards")
                model = sharded_from_hf(path, config_kwargs=kwargs, shard=self._fully_shard, device=self.device,
                                        rank=self.rank, world=self.world_size)
                self.presharded = True
                return model
            if weights and (has_weights or not path.is_dir()):
                return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs)
            config = AutoConfig.from_pretrained(str(path))
        else:
            values = dict(n["model_config"])
            config = AutoConfig.for_model(values.pop("model_type"), **values)
        if not (n.get("fsdp") and dist.is_initialized() and self.world_size > 1):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
        # FSDP: only rank 0 holds the random init in host memory; the others build on the meta device
        # and get their shards of rank 0's weights when sharded (_send_rank0_init)
        if self.rank == 0:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
        else:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
        self.rank0_init = model.state_dict() if self.rank == 0 else {}
        rng = [_rng_state()]  # every rank goes on with rank 0's random stream, as if it had built the init too
        dist.broadcast_object_list(rng, src=0)
        _set_rng_state(rng[0])
        return model

    def _slice_loading(self, path: Path) -> bool:
        """FSDP with a local directory of safetensors (core checked their headers): read per-rank slices."""
        return bool(self.ctx.native.get("fsdp")) and self.ctx.module.hf_path is not None \
            and not self.ctx.native.get("hf_path") and path.is_dir() and any(path.glob("*.safetensors"))

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        n = self.ctx.native
        if n.get("fsdp"):
            if self.presharded:
                return model
            model = self._fully_shard(model)
            if self.rank0_init is not None:
                self._send_rank0_init(model)
            return model
        if not dist.is_initialized() or self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        unused = n.get("ddp_find_unused_parameters")
        if unused is None:  # routed experts that got no token in a step have no gradient
            unused = any(k in model.config.to_dict() for k in ("num_local_experts", "num_experts", "n_routed_experts"))
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       find_unused_parameters=bool(unused))

    def _fully_shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dtype = self._half_dtype()
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
        for layer in self._decoder_layers(model):  # one shard group per decoder layer, the usual FSDP granularity
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model

    def _send_rank0_init(self, model: torch.nn.Module) -> None:
        """Each rank's shards of rank 0's init (the other ranks' parameters are on the meta device
        until now), and rank 0's buffers (RoPE's inverse frequencies are in no state dict)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.rank != 0:
            model.to_empty(device=self.device)
        set_model_state_dict(model, self.rank0_init or {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
        self.rank0_init = None

    def _decoder_layers(self, model: torch.nn.Module) -> Any:
        return getattr(getattr(model, "model", model), "layers", [])

    def _half_dtype(self) -> torch.dtype | None:
        n = self.ctx.native
        bf16 = n.get("bf16")
        if bf16 is None:  # precision auto: bf16 on GPUs, fp32 on CPU
            bf16 = self.device.type == "cuda"
        if bf16:
            return torch.bfloat16
        return torch.float16 if n.get("fp16") else None

    def _precision(self) -> tuple[Any, Any]:
        dtype = self._half_dtype()
        if dtype is None or self.ctx.native.get("fsdp"):  # FSDP casts through its MixedPrecisionPolicy
            return nullcontext, None
        scaler = torch.amp.GradScaler(self.device.type) if dtype == torch.float16 else None
        return (lambda: torch.autocast(self.device.type, dtype=dtype)), scaler

    def _optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """AdamW; like transformers' Trainer, no weight decay on biases and norm weights (1-D tensors)."""
        n = self.ctx.native
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": float(n["weight_decay"])},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        fused = n.get("optim") == "adamw_torch_fused" and self.device.type == "cuda"
        return torch.optim.AdamW(groups, lr=float(n["learning_rate"]), betas=(n["adam_beta1"], n["adam_beta2"]),
                                 eps=float(n["adam_epsilon"]), fused=fused or None)

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """transformers' schedules; `min_lr` selects their min-lr variants of cosine and linear decay."""
        from transformers import get_scheduler

        n, s = self.ctx.native, self.settings
        name = n["lr_scheduler_type"]
        kwargs = dict(n.get("lr_scheduler_kwargs") or {})
        warmup = float(n.get("warmup_steps") or 0)
        warmup_steps = math.ceil(warmup * s.max_steps) if 0 < warmup < 1 else int(warmup)  # <1: a ratio
        min_lr = float(n.get("min_lr") or 0.0)
        if min_lr > 0 and name == "cosine":
            name, kwargs = "cosine_with_min_lr", {"min_lr": min_lr, **kwargs}
        elif min_lr > 0 and name == "linear":
            name = "warmup_stable_decay"
            kwargs = {"num_stable_steps": 0, "num_decay_steps": s.max_steps - warmup_steps, "decay_type": "linear",
                      "min_lr_ratio": min_lr / float(n["learning_rate"]), **kwargs}
        return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=s.max_steps,
                             scheduler_specific_kwargs=kwargs or None)

    # ======================================================================= the loop

    def train(self, start: int) -> bool:
        """Steps start+1..max_steps; False when stopped early by exit_at_step."""
        s = self.settings
        tokens_per_step = self.global_batch * s.seq_length
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.train_model.train()
        window_start, window_steps = time.perf_counter(), 0
        loss_sum = torch.zeros((), device=self.device)
        for step in range(start + 1, s.max_steps + 1):
            loss_sum.zero_()
            for micro in range(s.accumulation):
                rows = self.micro_rows(step - 1, micro).to(self.device, non_blocking=True)
                with self._grad_sync(last=micro == s.accumulation - 1), self.autocast():
                    loss = self._loss(rows) / s.accumulation
                    (self.scaler.scale(loss) if self.scaler else loss).backward()
                loss_sum += loss.detach()
            logged = step % s.logging_steps == 0 or step == s.max_steps or step == start + 1
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            grad_norm = None
            if s.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
            elif logged:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))  # measures, clips nothing
            lr = self.scheduler.get_last_lr()[0]
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            window_steps += 1

            if logged:
                loss_value = self._mean_over_ranks(loss_sum)
                now = time.perf_counter()
                self.ctx.metrics.train_step(step, loss=loss_value, lr=lr, grad_norm=_item(grad_norm),
                                            tokens=tokens_per_step, step_time_s=(now - window_start) / window_steps)
            evaluating = bool(s.eval_every) and step % s.eval_every == 0
            if evaluating:
                self.ctx.metrics.eval_step(step, loss=self.held_out_loss())
            stopping = (bool(s.exit_at_step) and step == s.exit_at_step or self._stop_requested(check=logged)) \
                and step < s.max_steps
            saving = (bool(s.save_every) and step % s.save_every == 0 and step < s.max_steps) or stopping
            if saving:
                self.save_checkpoint(step)
            if logged or evaluating or saving:  # step times exclude evaluation and checkpoint writes
                window_start, window_steps = time.perf_counter(), 0
            if stopping:
                why = "SIGTERM" if self.ctx.stop_requested else "exit_at_step"
                logger.warning(f"stopping after step {step} ({why}); resume with checkpoint.resume: auto")
                return False
        # checkpoint.export: hf exports the last checkpoint when the job ends: there must be one of the last step
        export_at_end = getattr(self.ctx.module.module.checkpoint, "export", None) == "hf"
        if start < s.max_steps and (s.save_every and s.max_steps % s.save_every == 0 or export_at_end):
            self.save_checkpoint(s.max_steps)
        return True

    def micro_rows(self, step: int, micro: int) -> torch.Tensor:
        """The rows this rank trains on in micro step `micro` of 0-based `step`."""
        s = self.settings
        return micro_batch(self.blocks.train, self.order, step=step, micro_index=micro, rank=self.rank,
                           world_size=self.world_size, micro_batch_size=s.micro_batch_size,
                           accumulation=s.accumulation)

    def _loss(self, rows: torch.Tensor) -> torch.Tensor:
        """The model's mean token loss on `rows` (transformers' loss, so a MoE aux loss is kept)."""
        if self.shifted:  # labels already shifted: every one of the seq_length targets counts
            targets = rows[:, 1:].contiguous()
            return self.train_model(input_ids=rows[:, :-1], labels=targets, shift_labels=targets).loss
        return self.train_model(input_ids=rows, labels=rows).loss

    def _grad_sync(self, last: bool) -> Any:
        """Skip the gradient all-reduce on all but the last micro step of an accumulation."""
        m = self.train_model
        if last or not dist.is_initialized():
            return nullcontext()
        if hasattr(m, "no_sync"):
            return m.no_sync()
        if hasattr(m, "set_requires_gradient_sync"):  # FSDP2
            m.set_requires_gradient_sync(False)
            return _RestoreGradientSync(m)
        return nullcontext()

    def _stop_requested(self, *, check: bool) -> bool:
        """SIGTERM seen by any rank (core's stop flag): all ranks stop after the same step. Several
        ranks agree through an all-reduce, whose `.item()` waits for the device: asked only on the
        steps that log (`check`: every logging_steps, where the loss is read anyway), so a signalled
        job stops within one log interval and the host runs ahead of the device in between."""
        stop = self.ctx.stop_requested
        if not dist.is_initialized() or self.world_size == 1:
            return stop
        if not check:
            return False
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _mean_over_ranks(self, value: torch.Tensor) -> float:
        value = value.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(value)
            value /= self.world_size
        return float(value)

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """Mean loss over `eval_iters` batches of the held-out blocks (the same ones every pass)."""
        s, valid = self.settings, self.blocks.valid
        if len(valid) == 0:
            return float("nan")
        self.train_model.eval()
        total = torch.zeros((), device=self.device)
        for i in range(s.eval_iters):
            first = (i * self.world_size + self.rank) * s.eval_batch_size
            rows = valid[torch.arange(first, first + s.eval_batch_size) % len(valid)].to(self.device)
            with self.autocast():
                total += self.train_model(input_ids=rows, labels=rows).loss.float()
        self.train_model.train()
        return self._mean_over_ranks(total / s.eval_iters)

    # ======================================================================= checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return self.ctx.checkpoint_dir

    def resume_point(self) -> Path | None:
        """An explicit `resume_from_checkpoint`; the `hf.auto_continue_train` patch adds the newest one."""
        explicit = self.ctx.native.get("resume_from_checkpoint")
        if not explicit:
            return None
        path = Path(explicit).expanduser()
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"resume_from_checkpoint {path} is not a complete checkpoint", key="resume_from_checkpoint")
        return path

    def _state_dict_options(self, **kw: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    def _reads_for_all_ranks(self) -> bool:
        """Whether this rank reads model.pt and optimizer.pt. Under FSDP on several ranks only rank 0
        does (the others get their shards by broadcast: one copy in host memory per node, not one per
        rank); a LoRA run's checkpoint (the adapter, small) and a replica's (DDP) are read by every rank."""
        return not self._broadcasts_checkpoints() or self.rank == 0

    def _broadcasts_checkpoints(self) -> bool:
        """Under FSDP, a checkpoint with a whole model.pt (one saved before shards, or by one process)
        is read by rank 0 and broadcast."""
        return bool(self.ctx.native.get("fsdp")) and dist.is_initialized() and self.world_size > 1 \
            and self.checkpoints_hold_every_weight

    def _saves_shards(self) -> bool:
        """Under FSDP on several ranks a checkpoint holds the model and optimizer as DCP shards: each
        rank writes the shards it holds and, on resume, reads the ones it needs (any layout reads
        them: DCP reshards), so no rank ever holds the whole model or optimizer in host memory."""
        return self._broadcasts_checkpoints()

    def _load_options(self, **kw: Any) -> Any:
        """Options that set a model or optimizer from a full state dict: broadcast from rank 0 (the
        others pass an empty one) when only rank 0 read it (`_reads_for_all_ranks`)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        if self._broadcasts_checkpoints():
            return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, **kw)
        return self._state_dict_options(**kw)

    #: a checkpoint's model.pt holds every weight (a LoRA run's holds the adapter only: its base is hf_path)
    checkpoints_hold_every_weight = True

    def model_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint's model.pt holds: the whole model (every rank calls: FSDP gathers)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=self._state_dict_options())

    def load_model_state(self, state: dict[str, torch.Tensor], checkpoint: Path) -> None:
        """Set the model from a `model_state` read back from `checkpoint`."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state, options=self._load_options())

    def save_checkpoint(self, step: int) -> None:
        """Write `.tmp-checkpoint-<step>` completely, then rename it: a crash never leaves a half checkpoint."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        final = self.checkpoint_dir / f"{CHECKPOINT_PREFIX}{step}"
        tmp = self.checkpoint_dir / f"{TMP_PREFIX}{CHECKPOINT_PREFIX}{step}"
        shards = self._saves_shards()
        if not shards:  # every rank joins the gathers (FSDP needs it); rank 0 writes the whole state
            model_state = self.model_state()
            optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=self._state_dict_options())
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        if shards:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(self.model, self.optimizer)  # this rank's shards
            dcp.save({"model": model_state, "optimizer": optim_state},
                     storage_writer=dcp.FileSystemWriter(str(tmp / SHARDS)))
        torch.save(_rng_state(), tmp / f"rng_state_{self.rank}.pt")
        if self.rank == 0:
            if not shards:
                torch.save(model_state, tmp / "model.pt")
                torch.save(optim_state, tmp / "optimizer.pt")
            torch.save({"scheduler": self.scheduler.state_dict(),
                        "scaler": self.scaler.state_dict() if self.scaler else None}, tmp / "scheduler.pt")
        self._barrier()
        if self.rank == 0:
            state = {"step": step, "global_batch_size": self.global_batch, "seq_length": self.settings.seq_length,
                     "world_size": self.world_size, "consumed_samples": step * self.global_batch}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate()
            logger.info(f"checkpoint saved: {final}")
        self._barrier()

    def _rotate(self) -> None:
        keep = self.settings.keep_last
        if not keep:
            return
        for old in complete_checkpoints(self.checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, newest: Path) -> int:
        """Load `newest`; when a file of it cannot be read, `checkpoint.on_damaged` decides: fail naming
        it, or load the newest older complete checkpoint (which sets every piece of state again, so
        what the damaged one had set already does not matter). A damaged checkpoint is never deleted:
        it is renamed `<name>.damaged`, so neither rotation nor a later save at its step touches it."""
        damaged: list[DamagedCheckpoint] = []
        path: Path | None = newest
        while path is not None:
            try:
                step = self.load_checkpoint(path)
            except DamagedCheckpoint as exc:
                if self.settings.on_damaged != "previous":
                    raise ConfigError(f"checkpoint {exc.path} cannot be loaded: {exc.reason}",
                                      fix=f"set checkpoint.on_damaged=previous to resume from the complete checkpoint "
                                          f"before it, or delete {exc.path}") from None
                damaged.append(exc)
                path = previous_checkpoint(path)
                continue
            for exc in damaged:
                aside = self._set_aside(exc.path)
                logger.warning(f"checkpoint {exc.path} cannot be loaded ({exc.reason}); resumed from {path.name} "
                               f"instead (checkpoint.on_damaged: previous); the damaged one is kept as {aside.name}")
            return step
        first = damaged[0]
        raise ConfigError(f"checkpoint {first.path} cannot be loaded: {first.reason}; no older complete checkpoint "
                          "could be loaded either", fix=f"delete the damaged checkpoints in {first.path.parent} to "
                                                        "start from step 0")

    def load_checkpoint(self, path: Path) -> int:
        """Weights, optimizer, schedule and RNG from `path`; tensors and plain values only
        (`weights_only=True`: a file that would unpickle code is refused). A file missing or cut
        short raises DamagedCheckpoint on every rank (see `_read`). Under FSDP rank 0 alone reads
        model.pt and optimizer.pt (`_reads_for_all_ranks`); a checkpoint of DCP shards is read shard by
        shard (`_load_shards`)."""
        state = self._read(path, STATE_FILE, lambda f: json.loads(f.read_text(encoding="utf-8")))
        if state["global_batch_size"] != self.global_batch or state["seq_length"] != self.settings.seq_length:
            raise ConfigError(f"checkpoint {path} was written with global batch {state['global_batch_size']} x "
                              f"seq {state['seq_length']}; this run has {self.global_batch} x "
                              f"{self.settings.seq_length}", key="checkpoint.resume",
                              fix="resume with the same batch and sequence length, or checkpoint.resume: never")
        if (path / SHARDS).is_dir():
            self._load_shards(path, optimizer=True)
        else:
            self._load_whole(path)
        schedule = self._read(path, "scheduler.pt", _tensors)
        self.scheduler.load_state_dict(schedule["scheduler"])
        if self.scaler and schedule.get("scaler"):
            self.scaler.load_state_dict(schedule["scaler"])
        # absent when the world size changed: the data order does not depend on it
        rng = self._read(path, f"rng_state_{self.rank}.pt", _tensors, optional=True)
        if rng is not None:
            _set_rng_state(rng)
        logger.info(f"resumed from {path} at step {state['step']}")
        return int(state["step"])

    def _load_whole(self, path: Path) -> None:
        """model.pt and optimizer.pt: the whole state, by every rank, or by rank 0 alone and broadcast."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        here = self._reads_for_all_ranks()
        self.load_model_state(self._read(path, "model.pt", _mapped_tensors, here=here), path)
        set_optimizer_state_dict(self.model, self.optimizer, self._read(path, "optimizer.pt", _mapped_tensors, here=here),
                                 options=self._load_options())
        if self._broadcasts_checkpoints():
            logger.info(f"model.pt and optimizer.pt of {path}: " + (
                "read by this rank and broadcast to every rank's shards" if here
                else "received by broadcast from rank 0 (not read by this rank)"))

    def _load_shards(self, path: Path, *, optimizer: bool) -> None:
        """The model (and optimizer) from the checkpoint's DCP shards, into this run's layout: each
        rank reads what it holds, whatever layout saved them; the metadata through a restricted
        unpickler, values weights-only (primus.runs.dcp). Every rank joins the load, so a file missing
        or cut short fails every rank alike (DamagedCheckpoint)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import state_dict as states

        from primus.runs.dcp import SafePlanner, SafeReader, damage, first_failure

        if optimizer:  # this layout's own state dicts (sharded under FSDP) say what to read
            model_state, optim_state = states.get_state_dict(self.model, self.optimizer)
            target = {"model": model_state, "optimizer": optim_state}
        else:
            target = {"model": states.get_model_state_dict(self.model)}
        try:
            with warnings.catch_warnings():  # one process reading every rank's shards is what is meant
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(target, storage_reader=SafeReader(str(path / SHARDS)), planner=SafePlanner(),
                         no_dist=not dist.is_initialized())
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            why = damage(path / SHARDS, exc)
            if why is not None:
                raise DamagedCheckpoint(path, f"{SHARDS}/{why}") from None
            if type(exc).__name__ == "CheckpointException":  # the worker reports a TrainingError in one line
                raise TrainingError(f"checkpoint {path} cannot be loaded: {first_failure(exc)}") from None
            raise
        if optimizer:
            states.set_state_dict(self.model, self.optimizer, model_state_dict=target["model"],
                                  optim_state_dict=target["optimizer"])
        else:
            states.set_model_state_dict(self.model, target["model"])
        logger.info(f"{path.name}: this rank read the shards it holds from {SHARDS}/ (DCP)")

    def _read(self, path: Path, name: str, read: Any, optional: bool = False, here: bool = True) -> Any:
        """`read(path / name)` ({} where not `here`: this rank reads nothing but joins the agreement).
        Every rank calls it for every file and the ranks agree on the outcome, so that none goes on
        alone: a file missing or cut short on any rank raises DamagedCheckpoint everywhere, with the
        same reason (the first damaged rank's), any other failure (a refused pickle) fails every rank."""
        value, why, error = None if here else {}, None, None
        if here and not (optional and not (path / name).is_file()):
            try:
                value = read(path / name)
            except Exception as exc:
                why = _damage(exc)
                if why is None:
                    error = exc
        worst = self._worst_over_ranks(2 if error else 1 if why else 0)
        if error is not None:
            raise error
        if worst == 2:
            raise TrainingError(f"checkpoint {path}: another rank failed to read it (see that rank's log)")
        if worst == 1:
            reasons = [f"{name} {why}" if why else None]
            if dist.is_initialized():  # every rank reports what the first damaged one found
                reasons = [None] * self.world_size
                dist.all_gather_object(reasons, f"{name} {why}" if why else None)
            raise DamagedCheckpoint(path, next(r for r in reasons if r))
        return value

    def _worst_over_ranks(self, code: int) -> int:
        if not dist.is_initialized():
            return code
        flag = torch.tensor([float(code)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def _set_aside(self, path: Path) -> Path:
        """`checkpoint-6` -> `checkpoint-6.damaged` (by rank 0), a name no rotation or resume picks up."""
        self._barrier()
        aside = path.with_name(f"{path.name}.damaged")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.damaged-{n}")
        if self.rank == 0 and path.exists():
            os.replace(path, aside)
        self._barrier()
        return aside

    def save_final_model(self) -> None:
        """The trained model in Hugging Face format under <run dir>/model (from_pretrained loads it)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(self.model, options=self._state_dict_options())
        if self.rank == 0:
            final = self.ctx.run_dir / "model"
            tmp = self.ctx.run_dir / f"{TMP_PREFIX}model"
            shutil.rmtree(tmp, ignore_errors=True)
            self.model.save_pretrained(str(tmp), state_dict=state)
            if self.blocks.tokenizer is not None:
                self.blocks.tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            logger.info(f"model saved in Hugging Face format: {final}")
        self._barrier()

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()


# =========================================================================== helpers


def _eval_tokenizer(directory: Path) -> tuple[Any, int, int]:
    """(encode, EOS id, vocabulary size) of a tokenizer directory's tokenizer.json, EOS being
    tokenizer_config.json's `eos_token` (`<|endoftext|>` when it names none)."""
    from tokenizers import Tokenizer

    file = directory / "tokenizer.json"
    if not file.is_file():
        raise ConfigError(f"tokenizer directory {directory} has no tokenizer.json", key="data.tokenizer",
                          fix="point data.tokenizer at a directory saved by a fast (tokenizers) tokenizer")
    tokenizer = Tokenizer.from_file(str(file))
    eos: Any = None
    config = directory / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    eos = eos or "<|endoftext|>"
    eos_id = tokenizer.token_to_id(eos)
    if eos_id is None:
        raise ConfigError(f"tokenizer {directory} has no token {eos!r} (its eos_token)", key="data.tokenizer")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    return encode, eos_id, tokenizer.get_vocab_size(with_added_tokens=True)


class _RestoreGradientSync:
    def __init__(self, module: Any) -> None:
        self.module = module

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.module.set_requires_gradient_sync(True)


class DamagedCheckpoint(Exception):
    """A checkpoint with a file missing, cut short or unreadable."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _damage(exc: Exception) -> str | None:
    """What `exc`, raised while reading a checkpoint file, says is wrong with the file; None when it
    is not damage (a refused pickle, a permission error: those keep their own report)."""
    if isinstance(exc, FileNotFoundError):
        return "is missing"
    if isinstance(exc, EOFError) or (isinstance(exc, RuntimeError) and "PytorchStreamReader" in str(exc)):
        return "is truncated or corrupt"
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return "is truncated or corrupt"
    if isinstance(exc, OSError) and not isinstance(exc, PermissionError):
        return f"cannot be read ({exc.strerror or exc})"
    return None


def _tensors(file: Path) -> Any:
    """A checkpoint file of tensors and plain values; a pickle that would run code is refused."""
    return torch.load(file, map_location="cpu", weights_only=True)


def _mapped_tensors(file: Path) -> Any:
    """model.pt, optimizer.pt: mapped rather than read whole (rank 0 sends each tensor on as it is needed)."""
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def previous_checkpoint(path: Path) -> Path | None:
    """The newest complete checkpoint older than `path` in its directory."""
    step = path.name[len(CHECKPOINT_PREFIX):]
    if not (path.name.startswith(CHECKPOINT_PREFIX) and step.isdigit()):
        return None
    older = [p for p in complete_checkpoints(path.parent) if int(p.name[len(CHECKPOINT_PREFIX):]) < int(step)]
    return older[-1] if older else None


def complete_checkpoints(directory: Path) -> list[Path]:
    """`checkpoint-<step>` directories with their state file, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _checksum(model: torch.nn.Module) -> float:
    """Sum of all weights; FSDP shards are gathered (a collective: every rank calls it)."""
    total = 0.0
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        total += float(full.detach().double().sum())
    return total


def _item(value: torch.Tensor | None) -> float | None:
    return None if value is None else float(value)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
