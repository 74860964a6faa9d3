"""The heavy half of the torchtitan backend: drives TorchTitan's own Trainer in this process.

Reads top to bottom as a run does: the process-group environment, the `Trainer.Config` built
from the resolved native keys, the patches of each phase, the metrics hook, training.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

from loguru import logger

from primus.backends.adapter import Adapter
from primus.errors import ConfigError
from primus_torchtitan.config_keys import config_keys
from primus_torchtitan.translate import (
    PRIMUS_KEYS,
    UNAVAILABLE,
    UPSTREAM_ALIASES,
    key_matches,
    native_get,
    tokenizer_location,
)

# ----------------------------------------------------------------------------- process group env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def single_process_env() -> Iterator[None]:
    """TorchTitan initialises torch.distributed from the torchrun environment even for one process.

    Core runs a one-process job in-process without torchrun, so the variables torchrun would set
    are provided here (and removed afterwards); under torchrun they are already present.
    """
    wanted = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    added = {k: v for k, v in wanted.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@contextlib.contextmanager
def parameters_left_uninitialised(skip: bool) -> Iterator[None]:
    """While the Trainer is built, leave TorchTitan's random parameter init out (buffers such as
    the RoPE cache are still computed): Hugging Face weights overwrite every parameter right after
    (`hf_weights.load_into` fails on a parameter it has no tensor for), and the init of a 1B model
    costs about 30 s of CPU per rank and memory the allocator keeps."""
    if not skip:
        yield
        return
    from torchtitan.protocols.module import Module

    framework_init = Module._init_self_parameters
    Module._init_self_parameters = lambda self: None
    try:
        yield
    finally:
        Module._init_self_parameters = framework_init


# ----------------------------------------------------------------------------- Trainer.Config


def _flat(native: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in native.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and dotted not in config_keys():
            out.update(_flat(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def native_settings(native: dict[str, Any]) -> dict[str, Any]:
    """The resolved keys that are TorchTitan's own, upstream aliases moved to their 0.3 names."""
    flat = _flat(native)
    for old, new in UPSTREAM_ALIASES.items():
        if old in flat and flat.get(new) is None:
            flat[new] = flat[old]
    schema = config_keys()
    settings = {}
    for key, value in flat.items():
        primus_key = any(key_matches(key, p) for p in (*PRIMUS_KEYS, *UNAVAILABLE)) or key in UPSTREAM_ALIASES
        if primus_key:
            continue
        if key in schema or any(key.startswith(k + ".") for k in schema if isinstance(schema[k], dict)):
            settings[key] = value
    return settings


def _set_dotted(obj: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    if isinstance(obj, dict):
        obj[last] = value
    else:
        setattr(obj, last, value)


def _activation_checkpoint(mode: Any) -> Any:
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    modes = {"none": None, "selective": SelectiveAC.Config, "full": FullAC.Config}
    key = str(mode).lower() if mode is not None else "none"
    if key.isdigit() or key == "op":  # upstream selective_ac_option values
        key = "selective"
    if key not in modes:
        raise ConfigError(f"activation_checkpoint.mode '{mode}' is not one of none, selective, full",
                          key="activation_checkpoint.mode")
    return modes[key]() if modes[key] else None


def build_trainer_config(native: dict[str, Any], *, run_dir: str, checkpoint_dir: str) -> Any:
    """A TorchTitan `Trainer.Config` from the resolved native keys."""
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.components.optimizer import default_adamw
    from torchtitan.components.tokenizer import HuggingFaceTokenizer
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
    from torchtitan.models.common.config_utils import decoder_vocab_size
    from torchtitan.trainer import Trainer

    from primus_torchtitan.data import (
        MockDataLoader,
        MockTokenizer,
        register_jsonl_dataset,
        tokenizer_directory,
    )
    from primus_torchtitan.model import build_model_spec

    model_spec = build_model_spec(native["model"])
    vocab = decoder_vocab_size(model_spec)
    opt = native.get("optimizer", {})
    if str(opt.get("name", "AdamW")).lower() not in ("adamw", "adam"):
        raise ConfigError(f"optimizer.name '{opt.get('name')}' is not supported (AdamW, Adam)", key="optimizer.name")
    optimizer = default_adamw(lr=float(opt.get("lr", 8e-4)), betas=(float(opt.get("beta1", 0.9)),
                              float(opt.get("beta2", 0.95))), eps=float(opt.get("eps", 1e-8)),
                              weight_decay=float(opt.get("weight_decay", 0.1)))
    optimizer.param_groups[0].optimizer_name = "Adam" if str(opt.get("name")).lower() == "adam" else "AdamW"

    mock = bool(native_get(native, "training.mock_data"))
    seed = native_get(native, "debug.seed")
    if mock:
        dataloader = MockDataLoader.Config(vocab_size=vocab, seed=1234 if seed is None else int(seed))
        tokenizer = MockTokenizer.Config(vocab_size=vocab)
    else:
        register_jsonl_dataset(native_get(native, "dataloader.text_key") or "text")
        dataloader = HuggingFaceTextDataLoader.Config()
        tokenizer = HuggingFaceTokenizer.Config()

    if native_get(native, "model.mtp_layers"):  # DeepSeek-V3's multi-token prediction: TorchTitan's own loss
        from torchtitan.models.deepseek_v3 import MTPLoss

        loss = MTPLoss.Config(global_vocab_size=vocab)
    else:
        loss = ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config(global_vocab_size=vocab))
    config = Trainer.Config(
        model_spec=model_spec,
        loss=loss,
        optimizer=optimizer, dataloader=dataloader, tokenizer=tokenizer,
        activation_checkpoint=_activation_checkpoint(native_get(native, "activation_checkpoint.mode")),
    )
    for key, value in native_settings(native).items():
        if mock and key.startswith("dataloader."):
            continue
        if key == "parallelism.spmd_backend" and value is None:
            continue  # keep TorchTitan's default
        _set_dotted(config, key, value)
    if config.validator.enable:
        _validation_data(config, native, mock=mock, vocab=vocab)
    config.dump_folder = run_dir
    config.checkpoint.folder = checkpoint_dir  # absolute: os.path.join keeps it as is
    config.hf_assets_path = tokenizer_directory(tokenizer_location(native), mock=mock, fallback=run_dir)
    if native_get(native, "training.disable_cuda_graphs") is None:
        # off unless written: TorchTitan's CUDA graphs need fixed shapes and no host sync in the step
        # (no pipeline, EP only with some dispatchers); `training.disable_cuda_graphs: false` turns them on
        config.training.disable_cuda_graphs = True
    return config


def _validation_data(config: Any, native: dict[str, Any], *, mock: bool, vocab: int) -> None:
    """Validation reads what training reads: other synthetic samples, or the same local corpus
    (TorchTitan's default validation set is C4 from the hub, unreachable offline)."""
    from primus_torchtitan.data import JSONL_DATASET, MockDataLoader

    if mock:
        seed = native_get(native, "debug.seed")
        config.validator.dataloader = MockDataLoader.Config(vocab_size=vocab, seed=(seed or 1234) + 1)
        if config.validator.steps < 0:
            config.validator.steps = 10  # synthetic data never ends
    elif native_get(native, "dataloader.dataset") == JSONL_DATASET and native_get(native, "validator.dataloader.dataset") is None:
        config.validator.dataloader.dataset = JSONL_DATASET
        config.validator.dataloader.dataset_path = native_get(native, "dataloader.dataset_path")


# ----------------------------------------------------------------------------- local corpora


def validate_corpora(native: dict[str, Any]) -> None:
    """Read every line of the local JSONL corpora TorchTitan will load, once, before it does: its
    JSON loader reports a bad line as a traceback without file or line; core's reader names
    `file:line` (ConfigError, exit 2). It streams, so a large corpus costs one pass, not memory."""
    from primus.runs.corpus import read_documents
    from primus_torchtitan.data import JSONL_DATASET

    if native_get(native, "training.mock_data"):
        return
    text_key = native_get(native, "dataloader.text_key") or "text"
    paths = []
    for section in ("dataloader", "validator.dataloader"):
        if native_get(native, f"{section}.dataset") == JSONL_DATASET and native_get(native, f"{section}.dataset_path"):
            paths.append(str(native_get(native, f"{section}.dataset_path")))
    for path in dict.fromkeys(paths):
        for _ in read_documents(path, text_key):
            pass


# ----------------------------------------------------------------------------- metrics


class PrimusMetricsLogger:
    """A TorchTitan metric logger that feeds Primus's metrics.jsonl and progress line.

    TorchTitan calls it with the metrics it computed for a logged step; `throughput(tps)` is
    tokens per second per device, normalised by the non-data-parallel degree, so the tokens the
    whole job processed per second are tps x world size.
    """

    def __init__(self, ctx: Any, *, world_size: int, log_freq: int) -> None:
        self.ctx, self.world_size, self.log_freq = ctx, world_size, log_freq
        self.last_step: int | None = None  # a resumed run starts past step 0
        self.last_time = time.perf_counter()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if "loss_metrics/global_avg_loss" not in metrics:
            if "validation_metrics/loss" in metrics:
                self.ctx.metrics.eval_step(step, loss=metrics["validation_metrics/loss"])
            return
        now = time.perf_counter()
        steps = 1 if self.last_step is None else max(step - self.last_step, 1)
        interval = metrics.get("time_metrics/end_to_end(s)")
        step_time = (now - self.last_time) / steps
        if interval is not None:
            step_time = float(interval) * self.log_freq / steps  # TorchTitan divides by log_freq
        lr = next((v for k, v in metrics.items() if k.startswith("lr/")), None)
        tokens = float(metrics.get("throughput(tps)", 0.0)) * self.world_size * step_time
        extra = {k: metrics[k] for k in ("mfu(%)", "tflops") if k in metrics}
        self.ctx.metrics.train_step(step, loss=metrics["loss_metrics/global_avg_loss"], lr=lr,
                                    grad_norm=metrics.get("grad_norm"), tokens=int(round(tokens)),
                                    step_time_s=step_time, **{k.split("(")[0]: v for k, v in extra.items()})
        self.last_step, self.last_time = step, now

    def close(self) -> None:
        return None


def hook_metrics(trainer: Any, ctx: Any) -> None:
    from torchtitan.components.metrics import LoggerContainer

    ours = PrimusMetricsLogger(ctx, world_size=ctx.world_size, log_freq=trainer.config.metrics.log_freq)
    container = LoggerContainer()
    container.add_logger(trainer.metrics_processor.logger)
    container.add_logger(ours)
    trainer.metrics_processor.logger = container


# ----------------------------------------------------------------------------- the adapter


def stop_after_step(trainer: Any, step: int) -> None:
    """End training after `step` as an interrupted job would: the schedule still spans every step."""
    keep_going = trainer.should_continue_training

    def should_continue_training() -> bool:
        return keep_going() and trainer.step < step

    trainer.should_continue_training = should_continue_training


def stop_when_asked(trainer: Any, ctx: Any) -> Callable[[], bool]:
    """SIGTERM on any rank ends training after the current step on every rank.

    TorchTitan asks `should_continue_training` before each step; the ranks all-reduce their stop
    flag there, so one signalled rank cannot leave the others waiting in the next step's collectives.
    The all-reduce's `.item()` waits for the device, so several ranks agree only every
    `metrics.log_freq` steps (where the loss is read anyway): a signalled job stops within one log
    interval. Returns whether training stopped that way.
    """
    import torch

    keep_going = trainer.should_continue_training
    every = max(1, int(trainer.config.metrics.log_freq or 1))
    stopped = False

    def should_continue_training() -> bool:
        nonlocal stopped
        if not keep_going():
            return False
        several = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        if several and trainer.step % every:
            return True
        flag = torch.tensor([1 if ctx.stop_requested else 0], dtype=torch.int32, device=trainer.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        stopped = bool(flag.item())
        return not stopped

    trainer.should_continue_training = should_continue_training
    return lambda: stopped


class TorchTitanAdapter(Adapter):
    def run(self) -> None:
        ctx = self.ctx
        with single_process_env():
            import torch
            from torchtitan.trainer import Trainer  # noqa: F401 - the framework import, after before_import

            from primus_torchtitan.checkpoint import handle_damaged, load_safely

            ctx.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            validate_corpora(ctx.native)
            config = build_trainer_config(ctx.native, run_dir=str(ctx.run_dir), checkpoint_dir=str(ctx.checkpoint_dir))
            if ctx.module.kind == "posttrain":  # fine-tuning: core's masked rows are the batches
                from primus_torchtitan.posttrain import feed_sft_rows

                feed_sft_rows(config, ctx)
            # core's phase order: build_args (the config), then setup (torchtitan's modules), both
            # before config.build() creates the model
            ctx.apply_patches("build_args", titan_config=config)
            ctx.apply_patches("setup")
            trainer = None
            try:
                with parameters_left_uninitialised(bool(ctx.module.hf_path)):
                    trainer = config.build()
                hook_metrics(trainer, ctx)
                if ctx.module.hf_path:  # the init; a checkpoint that train() resumes from replaces it
                    self._load_hf(trainer)
                if self._resume_never():  # start fresh; checkpoints already there stay untouched
                    trainer.checkpointer.load = lambda step=-1: False
                elif trainer.checkpointer.enable:
                    load_safely(trainer.checkpointer, trainer.dataloader)
                    handle_damaged(trainer.checkpointer, rank=ctx.rank,
                                   on_damaged=native_get(ctx.native, "checkpoint.on_damaged") or "fail")
                ctx.apply_patches("before_train", trainer=trainer)
                exit_at = int(native_get(ctx.native, "training.exit_at_step") or 0)
                if exit_at:
                    stop_after_step(trainer, exit_at)
                stopped_by_signal = stop_when_asked(trainer, ctx)
                trainer.train()
                if stopped_by_signal() and not ctx.stop_requested:
                    ctx.stop.request("another rank received SIGTERM; all ranks stopped after the same step")
                stopped_early = stopped_by_signal() or (exit_at and trainer.step == exit_at)
                if stopped_early and trainer.step > 0 and config.checkpoint.enable:
                    trainer.checkpointer.save(trainer.step, last_step=True)
                ctx.apply_patches("after_train", trainer=trainer)
            finally:
                if trainer is not None:
                    trainer.close()
                if torch.distributed.is_initialized():
                    torch.distributed.destroy_process_group()
        logger.debug("torchtitan trainer closed")

    def _load_hf(self, trainer: Any) -> None:
        from pathlib import Path

        from primus_torchtitan.hf_weights import Layout, load_into, peak_rss_gib

        started = time.perf_counter()
        read = load_into(trainer.model_parts, Layout.from_native(self.ctx.native["model"]), Path(self.ctx.module.hf_path))
        logger.info(f"loaded the Hugging Face weights of {self.ctx.module.hf_path}: {read / 2**20:.1f} MiB read by "
                    f"this rank in {time.perf_counter() - started:.1f}s, peak RSS so far {peak_rss_gib():.2f} GiB")

    def evaluate(self, request: Any) -> Any:
        from primus_torchtitan.evaluation import evaluate

        return evaluate(self.ctx, request)

    def _resume_never(self) -> bool:
        return self.ctx.module.module.checkpoint.resume in ("never", False)
