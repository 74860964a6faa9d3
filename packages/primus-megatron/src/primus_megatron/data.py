"""Data for the trainer: megatron-core's mock GPT dataset, or a local JSONL corpus converted once to
Megatron's indexed `.bin/.idx` format (cached by content hash) and read through its GPTDataset.

Every rank reads the samples it needs itself (the datasets are deterministic), so no broadcast is
needed between tensor-parallel ranks; the sample order is a function of the step, which makes a
resumed run read exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from loguru import logger
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.tokenizers import MegatronTokenizerBase

from primus.errors import ConfigError
from primus.runs.corpus import read_documents

EOD_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[EOS]")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")
CACHE_VERSION = "1"  # bump when the conversion changes, so old caches are not reused


class LocalTokenizer(MegatronTokenizerBase):
    """A local Hugging Face `tokenizer.json` in the shape GPTDataset expects (vocab_size, eod, pad)."""

    def __init__(self, directory: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(directory)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"no tokenizer.json in {directory}", key="data.tokenizer")
        super().__init__(str(file), {})
        self._tok = Tokenizer.from_file(str(file))
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab = vocab
        self.eod = next((vocab[n] for n in EOD_NAMES if n in vocab), None)
        if self.eod is None:
            raise ConfigError(f"tokenizer {file} has no end-of-document token ({', '.join(EOD_NAMES)})",
                              key="data.tokenizer")
        self.pad = next((vocab[n] for n in PAD_NAMES if n in vocab), self.eod)
        self.unique_identifiers = {"class": type(self).__name__, "path": str(file)}

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:  # type: ignore[override]
        return self._vocab

    def tokenize(self, text: str) -> list[int]:  # type: ignore[override]
        return self._tok.encode(text).ids

    def detokenize(self, ids: list[int]) -> str:  # type: ignore[override]
        return self._tok.decode(ids)

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("pretraining has no chat template")


class MockTokenizer(MegatronTokenizerBase):
    """What MockGPTDataset needs from a tokenizer: the model's vocabulary, its last id as end of document."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__("mock", {})
        self._size = vocab_size
        self.eod = vocab_size - 1
        self.pad = vocab_size - 1
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size}

    @property
    def vocab_size(self) -> int:  # type: ignore[override]
        return self._size

    @property
    def vocab(self) -> dict[str, int]:  # type: ignore[override]
        return {}

    def tokenize(self, text: str) -> list[int]:  # type: ignore[override]
        raise NotImplementedError

    def detokenize(self, ids: list[int]) -> str:  # type: ignore[override]
        raise NotImplementedError

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ JSONL -> .bin/.idx


def corpus_fingerprint(corpus: Path, tokenizer_dir: Path, json_key: str) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    for part in (corpus, tokenizer_dir / "tokenizer.json" if tokenizer_dir.is_dir() else tokenizer_dir):
        with part.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    h.update(json_key.encode())
    return h.hexdigest()[:16]


def default_cache_dir(run_dir: str | Path | None = None) -> Path:
    """Where converted corpora go when `data_cache_path` is not set: `$PRIMUS_CACHE_DIR/megatron`,
    else `<workspace>/.cache/megatron` for a run (its run directory is
    `<workspace>/<work_group>/<user_name>/<exp_name>`): on the filesystem every node of a cluster
    sees, which a node-local `~/.cache` is not, and shared by the workspace's runs. Without a run
    (`primus data prepare`), `~/.cache/primus/megatron`.

    Not next to the corpus: shared datasets are often read-only, and a source tree stays clean.
    """
    root = os.environ.get("PRIMUS_CACHE_DIR")
    if root:
        return Path(root) / "megatron"
    if run_dir is not None:
        return Path(run_dir).parents[2] / ".cache" / "megatron"
    return Path.home() / ".cache" / "primus" / "megatron"


def prepare_indexed_dataset(corpus: str | Path, tokenizer_dir: str | Path, *, json_key: str = "text",
                            cache_dir: str | Path | None = None, progress: bool = False) -> str:
    """Tokenize `corpus` (JSONL, or plain text with one document per line) into `<prefix>.bin/.idx`
    once; later calls with the same corpus, tokenizer and key return the cached prefix."""
    corpus, tokenizer_dir = Path(corpus), Path(tokenizer_dir)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    prefix = cache / f"{corpus.stem}-{corpus_fingerprint(corpus, tokenizer_dir, json_key)}"
    if Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file():
        return str(prefix)
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer = LocalTokenizer(tokenizer_dir)
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    tmp = Path(f"{prefix}.tmp-{os.getpid()}")
    # with a progress bar, a first pass counts the documents, and so finds a bad line before any output
    bar = _Progress(sum(1 for _ in corpus_documents(corpus, json_key))) if progress else None
    documents = 0
    try:
        builder = IndexedDatasetBuilder(f"{tmp}.bin", dtype=dtype)
        for text in corpus_documents(corpus, json_key):
            ids = tokenizer.tokenize(text) + [tokenizer.eod]
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            documents += 1
            if bar:
                bar(documents)
        if not documents:
            raise ConfigError("the corpus has no documents", file=str(corpus), key="data.path")
        builder.finalize(f"{tmp}.idx")
    except BaseException:  # a bad line (ConfigError naming file:line) leaves no partial cache entry
        if bar:
            bar.end()  # the error goes on a line of its own
        for suffix in (".bin", ".idx"):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        raise
    os.replace(f"{tmp}.bin", f"{prefix}.bin")  # the .idx last: its presence marks a complete cache entry
    os.replace(f"{tmp}.idx", f"{prefix}.idx")
    logger.info(f"indexed {documents} documents of {corpus} into {prefix}.bin/.idx")
    return str(prefix)


def corpus_documents(corpus: Path, text_key: str) -> Iterator[str]:
    """The corpus's documents in file order, through core's reader (a bad line is a ConfigError
    naming file:line). Megatron-LM also reads `.json` files as JSON lines (its preprocess_data's
    convention), which core's reader takes for plain text; those are read here the same way."""
    if corpus.suffix != ".json":
        yield from read_documents(corpus, text_key)
        return
    with corpus.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
                raise ConfigError(f"is not a JSON line ({reason})", file=str(corpus), line=number, key="data.path",
                                  fix='one JSON object per line, e.g. {"text": "..."}') from None
            text = record.get(text_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ConfigError(f"has no text field '{text_key}'", file=str(corpus), line=number,
                                  key="data.text_key", fix="set data.text_key to the field holding the text")
            yield text


class _Progress:
    """A one-line progress bar on stderr, ended by a newline even when the conversion fails."""

    def __init__(self, total: int) -> None:
        self.total, self.open = total, False

    def __call__(self, done: int) -> None:
        import sys

        if done == self.total or done % max(self.total // 50, 1) == 0:
            width = 30
            filled = width * done // max(self.total, 1)
            sys.stderr.write(f"\rtokenizing [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}")
            self.open = done != self.total
            if not self.open:
                sys.stderr.write("\n")

    def end(self) -> None:
        import sys

        if self.open:
            sys.stderr.write("\n")
            self.open = False


# ------------------------------------------------------------------------------------ datasets


def build_datasets(args: SimpleNamespace, vocab_size: int, *, run_dir: Path | None = None) -> tuple[Any, Any]:
    """Train and validation datasets with as many samples as the run will read. A JSONL corpus is
    converted, and GPTDataset's sample index is cached, in `data_cache_path`, else in
    `default_cache_dir(run_dir)` (the index in its index-cache/)."""
    train_samples = args.train_iters * args.global_batch_size
    evals = (args.train_iters // args.eval_interval + 1) if args.eval_interval else 0
    valid_samples = max(evals * (args.eval_iters or 0) * args.global_batch_size, 1)
    common = dict(random_seed=args.seed, sequence_length=args.seq_length,
                  reset_position_ids=bool(args.reset_position_ids),
                  reset_attention_mask=bool(args.reset_attention_mask), eod_mask_loss=bool(args.eod_mask_loss),
                  create_attention_mask=bool(args.create_attention_mask_in_dataloader),
                  mmap_bin_files=bool(args.mmap_bin_files))
    if args.mock_data:
        config = GPTDatasetConfig(tokenizer=MockTokenizer(args.vocab_size), split="99,1,0", **common)
        cls: type = MockGPTDataset
    else:
        cache = Path(args.data_cache_path) if args.data_cache_path else default_cache_dir(run_dir)
        prefix = resolve_data_prefix(args, cache_dir=cache)
        tokenizer = LocalTokenizer(args.tokenizer_model) if args.tokenizer_model else MockTokenizer(vocab_size)
        if tokenizer.vocab_size > vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                              f"{args.vocab_size}", key="vocab_size", fix="use a model preset with a large enough vocab")
        config = GPTDatasetConfig(tokenizer=tokenizer, blend=([prefix], None), split=args.split or "99,1,0",
                                  path_to_cache=str(cache if args.data_cache_path else cache / "index-cache"),
                                  **common)
        cls = GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, [train_samples, valid_samples, 0], lambda: True,
                                                    config).build()
    return train, valid


def resolve_data_prefix(args: SimpleNamespace, *, cache_dir: str | Path | None = None) -> str:
    path = args.data_path[0] if isinstance(args.data_path, list) else args.data_path
    if str(path).endswith((".jsonl", ".json", ".txt")):
        key = (args.json_keys or ["text"])[0]
        cache_dir = cache_dir or args.data_cache_path
        # One rank converts; the others wait, then find the cache entry it wrote.
        if torch.distributed.get_rank() == 0:
            prefix = prepare_indexed_dataset(path, args.tokenizer_model, json_key=key, cache_dir=cache_dir)
        torch.distributed.barrier()
        if torch.distributed.get_rank() != 0:
            prefix = prepare_indexed_dataset(path, args.tokenizer_model, json_key=key, cache_dir=cache_dir)
        return prefix
    return str(path)


def microbatches(dataset: Any, batch_index: int, args: SimpleNamespace, dp_rank: int, dp_size: int,
                 device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel rank's microbatches of global batch `batch_index`.

    The global batch is samples [batch_index * gbs, (batch_index + 1) * gbs); each data-parallel
    rank takes a contiguous share of it, micro_batch_size samples at a time.
    """
    gbs, mbs = args.global_batch_size, args.micro_batch_size
    share = gbs // dp_size
    first = batch_index * gbs + dp_rank * share
    for start in range(first, first + share, mbs):
        samples = [dataset[i % len(dataset)] for i in range(start, start + mbs)]
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in samples[0]
                 if samples[0][key] is not None}
        yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}
