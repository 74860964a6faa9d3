"""`primus runs [WORKSPACE]` and `primus compare RUN_DIR... [--plot out.png]` (issue 15).

Both read run directories only (config.yaml, metrics.jsonl, status.json), so they work for runs
of every backend and import no framework. The plot needs matplotlib: `pip install primus-core[plot]`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from primus.errors import EXIT_OK, ConfigError


def _num(value: float | None, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_runs(args: argparse.Namespace) -> int:
    from primus.runs.summary import find_runs, summarize

    # the examples write to ${PRIMUS_WORKSPACE:./output}: list where they wrote
    workspace = Path(args.workspace or os.environ.get("PRIMUS_WORKSPACE") or "./output").expanduser()
    if not workspace.is_dir():
        raise ConfigError(f"workspace {workspace} does not exist", key="WORKSPACE",
                          fix="give the experiment's workspace (default ./output)")
    summaries = []
    for run_dir in find_runs(workspace):
        try:
            summaries += summarize(run_dir)
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"primus: warning: skipped {run_dir}: {exc}\n")
    if args.json:
        print(json.dumps([s.to_json() for s in summaries], indent=2))
        return EXIT_OK
    if not summaries:
        print(f"no runs under {workspace}")
        return EXIT_OK
    header = ["exp", "backend", "model", "state", "step", "last loss", "tok/s", "started", "duration"]
    rows = [[s.exp if len({x.module for x in summaries if x.exp == s.exp}) < 2 else f"{s.exp}/{s.module}",
             s.backend, s.model, s.state, f"{s.step if s.step is not None else '-'}/{s.steps or '?'}",
             _num(s.last_loss, ".4f"), _num(s.tokens_per_s, ",.0f"), s.started or "-", _duration(s.duration_s)]
            for s in summaries]
    print(_table(header, rows))
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from primus.runs.summary import summarize

    summaries = []
    for given in args.run_dirs:
        run_dir = Path(given).expanduser()
        try:
            summaries += summarize(run_dir)
        except (OSError, ValueError):
            raise ConfigError(f"{run_dir} is not a run directory (no readable config.yaml)", key="RUN_DIR",
                              fix="`primus runs WORKSPACE` lists run directories") from None
    if args.plot:
        _plot(summaries, Path(args.plot))
    if args.json:
        print(json.dumps([s.to_json() for s in summaries], indent=2))
        return EXIT_OK
    header = ["run", "backend", "steps", "final loss", "best loss", "eval loss", "tok/s", "step s", "layout"]
    rows = [[_label(s, summaries), s.backend, f"{s.step if s.step is not None else '-'}/{s.steps or '?'}",
             _num(s.last_loss, ".4f"), _num(s.best_loss, ".4f"), _num(s.eval_loss, ".4f"),
             _num(s.tokens_per_s, ",.0f"), _num(s.step_time_s, ".4f"), s.layout] for s in summaries]
    print(_table(header, rows))
    if args.plot:
        print(f"plot: {args.plot}")
    return EXIT_OK


def _label(s, summaries) -> str:
    same_exp = sum(1 for x in summaries if x.exp == s.exp) > 1
    return f"{s.exp} ({Path(s.run_dir).parent.name}/{s.module})" if same_exp else s.exp


def _plot(summaries, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: compute nodes and CI have no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib, which is not installed", key="--plot",
                          fix="pip install 'primus-core[plot]'") from None
    if not out.parent.is_dir():
        raise ConfigError(f"folder {out.parent} does not exist", key="--plot")
    fig, (loss_ax, speed_ax) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for s in summaries:
        label = _label(s, summaries)
        train = [r for r in s.history if "loss" in r and r.get("loss") is not None]
        evals = [r for r in s.history if r.get("eval_loss") is not None]
        line, = loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=f"{label} loss")
        if evals:
            loss_ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o--", color=line.get_color(),
                         label=f"{label} eval loss")
        speed = [r for r in train if r.get("tokens_per_s") is not None]
        speed_ax.plot([r["step"] for r in speed], [r["tokens_per_s"] for r in speed], color=line.get_color(),
                      label=label)
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize="small")
    loss_ax.grid(alpha=0.3)
    speed_ax.set_ylabel("tokens/s")
    speed_ax.set_xlabel("step")
    speed_ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
