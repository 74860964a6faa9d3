"""`config show --explain` names the true layer of a value on every installed backend: the command
line, a derived value, the module preset, a file the preset extends, and an environment reference.

The backend's tiny example is copied next to a corpus-free experiment of our own, so nothing here
depends on a backend's key names beyond what `config show --sources` prints.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import primus_env

ROOT = Path(__file__).resolve().parents[2]
TINY_EXAMPLES = {
    "hf": "examples/hf/llama3_tiny.yaml",
    "megatron": "examples/megatron/llama3_tiny-pretrain.yaml",
    "torchtitan": "examples/torchtitan/llama3_tiny_cpu.yaml",
    "maxtext": "examples/maxtext/llama3_tiny-pretrain.yaml",
}


def _primus(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "primus", *args], capture_output=True, text=True, timeout=120,
                          env=primus_env(env))


def _sources(example: str, *items: str, env: dict[str, str] | None = None) -> dict[str, str]:
    r = _primus("config", "show", example, *items, "--sources", "--nproc-per-node", "1", env=env)
    assert r.returncode == 0, r.stderr
    out = {}
    for line in r.stdout.splitlines():
        m = re.match(r"(\S+)\s+.*# (.*)$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


@pytest.mark.parametrize("backend", sorted(TINY_EXAMPLES))
def test_explain_names_the_true_layer(backend: str, tmp_path: Path):
    from importlib.util import find_spec

    if find_spec(f"primus_{backend}") is None:
        pytest.skip(f"primus-{backend} not installed in this session")
    example = str(ROOT / TINY_EXAMPLES[backend])

    # the command line: a neutral key and the native key it became
    r = _primus("config", "show", example, "train.steps=7", "--explain", "train.steps")
    assert r.returncode == 0, r.stderr
    assert "train.steps = 7" in r.stdout and "cli (command line: train.steps=7)" in r.stdout

    sources = _sources(example)
    layers = set(sources.values())
    # a derived value names what it came from; preset values name the preset file, and values the
    # preset inherits (module_base.yaml at least) say "via extends"
    assert any(s.startswith("derived from ") for s in layers), layers
    assert any(s.startswith("module preset (") for s in layers), layers
    assert any(s.startswith("module preset via extends (") and "module_base.yaml" in s for s in layers), layers

    # an environment reference in the experiment is named as such
    exp = tmp_path / "exp.yaml"
    # the copy lives elsewhere: its relative corpus paths are made absolute against the example's folder
    text = Path(example).read_text().replace("../data/", f"{ROOT / 'examples' / 'data'}/")
    exp.write_text(re.sub(r"(\bsteps:\s*)\d+", r'\g<1>"${E2E_STEPS}"', text, count=1))
    if "${E2E_STEPS}" not in exp.read_text():
        pytest.skip("the example sets no train.steps")
    r = _primus("config", "show", str(exp), "--explain", "train.steps", env={"E2E_STEPS": "9"})
    assert r.returncode == 0, r.stderr
    assert "train.steps = 9" in r.stdout and "${E2E_STEPS}" in r.stdout, r.stdout
