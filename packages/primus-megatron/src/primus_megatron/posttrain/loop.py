"""The megatron post-training loop: the pretraining loop (trainer.PretrainLoop) with core's SFT rows as data,
the loss on response tokens only, optionally LoRA adapters on the frozen base, and a Hugging Face result.

- **Data.** core's `primus.posttrain.data` makes the rows once (rank 0 tokenizes into `<run dir>/data-cache`,
  the other ranks read the cache after a barrier). Rows are read in a fresh seeded order every epoch.
- **Loss.** A label of IGNORE_INDEX becomes loss_mask 0; the preset's `calculate_per_token_loss: true` makes
  megatron-core divide the summed gradients by the global batch's trained-token count, so a step optimizes
  the mean loss over every trained token of the global batch, whatever the microbatches and DP ranks hold
  (the logged loss is that same mean).
- **Packing.** Rows hold several samples; positions restart per sample. `isolated`: a block-diagonal causal
  mask goes to megatron-core's local attention (its softmax takes a given mask in place of its causal one),
  so a sample attends only to itself (RoPE is relative, so the offset inside the row changes nothing);
  else attention is causal across the row (upstream's default regime).
- **Checkpoints.** Full fine-tune: pretraining's. LoRA: the same checkpoints (checkpoint.interval, exit_interval,
  SIGTERM, the end) holding only the adapters of the model's state, with their optimizer state, the schedule,
  the step and the RNG; the frozen base is not written, and a resumed run loads it from `hf_path` again.
- **End.** Full fine-tune: core exports the last checkpoint to `<run dir>/hf/` (any layout).
  LoRA: `<run dir>/adapter/` (peft) from the live adapters, and `<run dir>/hf/` merged on request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from loguru import logger

from primus.posttrain.data import IGNORE_INDEX, Rows, SFTData, load_or_tokenize
from primus_megatron.posttrain.settings import SFTSettings
from primus_megatron.trainer import PretrainLoop


class SFTDataset:
    """Core's rows as megatron samples: item i of the endless stream is a row of epoch i // rows, in that
    epoch's seeded order (every rank computes the same order)."""

    def __init__(self, rows: Rows, indices: list[int], *, seed: int, isolated: bool) -> None:
        self.rows, self.indices, self.seed, self.isolated = rows, indices, seed, isolated
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.indices)

    def order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))}
        return self._orders[epoch]

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        epoch, at = divmod(i, len(self.indices))
        return self.row(self.indices[int(self.order(epoch)[at])])

    def row(self, index: int) -> dict[str, torch.Tensor]:
        r = self.rows.row(index)
        labels = torch.tensor(r["labels"], dtype=torch.long)
        out = {"tokens": torch.tensor(r["input_ids"], dtype=torch.long),
               "labels": labels.clamp(min=0),  # megatron's cross-entropy indexes the vocabulary: no -100
               "loss_mask": (labels != IGNORE_INDEX).float(),
               "position_ids": torch.tensor(r["position_ids"], dtype=torch.long)}
        if self.isolated:
            out["attention_mask"] = isolation_mask(torch.tensor(r["segment_ids"], dtype=torch.long))
        return out


class _Stream:
    """`dataset[i]` for trainer.microbatches, which reads sample `i % len(dataset)`: len is made huge so the
    epoch order above decides."""

    def __init__(self, dataset: SFTDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.dataset.sample(i)


def isolation_mask(segments: torch.Tensor) -> torch.Tensor:
    """(1, s, s) bool, True where attention is cut (megatron's convention): a position sees the earlier
    positions of its own sample; padding (segment 0) sees only itself."""
    s = segments.numel()
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    same = segments[:, None] == segments[None, :]
    keep = causal & same
    keep |= torch.eye(s, dtype=torch.bool)
    return (~keep).unsqueeze(0)


def is_adapter_key(key: str) -> bool:
    """Whether a key of the model's sharded state is a LoRA matrix (what a LoRA checkpoint keeps)."""
    return key.rsplit(".", 1)[-1] in ("lora_A", "lora_B")


class PostTrainLoop(PretrainLoop):
    """PretrainLoop with `build_data`, `adapt_model` and the end of the run replaced (see the module doc)."""

    def __init__(self, args: Any, *, ctx: Any, sft: SFTSettings, **kwargs: Any) -> None:
        self.ctx, self.sft = ctx, sft
        kwargs["hf_path"] = self.sft.hf_path
        super().__init__(args, **kwargs)
        self.lora_layers: list[Any] = []

    def build_data(self) -> tuple[Any, Any]:
        a, rank = self.args, torch.distributed.get_rank()
        rows = None
        if rank == 0:
            rows = self._rows(self.sft.data)
        torch.distributed.barrier()  # rank 0 wrote the cache; the others read it
        if rows is None:
            rows = self._rows(self.sft.data)
        valid_fraction = self.ctx.module.module.data.valid_fraction or 0.0
        held = int(round(rows.count * valid_fraction)) if a.eval_iters else 0
        if held >= rows.count:
            held = rows.count - 1
        train = list(range(rows.count - held))
        valid = list(range(rows.count - held, rows.count))
        logger.info(f"post-training ({self.sft.method}): {len(train)} training rows"
                    + (f", {held} held out for validation" if held else "")
                    + (f"; packed ({'isolated' if self.sft.isolated else 'causal'} attention)"
                       if self.sft.data.packing else "")
                    + f"; loss on {rows.trained_tokens():,} trained tokens per epoch (mean over each global batch's)")
        if a.eval_iters and a.eval_interval and not valid:
            logger.warning("eval_iters is set but no rows are held out (data.valid_fraction): no validation")
            a.eval_iters = 0
        make = lambda idx: _Stream(SFTDataset(rows, idx, seed=a.seed, isolated=self.sft.isolated))  # noqa: E731
        return make(train), make(valid) if valid else None

    def _rows(self, request: SFTData) -> Rows:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(request.tokenizer_dir)
        rows = load_or_tokenize(request, tokenizer, self.ctx.run_dir / "data-cache", rank=self.ctx.rank)
        top = int(max(rows.tokens)) if len(rows.tokens) else 0
        if top >= self.args.vocab_size:
            from primus.errors import ConfigError

            raise ConfigError(f"the tokenizer at {request.tokenizer_dir} makes token {top}, beyond the model's "
                              f"vocabulary of {self.args.vocab_size}", key="data.tokenizer",
                              fix="use the model's own tokenizer")
        return rows

    def adapt_model(self, model: list[torch.nn.Module]) -> list[torch.nn.Module]:
        if self.sft.lora is None:
            return model
        from primus_megatron.posttrain.lora import add_lora, base_fingerprint

        if not self.sft.hf_path:
            from primus.errors import ConfigError

            raise ConfigError("LoRA adapts a pretrained model: no weights to start from", key="model",
                              fix="set model: {hf_path: DIR} (a local Hugging Face model directory)")
        self.lora_layers = add_lora(model, self.sft.lora, seed=self.args.seed)
        self.base_digest = base_fingerprint(model)
        self.checkpoint_filter = is_adapter_key
        return model

    def _resuming(self) -> bool:
        """A LoRA checkpoint holds the adapters only: the base is loaded from hf_path whether or not it resumes."""
        return self.sft.lora is None and super()._resuming()

    def finish(self) -> None:
        """LoRA's result: `<run dir>/adapter/` (+ merged `<run dir>/hf/`); every rank calls, rank 0 writes. A full
        fine-tune's `<run dir>/hf/` is core's export of the last checkpoint (checkpoint.export: hf, core's default
        for full post-training) once the job is done."""
        if self.sft.lora is not None:
            from primus_megatron.posttrain.lora import write_outputs

            write_outputs(self, Path(self.ctx.run_dir))
