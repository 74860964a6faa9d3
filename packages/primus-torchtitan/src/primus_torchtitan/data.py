"""Data for TorchTitan's Trainer (imports torchtitan).

- Mock data: a TorchTitan dataloader component of our own (TorchTitan 0.3 extends by components),
  yielding seeded, learnable token sequences; resumable, since its state is the sample index.
- A local JSONL corpus: registered in TorchTitan's dataset table as `primus_jsonl`, so it goes
  through TorchTitan's own HuggingFace text dataset path with the local tokenizer.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer

JSONL_DATASET = "primus_jsonl"


class MockTextDataset(IterableDataset, Stateful):
    """Arithmetic token progressions with a random start and stride per sample: easy to learn,
    so the loss falls in a few steps.

    Each sample depends on (seed, its global number) only. Rank r's j-th sample is global sample
    ((j // batch) * dp_world + r) * batch + j % batch, so one optimizer step of a global batch sees
    the same samples whatever the data-parallel layout (2 ranks of 2, or 1 rank accumulating 2 x 2),
    and the position resumes under another layout (`MockDataLoader.load_state_dict`)."""

    def __init__(self, *, vocab_size: int, seq_len: int, seed: int, dp_rank: int, dp_world: int = 1,
                 batch: int = 1) -> None:
        self.vocab_size, self.seq_len, self.seed, self.dp_rank = vocab_size, seq_len, seed, dp_rank
        self.dp_world, self.batch = dp_world, max(1, batch)
        self.sample_idx = 0

    def global_index(self, index: int) -> int:
        return ((index // self.batch) * self.dp_world + self.dp_rank) * self.batch + index % self.batch

    def _sample(self, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_index(index))
        start = int(torch.randint(0, self.vocab_size, (1,), generator=g))
        stride = int(torch.randint(1, 8, (1,), generator=g))
        return (start + stride * torch.arange(self.seq_len + 1)) % self.vocab_size

    def __iter__(self) -> Any:
        while True:
            tokens = self._sample(self.sample_idx)
            self.sample_idx += 1
            yield {"input": tokens[:-1], "positions": torch.arange(self.seq_len)}, tokens[1:]

    def state_dict(self) -> dict[str, Any]:
        return {"sample_idx": self.sample_idx}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sample_idx = int(state_dict["sample_idx"])


#: the dataloader state key of the synthetic data's position, the same on every rank
MOCK_POSITION = "mock_global_batches"


class MockDataLoader(ParallelAwareDataloader):
    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = "mock"
        vocab_size: int = 512
        seed: int = 1234
        infinite: bool = True  # what TorchTitan's validator sets; synthetic data never ends anyway

    def __init__(self, config: Config, *, dp_world_size: int, dp_rank: int, tokenizer: Any, seq_len: int,
                 local_batch_size: int, snapshot_every_n_steps: int | None = 1, **kwargs: Any) -> None:
        dataset = MockTextDataset(vocab_size=config.vocab_size, seq_len=seq_len, seed=config.seed, dp_rank=dp_rank,
                                  dp_world=dp_world_size, batch=local_batch_size)
        self.mock = dataset
        super().__init__(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, num_workers=0,
                         batch_size=local_batch_size, snapshot_every_n_steps=snapshot_every_n_steps)

    # The position is saved as global batches consumed (every rank consumed as many at a step
    # boundary; no worker prefetches with num_workers=0), so a checkpoint of 2 data-parallel ranks
    # resumes on 1 at the sample an uninterrupted 1-rank run would read next.
    def state_dict(self) -> dict[str, Any]:
        batches = self.mock.sample_idx // self.mock.batch
        return {MOCK_POSITION: pickle.dumps({"global_batches": batches * self.dp_world_size,
                                             "batch": self.mock.batch}),
                "world_size": self.dp_world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict or MOCK_POSITION not in state_dict:  # a checkpoint of the per-rank format before
            super().load_state_dict(state_dict)
            return
        from primus_torchtitan.checkpoint import restricted_loads

        position = restricted_loads(state_dict[MOCK_POSITION], what="the mock data position")
        global_samples = int(position["global_batches"]) * int(position["batch"])
        self.mock.sample_idx = global_samples // (self.dp_world_size * self.mock.batch) * self.mock.batch


class MockTokenizer(BaseTokenizer):
    """Stands in for a tokenizer when the data is synthetic: TorchTitan always builds one."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        vocab_size: int = 512

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__()
        self.vocab_size = config.vocab_size
        self.eos_id = config.vocab_size - 1

    def encode(self, *args: Any, **kwargs: Any) -> list[int]:
        raise NotImplementedError("mock data has no text")

    def decode(self, *args: Any, **kwargs: Any) -> str:
        raise NotImplementedError("mock data has no text")

    def get_vocab_size(self) -> int:
        return self.vocab_size


def register_jsonl_dataset(text_key: str) -> None:
    """Add `primus_jsonl` to TorchTitan's dataset table: a local JSONL file, `text_key` per line."""
    from datasets import load_dataset
    from torchtitan.hf_datasets import DatasetConfig
    from torchtitan.hf_datasets.text_datasets import DATASETS

    DATASETS[JSONL_DATASET] = DatasetConfig(
        path="",
        loader=lambda path: load_dataset("json", data_files=path, split="train"),
        sample_processor=partial(_text_of, text_key=text_key),
    )


def _text_of(sample: dict[str, Any], *, text_key: str) -> str:
    return sample[text_key]


#: the files a tokenizer directory holds (TorchTitan's HuggingFaceTokenizer reads these), not weights
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "vocab.txt", "merges.txt", "generation_config.json", "config.json"]


def tokenizer_directory(location: str | None, *, mock: bool, fallback: str) -> str:
    """TorchTitan's `hf_assets_path` for this run: a local directory as written; a Hugging Face
    repository id (upstream's presets name tokenizers so) is downloaded into the Hugging Face cache
    first, tokenizer files only, as upstream's prepare step does. Mock data reads no tokenizer."""
    from primus_torchtitan.translate import hub_repository

    if not location:
        return fallback
    repo = hub_repository(location)
    if repo is None or mock:
        return location if repo is None else fallback
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=repo, allow_patterns=TOKENIZER_FILES)
