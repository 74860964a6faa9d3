"""`primus` argument parsing and error handling (exit codes: 0 ok, 1 training failure, 2 usage)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from primus import __version__

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other usage error
        sys.stderr.write(f"primus: error: {message} (see `{self.prog} --help`)\n")
        sys.exit(EXIT_USAGE)


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], refused with the range otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high if high is not None else ''}")
        return value

    parse.__name__ = "integer"
    return parse


_POSITIVE, _NON_NEGATIVE, _PORT = _int_at_least(1), _int_at_least(0), _int_at_least(1, 65535)


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("launch (defaults from GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT)")
    g.add_argument("--nproc-per-node", type=_POSITIVE, default=None, help="processes per node (torch backends); devices per host for per-host (JAX) backends")
    g.add_argument("--nnodes", type=_POSITIVE, default=None)
    g.add_argument("--node-rank", type=_NON_NEGATIVE, default=None)
    g.add_argument("--master-addr", default=None)
    g.add_argument("--master-port", type=_PORT, default=None)
    g.add_argument("--max-restarts", type=_NON_NEGATIVE, default=None, help="torchrun restarts of failed workers")
    g.add_argument("--platform", choices=["rocm", "cuda", "cpu"], default=None,
                   help="target platform of the nodes that run the job (default: launch.platform, else this host's; "
                        "for Slurm from a host without GPUs, what each compute node detects)")
    g.add_argument("--gpus-per-node", type=_NON_NEGATIVE, default=None,
                   help="GPUs each node of the target has (default: launch.slurm.gpus_per_node, else this host's "
                        "visible devices); the default --nproc-per-node")
    g.add_argument("--launcher", choices=["local", "slurm", "container"], default=None,
                   help="default: the experiment's launch.launcher, else local")
    g.add_argument("--wait", action="store_true", help="slurm: follow the job and return its exit code")
    g.add_argument("--srun-arg", action="append", metavar="ARG", help="slurm: extra srun option (repeatable)")
    g.add_argument("--sbatch-arg", action="append", metavar="ARG", help="slurm: extra sbatch option (repeatable)")
    g.add_argument("--container", action="store_true", help="slurm: run each node inside the container")
    g.add_argument("--image", help="container image (launch.container.image)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="primus", description="One experiment YAML, one command, four training backends.")
    parser.add_argument("--version", action="version", version=f"primus {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", help="resolve an experiment and train")
    run.add_argument("exp", help="experiment YAML")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="dotted paths inside the module (train.steps=10); a bare key is a native override")
    run.add_argument("--module", help="run only this module")
    run.add_argument("--dry-run", action="store_true", help="print what would happen and exit 0; touch nothing")
    _add_launch_args(run)

    train = sub.add_parser("train", help="upstream form: primus train pretrain --config EXP [key=value ...]")
    train.add_argument("task", choices=["pretrain", "posttrain", "sft"])
    train.add_argument("--config", "--exp", dest="exp", required=True)
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.add_argument("--module", help="run only this module")
    train.add_argument("--dry-run", action="store_true")
    _add_launch_args(train)

    preflight = sub.add_parser("preflight", help="check every node of a job (accelerators, env, versions, "
                               "collectives, disk) through the same launcher")
    preflight.add_argument("exp")
    preflight.add_argument("overrides", nargs="*", metavar="key=value")
    preflight.add_argument("--module")
    preflight.add_argument("--dry-run", action="store_true")
    _add_launch_args(preflight)

    sub.add_parser("backends", help="list installed backends")

    config = sub.add_parser("config", help="show, validate or describe experiment configs")
    csub = config.add_subparsers(dest="config_command", metavar="ACTION", required=True, parser_class=_Parser)
    show = csub.add_parser("show", help="print the resolved module config")
    show.add_argument("exp")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.add_argument("--module")
    show.add_argument("--explain", metavar="KEY", help="which layer and file set KEY")
    show.add_argument("--sources", action="store_true", help="print the layer of every value")
    show.add_argument("--nproc-per-node", type=_POSITIVE, default=None,
                      help="processes per node the values are for (default: launch.nproc_per_node, else 1)")
    show.add_argument("--nnodes", type=_POSITIVE, default=None, help="default: launch.nnodes, else 1")
    validate = csub.add_parser("validate", help="check an experiment without running it")
    validate.add_argument("exp")
    validate.add_argument("overrides", nargs="*", metavar="key=value")
    validate.add_argument("--nproc-per-node", type=_POSITIVE, default=None,
                          help="default: launch.nproc_per_node, else 1")
    validate.add_argument("--nnodes", type=_POSITIVE, default=None, help="default: launch.nnodes, else 1")
    csub.add_parser("schema", help="print the JSON Schema of experiment files")

    patches = sub.add_parser("patches", help="list patches and whether they would apply")
    patches.add_argument("--backend")
    patches.add_argument("--markdown", action="store_true")
    patches.add_argument("--platform", choices=["rocm", "cuda", "cpu"])
    patches.add_argument("--exp", help="decide with this experiment's config")

    env = sub.add_parser("env", help="print the environment Primus would set")
    env.add_argument("--backend", help="add this backend's entries (default: core's platform set only)")
    env.add_argument("--platform", choices=["rocm", "cuda", "cpu"])
    env.add_argument("--arch", help="gfx arch on ROCm, e.g. gfx942")
    env.add_argument("--all", action="store_true", help="also list entries that would not apply")

    presets = sub.add_parser("presets", help="list model presets")
    presets.add_argument("--backend")

    data = sub.add_parser("data", help="prepare local data in a backend's own format")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True, parser_class=_Parser)
    prepare = dsub.add_parser("prepare", help="convert the experiment's corpus once (cached) before a run")
    prepare.add_argument("exp")
    prepare.add_argument("overrides", nargs="*", metavar="key=value")
    prepare.add_argument("--module")
    prepare.add_argument("--backend", help="only modules of this backend")

    runs = sub.add_parser("runs", help="list the runs of a workspace, newest first")
    runs.add_argument("workspace", nargs="?", default=None,
                      help="default $PRIMUS_WORKSPACE, else ./output (the examples' workspace)")
    runs.add_argument("--json", action="store_true")

    compare = sub.add_parser("compare", help="runs side by side (any backend), optionally plotted")
    compare.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    compare.add_argument("--plot", metavar="OUT.png", help="loss, eval loss and tokens/s against step "
                         "(needs primus-core[plot])")
    compare.add_argument("--json", action="store_true")

    evaluate = sub.add_parser("eval", help="mean token loss and perplexity of a module's model on a corpus")
    evaluate.add_argument("exp", help="experiment YAML")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value")
    evaluate.add_argument("--checkpoint", help="latest (the run's newest checkpoint) or a checkpoint directory; "
                          "default: the model's init (its hf_path weights)")
    evaluate.add_argument("--data", help="corpus (.jsonl or text); default: the module's data.path")
    evaluate.add_argument("--module")
    evaluate.add_argument("--max-blocks", type=_POSITIVE, default=None, help="score only the first N blocks")
    evaluate.add_argument("--nproc-per-node", type=_POSITIVE, default=None)
    evaluate.add_argument("--master-port", type=_PORT, default=None)

    export = sub.add_parser("export", help="a run's checkpoint as a Hugging Face model directory")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty directory")
    export.add_argument("--step", type=_NON_NEGATIVE, default=None, help="default: the newest checkpoint")
    export.add_argument("--module")

    generate = sub.add_parser("generate", help="greedy generation with a run's model (post-training's quick check)")
    generate.add_argument("run_dir", metavar="RUN_DIR")
    generate.add_argument("--prompt", action="append", metavar="TEXT", help="a user prompt (repeatable)")
    generate.add_argument("--prompts", metavar="FILE", help='a .jsonl of {"prompt": ...}, or one prompt per line')
    generate.add_argument("--max-new-tokens", type=_POSITIVE, default=64)
    generate.add_argument("--system", metavar="TEXT", help="a system message (chat templates)")
    generate.add_argument("--module", help="the run's module (default: post_trainer, else the first)")

    docs = sub.add_parser("docs", help="generate docs/backends from the installed packages")
    docs.add_argument("--out", default="docs/backends")
    docs.add_argument("--check", action="store_true", help="exit 1 if the committed files differ")
    return parser


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command in ("run", "train", "preflight"):
        from primus.cli.run_cmd import cmd_run

        return cmd_run(args, preflight=command == "preflight")
    if command == "config":
        from primus.cli import config_cmd

        return {"show": config_cmd.cmd_show, "validate": config_cmd.cmd_validate,
                "schema": config_cmd.cmd_schema}[args.config_command](args)
    if command in ("eval", "export"):
        from primus.cli import eval_cmd

        return eval_cmd.cmd_eval(args) if command == "eval" else eval_cmd.cmd_export(args)
    if command == "generate":
        from primus.posttrain.generate import cmd_generate

        return cmd_generate(args)
    if command in ("runs", "compare"):
        from primus.cli import runs_cmd

        return runs_cmd.cmd_runs(args) if command == "runs" else runs_cmd.cmd_compare(args)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {}
    from primus.cli import info_cmd

    handlers = {"data": info_cmd.cmd_data_prepare, "backends": info_cmd.cmd_backends, "patches": info_cmd.cmd_patches, "env": info_cmd.cmd_env,
                "presets": info_cmd.cmd_presets, "docs": info_cmd.cmd_docs}
    return handlers[command](args)


def _extra_overrides(extra: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Overrides after options, and upstream's `--key value` / `--key=value` form, as key=value."""
    out: list[str] = []
    i = 0
    while i < len(extra):
        item = extra[i]
        if item.startswith("--") and len(item) > 2:
            key = item[2:]
            _refuse_mistyped_option(key.partition("=")[0], parser)
            if "=" in key:
                out.append(key)
            elif i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                out.append(f"{key}={extra[i + 1]}")
                i += 1
            else:
                out.append(f"{key}=true")
        elif "=" in item and not item.startswith("-"):
            out.append(item)
        else:
            parser.error(f"unrecognized argument: {item}")
        i += 1
    return out


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command being run, whose options a mistyped one is compared with."""
    for attr in ("command", "config_command", "data_command"):
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, attr, None)
        if sub is None or name not in sub.choices:
            break
        parser = sub.choices[name]
    return parser


def _refuse_mistyped_option(name: str, parser: argparse.ArgumentParser) -> None:
    """`--dryrun` is a mistyped `--dry-run`, not upstream's `--key value` config form.

    Config keys use underscores; an option of this command within a small edit distance, or a
    name with a dash, is taken as a mistyped option (exit 2 with the suggestion).
    """
    import difflib

    options = [o[2:] for a in parser._actions for o in a.option_strings if o.startswith("--")]
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.8)
    if close and name not in options:
        parser.error(f"unknown option --{name}; did you mean --{close[0]}?")
    if "-" in name:
        parser.error(f"unknown option --{name} (config keys are written key=value; `{parser.prog} --help` lists "
                     "the options)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides"):
            parser.error("unrecognized arguments: " + " ".join(extra))
        args.overrides = list(args.overrides) + _extra_overrides(extra, _command_parser(parser, args))
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    from primus.errors import ConfigError

    try:
        return _dispatch(args)
    except ConfigError as exc:
        sys.stderr.write(f"primus: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
