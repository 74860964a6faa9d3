"""Real training on CPU through `primus run`: tiny Llama, 6 steps, loss must fall.

Each test starts `primus` as a user would (1 process in-process, 2 under torchrun with gloo).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mg_helpers import EXAMPLE, REPO, assert_trained, run_dir, train, train_losses

pytestmark = pytest.mark.slow


def test_one_process_mock_data(tmp_path: Path) -> None:
    result = train(tmp_path, "eval_interval=3", "eval_iters=1")
    assert_trained(result, tmp_path)
    out = run_dir(tmp_path)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in records if "loss" in r)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"} <= set(step)
    assert step["tokens_per_s"] > 0 and step["grad_norm"] > 0
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    assert (out / "checkpoints" / "iter_0000006" / "common.pt").is_file()
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"


@pytest.mark.parametrize("layout", ["parallel.tensor=2", "parallel.pipeline=2", "parallel.data=2"])
def test_two_processes(layout: str, tmp_path: Path) -> None:
    # disable_last_saving keeps these runs short; checkpoints have their own tests
    result = train(tmp_path, layout, "disable_last_saving=true", nproc=2)
    losses = assert_trained(result, tmp_path)
    if layout != "parallel.pipeline=2":
        # same seed and same global batch: TP and DP reproduce the one-process run's first loss
        assert abs(losses[1] - 6.2344) < 1e-3, losses


@pytest.mark.parametrize("model", ["qwen3_tiny.yaml", "mixtral_tiny.yaml"])
def test_other_families_train(model: str, tmp_path: Path) -> None:
    assert_trained(train(tmp_path, f"model={model}", "disable_last_saving=true", "train.lr=5.0e-3"), tmp_path)


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert_trained(train(whole, "disable_last_saving=true"), whole)
    stopped = train(parts, "exit_interval=3")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert sorted(train_losses(parts)) == [1, 2, 3]
    resumed = train(parts, "disable_last_saving=true")  # checkpoint.resume: auto in the example
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert sorted(train_losses(parts)) == list(range(1, 7))
    assert train_losses(parts)[6] == train_losses(whole)[6]


def _write_corpus_and_tokenizer(folder: Path) -> tuple[Path, Path]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = ["the", "a", "model", "learns", "tokens", "from", "text", "while", "loss", "falls", "and", "steps", "go", "by", "on", "a", "small", "cpu"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(200)]
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir()
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    return corpus, tok_dir


def test_local_jsonl_corpus_is_indexed_once_and_trains(tmp_path: Path) -> None:
    corpus, tokenizer = _write_corpus_and_tokenizer(tmp_path)
    cache = tmp_path / "cache"
    data = [f"data.path={corpus}", f"data.tokenizer={tokenizer}", "data.mock=false", "disable_last_saving=true",
            f"data_cache_path={cache}"]
    assert_trained(train(tmp_path / "ws", *data), tmp_path / "ws")
    built = sorted(p.name for p in cache.glob("*.idx"))
    assert len(built) == 1
    again = train(tmp_path / "ws2", *data)
    assert again.returncode == 0
    assert sorted(p.name for p in cache.glob("*.idx")) == built  # reused, not rebuilt


SHARED = REPO / "examples" / "data"


@pytest.mark.skipif(not (SHARED / "corpus.jsonl").is_file() or not (SHARED / "tokenizer" / "tokenizer.json").is_file(),
                    reason="the shared corpus and tokenizer (examples/data) are not in this checkout yet")
def test_shared_corpus_trains(tmp_path: Path) -> None:
    data = [f"data.path={SHARED / 'corpus.jsonl'}", f"data.tokenizer={SHARED / 'tokenizer'}", "data.mock=false",
            "disable_last_saving=true", "train.lr=5.0e-3"]
    assert_trained(train(tmp_path, *data), tmp_path)


def test_data_prepare_converts_ahead_of_the_run(tmp_path: Path) -> None:
    from mg_helpers import run_primus  # noqa: PLC0415

    corpus, tokenizer = _write_corpus_and_tokenizer(tmp_path)
    cache = tmp_path / "cache"
    args = ["data", "prepare", str(EXAMPLE), "--backend", "megatron", f"data.path={corpus}",
            f"data.tokenizer={tokenizer}", "data.mock=false", f"data_cache_path={cache}"]
    result = run_primus(*args)
    assert result.returncode == 0, result.stderr
    assert "indexed dataset ready" in result.stdout
    assert len(list(cache.glob("*.bin"))) == 1 and len(list(cache.glob("*.idx"))) == 1
