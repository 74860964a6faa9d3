"""Post-training data, the same on every backend (docs/guide/posttrain.md, decision 31).

Records (JSONL, one per line) in one of three formats become conversations; a conversation becomes text segments
marked trainable or not; segments become tokens with a per-token loss mask; samples become rows of
`seq_length + 1` tokens, one sample per row (padded) or several (packed). Loss is taken on the tokens of
assistant turns (messages), the output (alpaca) or the completion (prompt_completion), each followed by its
end-of-turn marker or EOS, so a fine-tuned model learns to stop.

- **Rendering.** `messages` always go through a chat template: the tokenizer's own, `chatml`, or a Jinja
  template given inline or as a file. Trainable spans are found by rendering growing prefixes of the
  conversation (`render(turns[:i], add_generation_prompt=True)` ends where assistant turn i starts,
  `render(turns[:i+1])` where it ends); a template whose renderings are not prefixes of each other is refused.
  `alpaca` and `prompt_completion` are plain text (the Alpaca prompt, or the prompt as written) followed by
  EOS, unless `data.chat_template` is set: then they are a one-turn chat.
- **Tokens.** Each segment is tokenized on its own (the first with the tokenizer's special tokens, e.g. BOS,
  the others without): the prompt's tokens are exactly those `primus generate` feeds the model.
- **Truncation** (`data.truncation`): `right` cuts a sample to `seq_length + 1` tokens, `drop` leaves it out; a
  sample left with no trainable token is dropped either way. Counts are logged.
- **Rows.** Unpacked: one sample per row, padded (padding is never trained). Packed (`data.packing`): samples
  in file order fill a row until the next does not fit. Every row carries position ids that restart at each
  sample and segment ids (1, 2, ... per sample, 0 on padding) so a backend can keep attention inside a sample.
- **Cache.** Rows are written once per run to `<run dir>/data-cache/sft-<key>.bin`, keyed by the data file's
  and tokenizer's contents and every setting above, and read back on resume or by other ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from primus.errors import ConfigError

FORMATS = ("messages", "alpaca", "prompt_completion", "squad")
ROLES = ("system", "user", "assistant")
#: the label of a position whose next token is not trained (PyTorch's cross-entropy ignore_index default)
IGNORE_INDEX = -100
#: bump when the way rows are made changes, so old caches are not reused
ROWS_VERSION = 1
MAX_RECORD_BYTES = 16 << 20  # one JSON line; a longer one is a broken file, not a sample

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                            "further context. Write a response that appropriately completes the request.\n\n"
                            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
#: ChatML (`data.chat_template: chatml`), for tokenizers that ship no template of their own
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML_TEMPLATE}
#: a SQuAD record's prompt (Megatron-Bridge's SQuAD form); its completion is " " + the first answer's text
SQUAD_PROMPT = "Context: {context} Question: {question} Answer:"


# --------------------------------------------------------------------------- records


def detect_format(record: Any) -> str | None:
    """The format a record's fields say, or None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "context" in record and "question" in record and "answers" in record:
        return "squad"
    return None


def _record_error(path: Path, line: int, message: str, fix: str | None = None) -> ConfigError:
    return ConfigError(message, file=str(path), line=line, key="data.path", fix=fix)


def _check_record(record: Any, fmt: str, path: Path, line: int) -> dict[str, Any]:
    """The record's fields for `fmt`, checked; a ConfigError naming file:line otherwise."""
    if not isinstance(record, dict):
        raise _record_error(path, line, "is not a JSON object")

    def text(field: str, optional: bool = False) -> str:
        value = record.get(field)
        if value is None and optional:
            return ""
        if not isinstance(value, str):
            got = "missing" if field not in record else f"a {type(value).__name__}, not a string"
            fields = ", ".join(sorted(str(k) for k in record)) or "none"
            raise _record_error(path, line, f"{fmt} record: field '{field}' is {got}",
                                fix=f"a {fmt} record has {FORMAT_FIELDS[fmt]} (fields here: {fields})")
        return value

    if fmt == "alpaca":
        return {"instruction": text("instruction"), "input": text("input", optional=True), "output": text("output")}
    if fmt == "prompt_completion":
        return {"prompt": text("prompt"), "completion": text("completion")}
    if fmt == "squad":
        return {"prompt": SQUAD_PROMPT.format(context=text("context"), question=text("question")),
                "completion": " " + _first_answer(record.get("answers"), path, line)}
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _record_error(path, line, "messages record: 'messages' must be a non-empty list of {role, content}",
                            fix=f"a messages record has {FORMAT_FIELDS['messages']}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise _record_error(path, line, f"messages[{i}] must be {{role: {'|'.join(ROLES)}, content: string}}, "
                                            f"got {json.dumps(m)[:80]}")
        turns.append({"role": m["role"], "content": m["content"]})
    if not any(t["role"] == "assistant" for t in turns):
        raise _record_error(path, line, "chat has no assistant turn: nothing to train on",
                            fix="every chat needs at least one {role: assistant} message")
    return {"messages": turns}


def _first_answer(answers: Any, path: Path, line: int) -> str:
    """The text of a SQuAD record's first answer: `answers` as the datasets library writes it ({text: [...],
    answer_start: [...]}), as SQuAD's JSON does ([{text, answer_start}, ...]) or a list of strings."""
    if isinstance(answers, dict):
        answers = answers.get("text")
    texts = [a.get("text") if isinstance(a, dict) else a for a in answers] if isinstance(answers, list) else None
    if texts is None or not all(isinstance(t, str) for t in texts):
        raise _record_error(path, line, "squad record: 'answers' must be {text: [...]}, [{text}, ...] or [...] of "
                                        "strings", fix=f"a squad record has {FORMAT_FIELDS['squad']}")
    if not texts or not texts[0].strip():
        raise _record_error(path, line, "squad record has no answer text (an unanswerable SQuAD 2.0 question): "
                                        "nothing to train on", fix="leave out the records whose answers are empty")
    return texts[0]


FORMAT_FIELDS = {"messages": "messages: [{role: system|user|assistant, content}]",
                 "alpaca": "instruction, output and optionally input",
                 "prompt_completion": "prompt and completion",
                 "squad": "context, question and answers: {text: [...]}"}


def read_records(path: Path | str, fmt: str | None = None) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, format, checked fields) of every record, in file order. `fmt` None: the first
    record's format, which every later record must have too. Errors name file:line (exit 2)."""
    path = Path(path)
    count = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if len(raw) > MAX_RECORD_BYTES:
                raise _record_error(path, number, f"is longer than {MAX_RECORD_BYTES >> 20} MiB")
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
                raise _record_error(path, number, f"is not a JSON line ({reason})",
                                    fix="one JSON object per line") from None
            if fmt is None:
                fmt = detect_format(record)
                if fmt is None:
                    fields = ", ".join(sorted(str(k) for k in record)) if isinstance(record, dict) else "none"
                    raise _record_error(path, number, f"record is none of the post-training formats (fields: "
                                                      f"{fields})",
                                        fix="; ".join(f"{f}: {FORMAT_FIELDS[f]}" for f in FORMATS)
                                            + " (or set data.format)")
            count += 1
            yield number, fmt, _check_record(record, fmt, path, number)
    if not count:
        raise ConfigError(f"{path} holds no records", key="data.path")


def data_format(path: Path | str, configured: str | None) -> str:
    """The format of the records in `path`: `configured`, else the first record's."""
    if configured not in (None, "text"):
        return str(configured)
    for _, fmt, _ in read_records(path):
        return fmt
    raise AssertionError("unreachable: read_records raises on an empty file")


def check_records(path: Path | str, fmt: str | None) -> str:
    """Read every record once (fields only, no tokenizer): a bad line is refused before anything runs."""
    formats = {found for _, found, _ in read_records(path, fmt)}
    return formats.pop()  # read_records holds every record to the first one's format


# --------------------------------------------------------------------------- rendering


def template_text(setting: str | None) -> str | None:
    """The Jinja text of `data.chat_template` (None: the tokenizer's own)."""
    if setting in (None, "tokenizer"):
        return None
    if setting in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[setting]
    if "{%" in setting or "{{" in setting:
        return setting
    return Path(setting).read_text(encoding="utf-8")


CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a tokenizer's (single) template


def carry_chat_template(out_dir: Path, setting: str | None, tokenizer_dir: Path | str | None = None) -> bool:
    """Give the tokenizer files in `out_dir` (an exported model, an adapter) the chat template the run used, as
    transformers 5 saves one: `chat_template.jinja`, and no `chat_template` left in tokenizer_config.json (the
    file wins when loading; two templates would only mislead). `setting` None / tokenizer: the tokenizer's own
    template, already copied with its files, except a legacy `chat_template.json` of `tokenizer_dir`, copied
    here. Returns whether `out_dir` now carries a template of the run's."""
    out_dir = Path(out_dir)
    text = template_text(setting)
    if not out_dir.is_dir():
        return False
    if text is None:
        legacy = Path(tokenizer_dir) / "chat_template.json" if tokenizer_dir else None
        if legacy is not None and legacy.is_file() and not (out_dir / CHAT_TEMPLATE_FILE).is_file():
            (out_dir / legacy.name).write_bytes(legacy.read_bytes())
            return True
        return False
    (out_dir / CHAT_TEMPLATE_FILE).write_text(text, encoding="utf-8")
    (out_dir / "chat_template.json").unlink(missing_ok=True)
    config = out_dir / "tokenizer_config.json"
    if config.is_file():
        values = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(values, dict) and values.pop("chat_template", None) is not None:
            config.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def conversation(fields: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """A record as chat turns (alpaca and prompt_completion: one user turn, one assistant turn)."""
    if fmt == "messages":
        return list(fields["messages"])
    if fmt == "alpaca":
        user = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": fields["output"]}]
    return [{"role": "user", "content": fields["prompt"]}, {"role": "assistant", "content": fields["completion"]}]


def plain_prompt(fields: dict[str, Any], fmt: str) -> str:
    if fmt == "alpaca":
        template = ALPACA_PROMPT_WITH_INPUT if fields["input"] else ALPACA_PROMPT
        return template.format(instruction=fields["instruction"], input=fields["input"])
    return fields["prompt"]


class Renderer:
    """Turns records into (text, trainable) segments with the run's tokenizer and template."""

    def __init__(self, tokenizer: Any, fmt: str, chat_template: str | None) -> None:
        self.tokenizer, self.fmt = tokenizer, fmt
        self.template = template_text(chat_template)
        self.chat = fmt == "messages" or chat_template is not None
        if self.chat and self.template is None and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the tokenizer has no chat template", key="data.chat_template",
                              fix="set data.chat_template: chatml, an inline Jinja template or a .jinja file")

    def _render(self, turns: list[dict[str, str]], generation_prompt: bool) -> str:
        kwargs = {"chat_template": self.template} if self.template is not None else {}
        text = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt,
                                                  **kwargs)
        if not isinstance(text, str):
            raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
        return text

    def segments(self, fields: dict[str, Any]) -> list[tuple[str, bool]]:
        """The record's text as consecutive (text, trainable) pieces; plain formats end with EOS (added
        as a token by `tokens`)."""
        if not self.chat:
            return [(plain_prompt(fields, self.fmt), False), (self.completion(fields), True)]
        turns = conversation(fields, self.fmt)
        full = self._render(turns, False)
        out: list[tuple[str, bool]] = []
        done = 0
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            start = self._render(turns[:i], True) if i else ""
            end = self._render(turns[: i + 1], False)
            if not (full.startswith(end) and end.startswith(start) and len(start) >= done):
                raise ConfigError("the chat template does not render a conversation's turns as prefixes of the "
                                  "whole (it rewrites earlier turns), so the assistant tokens cannot be located",
                                  key="data.chat_template",
                                  fix="use a template that renders turns in order, e.g. data.chat_template: chatml")
            if start[done:]:
                out.append((start[done:], False))
            out.append((end[len(start):], True))
            done = len(end)
        if full[done:]:
            out.append((full[done:], False))
        return out

    def completion(self, fields: dict[str, Any]) -> str:
        return fields["output"] if self.fmt == "alpaca" else fields["completion"]

    def prompt(self, text: str, system: str | None = None) -> str:
        """What `primus generate` feeds the model for a user prompt `text`."""
        if not self.chat:
            return plain_prompt({"instruction": text, "input": "", "prompt": text}, self.fmt)
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return self._render(turns, True)

    def tokens(self, fields: dict[str, Any]) -> tuple[list[int], list[bool]]:
        """Token ids and, per token, whether it is trained."""
        ids: list[int] = []
        trainable: list[bool] = []
        for i, (text, train) in enumerate(self.segments(fields)):
            piece = list(self.tokenizer.encode(text, add_special_tokens=(i == 0 and not self.chat)))
            ids += piece
            trainable += [train] * len(piece)
        if not self.chat:
            eos = self.tokenizer.eos_token_id
            if eos is None:
                raise ConfigError("the tokenizer has no EOS token to end completions with", key="data.tokenizer")
            ids.append(int(eos))
            trainable.append(True)
        return ids, trainable


# --------------------------------------------------------------------------- rows


@dataclass
class Rows:
    """`count` rows of `width` (= seq_length + 1) tokens, flat int32 arrays."""

    width: int
    tokens: array
    trainable: array  # 0/1 per token: whether predicting it is trained
    positions: array
    segments: array  # 1, 2, ... per sample in the row; 0 on padding
    stats: dict[str, int]

    @property
    def count(self) -> int:
        return len(self.tokens) // self.width

    def row(self, i: int) -> dict[str, list[int]]:
        """Row i as model inputs of seq_length positions: input_ids, labels (IGNORE_INDEX where the
        next token is not trained), position_ids, segment_ids."""
        a, w = i * self.width, self.width
        tokens, train = self.tokens[a:a + w], self.trainable[a:a + w]
        return {"input_ids": list(tokens[:-1]),
                "labels": [t if m else IGNORE_INDEX for t, m in zip(tokens[1:], train[1:], strict=True)],
                "position_ids": list(self.positions[a:a + w - 1]),
                "segment_ids": list(self.segments[a:a + w - 1])}

    def trained_tokens(self) -> int:
        """Predicted tokens that carry loss, over all rows (what the mean loss divides by)."""
        w = self.width
        return sum(sum(self.trainable[i * w + 1:(i + 1) * w]) for i in range(self.count))


def build_rows(samples: list[tuple[list[int], list[bool]]], seq_length: int, *, pad_id: int, packing: bool,
               truncation: str = "right") -> Rows:
    width = seq_length + 1
    tokens, trainable, positions, segments = array("i"), array("i"), array("i"), array("i")
    stats = {"samples": len(samples), "truncated": 0, "dropped": 0, "rows": 0}
    row_t: list[int] = []
    row_m: list[int] = []
    row_p: list[int] = []
    row_s: list[int] = []

    def flush() -> None:
        if not row_t:
            return
        pad = width - len(row_t)
        tokens.extend(row_t + [pad_id] * pad)
        trainable.extend(row_m + [0] * pad)
        positions.extend(row_p + list(range(len(row_p), len(row_p) + pad)))
        segments.extend(row_s + [0] * pad)
        stats["rows"] += 1
        for buf in (row_t, row_m, row_p, row_s):
            buf.clear()

    for ids, mask in samples:
        if len(ids) > width:
            if truncation == "drop":
                stats["dropped"] += 1
                continue
            ids, mask = ids[:width], mask[:width]
            stats["truncated"] += 1
        if not any(mask[1:]):  # the first token of a row is never predicted
            stats["dropped"] += 1
            continue
        if not packing or len(row_t) + len(ids) > width:
            flush()
        segment = (row_s[-1] if row_s else 0) + 1
        row_t.extend(ids)
        row_m.extend(int(m) for m in mask)
        row_p.extend(range(len(ids)))
        row_s.extend([segment] * len(ids))
    flush()
    if not stats["rows"]:
        raise ConfigError(f"no sample has a trained token within seq_length + 1 = {width} tokens "
                          f"({stats['samples']} samples, {stats['dropped']} dropped)", key="train.seq_length",
                          fix="raise train.seq_length, or shorten the prompts")
    return Rows(width, tokens, trainable, positions, segments, stats)


# --------------------------------------------------------------------------- one run's rows, cached


@dataclass(frozen=True)
class SFTData:
    """Everything the rows depend on."""

    path: str
    format: str | None
    chat_template: str | None
    seq_length: int
    packing: bool
    truncation: str
    tokenizer_dir: str

    @classmethod
    def from_module(cls, module: Any, seq_length: int, tokenizer_dir: str | Path) -> SFTData:
        data = module.data
        if not data.path:
            raise ConfigError("post-training needs a local JSONL of records", key="data.path",
                              fix="set data.path (formats: messages, alpaca, prompt_completion)")
        return cls(path=str(data.path), format=data.format, chat_template=data.chat_template,
                   seq_length=int(seq_length), packing=bool(data.packing), truncation=data.truncation or "right",
                   tokenizer_dir=str(tokenizer_dir))

    def key(self) -> str:
        h = hashlib.sha256(json.dumps({**self.__dict__, "version": ROWS_VERSION}, sort_keys=True).encode())
        for file in [Path(self.path), *sorted(Path(self.tokenizer_dir).glob("*"))]:
            if file.is_file():
                h.update(file.name.encode())
                with file.open("rb") as f:
                    for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(chunk)
        if self.chat_template and Path(self.chat_template).is_file():
            h.update(Path(self.chat_template).read_bytes())
        return h.hexdigest()[:16]


def _progress(total: int, show: bool) -> Callable[[int], None]:
    """A progress bar on a terminal (tqdm, where installed), else a log line every ~10%."""
    if not show:
        return lambda n: None
    try:
        if sys.stderr.isatty():
            from tqdm import tqdm  # every backend's environment has it (transformers needs it)

            bar = tqdm(total=total, desc="tokenizing", unit="sample")

            def update(n: int) -> None:
                bar.update(n - bar.n)
                if n >= total:
                    bar.close()

            return update
    except ImportError:
        pass
    from loguru import logger

    marks = {max(1, total * k // 10) for k in range(1, 11)}
    return lambda n: logger.info(f"tokenizing: {n}/{total} samples") if n in marks else None


def tokenize(request: SFTData, tokenizer: Any, *, show_progress: bool = False) -> Rows:
    fmt = data_format(request.path, request.format)
    renderer = Renderer(tokenizer, fmt, request.chat_template)
    records = list(read_records(request.path, fmt))
    progress = _progress(len(records), show_progress)
    samples = []
    for n, (_, _, fields) in enumerate(records, 1):
        samples.append(renderer.tokens(fields))
        progress(n)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return build_rows(samples, request.seq_length, pad_id=int(pad or 0), packing=request.packing,
                      truncation=request.truncation)


_MAGIC = b"PRIMUS-SFT-ROWS\n"


def save_rows(rows: Rows, path: Path) -> None:
    """Atomically: a JSON header line, then the four int32 arrays (native byte order, recorded)."""
    header = {"width": rows.width, "count": rows.count, "byteorder": sys.byteorder, "stats": rows.stats}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as f:
        f.write(_MAGIC + json.dumps(header).encode() + b"\n")
        for a in (rows.tokens, rows.trainable, rows.positions, rows.segments):
            a.tofile(f)
    os.replace(tmp, path)


def load_rows(path: Path) -> Rows | None:
    """The cached rows, or None when the file is not a complete cache of this version."""
    try:
        with path.open("rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                return None
            header = json.loads(f.readline(1 << 16))
            width, count = int(header["width"]), int(header["count"])
            arrays = []
            for _ in range(4):
                a = array("i")
                a.fromfile(f, width * count)
                if header["byteorder"] != sys.byteorder:
                    a.byteswap()
                arrays.append(a)
            if f.read(1):
                return None
    except (OSError, EOFError, ValueError, KeyError, TypeError):
        return None
    return Rows(width, *arrays, stats=dict(header.get("stats") or {}))


def load_or_tokenize(request: SFTData, tokenizer: Any, cache_dir: Path, *, rank: int = 0) -> Rows:
    """The run's rows: read from `cache_dir` when this exact data was tokenized before, else
    tokenized (progress shown on rank 0) and cached. Ranks that race write identical files atomically."""
    from loguru import logger

    path = Path(cache_dir) / f"sft-{request.key()}.bin"
    rows = load_rows(path)
    if rows is not None:
        if rank == 0:
            logger.info(f"post-training data: {rows.count} rows from the cache {path}")
        return rows
    start = time.monotonic()
    rows = tokenize(request, tokenizer, show_progress=rank == 0)
    save_rows(rows, path)
    if rank == 0:
        s = rows.stats
        logger.info(f"post-training data: {s['samples']} samples -> {s['rows']} rows of {request.seq_length} "
                    f"({'packed' if request.packing else 'one per row'}; {s['truncated']} truncated, {s['dropped']} "
                    f"dropped) in {time.monotonic() - start:.1f}s, cached at {path}")
    return rows
