"""What one megatron post-training run does, read from the neutral sections or upstream's native keys.

The neutral form (`model: {hf_path}`, `data: {path, format, chat_template, packing, packed_attention}`,
`finetune: {method, lora}`) wins; where a neutral field is unset, upstream Primus's keys of
presets/sft_trainer.yaml fill it, so upstream's SFT experiment files run unchanged:

- `hf_path` -> the weights to start from; `sft_dataset_name` -> data.path (a local JSONL only: a hub id
  cannot be downloaded by a training job, and is refused when the run starts, in one line);
- `sft_conversation_format`: `alpaca` -> plain text (the Alpaca prompt for alpaca records, the prompt as written
  for prompt_completion; messages records take the tokenizer's template); `chatml`, `openai` and `messages` ->
  the records rendered with the ChatML template, as upstream's formatters write them;
- `enable_packed_sequences` -> data.packing; `use_packed_attention` true -> isolated, false -> causal;
- `lora: {enabled, dim, alpha, dropout, target_modules: [linear_qkv, linear_proj, linear_fc1, linear_fc2]}`
  -> finetune.lora (megatron's fused layers name the Hugging Face projections they hold).

`native_to_neutral` writes the experiment's `overrides:` of these keys into the neutral fields while the module
resolves (the translator calls it first), so core checks the records and knows a LoRA run; `read_settings`
reads the result when the run starts, and refuses there what only a run can (a hub id, a missing directory).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from primus.config.schema import LoraSection
from primus.errors import ConfigError
from primus.posttrain.data import SFTData

#: megatron-core's linear layers <-> the Hugging Face projections each holds (fused: one A shared)
MEGATRON_TARGETS = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
                    "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}
#: upstream's sft_conversation_format -> the chat template (the records' format is read off the records):
#: alpaca renders plain text (the Alpaca prompt for alpaca records), the others ChatML as upstream writes them
CONVERSATION_FORMATS: dict[str, str | None] = {"alpaca": None, "chatml": "chatml", "openai": "chatml",
                                               "messages": "chatml"}


@dataclass(frozen=True)
class SFTSettings:
    hf_path: str | None  # the weights to start from (a local Hugging Face directory)
    tokenizer_dir: str
    data: SFTData
    isolated: bool  # packed samples attend only to themselves
    lora: LoraSection | None

    @property
    def method(self) -> str:
        return "lora" if self.lora is not None else "full"


def _local_dir(value: str, key: str, what: str) -> str:
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{value!r} is not a local directory: {what} cannot be downloaded by a training job",
                          key=key, fix="download it first (e.g. `hf download ID --local-dir DIR`) and set "
                                       f"{key} to that directory")
    return str(path.resolve())


def lora_from_native(lora: Any) -> LoraSection | None:
    """Upstream's `lora:` block as the neutral LoRA settings (None when it is not enabled)."""
    if not isinstance(lora, dict) or not lora.get("enabled"):
        return None
    targets: list[str] = []
    for name in lora.get("target_modules") or list(MEGATRON_TARGETS):
        if name not in MEGATRON_TARGETS:
            from primus.suggest import did_you_mean

            raise ConfigError(f"unknown LoRA target module {name!r}", key="lora.target_modules",
                              fix=did_you_mean(name, list(MEGATRON_TARGETS))
                              or "megatron's linear layers: " + ", ".join(MEGATRON_TARGETS))
        targets += MEGATRON_TARGETS[name]
    if lora.get("dropout_position", "pre") != "pre":
        raise ConfigError("lora.dropout_position: post is not built (the dropout acts on the adapter's input)",
                          key="lora.dropout_position", fix="use pre")
    try:
        return LoraSection(rank=lora.get("dim", 32), alpha=lora.get("alpha", 32), dropout=lora.get("dropout") or 0.0,
                           target_modules=targets)
    except ValueError as exc:
        raise ConfigError(f"lora: {exc}".splitlines()[0], key="lora") from None


def native_to_neutral(module: Any) -> None:
    """Upstream's post-training overrides as the neutral fields they mean, before core's checks (which then judge
    the run as what it is: LoRA, these records, this packing) and so that `primus generate` renders prompts as
    the run did. `lora: {enabled: true, ...}` -> finetune.lora; `sft_dataset_name` naming a local file ->
    data.path (a local `tokenizer_model` or `hf_path` as data.tokenizer), with `sft_conversation_format`,
    `enable_packed_sequences` and `use_packed_attention`. A neutral field that is set wins; a hub dataset or
    tokenizer stays native and is refused when the run starts (`read_settings`); so do keys given on the
    command line, which resolve after this."""
    o = module.overrides if isinstance(module.overrides, dict) else {}
    finetune, data = module.finetune, module.data
    if finetune.method is None and finetune.lora is None:
        finetune.lora = lora_from_native(o.get("lora"))
    name = o.get("sft_dataset_name")
    if data.path is not None or not isinstance(name, str) or not Path(name).expanduser().is_file():
        return
    if data.tokenizer is None and not (isinstance(module.model, dict) and module.model.get("hf_path")):
        tokenizer = next((t for t in (o.get("tokenizer_model"), o.get("hf_path"))
                          if isinstance(t, str) and Path(t).expanduser().is_dir()), None)
        if tokenizer is None:
            return  # a hub tokenizer: refused when the run starts
        data.tokenizer = str(Path(tokenizer).expanduser().resolve())
    data.path = str(Path(name).expanduser().resolve())
    if data.chat_template is None:
        data.chat_template = conversation_template(o.get("sft_conversation_format") or "alpaca")
    if data.packing is None and "enable_packed_sequences" in o:
        data.packing = bool(o["enable_packed_sequences"])
    if data.packing and data.packed_attention is None and "use_packed_attention" in o:
        data.packed_attention = "isolated" if o["use_packed_attention"] else "causal"


def conversation_template(conv: str) -> str | None:
    if conv not in CONVERSATION_FORMATS:
        from primus.suggest import did_you_mean

        raise ConfigError(f"{conv!r} is not built", key="sft_conversation_format",
                          fix=did_you_mean(conv, list(CONVERSATION_FORMATS)) or "use one of: "
                          + ", ".join(CONVERSATION_FORMATS))
    return CONVERSATION_FORMATS[conv]


def read_settings(module: Any, native: dict[str, Any]) -> SFTSettings:
    """`module`: the resolved module (ResolvedModule); `native`: its resolved Megatron arguments."""
    config = module.module
    stage = native.get("stage") or "sft"
    if stage != "sft":
        raise ConfigError(f"{stage!r}: the megatron post_trainer runs supervised fine-tuning only",
                          key="stage", fix="stage: sft")
    data = config.data
    records = None if data.path else _native_records(native)  # the data first: the most common refusal
    hf_path = module.hf_path or native.get("hf_path")
    if hf_path:
        hf_path = _local_dir(str(hf_path), "hf_path" if not module.hf_path else "model.hf_path", "a model hub id")
    tokenizer = data.tokenizer or native.get("tokenizer_model") or hf_path
    if not tokenizer:
        raise ConfigError("post-training needs a tokenizer", key="data.tokenizer",
                          fix="set data.tokenizer, or model: {hf_path: DIR} with the tokenizer beside the weights")
    tokenizer = _local_dir(str(tokenizer), "data.tokenizer" if data.tokenizer else
                           "tokenizer_model" if native.get("tokenizer_model") else "hf_path", "a tokenizer hub id")
    seq_length = int(native["seq_length"])
    if data.path:
        request = SFTData.from_module(config, seq_length, tokenizer)
        packing = bool(data.packing)
        isolated = packing and data.packed_attention != "causal"  # isolated where the backend can: here
    else:
        request, packing, isolated = _native_data(records, native, seq_length, tokenizer, data)
    lora = config.finetune.lora_settings if config.finetune.is_lora else None
    return SFTSettings(hf_path=hf_path, tokenizer_dir=tokenizer, data=request, isolated=isolated, lora=lora)


def _native_records(native: dict[str, Any]) -> Path:
    name = native.get("sft_dataset_name")
    if not name:
        raise ConfigError("post-training needs a local JSONL of records", key="data.path",
                          fix="set data.path (or upstream's sft_dataset_name) to a .jsonl file")
    path = Path(str(name)).expanduser()
    if not path.is_file():
        raise ConfigError(f"{name!r} is not a local file: a hub dataset cannot be downloaded by a "
                          "training job", key="sft_dataset_name",
                          fix="export it to JSONL (messages, alpaca or prompt_completion records) and set data.path")
    return path


def _native_data(path: Path, native: dict[str, Any], seq_length: int, tokenizer: str,
                 data: Any) -> tuple[SFTData, bool, bool]:
    template = conversation_template(str(native.get("sft_conversation_format") or "alpaca"))
    from primus.posttrain.data import check_records

    fmt = check_records(path, data.format)
    packing = bool(native.get("enable_packed_sequences")) if data.packing is None else bool(data.packing)
    isolated = packing and bool(native.get("use_packed_attention"))
    request = SFTData(path=str(path.resolve()), format=fmt, chat_template=data.chat_template or template,
                      seq_length=seq_length, packing=packing, truncation=data.truncation or "right",
                      tokenizer_dir=tokenizer)
    return request, packing, isolated
