"""The training batches on a GPU: DataLoader workers build them into pinned memory, one batch ahead
each, in the order data.microbatches builds them inline (which the CPU keeps: its cores train).
Imports torch only, not megatron."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch


class _RankBatches:
    """Sample indices of this rank's microbatches from global batch `first_batch` to the last, in
    data.microbatches' order (the DataLoader's batch sampler: it runs in the training process)."""

    def __init__(self, length: int, first_batch: int, args: SimpleNamespace, dp_rank: int, dp_size: int) -> None:
        self.length, self.first_batch, self.dp_rank = length, first_batch, dp_rank
        self.steps, self.gbs, self.mbs = args.train_iters, args.global_batch_size, args.micro_batch_size
        self.share = self.gbs // dp_size

    def __iter__(self) -> Iterator[list[int]]:
        for batch_index in range(self.first_batch, self.steps):
            first = batch_index * self.gbs + self.dp_rank * self.share
            for start in range(first, first + self.share, self.mbs):
                yield [i % self.length for i in range(start, start + self.mbs)]


def _stack(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]
            if samples[0][key] is not None}


def train_loader(dataset: Any, first_batch: int, args: SimpleNamespace, dp_rank: int, dp_size: int,
                 workers: int) -> torch.utils.data.DataLoader:
    """This rank's training microbatches from global batch `first_batch` on, built by `workers`
    processes into pinned memory (with CUDA), one batch ahead each."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=_RankBatches(len(dataset), first_batch, args, dp_rank, dp_size), collate_fn=_stack,
        num_workers=workers, pin_memory=torch.cuda.is_available(), prefetch_factor=1,
        multiprocessing_context=getattr(args, "multiprocessing_context", None))
