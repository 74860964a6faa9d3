"""End to end through `primus run`: one process on mock data and on the example corpus, and the model
it leaves behind. Runs are shared between tests through module fixtures to keep the suite short."""

from __future__ import annotations

from pathlib import Path

import pytest

from primus.runs.metrics import TRAIN_KEYS

from .conftest import assert_ok, corpus_data, read_jsonl, run_dir, run_primus, train_records, write_experiment

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 steps on the example corpus with evaluation every 10 steps; returns the run directory."""
    base = tmp_path_factory.mktemp("corpus")
    exp = write_experiment(base, steps=20, micro=4, global_batch=8, data=corpus_data(valid_fraction=0.05),
                           overrides="{eval_strategy: steps, eval_steps: 10, eval_iters: 2}")
    result = run_primus("run", str(exp), f"workspace={base / 'ws'}")
    assert_ok(result)
    return run_dir(base / "ws")


def test_mock_data_training_loss_falls(tmp_path: Path, workspace: Path):
    exp = write_experiment(tmp_path, steps=15, overrides="{disable_last_saving: true}")
    result = run_primus("run", str(exp), f"workspace={workspace}")
    assert_ok(result)
    records = train_records(run_dir(workspace) / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 16))
    assert records[-1]["loss"] < records[0]["loss"] - 0.3, [r["loss"] for r in records]
    assert not (run_dir(workspace) / "model").exists()  # disable_last_saving
    assert "step 15/15" in result.stderr  # rank 0's progress line


def test_corpus_training_loss_falls_and_metrics_have_the_common_keys(corpus_run: Path):
    records = train_records(corpus_run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))
    for record in records:
        assert set(TRAIN_KEYS) <= set(record), record
        assert record["tokens_per_s"] > 0 and record["step_time_s"] > 0 and record["grad_norm"] > 0
    assert records[-1]["loss"] < records[0]["loss"] - 1.0, [r["loss"] for r in records]
    assert records[0]["loss"] == pytest.approx(6.24, abs=0.3)  # ln(512): an untrained model


def test_corpus_training_reports_eval_loss_and_perplexity(corpus_run: Path):
    evals = [r for r in read_jsonl(corpus_run / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["eval_ppl"] == pytest.approx(2.718281828 ** evals[1]["eval_loss"], rel=1e-6)


def test_final_model_and_tokenizer_load_with_from_pretrained(corpus_run: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = corpus_run / "model"
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = tokenizer("This is a story about", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    assert not list(corpus_run.glob(".tmp-*")) and not list((corpus_run / "checkpoints").glob(".tmp-*"))


def test_model_from_a_local_directory(tmp_path: Path, workspace: Path):
    """`model: {hf_path: ./dir}` loads a causal LM (here a Qwen3 with weights) instead of a preset."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3", vocab_size=512, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                  max_position_embeddings=128, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path / "local_model"))
    exp = write_experiment(tmp_path, model="{hf_path: ./local_model}", steps=3)
    result = run_primus("run", str(exp), f"workspace={workspace}")
    assert_ok(result)
    assert "Qwen3ForCausalLM" in result.stderr
    assert (run_dir(workspace) / "model" / "config.json").is_file()
