"""The light half of the hf backend: neutral config in, TrainingArguments names out, checks first.

Core calls this while resolving (`primus config show`, `primus run --dry-run`), so nothing here may
import torch or transformers: the TrainingArguments field list comes from package data, the
tokenizer is checked by reading its JSON files, the corpus by reading its first lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from primus.backends.translator import NativeValues, Translator
from primus.config.rules import check_first_record
from primus.errors import ConfigError
from primus.models.hf import tokenizer_size
from primus_hf.training_args import NOT_PLAIN, training_arguments

if TYPE_CHECKING:
    from primus.config.resolve import ResolvedModule
    from primus.config.schema import ModuleConfig
    from primus.models.spec import ModelSpec

# TrainingArguments names the Primus loop reads. Any other field is accepted (upstream experiment files
# carry many) and, when set away from its default, reported as unused rather than silently dropped.
HONOURED_TRAINING_ARGS = frozenset({
    "max_steps", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "optim", "max_grad_norm", "per_device_train_batch_size",
    "per_device_eval_batch_size", "gradient_accumulation_steps", "bf16", "fp16", "tf32", "gradient_checkpointing",
    "torch_compile", "logging_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps",
    "save_total_limit", "resume_from_checkpoint", "seed", "use_cpu", "ddp_backend", "ddp_timeout",
    "ddp_find_unused_parameters", "fsdp",
    # where they go is decided by Primus, not by these fields:
    "output_dir", "local_rank", "report_to",
})
SUPPORTED_OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
ON_DAMAGED = ("fail", "previous")  # checkpoint.on_damaged
NEUTRAL_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
UNSUPPORTED = "not supported by the hf backend"


# --------------------------------------------------------------------------- model families
# The transformers config of a ModelSpec is core's (primus.models.hf.hf_config): `primus export`
# writes the same config.json that this backend builds its model from.


# --------------------------------------------------------------------------- the translator


class HFTranslator(Translator):
    default_module_preset = "pre_trainer.yaml"
    steps_key = "max_steps"
    dimension_keys = {
        "micro_batch_size": "per_device_train_batch_size", "global_batch_size": "global_batch_size",
        "seq_length": "seq_length", "steps": "max_steps",
        "num_layers": "model_config.num_hidden_layers", "num_heads": "model_config.num_attention_heads",
        "num_kv_heads": "model_config.num_key_value_heads", "max_positions": "model_config.max_position_embeddings",
    }
    unavailable_keys = {
        "deepspeed": "the Primus hf loop shards with FSDP (parallel.fsdp), not DeepSpeed",
        "push_to_hub": "runs write to the local run directory only",
    }

    #: the post_trainer module (presets/sft_trainer.yaml, primus_hf.posttrain): full and LoRA (peft)
    #: fine-tuning, packing with attention kept inside each packed sample
    post_training = frozenset({"full", "lora", "packing", "isolated_packing"})

    def native_keys(self, preset: dict[str, Any]) -> set[str]:
        return super().native_keys(preset) | set(training_arguments())

    def translate_model(self, spec: ModelSpec) -> NativeValues:
        from primus.models.hf import CONFIG_BUILDERS, Unbuilt, hf_config

        if spec.family not in CONFIG_BUILDERS:
            raise ConfigError(f"model family '{spec.family}' is {UNSUPPORTED}",
                              fix=f"the hf backend builds: {', '.join(CONFIG_BUILDERS)}")
        try:
            config = hf_config(spec)
        except Unbuilt as exc:
            raise ConfigError(exc.message.replace("has no standard transformers layout", f"is {UNSUPPORTED}"),
                              fix=exc.fix) from None
        config.pop("architectures", None)
        out = NativeValues()
        for key, value in config.items():
            if value is None:  # meaningful here (DeepSeek-V2's q_lora_rank: no q LoRA), not "unset"
                out.values.setdefault("model_config", {})[key] = None
                out.origins[f"model_config.{key}"] = _MODEL_ORIGINS.get(key, key)
            else:
                out.set(f"model_config.{key}", value, _MODEL_ORIGINS.get(key, key))
        return out

    def translate_sections(self, module: ModuleConfig, model: ModelSpec | None) -> NativeValues:
        out = NativeValues()
        t = module.train
        out.set("max_steps", t.steps, "train.steps")
        out.set("learning_rate", t.lr, "train.lr")
        out.set("min_lr", t.min_lr, "train.min_lr")
        out.set("warmup_steps", t.warmup_steps, "train.warmup_steps")
        out.set("lr_scheduler_type", NEUTRAL_SCHEDULES.get(t.lr_schedule or ""), "train.lr_schedule")
        out.set("per_device_train_batch_size", t.micro_batch_size, "train.micro_batch_size")
        out.set("global_batch_size", t.global_batch_size, "train.global_batch_size")
        out.set("seq_length", t.seq_length, "train.seq_length")
        out.set("seed", t.seed, "train.seed")
        out.set("weight_decay", t.weight_decay, "train.weight_decay")
        out.set("max_grad_norm", t.grad_clip, "train.grad_clip")
        if t.precision is not None and t.precision != "auto":  # auto keeps bf16: null (decided per device)
            out.set("bf16", t.precision == "bf16", "train.precision")
            out.set("fp16", t.precision == "fp16", "train.precision")
        out.set("logging_steps", t.log_interval, "train.log_interval")
        if t.eval_interval is not None:
            out.set("eval_strategy", "steps", "train.eval_interval")
            out.set("eval_steps", t.eval_interval, "train.eval_interval")
        out.set("eval_iters", t.eval_steps, "train.eval_steps")
        out.set("torch_compile", t.compile, "train.compile")

        if module.parallel.fsdp is not None:
            out.set("fsdp", "full_shard" if module.parallel.fsdp else "", "parallel.fsdp")

        d = module.data
        out.set("mock_data", d.mock, "data.mock")
        if d.path:
            out.set("mock_data", False, "data.path")
        out.set("data_path", d.path, "data.path")
        out.set("text_key", d.text_key, "data.text_key")
        out.set("tokenizer_path", d.tokenizer, "data.tokenizer")
        out.set("valid_fraction", d.valid_fraction, "data.valid_fraction")

        c = module.checkpoint
        if c.interval is not None:
            out.set("save_strategy", "steps", "checkpoint.interval")
            out.set("save_steps", c.interval, "checkpoint.interval")
        out.set("save_total_limit", c.keep_last, "checkpoint.keep_last")
        if c.resume is not None:
            out.set("auto_continue_train", c.resume in ("auto", True), "checkpoint.resume")
        out.set("on_damaged_checkpoint", c.on_damaged, "checkpoint.on_damaged")
        return out

    # ----------------------------------------------------------------------- derived values and checks

    def derive(self, resolved: ResolvedModule) -> NativeValues:
        """Gradient accumulation from the batch sizes (core checked they divide), and a local
        `hf_path` made absolute against the experiment's folder."""
        n, out = resolved.native, NativeValues()
        micro, world = int(n["per_device_train_batch_size"]), resolved.world_size
        gbs = n.get("global_batch_size")
        if gbs is None:
            out.set("global_batch_size", micro * world * int(n["gradient_accumulation_steps"]),
                    "train.micro_batch_size,gradient_accumulation_steps,world_size")
        else:
            out.set("gradient_accumulation_steps", int(gbs) // (micro * world),
                    "train.global_batch_size,train.micro_batch_size,world_size")
        if n.get("hf_path"):
            out.set("hf_path", _local_or_hub(str(n["hf_path"]), Path(resolved.experiment_file).parent), "hf_path")
        return out

    def check(self, resolved: ResolvedModule) -> None:
        n = resolved.native
        self._check_parallel(resolved)
        self._check_model(n)
        if resolved.kind == "posttrain":
            _check_post_training(resolved)
        else:
            self._check_data(n)
        self._check_schedule(n)
        self._check_trackers(n)
        if n.get("fp16") and n.get("fsdp"):
            # DDP runs scale the loss (torch.amp.GradScaler); FSDP2's mixed precision casts the
            # sharded parameters to fp16 with no scaler, so gradients would underflow silently
            raise ConfigError("fp16 under FSDP has no loss scaling in the hf loop", key="fp16",
                              fix="use train.precision: bf16, or drop parallel.fsdp: DDP scales fp16 losses")

    def _check_parallel(self, resolved: ResolvedModule) -> None:
        p = resolved.module.parallel
        for name in ("tensor", "pipeline", "context", "expert"):
            if (getattr(p, name) or 1) > 1:
                raise ConfigError(f"{name} parallelism is {UNSUPPORTED}", key=f"parallel.{name}",
                                  fix="the hf backend is data parallel (DDP, or FSDP with parallel.fsdp: true)")

    def _check_model(self, n: dict[str, Any]) -> None:
        if n.get("hf_path"):
            return
        config = n.get("model_config") or {}
        if not config.get("model_type"):
            raise ConfigError("no model: set `model:` to a model preset (e.g. llama3_tiny.yaml) or "
                              "`{hf_path: ./dir}`", key="model")

    def _check_data(self, n: dict[str, Any]) -> None:
        """The hf loop's own data rules; the corpus and tokenizer paths are core's (config.rules)."""
        if n.get("data_blocks") not in ("packed", "eval"):
            raise ConfigError(f"data_blocks {n.get('data_blocks')!r} is not a block layout", key="data_blocks",
                              fix="packed (the default) or eval (core's evaluation blocks in file order)")
        if n.get("data_blocks") == "eval" and n.get("mock_data"):
            raise ConfigError("data_blocks: eval cuts a corpus; mock data has none", key="data_blocks",
                              fix="set data: {path: corpus.jsonl, tokenizer: DIR}, or data_blocks: packed")
        if n.get("mock_data"):
            if n.get("data_path"):
                raise ConfigError("mock_data is true beside a data_path", key="mock_data",
                                  fix="set data.mock: false, or drop data.path")
            return
        if not n.get("data_path"):
            raise ConfigError("no training data", key="data",
                              fix="set data: {mock: true} or data: {path: corpus.jsonl, tokenizer: ./tokenizer}")
        if str(n["data_path"]).endswith(".jsonl"):  # the hf loop's own default field is "text"
            check_first_record(Path(n["data_path"]), n.get("text_key") or "text", key="text_key")
        tokenizer = n.get("tokenizer_path")
        if not tokenizer:
            raise ConfigError("a corpus needs a tokenizer", key="data.tokenizer",
                              fix="set data.tokenizer to a local tokenizer directory")
        vocab = tokenizer_size(Path(tokenizer), "tokenizer_path")
        model_vocab = (n.get("model_config") or {}).get("vocab_size")
        if vocab and model_vocab and vocab > int(model_vocab):
            raise ConfigError(f"tokenizer {tokenizer} has {vocab} tokens but the model's vocab_size is {model_vocab}",
                              key="tokenizer_path", fix="use a model preset whose vocab fits the tokenizer")

    def _check_schedule(self, n: dict[str, Any]) -> None:
        if n.get("optim") not in SUPPORTED_OPTIMIZERS:
            raise ConfigError(f"optim {n.get('optim')!r} is {UNSUPPORTED}", key="optim",
                              fix=f"use one of {', '.join(SUPPORTED_OPTIMIZERS)}")
        if int(n["max_steps"]) <= 0:
            raise ConfigError("max_steps must be positive (the loop trains by steps, not epochs)",
                              key="max_steps")
        if n.get("eval_strategy") not in ("no", "steps"):
            raise ConfigError(f"eval_strategy {n.get('eval_strategy')!r} is {UNSUPPORTED}",
                              key="eval_strategy", fix='use "steps" or "no"')
        if n.get("eval_strategy") == "steps" and not n.get("eval_steps"):
            raise ConfigError('eval_strategy "steps" needs eval_steps', key="eval_strategy")
        if n.get("on_damaged_checkpoint") not in (None, *ON_DAMAGED):
            raise ConfigError(f"on_damaged_checkpoint {n.get('on_damaged_checkpoint')!r} is not one of "
                              f"{', '.join(ON_DAMAGED)}", key="on_damaged_checkpoint")
        if n.get("save_strategy") not in ("no", "steps"):
            raise ConfigError(f"save_strategy {n.get('save_strategy')!r} is {UNSUPPORTED}",
                              key="save_strategy", fix='use "steps" or "no"')

    def _check_trackers(self, n: dict[str, Any]) -> None:
        from importlib.util import find_spec

        for key, module, dist in (("disable_tensorboard", "tensorboard", "tensorboard"),
                                  ("disable_wandb", "wandb", "wandb"), ("disable_mlflow", "mlflow", "mlflow")):
            if not n.get(key, True) and find_spec(module) is None:
                raise ConfigError(f"{key} is false but {dist} is not installed", key=key,
                                  fix=f"pip install {dist}, or leave {key}: true")

    def notices(self, resolved: ResolvedModule) -> list[str]:
        notes = super().notices(resolved)
        defaults = training_arguments()
        for key, value in resolved.native.items():
            if key in defaults and key not in HONOURED_TRAINING_ARGS and value != defaults[key] \
                    and defaults[key] != NOT_PLAIN:
                notes.append(f"{key}: a TrainingArguments field the Primus hf loop does not use; ignored")
        return notes

    def summary(self, resolved: ResolvedModule) -> dict[str, Any]:
        n = resolved.native
        model = n.get("hf_path") or (n.get("model_config") or {}).get("model_type")
        data = "mock" if n.get("mock_data") else n.get("data_path")
        return {
            "builds": model,
            "steps": n["max_steps"],
            "batch": f"global {n['global_batch_size']} = micro {n['per_device_train_batch_size']} x world "
                     f"{resolved.world_size} x accumulation {n['gradient_accumulation_steps']}",
            "seq": n["seq_length"],
            "data": data,
            "parallel": "FSDP" if n.get("fsdp") else ("DDP" if resolved.world_size > 1 else "single process"),
            "precision": "bf16" if n.get("bf16") else ("fp16 (GradScaler)" if n.get("fp16") else "fp32"),
            "attention": n.get("attn_implementation") or "transformers' default (sdpa)",
            "compile": "torch.compile of the wrapped model" if n.get("torch_compile") else "off",
        }


_MODEL_ORIGINS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim",
    "intermediate_size": "ffn_hidden_size", "max_position_embeddings": "max_position_embeddings",
    "rms_norm_eps": "norm_eps", "tie_word_embeddings": "tie_embeddings", "rope_parameters": "rope_theta",
    "num_local_experts": "moe", "num_experts": "moe", "num_experts_per_tok": "moe", "moe_intermediate_size": "moe",
}


# --------------------------------------------------------------------------- post-training


def _check_post_training(resolved: ResolvedModule) -> None:
    """What the hf post_trainer needs beyond core's rules (primus.posttrain.rules): SFT records in data.path,
    a tokenizer that fits the model, and for LoRA a pretrained model to adapt."""
    n, module = resolved.native, resolved.module
    if n.get("stage", "sft") != "sft":
        raise ConfigError(f"stage {n.get('stage')!r}: the hf post_trainer does supervised fine-tuning only",
                          key="stage", fix="stage: sft")
    if not module.data.path:
        raise ConfigError("the hf post_trainer reads a local JSONL of records", key="data.path",
                          fix="set data.path (formats: messages, alpaca, prompt_completion)")
    tokenizer = module.data.tokenizer or resolved.hf_path or n.get("hf_path")
    vocab = tokenizer_size(Path(tokenizer), "data.tokenizer") if tokenizer and Path(tokenizer).is_dir() else None
    model_vocab = (n.get("model_config") or {}).get("vocab_size") or (resolved.model.vocab_size if resolved.model
                                                                      else None)
    if vocab and model_vocab and vocab > int(model_vocab):
        raise ConfigError(f"tokenizer {tokenizer} has {vocab} tokens but the model's vocab_size is {model_vocab}",
                          key="data.tokenizer", fix="fine-tune with the model's own tokenizer")
    if n.get("eval_strategy") == "steps":
        raise ConfigError("the hf post_trainer holds no records out to evaluate on", key="train.eval_interval",
                          fix="remove train.eval_interval (the training loss is the mean over the trained tokens)")
    if n.get("disable_last_saving"):
        raise ConfigError("a post_trainer run always writes its model (hf/) or adapter (adapter/)",
                          key="disable_last_saving", fix="remove disable_last_saving")
    if not module.finetune.is_lora:
        return
    base = resolved.hf_path or n.get("hf_path")
    if not base or not Path(str(base)).is_dir():
        raise ConfigError("LoRA adapts a pretrained model: the hf backend needs its local directory",
                          key="finetune.method", fix="set model: {hf_path: DIR}, or finetune.method: full")
    if module.checkpoint.export:
        raise ConfigError("a LoRA run writes its adapter (and the merged model with lora.merge) itself",
                          key="checkpoint.export", fix="remove checkpoint.export; set finetune.lora.merge: true "
                                                       "for a merged Hugging Face model")


# --------------------------------------------------------------------------- file checks (no heavy imports)


def _local_or_hub(value: str, base: Path, key: str = "hf_path") -> str:
    """A local model directory becomes absolute; a bare `org/name` is left for the hub."""
    path = Path(value).expanduser()
    candidate = path if path.is_absolute() else (base / path)
    if candidate.is_dir():
        if not (candidate / "config.json").is_file():
            raise ConfigError(f"model directory {candidate.resolve()} has no config.json", key=key)
        return str(candidate.resolve())
    if value.startswith((".", "/", "~")) or value.count("/") != 1:
        raise ConfigError(f"model directory {candidate} does not exist", key=key,
                          fix="point hf_path at a directory with config.json (and weights)")
    return value  # a hub id: from_pretrained resolves it (needs network or a local hub cache)
