"""Every `primus ...` command shown in README.md and docs/ runs as shown, so a page cannot drift
from the code (issue 15, "Documented commands are tested").

What is collected: each line of a ```bash, ```sh, ```shell or ```console fence whose command (after
an optional `$ ` prompt, `NAME=value` prefixes, and in a `a && b` chain each part) starts with
`primus` or a path ending in `/primus` (`.venv/bin/primus`). In a ```console fence only `$ ` lines
are commands; the lines under one are its output, and each of them must appear in what the command
printed. A ```text fence is never read: it is the place for syntax summaries and rendered output.

How each runs: `python -m primus ARGS` in a subprocess from the repository root, with a temporary
workspace (`workspace=` on `run`/`train`, `PRIMUS_WORKSPACE`, `PRIMUS_CACHE_DIR`, the datasets
cache) so nothing is written into the repository; the default workspace `output` on the command
line stands for that temporary one, and `--out`/`--plot` files go to the temporary directory.
- A command that trains gets `train.steps=2` (and `train.warmup_steps=1` when its experiment warms
  up longer), and a free `--master-port` when it starts several processes; it must leave a
  `metrics.jsonl` that reached step 2.
- A command that needs a GPU node or a cluster (more than 2 processes per node, more than one node,
  an 8B-class example, `--launcher slurm` without `sbatch`, `--launcher container`) runs with
  `--dry-run`, which must create nothing.
- A command whose backend is not installed here is skipped, naming it; the backend template's
  commands run with the template pip-installed into a temporary folder on PYTHONPATH, as its guide
  tells the reader to install it (the environment itself is not changed).
- A schematic command (placeholders such as `exp.yaml` or `RUN_DIR`) is skipped only when the doc
  says so with a trailing `# schematic` comment. Anything else that does not run fails here.

The expected exit code is 0 unless the doc says otherwise: a trailing `# exit 2` comment, or in a
```console fence a following `$ echo $?` with the code on the next line.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest

from tests.support import QUIET_ENV, ROOT, free_port, read_metrics

pytestmark = pytest.mark.slow

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL_FENCES = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SEPARATORS = {"&&", "||", ";", "|", "&", ";;"}
TEMPLATE = ROOT / "examples" / "backend-template" / "primus-tinytorch"
TEMPLATE_BACKEND = "tinytorch"
TRAIN_STEPS = 2
LOCAL_PROCESSES = 2  # this CPU machine runs at most two training processes
BIG_MODEL = re.compile(r"\d+(\.\d+)?B(?![a-z])")  # llama3.1_8B, qwen3_8B, ...-70B-...
SUBCOMMANDS_WITH_WORKSPACE = {"run", "train", "preflight"}


@dataclass
class DocCommand:
    doc: str                 # path relative to the repository root
    line: int                # 1-based line of the command in the doc
    text: str                # the shell line as written (prompt removed)
    argv: list[str]          # after `primus`
    env: dict[str, str]      # NAME=value prefixes
    comment: str             # trailing comment, without '#'
    expected_output: list[str] = field(default_factory=list)
    expected_rc: int | None = None  # from `$ echo $?` in a console fence

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


# ---------------------------------------------------------------------------- collection


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment): a `#` outside quotes, at the start or after a blank, starts a comment."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1:].strip()
    return line.rstrip(), ""


def _tokens(code: str) -> list[str]:
    lexer = shlex.shlex(code, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = ""
    return list(lexer)


def _primus_commands(code: str) -> list[tuple[list[str], dict[str, str]]]:
    """Each `primus ...` part of a shell line: (argv after primus, NAME=value prefixes)."""
    parts: list[list[str]] = [[]]
    for token in _tokens(code):
        if token in SEPARATORS:
            parts.append([])
        else:
            parts[-1].append(token)
    found = []
    for part in parts:
        env = {}
        while part and ASSIGNMENT.match(part[0]):
            name, _, value = part.pop(0).partition("=")
            env[name] = value
        if part and (part[0] == "primus" or part[0].endswith("/primus")):
            found.append((part[1:], env))
        elif len(part) >= 3 and Path(part[0]).name.startswith("python") and part[1:3] == ["-m", "primus"]:
            found.append((part[3:], env))
    return found


def _fences(lines: list[str]):
    """(language, [(line number, text), ...]) for each fenced block."""
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, marker, lang = m.group(1), m.group(2), m.group(3).lower()
        body, i = [], i + 1
        while i < len(lines) and not (lines[i].strip().startswith(marker[0] * len(marker))
                                      and lines[i].strip().strip(marker[0]) == ""):
            text = lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip()
            body.append((i + 1, text))
            i += 1
        i += 1
        yield lang, body


def collect(path: Path) -> list[DocCommand]:
    doc = path.relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    commands: list[DocCommand] = []
    for lang, body in _fences(lines):
        if lang not in SHELL_FENCES:
            continue
        console = lang == "console"
        last: DocCommand | None = None
        k = 0
        while k < len(body):
            lineno, text = body[k]
            k += 1
            prompted = text.startswith("$ ")
            if console and not prompted:
                if last is not None and text.strip():
                    last.expected_output.append(text.strip())
                continue
            if prompted:
                text = text[2:]
            while text.rstrip().endswith("\\") and k < len(body):  # continuation lines
                text = text.rstrip()[:-1] + " " + body[k][1].strip()
                k += 1
            code, comment = _split_comment(text)
            if console and code.strip() == "echo $?":
                if last is not None and k < len(body) and body[k][1].strip().isdigit():
                    last.expected_rc = int(body[k][1].strip())
                    k += 1
                continue
            found = _primus_commands(code) if code.strip() else []
            if not found and console:
                last = None  # another command: its output is not ours
            for argv, env in found:
                last = DocCommand(doc, lineno, code.strip(), argv, env, comment)
                commands.append(last)
    return commands


def all_commands() -> list[DocCommand]:
    return [c for path in DOCS for c in collect(path)]


COMMANDS = all_commands()


# ---------------------------------------------------------------------------- planning


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _set_option(argv: list[str], name: str, value: str) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg == name and i + 1 < len(argv):
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return [*out, name, value]


def _experiment(argv: list[str]) -> Path | None:
    for arg in argv[1:]:
        if not arg.startswith("-") and "=" not in arg and arg.endswith((".yaml", ".yml")):
            return ROOT / arg
    return None


def _frameworks(exp: Path) -> set[str]:
    return set(re.findall(r"^\s*framework:\s*([\w-]+)", exp.read_text(), flags=re.M))


@cache
def _installed_backends() -> frozenset[str]:
    return frozenset(ep.name for ep in metadata.entry_points(group="primus.backends"))


@pytest.fixture(scope="module")
def template_site(tmp_path_factory) -> str:
    """The backend template pip-installed into a temporary folder (not the environment), for
    PYTHONPATH: its guide's first step is `pip install ./examples/backend-template/primus-tinytorch`."""
    target = tmp_path_factory.mktemp("template-site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                        "--no-build-isolation", "--target", str(target), str(TEMPLATE)],
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.skip(f"the backend template could not be installed into a temporary folder: "
                    f"{(r.stdout + r.stderr)[-1500:]}")
    return str(target)


@dataclass
class Plan:
    argv: list[str]
    env: dict[str, str]
    dry_run: bool = False        # we added --dry-run
    trains: bool = False
    notes: list[str] = field(default_factory=list)


def plan(cmd: DocCommand, tmp: Path, request: pytest.FixtureRequest) -> Plan:
    """What runs for a documented command, or pytest.skip with the reason."""
    if re.search(r"\bschematic\b", cmd.comment):
        pytest.skip(f"marked schematic in {cmd.doc}")
    argv = list(cmd.argv)
    if not argv:
        pytest.fail(f"{cmd.id}: `primus` without a command")
    workspace = tmp / "ws"
    sub = argv[0]

    # the backends it needs
    needed: set[str] = set()
    exp = _experiment(argv)
    if exp is not None and exp.is_file():
        needed |= _frameworks(exp)
    backend = _option(argv, "--backend")
    if backend:
        needed.add(backend)
    env = {**QUIET_ENV, "PRIMUS_WORKSPACE": str(workspace), "PRIMUS_CACHE_DIR": str(tmp / "cache"),
           "HF_HOME": str(tmp / "hf-home"), "HF_DATASETS_CACHE": str(tmp / "hf-home" / "datasets"),
           "XDG_CACHE_HOME": str(tmp / "xdg-cache"), **cmd.env}
    installed = _installed_backends()
    uses_template = TEMPLATE_BACKEND in needed or TEMPLATE_BACKEND in f"{cmd.text} {cmd.comment}"
    if uses_template and TEMPLATE_BACKEND not in installed:
        site = request.getfixturevalue("template_site")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH")) if p)
        installed = installed | {TEMPLATE_BACKEND}
    missing = sorted(needed - installed)
    if missing:
        pytest.skip(f"backend {', '.join(missing)} is not installed in this environment "
                    f"(pip install {' '.join('primus-' + b for b in missing)})")

    # the default workspace on the command line is the temporary one; files it writes go there too
    workspace.mkdir(parents=True, exist_ok=True)
    argv = [str(workspace / arg.split("/", 1)[1]) if arg.startswith(("output/", "./output/"))
            else str(workspace) if arg.rstrip("/") in ("output", "./output") else arg
            for arg in argv]
    for option in ("--out", "--plot"):
        value = _option(argv, option)
        if value is not None and not (sub == "docs" and "--check" in argv):
            argv = _set_option(argv, option, str(tmp / "files" / Path(value).name))

    p = Plan(argv, env)
    if sub not in SUBCOMMANDS_WITH_WORKSPACE:
        return p
    argv.append(f"workspace={workspace}")
    if "--dry-run" in argv:
        return p
    nproc, nnodes = _count(cmd, argv, "--nproc-per-node"), _count(cmd, argv, "--nnodes")
    launcher = _option(argv, "--launcher") or "local"
    gpu_reasons = []
    if nproc > LOCAL_PROCESSES:
        gpu_reasons.append(f"--nproc-per-node {nproc}")
    if nnodes > 1:
        gpu_reasons.append(f"--nnodes {nnodes} (the other nodes are not started here)")
    if exp is not None and BIG_MODEL.search(exp.stem):
        gpu_reasons.append(f"{exp.name} needs GPUs")
    if launcher == "slurm" and not shutil.which("sbatch"):
        gpu_reasons.append("--launcher slurm without a cluster")
    if launcher == "container":
        gpu_reasons.append("--launcher container")
    if gpu_reasons:
        argv.append("--dry-run")
        p.dry_run = True
        p.notes.append("--dry-run: " + "; ".join(gpu_reasons))
        return p
    if sub != "preflight":
        p.trains = True
        argv.append(f"train.steps={TRAIN_STEPS}")
        warmup = re.search(r"\bwarmup_steps:\s*(\d+)\b", exp.read_text()) if exp and exp.is_file() else None
        if warmup and int(warmup.group(1)) >= TRAIN_STEPS:  # a backend may refuse a run that is all warmup
            argv.append(f"train.warmup_steps={TRAIN_STEPS - 1}")
    if nproc * nnodes > 1:
        argv = _set_option(argv, "--master-port", str(free_port()))
    p.argv = argv
    return p


def _count(cmd: DocCommand, argv: list[str], option: str) -> int:
    value = _option(argv, option) or "1"
    if not value.isdigit():
        pytest.fail(f"{cmd.id}: `{option} {value}` is not a number; a placeholder must be marked `# schematic`")
    return int(value)


# ---------------------------------------------------------------------------- the tests


def test_commands_are_found_in_every_page_that_shows_one():
    by_doc: dict[str, int] = {}
    for c in COMMANDS:
        by_doc[c.doc] = by_doc.get(c.doc, 0) + 1
    assert by_doc.get("README.md", 0) >= 2, by_doc
    assert by_doc.get("docs/guide/hf.md", 0) >= 3, by_doc


def test_no_command_hides_outside_a_fence():
    """An indented code block (or a fence of another language) is not run here: a `primus` command
    shown that way could drift unseen, so it must be in a ```bash/```console fence (or ```text when
    it is syntax, not a command)."""
    hidden = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        in_fence = False
        for n, line in enumerate(lines, 1):
            if FENCE.match(line):
                in_fence = not in_fence
                continue
            if not in_fence and re.match(r"^( {4,}|\t)(\$ )?(\S*/)?primus \w", line):
                hidden.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hidden, "primus commands in indented blocks are never tested:\n" + "\n".join(hidden)


def _ids(commands):
    counts: dict[str, int] = {}
    out = []
    for c in commands:
        counts[c.id] = counts.get(c.id, 0) + 1
        out.append(c.id if counts[c.id] == 1 else f"{c.id}#{counts[c.id]}")
    return out


@pytest.mark.parametrize("cmd", COMMANDS, ids=_ids(COMMANDS))
def test_documented_command_runs(cmd: DocCommand, tmp_path: Path, request: pytest.FixtureRequest):
    p = plan(cmd, tmp_path, request)
    r = subprocess.run([sys.executable, "-m", "primus", *p.argv], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env={**os.environ, **p.env})
    expected = cmd.expected_rc
    if expected is None:
        m = re.search(r"\bexits? (\d+)\b", cmd.comment)
        expected = int(m.group(1)) if m else 0
    story = (f"{cmd.id}: `{cmd.text}`\nran: primus {shlex.join(p.argv)}  {' '.join(p.notes)}\n"
             f"--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}")
    assert r.returncode == expected, f"exit {r.returncode}, the doc says {expected}\n{story}"

    printed = {" ".join(line.split()) for line in (r.stdout + "\n" + r.stderr).splitlines()}
    for line in cmd.expected_output:
        if line in ("...", "…"):
            continue
        assert " ".join(line.split()) in printed, f"the doc shows the line\n  {line}\nwhich it did not print\n{story}"

    workspace = tmp_path / "ws"
    if p.dry_run or "--dry-run" in cmd.argv:
        assert not any(workspace.iterdir()), f"--dry-run wrote into the workspace: {list(workspace.rglob('*'))}"
    if p.trains and expected == 0:
        runs = list(workspace.glob("*/*/*/metrics.jsonl"))
        assert runs, f"no metrics.jsonl under {workspace}\n{story}"
        steps = [row["step"] for path in runs for row in read_metrics(path)]
        assert max(steps) == TRAIN_STEPS, f"steps {steps}\n{story}"
