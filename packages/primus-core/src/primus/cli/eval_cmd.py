"""`primus eval` and `primus export`: score a module's model, write a run's weights as a Hugging
Face model directory. Both work the same way on every backend (docs/guide/weights.md)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from primus.errors import EXIT_OK, EXIT_USAGE, ConfigError


def _tokenizer_dir(module) -> str:
    tokenizer = module.module.data.tokenizer or module.hf_path
    if not tokenizer:
        raise ConfigError("no tokenizer to cut the evaluation corpus with", key="data.tokenizer",
                          fix="set data.tokenizer=DIR, or load the model from a directory with one (model: {hf_path: DIR})")
    return str(tokenizer)


def cmd_eval(args: argparse.Namespace) -> int:
    from primus.backends.discovery import discover
    from primus.config.resolve import load_experiment, resolve
    from primus.config.rules import resolved_dimension
    from primus.launch.plan import EVALUATE, LaunchOptions, config_fingerprint, plan_launch
    from primus.platform.detect import detect_platform
    from primus.platform.env import core_entries, plan_env
    from primus.runs.evaluate import EVAL_LOG, RESULT_FILE, EvalRequest, EvalResult
    from primus.runs.files import write_yaml

    platform = detect_platform()
    loaded = load_experiment(Path(args.exp), args.overrides)
    launch = loaded.experiment.launch
    opts = LaunchOptions.from_args(
        nproc_per_node=args.nproc_per_node or launch.nproc_per_node, nnodes=1, node_rank=0,
        master_addr=None, master_port=args.master_port or launch.master_port, max_restarts=0,
        default_nproc=1)
    resolved = resolve(loaded, module=args.module, world_size=opts.world_size, discovery=discover())
    if len(resolved.modules) > 1:
        raise ConfigError(f"the experiment has {len(resolved.modules)} modules; evaluate one", file=args.exp,
                          key="modules", fix="pass --module NAME")
    (name, module), = resolved.modules.items()
    backend = resolved.backends[module.framework]
    data = args.data or module.module.data.path
    if not data:
        raise ConfigError("no evaluation corpus", key="--data", fix="pass --data FILE (.jsonl or text)")
    data_path = Path(data).expanduser().resolve()
    if not data_path.is_file():
        raise ConfigError(f"evaluation corpus {data_path} does not exist", key="--data")
    checkpoint = args.checkpoint
    if checkpoint not in (None, "latest"):
        path = Path(checkpoint).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"checkpoint {path} is not a directory", key="--checkpoint",
                              fix="pass latest, or a checkpoint directory of the run")
        checkpoint = str(path)
    seq_length = resolved_dimension(module, backend.spec.load_translator(), "seq_length")
    if not seq_length:
        raise ConfigError("no seq_length to cut evaluation blocks with", key="train.seq_length")
    if module.model is not None:
        from primus.models.hf import check_tokenizer_fits

        check_tokenizer_fits(Path(_tokenizer_dir(module)), module.model.vocab_size)
    request = EvalRequest(data=str(data_path), tokenizer=_tokenizer_dir(module), seq_length=int(seq_length),
                          checkpoint=checkpoint, max_blocks=args.max_blocks)

    env_changes, _ = plan_env(core_entries(backend.spec.runtime) + backend.spec.load_env(), platform=platform.kind,
                              arch=platform.arch, environ=os.environ, experiment_env=resolved.experiment.env,
                              config=module.native)
    run_dir = resolved.run_dir.resolve()
    eval_dir = run_dir / "eval" / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    suffix = 0
    while eval_dir.exists():
        suffix += 1
        eval_dir = eval_dir.with_name(eval_dir.name.split(".")[0] + f".{suffix}")
    eval_dir.mkdir(parents=True)
    write_yaml(eval_dir / "config.yaml", {"experiment_file": str(Path(resolved.file).resolve()), "argv": sys.argv,
                                          "modules": {name: module.to_dict()}})
    request.write(eval_dir)
    os.environ.update(env_changes)
    plan = plan_launch(backend.spec.process_model, eval_dir, name, opts, entry=EVALUATE, job_dir=run_dir,
                       fingerprint=config_fingerprint(module) + "-eval")
    if plan.kind == "in-process":
        from primus.runs.evaluate import run_eval_worker

        code = run_eval_worker(eval_dir, name)
    else:
        sys.stdout.flush()
        code = subprocess.call(plan.argv, env={**os.environ, **plan.env})
    if code != EXIT_OK:
        if code == EXIT_USAGE:  # a mistake found by the workers (no checkpoint yet, ...) leaves nothing
            shutil.rmtree(eval_dir, ignore_errors=True)
            for empty in (eval_dir.parent, run_dir):
                if empty.is_dir() and not any(empty.iterdir()):
                    empty.rmdir()
        return code
    result = EvalResult(**json.loads((eval_dir / RESULT_FILE).read_text()))
    record = result.record(backend=backend.name, checkpoint=checkpoint or "init", data=str(data_path),
                           seq_length=request.seq_length, world_size=opts.world_size, time=round(time.time(), 3))
    line = json.dumps(record)
    with open(run_dir / EVAL_LOG, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    print(line, flush=True)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """RUN_DIR's checkpoint (newest, or --step) as a Hugging Face directory OUT_DIR (primus.runs.export)."""
    from primus.runs.export import export_run, run_modules

    run_dir = Path(args.run_dir).expanduser().resolve()
    modules = run_modules(run_dir)
    out_dir = Path(args.out_dir).expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not empty", key="OUT_DIR", fix="choose a new directory")
    name = args.module or (modules[0] if len(modules) == 1 else None)
    if name not in modules:
        raise ConfigError(f"{run_dir} has modules {', '.join(modules)}", key="--module", fix="pass --module NAME")
    step, files = export_run(run_dir, name, args.step, out_dir)
    tokenizer = "with tokenizer" if "tokenizer.json" in files or "tokenizer.model" in files else "no tokenizer"
    print(f"primus: exported step {step} of {run_dir.name} to {out_dir} ({len(files)} files, {tokenizer})")
    return EXIT_OK
