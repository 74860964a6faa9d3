"""Training data as fixed-length token blocks, and the order they are read in.

Both sources end as two int64 tensors of shape [blocks, seq_length] (train and held-out):
- mock: a seeded Markov chain over the vocabulary (each token has a few likely successors), so a
  model can learn it and the loss visibly falls; needs no files.
- corpus: local JSONL (`text_key`) or text (one document per line), split into train and held-out
  documents, tokenized with a local tokenizer, joined with EOS and cut into blocks.

The read order is a pure function of (seed, sample index): step s of a job with global batch G reads
samples [s*G, (s+1)*G). A resumed run therefore needs only the step number to continue exactly where
the stopped one was; no sampler state has to be saved.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from primus.errors import ConfigError
from primus.runs import corpus

MOCK_SUCCESSORS = 4  # likely next tokens per token: the loss can fall to about ln(4) = 1.39
MOCK_TRAIN_BLOCKS = 2048
MOCK_VALID_BLOCKS = 64


@dataclass
class TokenBlocks:
    train: torch.Tensor  # [n, seq_length] int64
    valid: torch.Tensor  # [m, seq_length] int64, may be empty
    tokenizer: Any = None  # saved next to the final model when there is one


# --------------------------------------------------------------------------- mock


def mock_blocks(*, vocab_size: int, seq_length: int, seed: int) -> TokenBlocks:
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab_size, (vocab_size, MOCK_SUCCESSORS), generator=generator)

    def chains(count: int) -> torch.Tensor:
        tokens = torch.empty(count, seq_length, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, vocab_size, (count,), generator=generator)
        choice = torch.randint(0, MOCK_SUCCESSORS, (count, seq_length), generator=generator)
        for t in range(1, seq_length):
            tokens[:, t] = successors[tokens[:, t - 1], choice[:, t]]
        return tokens

    return TokenBlocks(train=chains(MOCK_TRAIN_BLOCKS), valid=chains(MOCK_VALID_BLOCKS))


# --------------------------------------------------------------------------- local corpus


def read_documents(path: Path, text_key: str) -> list[str]:
    """The corpus's documents in file order; a bad line is a ConfigError naming `file:line` (core's reader)."""
    return list(corpus.read_documents(path, text_key))


def split_documents(docs: list[str], valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Hold out a seeded random share of whole documents (at least one when asked for any)."""
    if valid_fraction <= 0 or len(docs) < 2:
        return docs, []
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(len(docs) * valid_fraction))])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def pack(token_lists: list[list[int]], seq_length: int, eos_id: int | None) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into full blocks; the remainder is dropped."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    usable = len(stream) // seq_length * seq_length
    return torch.tensor(stream[:usable], dtype=torch.long).view(-1, seq_length)


def corpus_blocks(*, path: Path, text_key: str, tokenizer_dir: Path, seq_length: int, valid_fraction: float,
                  seed: int, vocab_size: int | None) -> TokenBlocks:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{vocab_size}", key="data.tokenizer")
    train_docs, valid_docs = split_documents(read_documents(path, text_key), valid_fraction, seed)

    def encode(docs: list[str]) -> list[list[int]]:
        return tokenizer(docs, add_special_tokens=False)["input_ids"] if docs else []

    eos = tokenizer.eos_token_id
    train = pack(encode(train_docs), seq_length, eos)
    valid = pack(encode(valid_docs), seq_length, eos)
    if len(train) == 0:
        raise ConfigError(f"corpus {path} gives no full block of {seq_length} tokens",
                          key="data.path", fix="use a larger corpus or a smaller train.seq_length")
    return TokenBlocks(train=train, valid=valid, tokenizer=tokenizer)


def eval_order_blocks(*, path: Path, text_key: str, tokenizer_dir: Path, seq_length: int,
                      vocab_size: int | None) -> TokenBlocks:
    """`data_blocks: eval`: core's evaluation blocks of the whole corpus (documents in file order,
    EOS after each, blocks of seq_length + 1 ids, no held-out split), the tokens `primus eval`
    scores on every backend; a row predicts its last seq_length ids from the ones before them."""
    from transformers import AutoTokenizer

    from primus.runs.evaluate import eval_blocks

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{vocab_size}", key="data.tokenizer")
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer {tokenizer_dir} has no eos_token", key="data.tokenizer")
    blocks = eval_blocks(read_documents(path, text_key),
                         lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                         tokenizer.eos_token_id, seq_length)
    if not blocks:
        raise ConfigError(f"corpus {path} gives no full block of {seq_length + 1} tokens",
                          key="data.path", fix="use a larger corpus or a smaller train.seq_length")
    return TokenBlocks(train=torch.tensor(blocks, dtype=torch.long),
                       valid=torch.empty(0, seq_length + 1, dtype=torch.long), tokenizer=tokenizer)


def load_blocks(native: dict[str, Any], vocab_size: int | None) -> TokenBlocks:
    seq_length, seed = int(native["seq_length"]), int(native["seed"])
    if native.get("data_blocks") == "eval":
        return eval_order_blocks(path=Path(native["data_path"]), text_key=native.get("text_key") or "text",
                                 tokenizer_dir=Path(native["tokenizer_path"]), seq_length=seq_length,
                                 vocab_size=vocab_size)
    if native.get("mock_data"):
        if vocab_size is None:
            raise ConfigError("mock data needs the model's vocab_size", key="model")
        return mock_blocks(vocab_size=vocab_size, seq_length=seq_length, seed=seed)
    return corpus_blocks(path=Path(native["data_path"]), text_key=native.get("text_key") or "text",
                         tokenizer_dir=Path(native["tokenizer_path"]), seq_length=seq_length,
                         valid_fraction=float(native.get("valid_fraction") or 0.0), seed=seed,
                         vocab_size=vocab_size)


# --------------------------------------------------------------------------- read order


class SampleOrder:
    """Sample index -> block index: a fresh seeded permutation of the blocks every epoch, or the
    blocks in order (`shuffle=False`, for `data_blocks: eval`)."""

    def __init__(self, num_blocks: int, seed: int, shuffle: bool = True) -> None:
        self.num_blocks = num_blocks
        self.seed = seed
        self.shuffle = shuffle
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def blocks(self, first_sample: int, count: int) -> torch.Tensor:
        out = []
        for sample in range(first_sample, first_sample + count):
            epoch, position = divmod(sample, self.num_blocks)
            if not self.shuffle:
                out.append(position)
                continue
            if epoch != self._epoch:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm, self._epoch = torch.randperm(self.num_blocks, generator=generator), epoch
            out.append(int(self._perm[position]))
        return torch.tensor(out, dtype=torch.long)


def micro_batch(data: torch.Tensor, order: SampleOrder, *, step: int, micro_index: int, rank: int,
                world_size: int, micro_batch_size: int, accumulation: int) -> torch.Tensor:
    """Block rows that `rank` trains on in micro step `micro_index` of `step` (0-based)."""
    global_batch = micro_batch_size * world_size * accumulation
    first = step * global_batch + (micro_index * world_size + rank) * micro_batch_size
    return data[order.blocks(first, micro_batch_size)]
