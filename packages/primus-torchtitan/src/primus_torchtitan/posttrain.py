"""The torchtitan post_trainer: full fine-tuning with loss masking on TorchTitan's own Trainer.

Core makes the rows (primus.posttrain.data: records -> chat-rendered tokens -> padded or packed rows
with IGNORE_INDEX labels, cached per run); this module feeds them to TorchTitan as its batches, as
a dataloader component of ours. Everything else is TorchTitan's, unchanged:

- **Loss.** TorchTitan 0.3's cross-entropy ignores label -100 (its IGNORE_INDEX, core's too) and
  divides the summed token losses by the trained tokens of the whole optimizer step
  (`global_valid_tokens`: every micro-batch of the gradient accumulation, all-reduced over the
  data-parallel ranks; FSDP's own gradient division is switched off). So the loss is, as core
  defines it, the sum of the losses of the trained tokens in the global batch over their count:
  no patch is needed, and a 2-rank FSDP step equals a 1-process step of the same rows.
- **Packing.** TorchTitan's FlexAttention and varlen backends build a document mask from the
  positions a batch carries (a new document where the position is 0). Core's rows restart the
  positions at every packed sample, so `packed_attention: isolated` (the default) is those
  positions; `causal` hands TorchTitan a row's plain positions 0..seq-1 instead, so the packed
  samples read as one sequence and attend across their boundaries.
- **Out.** The last step is checkpointed (the preset enables checkpoints) and core's
  `checkpoint.export: hf`, which it sets for a full fine-tune, writes `<run dir>/hf/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchtitan.components.dataloader import ParallelAwareDataloader

from primus.posttrain.data import Rows, SFTData, load_or_tokenize
from primus_torchtitan.data import MockDataLoader, MockTextDataset
from primus_torchtitan.translate import SFT_DATASET, native_get


class SFTRowsDataset(MockTextDataset):
    """Core's rows, in a fresh seeded order each epoch, split over the data-parallel ranks as the
    synthetic data is (`MockTextDataset.global_index`): one optimizer step of a global batch reads
    the same rows whatever the layout, and the position resumes under another layout."""

    def __init__(self, rows: Rows, *, seq_len: int, seed: int, dp_rank: int, dp_world: int, batch: int,
                 isolated: bool) -> None:
        super().__init__(vocab_size=0, seq_len=seq_len, seed=seed, dp_rank=dp_rank, dp_world=dp_world, batch=batch)
        self.rows, self.isolated = rows, isolated
        self._order: tuple[int, torch.Tensor] | None = None

    def _row_of(self, global_index: int) -> int:
        epoch, position = divmod(global_index, self.rows.count)
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.rows.count, generator=g))
        return int(self._order[1][position])

    def sample(self, global_index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        row = self.rows.row(self._row_of(global_index))
        positions = row["position_ids"] if self.isolated else range(self.seq_len)
        return ({"input": torch.tensor(row["input_ids"]), "positions": torch.tensor(positions)},
                torch.tensor(row["labels"]))

    def __iter__(self) -> Any:
        while True:
            item = self.sample(self.global_index(self.sample_idx))
            self.sample_idx += 1
            yield item


class SFTDataLoader(MockDataLoader):
    """TorchTitan's dataloader for a post_trainer module: core's rows, tokenized once per run
    (every rank reads the cache the first one wrote, or makes the same one). Its checkpointed
    position is the synthetic loader's (global batches consumed)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MockDataLoader.Config):
        dataset: str = SFT_DATASET
        request: SFTData | None = None
        cache_dir: str = ""
        isolated: bool = True
        log_rank: int = 0

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer: Any, seq_len: int,
                 local_batch_size: int, snapshot_every_n_steps: int | None = 1, **kwargs: Any) -> None:
        from transformers import AutoTokenizer

        request = config.request
        assert request is not None and request.seq_length == seq_len, (request, seq_len)
        rows = load_or_tokenize(request, AutoTokenizer.from_pretrained(request.tokenizer_dir), Path(config.cache_dir),
                                rank=config.log_rank)
        self.mock = SFTRowsDataset(rows, seq_len=seq_len, seed=config.seed, dp_rank=dp_rank, dp_world=dp_world_size,
                                   batch=local_batch_size, isolated=config.isolated)
        ParallelAwareDataloader.__init__(self, self.mock, dp_rank=dp_rank, dp_world_size=dp_world_size, num_workers=0,
                                         batch_size=local_batch_size, snapshot_every_n_steps=snapshot_every_n_steps)


def feed_sft_rows(config: Any, ctx: Any) -> None:
    """Make a `Trainer.Config` built for the module's records train on core's rows: our dataloader
    in place of TorchTitan's text one, and no text tokenizer (the rows are tokens already)."""
    from torchtitan.models.common.config_utils import decoder_vocab_size

    from primus_torchtitan.data import MockTokenizer

    module = ctx.module.module
    tokenizer_dir = module.data.tokenizer or ctx.module.hf_path
    seed = native_get(ctx.native, "debug.seed")
    config.dataloader = SFTDataLoader.Config(
        request=SFTData.from_module(module, config.training.seq_len, tokenizer_dir),
        cache_dir=str(ctx.run_dir / "data-cache"), seed=1234 if seed is None else int(seed),
        isolated=not (module.data.packing and module.data.packed_attention == "causal"), log_rank=ctx.rank)
    config.tokenizer = MockTokenizer.Config(vocab_size=decoder_vocab_size(config.model_spec))
