"""A run's checkpoint as a Hugging Face model directory: `primus export`, and `checkpoint.export: hf`
at the end of a run (into `<run dir>/hf/`).

The backend's exporter (`BackendSpec.exporter`) writes the weights under Hugging Face names into a
temporary sibling of the target, from a checkpoint of any layout, in one process; core adds
`config.json` (from the run's `ModelSpec`) and the run's tokenizer files, then renames the folder
into place, so the target is either absent, the previous export, or complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from primus.errors import ConfigError

HF_EXPORT_DIR = "hf"  # <run dir>/hf/: where `checkpoint.export: hf` writes


def run_modules(run_dir: Path) -> list[str]:
    import yaml

    from primus.runs.rundir import CONFIG_FILE

    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE})", key="RUN_DIR",
                          fix="pass <workspace>/<work_group>/<user_name>/<exp_name>; `primus runs` lists them")
    return list((yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}).get("modules") or {})


def export_run(run_dir: Path, module_name: str, step: int | None, out_dir: Path, *,
               replace: bool = False) -> tuple[int, list[str]]:
    """Write the export; returns (the step exported, the files written). Without `replace`, an
    `out_dir` that exists and is not empty is refused."""
    from primus.backends.discovery import discover
    from primus.backends.spec import load_object
    from primus.models.hf import CONFIG_FILE, TOKENIZER_FILES, hf_config, legacy_rope_keys
    from primus.posttrain.data import carry_chat_template
    from primus.runs.rundir import read_module

    if not replace and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not empty", key="OUT_DIR", fix="choose a new directory")
    module, _ = read_module(run_dir, module_name)
    if module.model is None:
        raise ConfigError("the run's model is native keys, not a model spec: no config.json can be written",
                          key="model", fix="train with a neutral model preset or model: {hf_path: DIR}")
    config = {**hf_config(module.model), **legacy_rope_keys(module.model)}
    backend = discover().get(module.framework)
    if backend.spec.exporter is None:
        raise ConfigError(f"the {backend.name} backend cannot export weights", key="RUN_DIR")
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        exported = load_object(backend.spec.exporter)(module, run_dir, step, tmp)
        config["dtype"] = config["torch_dtype"] = "float32"  # transformers 5 reads dtype, older readers torch_dtype
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tokenizer = module.module.data.tokenizer or module.hf_path
        if tokenizer:
            for file in TOKENIZER_FILES:
                if (Path(tokenizer) / file).is_file():
                    shutil.copyfile(Path(tokenizer) / file, tmp / file)
            carry_chat_template(tmp, module.module.data.chat_template, tokenizer)  # post-training's template
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            out_dir.rename(old)  # empty, or the previous export when replacing
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return int(exported), sorted(p.name for p in out_dir.iterdir())


def export_after_run(run_dir: Path, module_name: str) -> None:
    """`checkpoint.export: hf`: the finished run's last checkpoint into `<run dir>/hf/` (replacing
    an earlier attempt's). Called once per job, by the process that outlives the workers."""
    from loguru import logger

    from primus.runs.rundir import read_module

    module, _ = read_module(run_dir, module_name)
    if module.module.checkpoint.export == "hf":
        step, files = export_run(run_dir, module_name, None, run_dir / HF_EXPORT_DIR, replace=True)
        logger.info(f"exported step {step} to {run_dir / HF_EXPORT_DIR} ({len(files)} files)")
        print(f"primus: exported step {step} to {run_dir / HF_EXPORT_DIR}", flush=True)
    carry_template(run_dir, module)


def carry_template(run_dir: Path, module: Any) -> None:
    """A post-training run's chat template into what its backend wrote itself (a LoRA run's `adapter/` and merged
    `hf/`), whichever backend: the model answers as it was trained wherever it goes."""
    from primus.posttrain.data import carry_chat_template
    from primus.posttrain.generate import ADAPTER_DIR

    data = module.module.data
    if getattr(module, "kind", None) != "posttrain" or data.chat_template is None:
        return
    for name in (HF_EXPORT_DIR, ADAPTER_DIR):
        if (run_dir / name / "tokenizer_config.json").is_file():
            carry_chat_template(run_dir / name, data.chat_template, data.tokenizer or module.hf_path)
