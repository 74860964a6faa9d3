"""`primus eval` and `primus export` as core defines them (issue 12): the evaluation blocks, the
result line and eval.jsonl, and the guard rails that leave nothing half-written. The backends'
numbers against transformers are in tests/<backend>/test_weights.py."""

from __future__ import annotations

import json
import math

from primus.runs.evaluate import eval_blocks
from tests.support import CORPUS, TOKENIZER, assert_config_error, assert_ok, run_primus


def test_blocks_are_documents_in_order_each_ended_by_eos_cut_into_seq_plus_one():
    docs = ["ab", "cde", "f"]
    encode = lambda text: [ord(c) for c in text]  # noqa: E731
    # stream: a b EOS c d e EOS f EOS -> blocks of 3, the last partial block (f EOS) dropped
    assert eval_blocks(docs, encode, 0, 2) == [[97, 98, 0], [99, 100, 101], [0, 102, 0]]
    assert eval_blocks(docs, encode, 0, 3) == [[97, 98, 0, 99], [100, 101, 0, 102]]
    assert eval_blocks(docs, encode, 0, 2, max_blocks=1) == [[97, 98, 0]]
    assert eval_blocks(["ab"], encode, 0, 8) == []


def _toy_blocks(seq_length: int) -> int:
    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines() if line.strip()]
    return len(eval_blocks(texts, lambda t: list(t.encode()), 0, seq_length))


def test_eval_prints_one_json_line_and_appends_it_to_the_run(toy_exp):
    exp, ws = toy_exp
    args = ("eval", str(exp), "--data", str(CORPUS), f"data.tokenizer={TOKENIZER}")
    first = run_primus(*args)
    assert_ok(first)
    record = json.loads(first.stdout.strip().splitlines()[-1])
    # the toy backend is a uniform byte model: every predicted token costs exactly log(256)
    assert record["tokens"] == _toy_blocks(32) * 32
    assert math.isclose(record["perplexity"], 256.0, rel_tol=1e-9) and record["checkpoint"] == "init"
    assert record["backend"] == "toy" and record["seq_length"] == 32
    assert_ok(run_primus(*args, "train.seq_length=16"))
    lines = (ws / "team/me/toy/eval.jsonl").read_text().splitlines()
    assert [json.loads(line)["seq_length"] for line in lines] == [32, 16]
    assert json.loads(lines[1])["tokens"] == _toy_blocks(16) * 16


def test_eval_refuses_a_missing_corpus_or_tokenizer_and_writes_nothing(toy_exp, tmp_path):
    exp, ws = toy_exp
    assert_config_error(run_primus("eval", str(exp), "--data", str(tmp_path / "nope.jsonl"),
                                   f"data.tokenizer={TOKENIZER}"), "nope.jsonl", "--data")
    assert_config_error(run_primus("eval", str(exp), "--data", str(CORPUS)), "tokenizer")
    assert not ws.exists()


def test_export_refuses_a_non_run_a_used_target_and_a_backend_without_exporter(toy_exp, tmp_path):
    exp, ws = toy_exp
    assert_config_error(run_primus("export", str(tmp_path), str(tmp_path / "out")), "not a run directory")
    assert_ok(run_primus("run", str(exp)))
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert_config_error(run_primus("export", str(ws / "team/me/toy"), str(used)), "not empty")
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    assert_config_error(run_primus("export", str(ws / "team/me/toy"), str(tmp_path / "out")),
                        "toy backend cannot export")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_export_at_the_end_is_refused_before_a_backend_without_exporter_runs(toy_exp):
    exp, ws = toy_exp
    assert_config_error(run_primus("run", str(exp), "checkpoint.export=hf"), "checkpoint.export",
                        "toy backend cannot export")
    assert not ws.exists()
