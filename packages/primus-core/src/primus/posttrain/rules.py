"""What core checks before a post_trainer module runs: every mistake here is exit 2, one line, nothing written.

- A pre_trainer module that sets a post-training field (finetune, data.format, ...), or a post_trainer module on a
  backend that cannot do what it asks (LoRA, packing, isolated packed attention): refused, naming the field.
- The records of `data.path`: every line read once (fields only) for its format, so a bad line is named by
  file:line now, not after the launch.
- The chat template: a file that exists, or a tokenizer that has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from primus.errors import ConfigError

#: module presets of the post-training modules (ARCHITECTURE §3.5)
POST_TRAINING_PRESETS = {"sft_trainer"}
POST_TRAINING_PRESET = "sft_trainer.yaml"
#: what a backend's post_trainer can do (Translator.post_training)
POST_TRAINING = frozenset({"full", "lora", "packing", "isolated_packing"})
#: neutral fields only a post_trainer module reads; core reads them (primus.posttrain.data makes the
#: tokens for every backend) and checks them against what the backend can do
POST_TRAINING_FIELDS = frozenset({"finetune.method", "finetune.lora", "data.format", "data.chat_template",
                                  "data.packing", "data.packed_attention", "data.truncation"})


def template_is_file(setting: str) -> bool:
    """`data.chat_template` names a file (not `tokenizer`, a named template, or inline Jinja)."""
    from primus.posttrain.data import NAMED_TEMPLATES

    return setting != "tokenizer" and setting not in NAMED_TEMPLATES and "{%" not in setting and "{{" not in setting


def tokenizer_has_template(directory: Path) -> bool:
    """Whether a tokenizer directory ships a chat template (transformers reads either file)."""
    if (directory / "chat_template.jinja").is_file() or (directory / "chat_template.json").is_file():
        return True
    config = directory / "tokenizer_config.json"
    try:
        return bool(config.is_file() and config.stat().st_size < (16 << 20)
                    and json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError, AttributeError):
        return False


def _set_fields(module: Any) -> list[str]:
    data = module.data
    out = [f"finetune.{k}" for k, v in (("method", module.finetune.method), ("lora", module.finetune.lora))
           if v is not None]
    if data.format not in (None, "text"):
        out.append("data.format")
    out += [f"data.{k}" for k in ("chat_template", "packing", "packed_attention", "truncation")
            if getattr(data, k) is not None]
    return out


#: upstream's `sft_dataset_split` values a local JSONL (one file, one split) stands for
SPLITS_OF_A_FILE = (None, "train")


def check_split(overrides: Any, path: str | None) -> None:
    """Upstream's `sft_dataset_split` names a split of a hub dataset; a local JSONL is one split, read whole, so
    only `train` (upstream's default) means it. Another split of a local file is refused: the records of that
    split are another file (`data.path` / `sft_dataset_name`). A hub dataset is refused when the run starts."""
    split = overrides.get("sft_dataset_split") if isinstance(overrides, dict) else None
    if split in SPLITS_OF_A_FILE or not path:
        return
    raise ConfigError(f"{split!r}: the local file {path} is one split, read whole",
                      key="sft_dataset_split", fix=f"point data.path (or sft_dataset_name) at the {split} split's "
                                                   "JSONL and remove sft_dataset_split")


def check_post_training(module: Any, kind: str, can: frozenset[str], backend: str, hf_path: str | None) -> None:
    """`kind`: the module's (pretrain, posttrain); `can`: the backend translator's `post_training`.
    A post_trainer module's `data.format`, when left to the records, is set to what they are."""
    if kind == "pretrain":
        for field in _set_fields(module):
            raise ConfigError(f"{field} applies to post-training modules", key=field,
                              fix="run it in a post_trainer module (config: sft_trainer.yaml), or remove it")
        return
    if not can:
        raise ConfigError(f"the {backend} backend has no post-training", key="config",
                          fix="`primus backends` lists the backends with post-training")
    finetune, data = module.finetune, module.data
    method = "lora" if finetune.is_lora else "full"
    if method not in can:
        raise ConfigError(f"the {backend} backend does not do {method} fine-tuning", key="finetune.method",
                          fix=f"it does: {', '.join(sorted(c for c in can if c in ('full', 'lora')))}")
    if data.packing and "packing" not in can:
        raise ConfigError(f"the {backend} backend does not pack samples", key="data.packing",
                          fix="remove data.packing")
    if data.packed_attention == "isolated" and "isolated_packing" not in can:
        raise ConfigError(f"the {backend} backend cannot keep attention inside packed samples", key="data.packed_attention",
                          fix="use packed_attention: causal (samples attend across their boundaries) or no packing")
    if data.format == "text":
        raise ConfigError("post-training reads records, not plain text", key="data.format",
                          fix="use messages, alpaca, prompt_completion or squad")
    check_split(module.overrides, data.path)
    if data.mock:
        raise ConfigError("post-training has no mock data", key="data.mock", fix="set data.path to a JSONL of records")
    template = data.chat_template
    if template is not None and template_is_file(template) and not Path(template).is_file():
        raise ConfigError(f"chat template file {template} does not exist", key="data.chat_template",
                          fix="tokenizer, chatml, an inline Jinja template, or a .jinja file")
    if not data.path:
        return  # upstream's native dataset keys: the backend reads them
    from primus.posttrain.data import check_records

    fmt = check_records(data.path, data.format)
    if data.format is None:
        data.format = fmt  # recorded in the run directory: `primus generate` renders prompts the same way
    tokenizer = data.tokenizer or hf_path
    if (fmt == "messages" or template == "tokenizer") and template in (None, "tokenizer") and tokenizer \
            and not tokenizer_has_template(Path(tokenizer)):
        raise ConfigError(f"the tokenizer at {tokenizer} has no chat template for the {fmt} records",
                          key="data.chat_template",
                          fix="set data.chat_template: chatml, an inline Jinja template or a .jinja file")
    if tokenizer is None:
        raise ConfigError("post-training needs a tokenizer", key="data.tokenizer",
                          fix="set data.tokenizer, or model: {hf_path: DIR} with the tokenizer beside the weights")
