"""The hf backend's post_trainer: supervised fine-tuning (full or LoRA) on core's post-training rows.

The pre_trainer loop (`HFAdapter`) runs unchanged; this subclass swaps what it trains on and what it leaves:

- **Data.** Core's rows (`primus.posttrain.data`: records -> masked tokens -> padded or packed rows, cached in
  `<run dir>/data-cache`), tokenized once by rank 0 and read from the cache by the others. A row is
  (input_ids, labels, position_ids); labels are IGNORE_INDEX (-100) where the next token is not trained.
- **Loss.** The sum of token losses over the trained labels of the *global* batch divided by their count:
  every micro batch is scored with transformers' own loss (so a MoE router loss is kept) with
  `num_items_in_batch` = (trained labels of the global batch) / (ranks x accumulation steps), which with
  DDP's / FSDP's gradient averaging gives exactly that mean, whatever the split of rows over ranks.
- **Packing.** Position ids restart at every packed sample. With `packed_attention: isolated` (the default)
  no attention mask is passed, and transformers' masking reads the restarts as sample boundaries (a
  block-diagonal causal mask; flash-attention's varlen path the same way); `causal` passes an all-ones mask,
  so samples attend to the ones packed before them (upstream's regime).
- **LoRA** (`finetune.method: lora`) with peft on exactly the modules core's `adapted_modules` names
  (Hugging Face paths, dense MLP layers only), base weights frozen and checked bit-identical at the end (a digest
  of the frozen weights before and after the steps). DDP, or FSDP2 with one group per decoder layer of the model
  inside peft's (every rank loads the base whole, then shards it). A checkpoint holds the adapter's matrices
  and their optimizer state only: resume rebuilds the base from `hf_path` and sets the adapter.
- **Out.** Full: `<run dir>/hf/`, core's export of the last step's checkpoint (`checkpoint.export: hf` is core's
  default for a full fine-tune). LoRA: `<run dir>/adapter/` written by core's `write_adapter` (peft's format, with
  the tokenizer and the chat template the run used) and, with `lora.merge`, the base model with
  `W + (alpha / r) B A` in `<run dir>/hf/`. `primus generate RUN_DIR` reads either.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from primus.errors import ConfigError, TrainingError
from primus.posttrain.data import IGNORE_INDEX, Rows, SFTData, load_or_tokenize, template_text
from primus.posttrain.lora import adapted_modules, adapter_key, write_adapter
from primus.runs.export import HF_EXPORT_DIR
from primus_hf.adapter import TMP_PREFIX, HFAdapter
from primus_hf.data import SampleOrder, TokenBlocks

ADAPTER_DIR = "adapter"  # primus.posttrain.generate's name for <run dir>/adapter/
PEFT_PREFIX = "base_model.model."  # a PeftModelForCausalLM's prefix before the transformers model's names


def rows_tensor(rows: Rows) -> torch.Tensor:
    """Core's rows as one int64 tensor [rows, 3, seq_length]: input_ids, labels, position_ids."""
    count, width = rows.count, rows.width

    def grid(values: Any) -> torch.Tensor:
        return torch.frombuffer(bytearray(values), dtype=torch.int32).view(count, width).long()

    tokens, trained = grid(rows.tokens), grid(rows.trainable).bool()
    labels = torch.where(trained[:, 1:], tokens[:, 1:], torch.full_like(tokens[:, 1:], IGNORE_INDEX))
    return torch.stack([tokens[:, :-1], labels, grid(rows.positions)[:, :-1]], dim=1)


def sft_forward(model: torch.nn.Module, rows: torch.Tensor, num_items: float | torch.Tensor, *,
                isolated: bool = True) -> Any:
    """The model's output on rows of `rows_tensor`; `.loss` is the summed loss of the trained labels divided by
    `num_items`. `isolated`: packed samples do not attend to each other (no mask: transformers reads the position
    restarts); else an all-ones mask (causal across the packed samples)."""
    ids, labels, positions = (rows[:, i].contiguous() for i in range(3))
    mask = None if isolated else torch.ones_like(ids)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels, shift_labels=labels,
                 num_items_in_batch=num_items, use_cache=False)


def trained_labels(rows: torch.Tensor) -> int:
    return int((rows[:, 1] != IGNORE_INDEX).sum())


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (a LoRA run's adapter matrices), whole and on the CPU, by state-dict name.
    Every rank calls: an FSDP-sharded parameter is gathered."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().to("cpu", copy=True)
    return out


def base_name(name: str) -> str:
    """A peft model's parameter name as the base model's (`...q_proj.base_layer.weight` -> `...q_proj.weight`)."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def frozen_digest(model: torch.nn.Module) -> str:
    """sha256 over the frozen parameters this rank holds (its shards under FSDP), in order of their base-model
    names: name, then the tensor's bytes. One process's digest of a LoRA model is that of its base's weights."""
    h = hashlib.sha256()
    frozen = {base_name(n): p for n, p in model.named_parameters() if not p.requires_grad}
    for name in sorted(frozen):
        p = frozen[name]
        local = p.to_local() if hasattr(p, "to_local") else p
        h.update(name.encode())
        h.update(local.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class SFTAdapter(HFAdapter):
    """`HFAdapter` for post_trainer modules (core's ResolvedModule.kind == "posttrain")."""

    # ----------------------------------------------------------------------- model

    @property
    def finetune(self) -> Any:
        return self.ctx.module.module.finetune

    def build_model(self, weights: bool = True) -> torch.nn.Module:
        model = super().build_model(weights)
        if self.finetune.is_lora:
            model = self._with_lora(model)
        return model

    @property
    def checkpoints_hold_every_weight(self) -> bool:  # type: ignore[override]
        return not self.finetune.is_lora

    def model_state(self) -> dict[str, torch.Tensor]:
        """LoRA: the adapter's matrices only (the base is `hf_path`'s, frozen); full: the whole model."""
        if not self.finetune.is_lora:
            return super().model_state()
        return trainable_state(self.model)

    def load_model_state(self, state: dict[str, torch.Tensor], checkpoint: Path) -> None:
        if not self.finetune.is_lora:
            return super().load_model_state(state, checkpoint)
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        wanted = {name for name, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(wanted - set(state))
        if missing:
            raise ConfigError(f"checkpoint {checkpoint} is not one of this LoRA run: it has no {missing[0]}",
                              key="checkpoint.resume", fix="resume with the run's own finetune.lora settings, or "
                                                           "checkpoint.resume: never")
        set_model_state_dict(self.model, {k: state[k] for k in wanted},
                             options=self._state_dict_options(strict=False))

    def _decoder_layers(self, model: torch.nn.Module) -> Any:
        # a peft model: the decoder layers of the model inside it
        return super()._decoder_layers(model.get_base_model() if self.finetune.is_lora else model)

    def _slice_loading(self, path: Path) -> bool:
        # LoRA wraps the loaded model before sharding (peft renames the layers it adapts): every rank loads it
        return not self.finetune.is_lora and super()._slice_loading(path)

    def _adapted_paths(self) -> dict[str, tuple[int, int]]:
        spec = self.ctx.module.model
        if spec is None:
            raise ConfigError("LoRA needs a model spec (model: {hf_path: DIR} or a model preset)", key="model")
        return adapted_modules(spec, self.finetune.lora_settings.targets())

    def _with_lora(self, model: torch.nn.Module) -> torch.nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ConfigError("LoRA on the hf backend needs peft", key="finetune.method",
                              fix="pip install 'primus-hf[lora]'") from None

        lora = self.finetune.lora_settings
        paths = self._adapted_paths()
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                            target_modules=sorted(paths), task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        found = {name[len(PEFT_PREFIX):] for name, m in peft_model.named_modules()
                 if name.startswith(PEFT_PREFIX) and hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
        if found != set(paths):
            missing = sorted(set(paths) - found)[:3]
            raise ConfigError(f"LoRA: the model has no linear layer at {', '.join(missing)}", key="finetune.lora.target_modules",
                              fix="adapt attention projections only (q_proj, k_proj, v_proj, o_proj)")
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        logger.info(f"LoRA r={lora.rank} alpha={lora.alpha} dropout={lora.dropout} on {len(paths)} linear layers "
                    f"({', '.join(lora.targets())}): {trainable / 1e6:.3f}M trainable parameters")
        return peft_model

    # ----------------------------------------------------------------------- data

    def load_data(self, model: torch.nn.Module) -> None:
        from transformers import AutoTokenizer

        module = self.ctx.module
        data = module.module.data
        tokenizer_dir = data.tokenizer or self.ctx.native.get("tokenizer_path") or module.hf_path \
            or self.ctx.native.get("hf_path")
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is not None and len(tokenizer) > int(vocab):
            raise ConfigError(f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the model's vocab_size is "
                              f"{vocab}", key="data.tokenizer", fix="fine-tune with the model's own tokenizer")
        request = SFTData.from_module(module.module, self.settings.seq_length, tokenizer_dir)
        cache = self.ctx.run_dir / "data-cache"
        if self.rank == 0:  # rank 0 tokenizes (with a progress bar); the others read its cache
            rows = load_or_tokenize(request, tokenizer, cache, rank=0)
        self._barrier()
        if self.rank != 0:
            rows = load_or_tokenize(request, tokenizer, cache, rank=self.rank)
        template = template_text(data.chat_template)
        if template is not None:  # the outputs carry the template the run trained with
            tokenizer.chat_template = template
        self.blocks = TokenBlocks(train=rows_tensor(rows), valid=torch.empty(0, 3, self.settings.seq_length,
                                                                              dtype=torch.long), tokenizer=tokenizer)
        self.shifted = False
        self.isolated = not (data.packing and data.packed_attention == "causal")
        self.order = SampleOrder(len(self.blocks.train), self.settings.seed)
        self._items_step, self._items = -1, 0  # the trained labels of the global batch of step _items_step
        logger.info(f"fine-tuning on {len(self.blocks.train)} rows, {rows.trained_tokens()} trained tokens per "
                    f"epoch ({'LoRA' if self.finetune.is_lora else 'full'}; loss = mean over the trained tokens of "
                    f"each global batch)")

    def micro_rows(self, step: int, micro: int) -> torch.Tensor:
        if step != self._items_step:  # every rank counts the whole global batch: no communication
            g = self.global_batch
            self._items_step, self._items = step, trained_labels(self.blocks.train[self.order.blocks(step * g, g)])
        return super().micro_rows(step, micro)

    def _loss(self, rows: torch.Tensor) -> torch.Tensor:
        # the loop divides by the accumulation steps and DDP/FSDP average over ranks: undo both in the divisor
        share = self._items / (self.world_size * self.settings.accumulation)
        return sft_forward(self.train_model, rows, torch.tensor(share, device=rows.device),
                           isolated=self.isolated).loss

    def train(self, start: int) -> bool:
        """LoRA: the frozen base is checked bit-identical after the steps (a digest before and after, every
        rank; the log gives it)."""
        if not self.finetune.is_lora:
            return super().train(start)
        before = frozen_digest(self.model)
        finished = super().train(start)
        after = frozen_digest(self.model)
        if after != before:
            raise TrainingError("LoRA: a frozen base weight changed during training")
        logger.info(f"LoRA: base weights bit-identical after training (frozen weights sha256 {after})")
        return finished

    @torch.no_grad()
    def held_out_loss(self) -> float:
        return float("nan")  # post-training holds nothing out (train.eval_interval has nothing to score)

    # ----------------------------------------------------------------------- outputs

    def save_final_model(self) -> None:
        """LoRA: the adapter (and the merged model). A full fine-tune's `<run dir>/hf/` is core's export of the
        last step's checkpoint (`checkpoint.export: hf`, core's default for a full fine-tune)."""
        if not self.finetune.is_lora:
            return
        state = self.model_state()  # every rank joins
        if self.rank == 0:
            with tempfile.TemporaryDirectory(dir=self.ctx.run_dir, prefix=TMP_PREFIX) as tokenizer_dir:
                self.blocks.tokenizer.save_pretrained(tokenizer_dir)
                self._save_lora(state, Path(tokenizer_dir))
        self._barrier()

    def _save_hf(self, save: Any, tokenizer_dir: Path) -> None:
        """`<run dir>/hf/`: the model `save(dir)` writes and the run's tokenizer, renamed into place."""
        final = self.ctx.run_dir / HF_EXPORT_DIR
        tmp = self.ctx.run_dir / f"{TMP_PREFIX}{HF_EXPORT_DIR}"
        shutil.rmtree(tmp, ignore_errors=True)
        save(str(tmp))
        for file in tokenizer_dir.iterdir():
            shutil.copy2(file, tmp / file.name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        logger.info(f"merged model saved in Hugging Face format: {final}")

    def _save_lora(self, state: dict[str, torch.Tensor], tokenizer_dir: Path) -> None:
        from safetensors.torch import save_file

        lora = self.finetune.lora_settings
        tensors = {}
        for path in self._adapted_paths():
            for which in ("A", "B"):
                tensors[adapter_key(path, which)] = state[f"{PEFT_PREFIX}{path}.lora_{which}.default.weight"] \
                    .detach().to(torch.float32).contiguous()
        base = self.ctx.module.hf_path or self.ctx.native.get("hf_path")
        out = write_adapter(self.ctx.run_dir / ADAPTER_DIR, tensors, spec=self.ctx.module.model, lora=lora,
                            base_model=str(base), save_file=save_file, tokenizer_dir=tokenizer_dir)
        logger.info(f"LoRA adapter saved (peft format): {out}")
        if lora.merge:
            self._save_hf(lambda out: merged_model(Path(str(base)), tensors, lora.alpha / lora.rank)
                          .save_pretrained(out), tokenizer_dir)


def merged_model(base: Path, tensors: dict[str, torch.Tensor], scale: float) -> torch.nn.Module:
    """The base model of `base` with every adapted weight W replaced by W + scale * B @ A (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            path = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            modules[path].weight += scale * (b @ a)
    return model
