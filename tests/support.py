"""What every test folder needs, once: run the real `primus` CLI, pick a free port, write a tiny
experiment, read what a run wrote, and assert the one-line error contract.

Imported as `tests.support` (nox runs `python -m pytest` from the repository root, which puts the
root on sys.path; tests/megatron has no __init__.py because a package named `megatron` would
shadow megatron-core, and imports this module the same way).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CORPUS = EXAMPLES / "data" / "corpus.jsonl"
TOKENIZER = EXAMPLES / "data" / "tokenizer"
# one CPU thread per process, no tokenizer thread pool: tests run two processes at most on 2 cores
QUIET_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_primus(*args: str, timeout: int = 300, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m primus ARGS` in a subprocess, as a user runs it."""
    full_env = {**os.environ, **QUIET_ENV, **(env or {})}
    return subprocess.run([sys.executable, "-m", "primus", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)


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


def attempts(path: Path) -> dict[int, list[int]]:
    """The training steps each attempt of a run logged, in order: a resumed attempt must start
    after its checkpoint, not at step 1 (a test keyed by step alone cannot tell)."""
    out: dict[int, list[int]] = {}
    for r in read_metrics(path):
        out.setdefault(int(r.get("attempt") or 1), []).append(r["step"])
    return out
