"""`primus run` (and its upstream alias `primus train pretrain`)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

from primus.errors import EXIT_OK, EXIT_USAGE


def _warn(text: str) -> None:
    sys.stderr.write(f"primus: warning: {text}\n")


def cmd_run(args: argparse.Namespace) -> int:
    from primus.backends.discovery import discover
    from primus.config.resolve import resolve
    from primus.launch.plan import LaunchOptions, plan_launch
    from primus.patches.registry import PatchContext, PatchSet
    from primus.platform.detect import detect_platform
    from primus.platform.env import core_entries, plan_env

    platform = detect_platform()
    opts = LaunchOptions.from_args(
        nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
        master_addr=args.master_addr, master_port=args.master_port, max_restarts=args.max_restarts,
        default_nproc=platform.devices or 1)
    discovery = discover()
    for w in discovery.warnings:
        _warn(w)
    resolved = resolve(args.exp, args.overrides, module=args.module, world_size=opts.world_size,
                       discovery=discovery)
    for m in resolved.modules.values():
        for note in m.notices:
            _warn(f"{m.name}: {note}")

    env_changes: dict[str, str] = {}
    for backend in resolved.backends.values():
        entries = core_entries(backend.spec.runtime) + backend.spec.load_env()
        changes, _ = plan_env(entries, platform=platform.kind, arch=platform.arch, environ=os.environ,
                              experiment_env=resolved.experiment.env)
        env_changes.update(changes)

    run_dir = resolved.run_dir.resolve()
    plans = {name: plan_launch(resolved.backends[m.framework].spec.process_model, run_dir, name, opts)
             for name, m in resolved.modules.items()}
    if len(plans) > 1 and any(p.kind != "in-process" for p in plans.values()):
        from primus.errors import ConfigError

        raise ConfigError(f"the experiment has {len(plans)} modules; a multi-process launch runs one",
                          file=args.exp, key="modules", fix="pass --module NAME")

    if args.dry_run:
        print(f"experiment  {resolved.file}")
        print(f"run dir     {run_dir}  (not created: dry run)")
        print(f"platform    {platform.describe()}")
        print(f"world size  {opts.world_size} ({opts.nnodes} node(s) x {opts.nproc_per_node} process(es))")
        for name, m in resolved.modules.items():
            backend = resolved.backends[m.framework]
            translator = backend.spec.load_translator()
            print(f"\nmodule {name}: backend {backend.name} ({backend.spec.framework} "
                  f"{backend.framework_version or 'not installed'})")
            if m.model is not None:
                print(f"  model     {m.model.family}, {m.model.parameter_count() / 1e6:,.1f}M parameters "
                      f"({m.model_file})")
            for key, value in translator.summary(m).items():
                print(f"  {key:<9} {value}")
            ctx = PatchContext(backend=backend.name, platform=platform.kind, arch=platform.arch,
                               framework_version=backend.framework_version, config=m.native)
            decisions = PatchSet(backend.spec.load_patches()).explain(ctx)
            applying = [d.patch.id for d in decisions if d.applies]
            print(f"  patches   {', '.join(applying) or 'none'}")
            print(f"  command   {plans[name].render()}")
        print("\nenvironment it would set:")
        for k, v in sorted(env_changes.items()):
            print(f"  {k}={v}")
        if not env_changes:
            print("  (nothing)")
        return EXIT_OK

    from primus.runs.rundir import create_run_dir
    from primus.runs.worker import run_worker

    existed = run_dir.exists()
    create_run_dir(resolved, env_changes, platform.describe())
    os.environ.update(env_changes)
    names = list(plans)
    for i, name in enumerate(names):
        plan = plans[name]
        if plan.kind == "in-process":
            code = run_worker(run_dir, name)
        else:
            env = {**os.environ, **plan.env}
            sys.stdout.flush()
            sys.stderr.flush()
            if i == len(names) - 1:
                os.execvpe(plan.argv[0], plan.argv, env)  # noqa: S606 - hand-off to the launcher
            code = subprocess.call(plan.argv, env=env)
        if code == EXIT_USAGE and not existed:
            shutil.rmtree(run_dir, ignore_errors=True)  # a config error caught late leaves nothing
        if code != EXIT_OK:
            return code
    return EXIT_OK


