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
    from primus.launch.plan import PREFLIGHT, WORKER, LaunchOptions, plan_launch
    from primus.platform.detect import detect_platform
    from primus.platform.env import core_entries, plan_env

    platform = detect_platform()
    # parsed once: launch options change this one object, and the run directory records it
    loaded = load_experiment(Path(args.exp), args.overrides)
    experiment = loaded.experiment
    launch = experiment.launch
    launcher = args.launcher or launch.launcher
    if args.image:
        launch.container.image = args.image
    launch.slurm.srun_args = [*launch.slurm.srun_args, *(args.srun_arg or [])]
    launch.slurm.sbatch = [*launch.slurm.sbatch, *(args.sbatch_arg or [])]
    opts = LaunchOptions.from_args(
        nproc_per_node=_given(args.nproc_per_node, launch.nproc_per_node), nnodes=_given(args.nnodes, launch.nnodes),
        node_rank=args.node_rank, master_addr=args.master_addr, master_port=_given(args.master_port, launch.master_port),
        max_restarts=_given(args.max_restarts, launch.max_restarts), default_nproc=platform.devices or 1)
    discovery = discover()
    for w in discovery.warnings:
        _warn(w)
    resolved = resolve(loaded, module=args.module, world_size=opts.world_size, discovery=discovery)
    for m in resolved.modules.values():
        for note in m.notices:
            _warn(f"{m.name}: {note}")
    if len(resolved.modules) > 1 and (opts.world_size > 1 or launcher != "local"):
        raise ConfigError(f"the experiment has {len(resolved.modules)} modules; a multi-process launch runs one",
                          file=args.exp, key="modules", fix="pass --module NAME")

    env_changes: dict[str, str] = {}
    for backend in resolved.backends.values():
        entries = core_entries(backend.spec.runtime) + backend.spec.load_env()
        native: dict[str, object] = {}
        for m in resolved.modules.values():
            if m.framework == backend.name:
                native.update(m.native)
        changes, _ = plan_env(entries, platform=platform.kind, arch=platform.arch, environ=os.environ,
                              experiment_env=resolved.experiment.env, config=native)
        env_changes.update(changes)

    run_dir = resolved.run_dir.resolve()
    names = list(resolved.modules)
    process_models = {n: resolved.backends[m.framework].spec.process_model for n, m in resolved.modules.items()}

    entry = PREFLIGHT if preflight else WORKER
    if preflight:
        names = names[:1]  # one check per job, whatever module it names
    if launcher == "local":
        plans = {n: plan_launch(process_models[n], run_dir, n, opts, entry=entry) for n in names}
        rendered = {n: p.render() for n, p in plans.items()}
    else:
        name = names[0]
        node_cmd = [sys.executable, "-m", "primus.launch.node", "--run-dir", str(run_dir), "--module", name,
                    "--process-model", process_models[name], "--nproc-per-node", str(opts.nproc_per_node),
                    "--nnodes", str(opts.nnodes), "--master-port", str(opts.master_port)]
        if opts.max_restarts:
            node_cmd += ["--max-restarts", str(opts.max_restarts)]
        if preflight:
            node_cmd += ["--entry", entry]
        if launcher == "slurm":
            from primus.launch.slurm import render_sbatch

            if getattr(args, "container", False):
                node_cmd.append("--container")
            gpus = launch.slurm.gpus_per_node
            if gpus is None:
                gpus = opts.nproc_per_node if platform.kind != "cpu" else 0
            script = render_sbatch(exp_name=experiment.exp_name, run_dir=run_dir, nnodes=opts.nnodes,
                                   gpus_per_node=gpus, slurm=launch.slurm, env=env_changes, node_command=node_cmd)
            rendered = {name: script}
        else:
            from primus.launch.container import container_argv

            exp_dir = Path(args.exp).resolve().parent
            mounts = [Path(resolved.experiment.workspace).expanduser().resolve(), exp_dir]
            data = resolved.modules[name].module.data
            mounts += [Path(p).parent for p in (data.path, data.tokenizer) if p]
            argv = container_argv(launch.container, mounts=mounts, env=env_changes,
                                  inner=["python", *node_cmd[1:]], workdir=Path.cwd())
            rendered = {name: shlex.join(argv)}

    from primus.runs.resume import RunLock, check_resume, next_attempt

    if args.dry_run:
        for name in names:
            for note in check_resume(resolved.modules[name], run_dir).notices:
                _warn(f"{name}: {note}")
        _print_dry_run(resolved, platform, opts, launcher, rendered, env_changes)
        return EXIT_OK

    from primus.runs.rundir import create_run_dir
    from primus.runs.worker import run_worker

    _check_launcher_tools(launcher, rendered[names[0]] if launcher == "container" else None)
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


def _print_dry_run(resolved, platform, opts, launcher, rendered, env_changes) -> None:
    from primus.patches.registry import PatchContext, PatchSet

    print(f"experiment  {resolved.file}")
    print(f"run dir     {resolved.run_dir.resolve()}  (not created: dry run)")
    print(f"platform    {platform.describe()}")
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
        for key, value in translator.summary(m).items():
            print(f"  {key:<9} {value}")
        ctx = PatchContext(backend=backend.name, platform=platform.kind, arch=platform.arch,
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
