"""`primus generate RUN_DIR --prompt TEXT`: greedy generation with a run's model, the fine-tuner's quick check.

The model is the run's Hugging Face export: `<run dir>/hf/` (a full fine-tune, a merged LoRA, or
`checkpoint.export: hf`), else `<run dir>/adapter/` on the base model it names (through peft). Prompts are
rendered as the run's training data was (`primus.posttrain.data.Renderer`: the chat template with a
generation prompt, or the Alpaca / plain prompt), so the model sees what it was trained to answer.
Prints one JSON line per prompt: {"prompt": ..., "completion": ...}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from primus.errors import ConfigError
from primus.models.hf import CONFIG_FILE
from primus.posttrain.lora import ADAPTER_CONFIG
from primus.runs.export import HF_EXPORT_DIR

ADAPTER_DIR = "adapter"  # <run dir>/adapter/: a LoRA run's peft adapter
MAX_PROMPTS = 10_000


def read_prompts(path: Path) -> list[str]:
    """A .jsonl of {"prompt": ...} (or a messages/alpaca record: its first user text; a squad record: its context
    and question as training rendered them), else one prompt per line."""
    from primus.posttrain.data import SQUAD_PROMPT, conversation, detect_format

    prompts = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if len(prompts) >= MAX_PROMPTS:
                raise ConfigError(f"more than {MAX_PROMPTS} prompts", file=str(path), key="--prompts")
            if path.suffix != ".jsonl":
                prompts.append(line.rstrip("\n"))
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"is not a JSON line ({exc.msg})", file=str(path), line=number, key="--prompts") \
                    from None
            fmt = detect_format(record)
            if isinstance(record, dict) and isinstance(record.get("prompt"), str):
                prompts.append(record["prompt"])
            elif fmt == "squad" and isinstance(record.get("context"), str) and isinstance(record.get("question"), str):
                prompts.append(SQUAD_PROMPT.format(context=record["context"], question=record["question"]))
            elif fmt in ("messages", "alpaca") and isinstance(record, dict):
                try:
                    turns = conversation(record if fmt == "messages" else {"input": "", **record}, fmt)
                    prompts.append(next(t["content"] for t in turns if t["role"] == "user"))
                except (KeyError, StopIteration, TypeError):
                    raise ConfigError("has no user prompt", file=str(path), line=number, key="--prompts") from None
            else:
                raise ConfigError("has no 'prompt' field", file=str(path), line=number, key="--prompts",
                                  fix='one {"prompt": "..."} per line')
    if not prompts:
        raise ConfigError(f"{path} holds no prompts", key="--prompts")
    return prompts


def model_dir(run_dir: Path) -> tuple[Path, Path | None]:
    """(model directory, adapter directory or None) of a run."""
    if (run_dir / HF_EXPORT_DIR / CONFIG_FILE).is_file():
        return run_dir / HF_EXPORT_DIR, None
    if (run_dir / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        config = json.loads((run_dir / ADAPTER_DIR / ADAPTER_CONFIG).read_text())
        base = config.get("base_model_name_or_path")
        if not base or not (Path(base) / CONFIG_FILE).is_file():
            raise ConfigError(f"the adapter's base model {base!r} is not a local model directory",
                              file=str(run_dir / ADAPTER_DIR / ADAPTER_CONFIG), key="base_model_name_or_path")
        return Path(base), run_dir / ADAPTER_DIR
    raise ConfigError(f"{run_dir} has no model to generate with (no {HF_EXPORT_DIR}/ or {ADAPTER_DIR}/)",
                      key="RUN_DIR", fix=f"post-training runs write them when they finish; `primus export RUN_DIR "
                                         f"{run_dir / HF_EXPORT_DIR}` writes {HF_EXPORT_DIR}/ from a checkpoint")


#: the generator: transformers (and peft for an adapter) live in the hf backend package, not in core
GENERATOR = "primus_hf.generate:generate"


def generate(run_dir: Path, module_name: str | None, prompts: list[str], max_new_tokens: int,
             system: str | None = None) -> list[dict[str, Any]]:
    from primus.backends.spec import load_object
    from primus.posttrain.data import Renderer, data_format
    from primus.runs.export import run_modules
    from primus.runs.rundir import read_module

    names = run_modules(run_dir)
    name = module_name or next((n for n in names if n == "post_trainer"), names[0] if names else None)
    if name not in names:
        raise ConfigError(f"no module {name!r} in the run (has: {', '.join(names)})", key="--module")
    module, _ = read_module(run_dir, name)
    weights, adapter = model_dir(run_dir)
    try:
        run_generation = load_object(GENERATOR)
    except ImportError:
        raise ConfigError("primus generate runs the model through transformers, which the hf backend brings",
                          key="generate", fix="pip install primus-hf") from None
    tokenizer_dir = adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else weights
    if not (tokenizer_dir / "tokenizer_config.json").is_file() and module.module.data.tokenizer:
        tokenizer_dir = Path(module.module.data.tokenizer)
    data = module.module.data
    fmt = data.format if data.format not in (None, "text") else (
        data_format(data.path, None) if data.path and Path(data.path).is_file() else "prompt_completion")

    def renderer(tokenizer: Any) -> Renderer:
        return Renderer(tokenizer, fmt, data.chat_template)

    completions = run_generation(weights=weights, adapter=adapter, tokenizer_dir=tokenizer_dir, renderer=renderer,
                                 prompts=prompts, max_new_tokens=max_new_tokens, system=system)
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions, strict=True)]


def cmd_generate(args: Any) -> int:
    run_dir = Path(args.run_dir).expanduser().resolve()
    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += read_prompts(Path(args.prompts))
    if not prompts:
        raise ConfigError("nothing to generate from", key="--prompt", fix='pass --prompt "..." or --prompts FILE')
    for record in generate(run_dir, args.module, prompts, args.max_new_tokens, args.system):
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    return 0
