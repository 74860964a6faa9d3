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

from primus.errors import EXIT_OK, ConfigError


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
    from primus.launch.plan import EVALUATE, LaunchOptions, plan_launch
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
    plan = plan_launch(backend.spec.process_model, eval_dir, name, opts, entry=EVALUATE)
    if plan.kind == "in-process":
        from primus.runs.evaluate import run_eval_worker

        code = run_eval_worker(eval_dir, name)
    else:
        sys.stdout.flush()
        code = subprocess.call(plan.argv, env={**os.environ, **plan.env})
    if code != EXIT_OK:
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
    """RUN_DIR's checkpoint (newest, or --step) as a Hugging Face directory OUT_DIR, written under a
    temporary name and renamed when complete: a failure leaves nothing at OUT_DIR."""
    from primus.backends.discovery import discover
    from primus.backends.spec import load_object
    from primus.models.hf import CONFIG_FILE, TOKENIZER_FILES, hf_config
    from primus.runs.rundir import CONFIG_FILE as RUN_CONFIG
    from primus.runs.rundir import read_module

    run_dir = Path(args.run_dir).expanduser().resolve()
    if not (run_dir / RUN_CONFIG).is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {RUN_CONFIG})", key="RUN_DIR",
                          fix="pass <workspace>/<work_group>/<user_name>/<exp_name>; `primus runs` lists them")
    out_dir = Path(args.out_dir).expanduser().resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConfigError(f"{out_dir} exists and is not empty", key="OUT_DIR", fix="choose a new directory")
    import yaml

    modules = list((yaml.safe_load((run_dir / RUN_CONFIG).read_text()) or {}).get("modules") or {})
    name = args.module or (modules[0] if len(modules) == 1 else None)
    if name not in modules:
        raise ConfigError(f"{run_dir} has modules {', '.join(modules)}", key="--module", fix="pass --module NAME")
    module, _ = read_module(run_dir, name)
    if module.model is None:
        raise ConfigError("the run's model is native keys, not a model spec: no config.json can be written",
                          key="model", fix="train with a neutral model preset or model: {hf_path: DIR}")
    config = hf_config(module.model)
    backend = discover().get(module.framework)
    exporter = backend.spec.exporter
    if exporter is None:
        raise ConfigError(f"the {backend.name} backend cannot export weights", key="RUN_DIR")
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        step = load_object(exporter)(module, run_dir, args.step, tmp)
        config["torch_dtype"] = "float32"
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tokenizer = module.module.data.tokenizer or module.hf_path
        copied = []
        if tokenizer:
            for file in TOKENIZER_FILES:
                if (Path(tokenizer) / file).is_file():
                    shutil.copyfile(Path(tokenizer) / file, tmp / file)
                    copied.append(file)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in out_dir.iterdir())
    print(f"primus: exported {module.framework} step {step} of {run_dir.name} to {out_dir} "
          f"({len(files)} files{', tokenizer ' + str(len(copied)) if copied else ', no tokenizer'})")
    return EXIT_OK
