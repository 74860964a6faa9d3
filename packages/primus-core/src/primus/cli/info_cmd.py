"""`primus backends | patches | env | presets | docs`: what is installed and what it would do."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from primus.errors import EXIT_FAILURE, EXIT_OK


def cmd_backends(args: argparse.Namespace) -> int:
    from primus.backends.discovery import KNOWN_BACKENDS, discover

    d = discover()
    for w in d.warnings:
        sys.stderr.write(f"primus: warning: {w}\n")
    if not d.backends:
        print("no backends installed: pip install " + " | ".join(sorted(KNOWN_BACKENDS.values())))
    for name, b in sorted(d.backends.items()):
        version = b.framework_version or "-"
        print(f"{name:<11} {b.distribution:<18} {b.spec.framework} {version:<10} supported {b.spec.supported:<14} "
              f"{b.spec.process_model:<9} {b.status()}")
    for name in d.disabled:
        print(f"{name:<11} (disabled by PRIMUS_DISABLE_BACKENDS)")
    return EXIT_OK


def _platform(kind: str | None, arch: str | None = None) -> tuple[str, str | None]:
    if kind:
        return kind, arch or ("gfx942" if kind == "rocm" else None)
    from primus.platform.detect import detect_platform

    p = detect_platform()
    return p.kind, arch or p.arch


def cmd_patches(args: argparse.Namespace) -> int:
    from primus.backends.discovery import discover
    from primus.patches.registry import PatchContext, PatchSet, patches_markdown

    d = discover()
    names = [args.backend] if args.backend else sorted(d.backends)
    platform, arch = _platform(args.platform)
    configs: dict[str, dict] = {}
    if args.exp:
        from primus.config.resolve import resolve

        for m in resolve(args.exp).modules.values():
            configs[m.framework] = m.native
    for name in names:
        backend = d.get(name)
        patches = backend.spec.load_patches()
        if args.markdown:
            print(f"## {name}\n\n{patches_markdown(name, patches)}")
            continue
        ctx = PatchContext(backend=name, platform=platform, arch=arch,
                           framework_version=backend.framework_version, config=configs.get(name, {}))
        print(f"{name} ({backend.spec.framework} {backend.framework_version or 'not installed'}, {platform}):")
        for dec in PatchSet(patches).explain(ctx):
            mark = "apply" if dec.applies else "skip "
            print(f"  {mark}  {dec.patch.id:<40} {dec.patch.phase:<13} {dec.reason}")
        if not patches:
            print("  (no patches)")
    return EXIT_OK


def cmd_env(args: argparse.Namespace) -> int:
    from primus.backends.discovery import discover
    from primus.platform.env import core_entries, plan_env

    platform, arch = _platform(args.platform, args.arch)
    if args.backend:
        backend = discover().get(args.backend, key="--backend")
        entries = core_entries(backend.spec.runtime) + backend.spec.load_env()
        title = backend.name
    else:  # core alone: its own platform set (the torch runtime's, which a core-only install runs)
        entries, title = core_entries("torch"), "core (give --backend B to add a backend's entries)"
    changes, decisions = plan_env(entries, platform=platform, arch=arch, environ=os.environ)
    print(f"# {title} on {platform}" + (f" ({arch})" if arch else ""))
    for dec in decisions:
        if dec.applied:
            print(f"{dec.entry.name}={dec.value}  # {dec.entry.source}: {dec.reason}" +
                  (f"; {dec.entry.why}" if dec.entry.why else ""))
        elif args.all:
            print(f"# skip {dec.entry.name}={dec.entry.value}: {dec.reason}")
    if not changes:
        print("# nothing to set")
    return EXIT_OK


def cmd_presets(args: argparse.Namespace) -> int:
    import yaml

    from primus.config.resolve import core_preset_dir

    dirs = [("core", core_preset_dir() / "models")]
    aliases = {}
    if args.backend:
        from primus.backends.discovery import discover
        from primus.config.upstream import upstream_tables

        backend = discover().get(args.backend)
        dirs.insert(0, (args.backend, backend.spec.preset_dir() / "models"))
        aliases = upstream_tables(backend).models
    for owner, directory in dirs:
        for path in sorted(directory.glob("*.yaml")):
            data = yaml.safe_load(path.read_text()) or {}
            family = data.get("family", "native")
            print(f"{path.name:<26} {owner:<10} {family}")
    for name, alias in sorted(aliases.items()):  # upstream Primus's names for this backend's models
        what = (f"-> {alias.preset}" if alias.preset else "native") if alias.built else "not built"
        print(f"{name + '.yaml':<26} {'upstream':<10} {alias.family or '-'} {what}")
    return EXIT_OK


def cmd_docs(args: argparse.Namespace) -> int:
    from primus.docs.generate import generate_docs

    out = Path(args.out)
    pages = generate_docs()
    stale = []
    for name, text in pages.items():
        path = out / name
        current = path.read_text() if path.exists() else None
        if current != text:
            stale.append(str(path))
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if args.check and stale:
        sys.stderr.write("primus: generated docs are out of date: " + ", ".join(stale) +
                         " (run `primus docs` and commit)\n")
        return EXIT_FAILURE
    print(("checked " if args.check else "wrote ") + ", ".join(str(out / n) for n in pages))
    return EXIT_OK


def cmd_data_prepare(args: argparse.Namespace) -> int:
    import inspect

    from primus.backends.spec import load_object
    from primus.config.resolve import resolve
    from primus.errors import ConfigError

    resolved = resolve(args.exp, args.overrides, module=args.module)
    modules = [m for m in resolved.modules.values() if not args.backend or m.framework == args.backend]
    if not modules:
        raise ConfigError(f"no module of backend '{args.backend}' in the experiment", file=args.exp)
    for m in modules:
        spec = resolved.backends[m.framework].spec
        if spec.data_prepare is None:
            print(f"{m.name}: backend {m.framework} reads data directly; nothing to prepare")
            continue
        if not m.module.data.path:
            print(f"{m.name}: no data.path (mock data?); nothing to prepare")
            continue
        prepare = load_object(spec.data_prepare)
        # the run directory the module would train in: a backend whose run keeps its converted data in
        # the workspace (megatron) prepares it where the run will look; older hooks take the module only
        takes_run_dir = "run_dir" in inspect.signature(prepare).parameters
        print(f"{m.name}: {prepare(m, run_dir=resolved.run_dir) if takes_run_dir else prepare(m)}")
    return EXIT_OK
