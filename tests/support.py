"""What every test folder needs, once: run the real `primus` CLI, pick a free port, write a tiny
experiment, read what a run wrote, and assert the one-line error contract.

Imported as `tests.support` (nox runs `python -m pytest` from the repository root, which puts the
root on sys.path; tests/megatron has no __init__.py because a package named `megatron` would
shadow megatron-core, and imports this module the same way).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CORPUS = EXAMPLES / "data" / "corpus.jsonl"
TOKENIZER = EXAMPLES / "data" / "tokenizer"
# one CPU thread per process, no tokenizer thread pool: tests run two processes at most on 2 cores
QUIET_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


# where a run directory goes (`workspace/work_group/user_name/exp_name`): the shell of whoever runs the
# tests may set these, and the examples read them, so a test's subprocess sees them only when the
# test sets them itself
IDENTITY_VARS = ("PRIMUS_TEAM", "PRIMUS_USER", "PRIMUS_WORKSPACE")
# the names tests give their runs, so that no expected path depends on a default
TEAM, USER = "team", "me"

_cache_root: Path | None = None


def session_cache() -> Path:
    """This test session's private cache root (made on first use, removed when the session ends):
    converted corpora, datasets and tokenizer caches never land in the user's ~/.cache."""
    global _cache_root
    if _cache_root is None:
        _cache_root = Path(tempfile.mkdtemp(prefix="primus-tests-cache-"))
        atexit.register(shutil.rmtree, _cache_root, True)
    return _cache_root


def primus_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a `primus` subprocess: the caller's, without PRIMUS_TEAM/PRIMUS_USER/
    PRIMUS_WORKSPACE, with one CPU thread and caches under `session_cache()`; `env` wins over all."""
    cache = session_cache()
    base = {k: v for k, v in os.environ.items() if k not in IDENTITY_VARS}
    caches = {"PRIMUS_CACHE_DIR": str(cache / "primus"), "HF_HOME": str(cache / "huggingface"),
              "HF_DATASETS_CACHE": str(cache / "huggingface" / "datasets"), "XDG_CACHE_HOME": str(cache / "xdg")}
    return {**base, **QUIET_ENV, **caches, **(env or {})}


def run_primus(*args: str, timeout: int = 300, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m primus ARGS` in a subprocess, as a user runs it (environment: `primus_env(env)`)."""
    return subprocess.run([sys.executable, "-m", "primus", *args], capture_output=True, text=True,
                          timeout=timeout, env=primus_env(env), cwd=cwd)


def run_dir_for(workspace: Path, exp_name: str, team: str = TEAM, user: str = USER) -> Path:
    """Where a run of `exp_name` named with work_group=`team`, user_name=`user` writes."""
    return Path(workspace) / team / user / exp_name


def free_port() -> int:
    """A TCP port nobody listens on now (each distributed test takes its own)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_yaml(path: Path, text: str) -> Path:
    """Write dedented YAML text to `path` (parents created) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def experiment_template(framework: str, module_body: str, module: str = "pre_trainer") -> str:
    """A one-module experiment as a `str.format` template: the identity every test run uses
    (team/me, `{name}`, `{workspace}`), module `module` of `framework`, then `module_body` (the
    module's other lines, indented four spaces, braces doubled where they are YAML)."""
    head = ("\nwork_group: team\nuser_name: me\nexp_name: {name}\nworkspace: {workspace}\nmodules:\n"
            f"  {module}:\n    framework: " + framework + "\n")
    return head + module_body


def corpus_data(**extra: Any) -> str:
    """A neutral `data:` section for the bundled corpus and tokenizer, as inline YAML."""
    return json.dumps({"path": str(CORPUS), "text_key": "text", "tokenizer": str(TOKENIZER), **extra})


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The training lines of a metrics.jsonl (those with a loss), in file order."""
    return [r for r in read_jsonl(path) if "loss" in r]


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                                    f"\n--- stderr\n{result.stderr[-6000:]}")


def assert_config_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback, and every needle in that line."""
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-4000:])
    err = result.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def assert_late_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A ConfigError the eval worker finds: exit 2, no traceback, one `primus: error:` line (the
    worker's own INFO lines may come before it, as on `primus run`)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("primus: error:")]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def attempts(path: Path) -> dict[int, list[int]]:
    """The training steps each attempt of a run logged, in order: a resumed attempt must start
    after its checkpoint, not at step 1 (a test keyed by step alone cannot tell)."""
    out: dict[int, list[int]] = {}
    for r in read_metrics(path):
        out.setdefault(int(r.get("attempt") or 1), []).append(r["step"])
    return out


def resolve_upstream_form(folder: Path, name: str, *items: str, text: str | None = None,
                          tmp_path: Path | None = None, environ: dict[str, str] | None = None):
    """Resolve an upstream-form experiment of a test folder (or `text` written to tmp_path) for an
    8-process job, in process; returns the pre_trainer module."""
    from primus.config.resolve import resolve

    path = folder / name
    if text is not None:
        assert tmp_path is not None
        path = tmp_path / name
        path.write_text(text)
    return resolve(path, list(items), world_size=8, environ=environ or {}).modules["pre_trainer"]


def config_error(call, *args: Any, **kwargs: Any) -> str:
    """The one-line text of the ConfigError `call(*args, **kwargs)` must raise."""
    import pytest

    from primus.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        call(*args, **kwargs)
    return str(err.value)


def upstream_notes(m) -> list[str]:
    """A resolved module's warnings about upstream Primus keys this install accepts without effect."""
    return [n for n in m.notices if "upstream Primus key" in n]
