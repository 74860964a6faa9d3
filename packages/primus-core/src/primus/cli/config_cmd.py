"""`primus config show | validate | schema`."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from primus.errors import EXIT_OK, ConfigError


def _loaded_and_world(args: argparse.Namespace):
    """The experiment, parsed once, and the world size its values are judged for: the options, else the
    experiment's `launch:` section (as `primus run` reads it), else one process."""
    from primus.config.resolve import load_experiment

    loaded = load_experiment(args.exp, args.overrides)
    launch = loaded.experiment.launch
    nproc = args.nproc_per_node or launch.nproc_per_node or 1
    nnodes = args.nnodes or launch.nnodes or 1
    return loaded, nproc * nnodes


def cmd_show(args: argparse.Namespace) -> int:
    from primus.config.resolve import resolve
    from primus.config.yamlfile import flatten

    loaded, world = _loaded_and_world(args)
    resolved = resolve(loaded, module=args.module, world_size=world)
    for name, m in resolved.modules.items():
        for note in m.notices:
            sys.stderr.write(f"primus: warning: {name}: {note}\n")
        if args.explain:
            for line in explain(m, args.explain):
                print(line)
            continue
        print(f"# module {name} (backend {m.framework}) from {resolved.file}")
        if args.sources:
            width = max((len(".".join(p)) for p in m.sources), default=10)
            for path, value in flatten(m.native).items():
                src = m.sources.get(path)
                print(f"{'.'.join(path):<{width}}  {value!r:<24}  # {src.describe() if src else '?'}")
        else:
            sys.stdout.write(yaml.safe_dump({name: m.native}, sort_keys=False))
    return EXIT_OK


def explain(m, key: str) -> list[str]:
    """Where `key` came from, asked in either language: a native key (`max_steps`), a neutral path
    (`train.steps`) or a bare neutral field (`steps`). Unknown: a did-you-mean over both."""
    from primus.config.rules import get_path
    from primus.config.schema import NEUTRAL_SECTIONS
    from primus.suggest import did_you_mean

    def native_line(native_key: str) -> str:
        src = m.explain(native_key)
        where = src.describe() if src else "?"
        return f"{m.name}.{native_key} = {get_path(m.native, native_key)!r}  <- {where}"

    if m.explain(key) is not None:
        origin = m.neutral_origins.get(key)
        return [native_line(key) + (f"  (neutral name: {origin})" if origin else "")]
    neutral_paths = [f"{s}.{f}" for s, cls in NEUTRAL_SECTIONS.items() for f in cls.model_fields]
    if key not in neutral_paths:
        bare = [p for p in neutral_paths if p.split(".")[1] == key]
        key = bare[0] if len(bare) == 1 else key
    if key in neutral_paths:
        section, field_name = key.split(".")
        value = getattr(getattr(m.module, section), field_name)
        natives = m.native_keys_of(key)
        head = f"{m.name}.{key} = {value!r}" if value is not None else f"{m.name}.{key} is not set"
        if not natives:
            return [head + f"  (the {m.framework} backend's own default applies)" if value is None
                    else head + f"  (not used by the {m.framework} backend)"]
        return [head + "  -> " + ", ".join(natives)] + ["  " + native_line(k) for k in natives]
    native_names = {".".join(p[: i + 1]) for p in m.sources for i in range(len(p))}
    hint = did_you_mean(key, native_names | set(neutral_paths) | {p.split(".")[1] for p in neutral_paths})
    raise ConfigError(f"'{key}' is neither a native key of module '{m.name}' nor a neutral path", key="--explain",
                      fix=hint or "`primus config show EXP --sources` lists every key")


def cmd_validate(args: argparse.Namespace) -> int:
    from primus.config.resolve import resolve

    loaded, world = _loaded_and_world(args)
    resolved = resolve(loaded, world_size=world)
    for m in resolved.modules.values():
        for note in m.notices:
            sys.stderr.write(f"primus: warning: {m.name}: {note}\n")
    names = ", ".join(f"{n} ({m.framework})" for n, m in resolved.modules.items())
    print(f"{args.exp}: ok ({names})")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from primus.config.schema import experiment_json_schema

    print(json.dumps(experiment_json_schema(), indent=2))
    return EXIT_OK
