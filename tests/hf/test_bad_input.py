"""Bad input: exit code 2, one line saying what is wrong, nothing trained, nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import CORPUS, TOKENIZER, corpus_data, run_primus, write_experiment


def _refused(exp: Path, workspace: Path, *extra: str) -> str:
    result = run_primus("run", str(exp), f"workspace={workspace}", *extra, timeout=120)
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("primus: error:")]
    assert len(errors) == 1, result.stderr
    assert not workspace.exists() or not any(workspace.iterdir()), list(workspace.rglob("*"))
    return errors[0]


def test_a_model_layout_the_backend_cannot_build(tmp_path: Path, workspace: Path):
    line = _refused(write_experiment(tmp_path, model="deepseek_tiny.yaml"), workspace)
    assert "deepseek model with softmax routing" in line and "not supported by the hf backend" in line
    assert "deepseek_tiny.yaml" in line


def test_a_missing_tokenizer_directory(tmp_path: Path, workspace: Path):
    data = json.dumps({"path": str(CORPUS), "tokenizer": str(tmp_path / "no_such_tokenizer")})
    line = _refused(write_experiment(tmp_path, data=data), workspace)
    assert "tokenizer directory" in line and "no_such_tokenizer" in line and "does not exist" in line
    assert "data.tokenizer" in line


def test_a_corpus_without_the_text_key(tmp_path: Path, workspace: Path):
    corpus = tmp_path / "notes.jsonl"
    corpus.write_text('{"body": "a document without the text field"}\n')
    line = _refused(write_experiment(tmp_path, data=json.dumps({"path": str(corpus), "tokenizer": str(TOKENIZER)})),
                    workspace)
    assert "has no text field 'text'" in line and "notes.jsonl" in line
    assert "fields there: body" in line and "data.text_key" in line


def test_a_text_key_that_is_not_in_the_corpus(tmp_path: Path, workspace: Path):
    line = _refused(write_experiment(tmp_path, data=corpus_data(text_key="content")), workspace)
    assert "has no text field 'content'" in line


def test_a_global_batch_that_micro_batch_times_world_cannot_make(tmp_path: Path, workspace: Path):
    line = _refused(write_experiment(tmp_path, micro=2, global_batch=6), workspace, "--nproc-per-node", "2")
    assert "global_batch_size 6" in line and "micro" in line


def test_a_native_key_typo_gets_a_suggestion(tmp_path: Path, workspace: Path):
    line = _refused(write_experiment(tmp_path, overrides="{learning_rat: 0.1}"), workspace)
    assert "unknown key" in line and "did you mean 'learning_rate'" in line


def test_model_parallel_layouts_are_refused(tmp_path: Path, workspace: Path):
    exp = write_experiment(tmp_path)
    line = _refused(exp, workspace, "parallel.tensor=2", "--nproc-per-node", "2")
    assert "tensor parallelism is not supported by the hf backend" in line


def test_a_vocab_the_model_cannot_hold(tmp_path: Path, workspace: Path):
    model = tmp_path / "small_vocab.yaml"
    model.write_text("family: llama\nvocab_size: 100\nhidden_size: 64\nnum_layers: 2\nnum_heads: 4\n"
                     "ffn_hidden_size: 128\nmax_position_embeddings: 128\n")
    line = _refused(write_experiment(tmp_path, model=str(model), data=corpus_data()), workspace)
    assert "has 512 tokens but the model's vocab_size is 100" in line


@pytest.mark.parametrize("value", ["./missing_model_dir"])
def test_a_missing_local_model_directory(tmp_path: Path, workspace: Path, value: str):
    line = _refused(write_experiment(tmp_path, model=f"{{hf_path: {value}}}"), workspace)
    assert "missing_model_dir does not exist" in line


def test_a_tracker_that_is_not_installed(tmp_path: Path, workspace: Path):
    from importlib.util import find_spec

    if find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    line = _refused(write_experiment(tmp_path, overrides="{disable_mlflow: false}"), workspace)
    assert "disable_mlflow is false but mlflow is not installed" in line
