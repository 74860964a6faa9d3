"""`primus run` (and its upstream alias `primus train pretrain`).

Resolve and validate everything first; only then create the run directory and hand the module to
its launcher: in-process, torchrun (local, one or more nodes), an sbatch script, or a container.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from primus.errors import EXIT_OK, EXIT_USAGE, ConfigError


def _warn(text: str) -> None:
    sys.stderr.write(f"primus: warning: {text}\n")


def cmd_run(args: argparse.Namespace, *, preflight: bool = False) -> int:
    from primus.backends.discovery import discover
    from primus.config.resolve import load_experiment, resolve
    from primus.launch.plan import PREFLIGHT, WORKER, LaunchOptions, config_fingerprint, plan_launch
    from primus.launch.target import check_target, planned_marker, platform_env, resolve_target
    from primus.platform.detect import detect_platform

    platform = detect_platform()  # this host; the nodes that run the job are the target
    # parsed once: launch options change this one object, and the run directory records it
    loaded = load_experiment(Path(args.exp), args.overrides)
    experiment = loaded.experiment
    launch = experiment.launch
    launcher = args.launcher or launch.launcher
    if args.image:
        launch.container.image = args.image
    launch.slurm.srun_args = [*launch.slurm.srun_args, *(args.srun_arg or [])]
    launch.slurm.sbatch = [*launch.slurm.sbatch, *(args.sbatch_arg or [])]
    target = resolve_target(host=platform, launcher=launcher, cli_platform=getattr(args, "platform", None),
                            cli_gpus=getattr(args, "gpus_per_node", None), exp_platform=launch.platform,
                            exp_arch=launch.arch, exp_gpus=launch.slurm.gpus_per_node)
    nproc_given = _given(args.nproc_per_node, launch.nproc_per_node)
    opts = LaunchOptions.from_args(
        nproc_per_node=nproc_given, nnodes=_given(args.nnodes, launch.nnodes),
        node_rank=args.node_rank, master_addr=args.master_addr, master_port=_given(args.master_port, launch.master_port),
        max_restarts=_given(args.max_restarts, launch.max_restarts), default_nproc=target.gpus_per_node or 1)
    target, target_notes = check_target(target, nproc_per_node=opts.nproc_per_node,
                                        nproc_given=nproc_given is not None or bool(os.environ.get("GPUS_PER_NODE")),
                                        launcher=launcher, dry_run=args.dry_run)
    discovery = discover()
    for w in discovery.warnings:
        _warn(w)
    module = _module_for_task(loaded, getattr(args, "task", None), args.module)
    resolved = resolve(loaded, module=module, world_size=opts.world_size, discovery=discovery)
    for m in resolved.modules.values():
        for note in m.notices:
            _warn(f"{m.name}: {note}")
    if len(resolved.modules) > 1 and (opts.world_size > 1 or launcher != "local"):
        raise ConfigError(f"the experiment has {len(resolved.modules)} modules; a multi-process launch runs one",
                          file=args.exp, key="modules", fix="pass --module NAME")

    # planned for the target; each node of a Slurm or container launch plans again for what it sees
    env_changes = platform_env(resolved.backends.values(), resolved.modules, platform=target.platform,
                               arch=target.arch, environ=os.environ, experiment_env=resolved.experiment.env)
    if opts.nnodes > 1 and launcher == "local":
        from primus.launch.network import socket_ifname_env

        env_changes.update(socket_ifname_env(opts.master_addr, os.environ, resolved.experiment.env))

    run_dir = resolved.run_dir.resolve()
    names = list(resolved.modules)
    process_models = {n: resolved.backends[m.framework].spec.process_model for n, m in resolved.modules.items()}

    entry = PREFLIGHT if preflight else WORKER
    if preflight:
        names = names[:1]  # one check per job, whatever module it names
    if launcher == "local":
        plans = {n: plan_launch(process_models[n], run_dir, n, opts, entry=entry,
                                fingerprint=config_fingerprint(resolved.modules[n])) for n in names}
        rendered = {n: p.render() for n, p in plans.items()}
    else:
        name = names[0]
        node_cmd = [sys.executable, "-m", "primus.launch.node", "--run-dir", str(run_dir), "--module", name,
                    "--process-model", process_models[name], "--nproc-per-node", str(opts.nproc_per_node),
                    "--nnodes", str(opts.nnodes), "--master-port", str(opts.master_port)]
        if opts.max_restarts:
            node_cmd += ["--max-restarts", str(opts.max_restarts)]
        if target.platform:
            node_cmd += ["--platform", target.platform]
        if target.gpu and target.gpus_per_node:
            node_cmd += ["--gpus-per-node", str(target.gpus_per_node)]
        if preflight:
            node_cmd += ["--entry", entry]
        if launcher == "slurm":
            from primus.launch.slurm import render_sbatch

            if getattr(args, "container", False):
                node_cmd.append("--container")
            gpus = target.gpus_per_node if target.gpu else 0
            script = render_sbatch(exp_name=experiment.exp_name, run_dir=run_dir, nnodes=opts.nnodes,
                                   gpus_per_node=gpus or 0, slurm=launch.slurm, node_command=node_cmd,
                                   env={**env_changes, **planned_marker(env_changes, resolved.experiment.env)})
            rendered = {name: script}
        else:
            from primus.launch.container import container_argv

            exp_dir = Path(args.exp).resolve().parent
            mounts = [Path(resolved.experiment.workspace).expanduser().resolve(), exp_dir]
            data = resolved.modules[name].module.data
            mounts += [Path(p).parent for p in (data.path, data.tokenizer) if p]
            argv = container_argv(launch.container, mounts=mounts, inner=["python", *node_cmd[1:]],
                                  env={**env_changes, **planned_marker(env_changes, resolved.experiment.env)},
                                  workdir=Path.cwd(), platform=target.platform or platform.kind)
            rendered = {name: shlex.join(argv)}

    from primus.runs.resume import RunLock, check_resume, checkpoint_dir, next_attempt, record_checkpoints

    if args.dry_run:
        for name in names:
            for note in check_resume(resolved.modules[name], run_dir).notices:
                _warn(f"{name}: {note}")
        _print_dry_run(resolved, platform, opts, launcher, rendered, env_changes, target, target_notes)
        return EXIT_OK

    from primus.runs.rundir import create_run_dir
    from primus.runs.worker import run_worker

    _check_launcher_tools(launcher, rendered[names[0]] if launcher == "container" else None)
    for note in target_notes:
        _warn(note)
    existed = run_dir.exists()
    try:
        if launcher == "local" and not preflight and opts.node_rank == 0:
            RunLock(run_dir).acquire()  # held until the job ends (kept across the exec into torchrun)
        checks = {name: check_resume(resolved.modules[name], run_dir) for name in names}
    except (ConfigError, OSError) as exc:
        if not existed:
            shutil.rmtree(run_dir, ignore_errors=True)
        if isinstance(exc, OSError):
            raise _unwritable(run_dir, exc) from None
        raise
    if checks and all(c.complete for c in checks.values()):
        for c in checks.values():
            print(f"primus: {c.complete}", flush=True)
        return EXIT_OK
    for name, c in checks.items():
        for note in c.notices:
            _warn(f"{name}: {note}")
    # one writer per job: another node of a multi-node launch writes the run directory only where
    # node 0's is not visible (node-local workspaces); metrics come from global rank 0 alone
    if opts.node_rank == 0 or not (run_dir / "config.yaml").exists():
        try:
            if existed:  # what the previous attempt left, even if it crashed before recording it
                for name in names:
                    record_checkpoints(run_dir, name, checkpoint_dir(resolved.modules[name], run_dir),
                                       next_attempt(run_dir) - 1)
            create_run_dir(resolved, env_changes, platform.describe(), attempt=next_attempt(run_dir))
        except OSError as exc:
            if not existed:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise _unwritable(run_dir, exc) from None
    if launcher == "slurm":
        from primus.launch.slurm import submit, wait
        from primus.runs.files import write_atomic

        script_path = run_dir / "slurm" / "job.sbatch"
        write_atomic(script_path, rendered[names[0]])
        job_id = submit(script_path)
        print(f"submitted Slurm job {job_id}; script {script_path}; output {run_dir / 'slurm'}", flush=True)
        return wait(job_id) if args.wait else EXIT_OK
    if launcher == "container":
        argv = shlex.split(rendered[names[0]])
        os.execvpe(argv[0], argv, os.environ)

    os.environ.update(env_changes)
    for i, name in enumerate(names):
        plan = plans[name]
        if plan.kind == "in-process":
            code = run_worker(run_dir, name)
        else:
            env = {**os.environ, **plan.env}
            if not existed:  # a late configuration error (exit 2) removes what this command made
                env["PRIMUS_NEW_RUN_DIR"] = str(run_dir)
            sys.stdout.flush()
            sys.stderr.flush()
            if i == len(names) - 1:
                os.execvpe(plan.argv[0], plan.argv, env)  # hand-off: signals reach the launcher
            code = subprocess.call(plan.argv, env=env)
        if code == EXIT_USAGE and not existed:
            shutil.rmtree(run_dir, ignore_errors=True)  # a config error caught late leaves nothing
        if code != EXIT_OK:
            return code
    return EXIT_OK


def _module_for_task(loaded, task: str | None, module: str | None) -> str | None:
    """`primus train pretrain|posttrain`: the modules of that kind (upstream's form). A named module
    or an experiment whose modules are all of the other kind is refused, naming the mismatch."""
    if task is None:
        return module
    from primus.config.resolve import module_kind

    wanted = "pretrain" if task == "pretrain" else "posttrain"
    kinds = {name: module_kind(name, m.config) for name, m in loaded.experiment.modules.items()}
    names = [module] if module is not None and module in kinds else [n for n, k in kinds.items() if k == wanted]
    wrong = [n for n in names if kinds[n] != wanted] if module is not None else []
    if wrong or not names:
        name = wrong[0] if wrong else next(iter(kinds))
        other = "posttrain" if wanted == "pretrain" else "pretrain"
        what = "a post-training module (config: sft_trainer.yaml)" if other == "posttrain" else "a pretraining module"
        raise ConfigError(f"`primus train {task}` runs {wanted} modules, but module '{name}' is {what}",
                          file=str(loaded.path), key=f"modules.{name}", fix=f"run `primus train {other}`")
    if module is None and len(names) < len(kinds):
        return names[0] if len(names) == 1 else module
    return module


def _unwritable(run_dir: Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot write the run directory {run_dir}: {exc.strerror or exc}", key="workspace",
                       fix="choose a writable workspace=... (or fix its permissions)")


def _given(value, default):
    """The command line's value when given (0 included: it is range-checked, not ignored)."""
    return value if value is not None else default


def _check_launcher_tools(launcher: str, container_command: str | None) -> None:
    """A launcher's tools must exist before the run directory does (exit 2 leaves nothing)."""
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("sbatch not found on this machine", key="--launcher slurm",
                          fix="run on a Slurm login node or use --launcher local")
    if launcher == "container" and container_command:
        runtime = shlex.split(container_command)[0]
        if shutil.which(runtime) is None:
            raise ConfigError(f"{runtime} not found on this machine", key="launch.container.runtime",
                              fix="install it or set launch.container.runtime")


def _summary(translator, m, host, target) -> dict:
    """The translator's dry-run lines; a translator whose `summary` takes `platform` gets the target's
    (kind and arch: a Platform), else this host's, to say what the run will take there."""
    import inspect

    if "platform" not in inspect.signature(translator.summary).parameters:
        return translator.summary(m)
    from primus.config.layered import COMMAND_LINE
    from primus.platform.detect import Platform

    try:
        return translator.summary(m, platform=Platform(kind=target.platform, arch=target.arch) if target else host)
    except ConfigError as exc:  # what the target platform cannot run: located where the value was written
        src = m.explain(exc.key) if exc.key and not exc.file else None
        if src is not None and src.item is not None:
            raise ConfigError(exc.message, file=COMMAND_LINE, key=src.item, fix=exc.fix) from None
        if src is not None and src.file:
            raise ConfigError(exc.message, file=src.file, line=src.line, key=exc.key, fix=exc.fix) from None
        raise


def _print_dry_run(resolved, platform, opts, launcher, rendered, env_changes, target=None, notes=()) -> None:
    from primus.patches.registry import PatchContext, PatchSet

    print(f"experiment  {resolved.file}")
    print(f"run dir     {resolved.run_dir.resolve()}  (not created: dry run)")
    print(f"platform    {platform.describe()}" + ("  (this host)" if target is not None else ""))
    if target is not None:
        print(f"target      {target.describe()}")
        for note in notes:
            print(f"  note: {note}")
        for name in ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME"):
            if name in env_changes:
                print(f"network     {name}={env_changes[name]} (the interface that routes to {opts.master_addr})")
            elif name in os.environ and opts.nnodes > 1:
                print(f"network     {name}={os.environ[name]} (set by the user)")
    print(f"launcher    {launcher}")
    print(f"world size  {opts.world_size} ({opts.nnodes} node(s) x {opts.nproc_per_node} process(es))")
    for name, m in resolved.modules.items():
        backend = resolved.backends[m.framework]
        translator = backend.spec.load_translator()
        print(f"\nmodule {name}: backend {backend.name} ({backend.spec.framework} "
              f"{backend.framework_version or 'not installed'})")
        if m.model is not None:
            alias = f", upstream name {m.model_alias}" if m.model_alias else ""
            print(f"  model     {m.model.family}, {m.model.parameter_count() / 1e6:,.1f}M parameters "
                  f"({m.model_file}{alias})")
        on = target if target is not None and target.platform else None  # the target's patches, when known
        for key, value in _summary(translator, m, platform, on).items():
            print(f"  {key:<9} {value}")
        ctx = PatchContext(backend=backend.name, platform=on.platform if on else platform.kind,
                           arch=on.arch if on else platform.arch,
                           framework_version=backend.framework_version, config=m.native,
                           world_size=opts.world_size)
        applying = [d.patch.id for d in PatchSet(backend.spec.load_patches()).explain(ctx) if d.applies]
        print(f"  patches   {', '.join(applying) or 'none'}")
        if name in rendered:
            text = rendered[name]
            if "\n" in text:
                print("  sbatch script:\n" + "\n".join("    " + line for line in text.splitlines()))
            else:
                print(f"  command   {text}")
    print("\nenvironment it would set:")
    for k, v in sorted(env_changes.items()):
        print(f"  {k}={v}")
    if not env_changes:
        print("  (nothing)")
