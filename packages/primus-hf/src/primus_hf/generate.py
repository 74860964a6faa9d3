"""`primus generate`'s model half: greedy decoding through transformers (and peft for a LoRA adapter).

Core (`primus.posttrain.generate`) finds the run's model and renders each prompt as the run's training data
was; this loads the model and decodes. Greedy, fp32 on the CPU, stopping at EOS or `max_new_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from primus.errors import ConfigError


def generate(*, weights: Path, adapter: Path | None, tokenizer_dir: Path, renderer: Callable[[Any], Any],
             prompts: list[str], max_new_tokens: int, system: str | None = None) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    render = renderer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(weights), dtype=torch.float32)
    if adapter is not None:
        try:
            from peft import PeftModel
        except ImportError:
            raise ConfigError("generating with a LoRA adapter needs peft", key="generate",
                              fix="pip install 'primus-hf[lora]', or train with finetune.lora.merge: true") from None
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(render.prompt(prompt, system), add_special_tokens=not render.chat)
        with torch.no_grad():
            result = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                    pad_token_id=pad)
        out.append(tokenizer.decode(result[0, len(ids):], skip_special_tokens=True).strip())
    return out
