"""`primus config show | validate | schema`."""

from __future__ import annotations

import argparse
import json
import sys

import yaml

from primus.errors import EXIT_OK, ConfigError


def cmd_show(args: argparse.Namespace) -> int:
    from primus.config.resolve import resolve
    from primus.config.yamlfile import flatten

    resolved = resolve(args.exp, args.overrides, module=args.module)
    for name, m in resolved.modules.items():
        if args.explain:
            src = m.explain(args.explain)
            if src is None:
                from primus.suggest import did_you_mean

                keys = {".".join(p) for p in m.sources}
                raise ConfigError(f"key '{args.explain}' is not in the resolved config of module '{name}'",
                                  key=args.explain, fix=did_you_mean(args.explain, keys))
            value = m.native
            for part in args.explain.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            print(f"{name}.{args.explain} = {value!r}  <- {src.describe()}")
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


def cmd_validate(args: argparse.Namespace) -> int:
    from primus.config.resolve import resolve

    resolved = resolve(args.exp, args.overrides, world_size=args.nproc_per_node * args.nnodes)
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
