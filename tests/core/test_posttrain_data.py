"""Core's post-training data (primus.posttrain.data): records, loss masks, truncation, packing, the cache, and
the resolve-time refusals. Backends' tests train on these rows with real tokenizers; here a character-level
tokenizer written for the test (one id per character, ChatML rendered in Python) makes every mask checkable by
eye."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from primus.errors import ConfigError
from primus.posttrain.data import (
    IGNORE_INDEX,
    Renderer,
    SFTData,
    build_rows,
    load_or_tokenize,
    load_rows,
    read_records,
)


class CharTokenizer:
    """ids = code points; BOS 1 and EOS 2 as tokens of their own; ChatML as a chat template."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    chat_template = "chatml (rendered in Python)"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([self.bos_token_id] if add_special_tokens else []) + [ord(c) for c in text]

    def apply_chat_template(self, turns, tokenize=False, add_generation_prompt=False, chat_template=None):
        text = "".join(f"<{t['role']}>{t['content']}</>" for t in turns)
        return text + ("<assistant>" if add_generation_prompt else "")


def _decode(ids, mask=None):
    return "".join(chr(i) if i > 2 else "#" for i, m in zip(ids, mask or [1] * len(ids), strict=True) if m)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_only_assistant_turns_and_completions_are_trained(tmp_path):
    tok = CharTokenizer()
    chat = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
                         {"role": "assistant", "content": "ok"}]}
    ids, mask = Renderer(tok, "messages", None).tokens(chat)
    assert _decode(ids) == "<system>S</><user>hi</><assistant>yo</><user>again</><assistant>ok</>"
    assert _decode(ids, mask) == "yo</>ok</>"  # every assistant turn, each with its end-of-turn marker
    ids, mask = Renderer(tok, "alpaca", None).tokens({"instruction": "Add", "input": "1 2", "output": "3"})
    assert ids[0] == 1 and ids[-1] == 2 and "### Input:\n1 2" in _decode(ids)
    assert [i for i, m in zip(ids, mask, strict=True) if m] == [ord("3"), 2]  # the output and EOS
    ids, mask = Renderer(tok, "prompt_completion", "chatml").tokens({"prompt": "p", "completion": "c"})
    assert _decode(ids, mask) == "c</>"


def test_rows_pad_pack_truncate_and_label_only_trained_tokens():
    samples = [([1, 10, 11, 12], [False, False, True, True]), ([1, 20, 21], [False, True, True])]
    unpacked = build_rows(samples, seq_length=5, pad_id=0, packing=False)
    assert unpacked.count == 2
    row = unpacked.row(0)
    assert row["input_ids"] == [1, 10, 11, 12, 0] and row["labels"] == [IGNORE_INDEX, 11, 12, IGNORE_INDEX,
                                                                        IGNORE_INDEX]
    packed = build_rows(samples, seq_length=6, pad_id=0, packing=True)
    assert packed.count == 1
    row = packed.row(0)
    assert row["input_ids"] == [1, 10, 11, 12, 1, 20] and row["position_ids"] == [0, 1, 2, 3, 0, 1]
    assert row["segment_ids"] == [1, 1, 1, 1, 2, 2]
    assert row["labels"] == [IGNORE_INDEX, 11, 12, IGNORE_INDEX, 20, 21]  # never across the boundary
    assert packed.trained_tokens() == unpacked.trained_tokens() == 4
    long = [([1, *range(30, 40)], [False] + [True] * 10)]
    assert build_rows(long, seq_length=4, pad_id=0, packing=False).stats["truncated"] == 1
    with pytest.raises(ConfigError, match="no sample has a trained token"):
        build_rows(long, seq_length=4, pad_id=0, packing=False, truncation="drop")


def test_bad_records_are_named_by_line(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a"}])
    with pytest.raises(ConfigError) as err:
        list(read_records(path))
    assert str(err.value).startswith(f"{path}:2: data.path: alpaca record: field 'output' is missing")
    chat = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ConfigError, match=":1: data.path: chat has no assistant turn"):
        list(read_records(chat))


def test_rows_are_cached_once_per_data_and_settings(tmp_path):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}] * 3)
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    request = SFTData(path=str(data), format=None, chat_template=None, seq_length=8, packing=True,
                      truncation="right", tokenizer_dir=str(tokenizer_dir))
    rows = load_or_tokenize(request, CharTokenizer(), tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("sft-*.bin")
    again = load_rows(cached)
    assert again is not None and again.tokens == rows.tokens and again.segments == rows.segments
    assert request.key() != SFTData(**{**request.__dict__, "packing": False}).key()
    cached.write_bytes(cached.read_bytes()[:-4])  # a torn write is not a cache
    assert load_rows(cached) is None


@pytest.mark.parametrize(("section", "message"), [
    ("finetune: {method: lora}", "modules.pre_trainer.finetune.method: finetune.method applies to post-training"),
    ("finetune: {lora: {rank: 0}}", "rank"),
    ("finetune: {lora: {target_modules: [q_prj]}}", "unknown LoRA target module 'q_prj' (did you mean 'q_proj'?)"),
    ("data: {packing: true}", "modules.pre_trainer.data.packing: data.packing applies to post-training"),
])
def test_post_training_settings_are_refused_where_they_cannot_apply(write, tmp_path, section, message):
    from primus.config.resolve import resolve

    path = write("exp.yaml", f"""
        exp_name: e
        workspace: {tmp_path}
        modules:
          pre_trainer:
            framework: toy
            model: llama3_tiny.yaml
            {section}
    """)
    with pytest.raises(ConfigError) as err:
        resolve(path)
    assert message in str(err.value) and str(err.value).startswith(f"{path}:")
    assert "\n" not in str(err.value)


def test_squad_records_train_on_the_first_answer(tmp_path):
    """SQuAD records (upstream's sft_dataset_name can name them), in the datasets library's form, SQuAD's JSON form
    or with plain strings: the prompt is the context and question, the completion the first answer, then EOS."""
    from primus.posttrain.generate import read_prompts

    context, question = "Zorbia's capital is Ulmet.", "What is the capital of Zorbia?"
    records = [{"context": context, "question": question, "answers": answers} for answers in (
        {"text": ["Ulmet", "Ulmet city"], "answer_start": [19, 19]}, [{"text": "Ulmet", "answer_start": 19}],
        ["Ulmet"])]
    path = _jsonl(tmp_path / "squad.jsonl", records)
    read = list(read_records(path))
    assert {fmt for _, fmt, _ in read} == {"squad"}
    renderer = Renderer(CharTokenizer(), "squad", None)
    for _, _, fields in read:
        ids, mask = renderer.tokens(fields)
        assert _decode(ids) == f"#Context: {context} Question: {question} Answer: Ulmet#"
        assert _decode(ids, mask) == " Ulmet#"  # the first answer and EOS
    assert read_prompts(path) == [f"Context: {context} Question: {question} Answer:"] * 3  # as trained
    bad = _jsonl(tmp_path / "bad.jsonl", [records[0], {"context": "c", "question": "q", "answers":
                                                       {"text": [], "answer_start": []}}])
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: data.path: squad record has no answer text"):
        list(read_records(bad))


@pytest.mark.parametrize(("split", "refused"), [(None, False), ("train", False), ("validation", True)])
def test_sft_dataset_split_of_a_local_file(tmp_path, split, refused):
    """A local JSONL is one split: upstream's sft_dataset_split may say train (its default), not another."""
    from primus.config.schema import ModuleConfig
    from primus.posttrain.rules import POST_TRAINING, check_post_training

    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}])
    module = ModuleConfig.model_validate({"framework": "hf", "data": {"path": str(path), "tokenizer": str(tmp_path)},
                                          "overrides": {"sft_dataset_split": split} if split else {}})
    if not refused:
        check_post_training(module, "posttrain", POST_TRAINING, "hf", None)
        assert module.data.format == "prompt_completion"
        return
    with pytest.raises(ConfigError) as err:
        check_post_training(module, "posttrain", POST_TRAINING, "hf", None)
    assert str(err.value) == (f"sft_dataset_split: 'validation': the local file {path} is one split, read whole "
                              f"(point data.path (or sft_dataset_name) at the validation split's JSONL and remove "
                              f"sft_dataset_split)")


def test_the_run_template_replaces_the_copied_one(tmp_path):
    """What every backend's outputs get (core, after the run / in the export): chat_template.jinja with the run's
    template, and no other template left in tokenizer_config.json."""
    from primus.posttrain.data import CHATML_TEMPLATE, carry_chat_template

    out = tmp_path / "hf"
    out.mkdir()
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": "{{ old }}"}))
    assert not carry_chat_template(out, "tokenizer")  # the tokenizer's own: copied with its files
    assert carry_chat_template(out, "chatml")
    assert (out / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"eos_token": "</s>"}
