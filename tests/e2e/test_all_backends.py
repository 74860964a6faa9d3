"""With every backend package installed (nox session `e2e`): discovery stays light, examples resolve."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "jax", "megatron", "transformers", "torchtitan", "maxtext", "numpy")


def test_backends_command_imports_no_framework():
    code = (
        "import sys\nfrom primus.cli.main import main\n"
        "assert main(['backends']) == 0\nassert main(['patches']) == 0\n"
        f"print('HEAVY', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout
    assert "hf" in r.stdout


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_validates_and_dry_runs_without_side_effects(example: Path, tmp_path: Path):
    from importlib.util import find_spec

    if find_spec(f"primus_{example.parent.name}") is None:
        pytest.skip(f"primus-{example.parent.name} not installed in this session")
    ws = tmp_path / "ws"
    for cmd in (["config", "validate", str(example), f"workspace={ws}"],
                ["run", str(example), "--dry-run", f"workspace={ws}"]):
        r = subprocess.run([sys.executable, "-m", "primus", *cmd], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    assert not ws.exists()


# what `config validate` and `run --dry-run` must never import: they run on login nodes and laptops
FRAMEWORKS = ("torch", "jax", "transformers", "megatron", "torchtitan", "maxtext")
CHECK_IMPORTS = """
import json, sys
from primus.cli.main import main
example, ws = sys.argv[1], sys.argv[2]
codes = [main(["config", "validate", example, f"workspace={ws}"]), main(["run", example, "--dry-run", f"workspace={ws}"])]
print("RESULT " + json.dumps({"codes": codes, "imported": sorted({m.split(".")[0] for m in sys.modules} & set(FRAMEWORKS))}))
"""


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_validate_and_dry_run_import_no_framework(example: Path, tmp_path: Path):
    """In one fresh interpreter, both commands in-process, then sys.modules: no framework in it."""
    import json
    from importlib.util import find_spec

    from tests.support import primus_env

    if find_spec(f"primus_{example.parent.name}") is None:
        pytest.skip(f"primus-{example.parent.name} not installed in this session")
    code = f"FRAMEWORKS = {FRAMEWORKS!r}\n" + CHECK_IMPORTS
    r = subprocess.run([sys.executable, "-c", code, str(example), str(tmp_path / "ws")], capture_output=True,
                       text=True, timeout=300, env=primus_env(), cwd=ROOT)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-2000:] + r.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["codes"] == [0, 0], r.stderr[-3000:]
    assert result["imported"] == [], f"{example.name}: config validate / run --dry-run imported {result['imported']}"


# issue 17: the dry run names what each torch backend will run with (megatron's fast path has its own
# tests in tests/megatron/test_fast_path.py); train.compile is the neutral switch
@pytest.mark.parametrize(("example", "lines"), [
    ("hf/llama3_tiny.yaml", ["precision bf16", "attention transformers' default (sdpa)",
                             "compile   torch.compile of the wrapped model"]),
    ("torchtitan/llama3_tiny_cpu.yaml", ["precision bfloat16 compute, fp32 master",
                                         "compile   torch.compile (compile.enable)"]),
])
def test_dry_run_names_precision_attention_and_compile(example: str, lines: list[str], tmp_path: Path):
    from importlib.util import find_spec

    if find_spec(f"primus_{example.split('/')[0]}") is None:
        pytest.skip(f"primus-{example.split('/')[0]} not installed in this session")
    r = subprocess.run([sys.executable, "-m", "primus", "run", str(ROOT / "examples" / example), "--dry-run",
                        f"workspace={tmp_path}", "train.compile=true", "train.precision=bf16"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for line in lines:
        assert f"  {line}" in r.stdout, r.stdout


# train.compile on every torch backend (a resolve-level test: inductor's first compile of the tiny
# model took 102 s on this CPU, too long for CI): the framework's own switch is set (megatron: exit 2,
# tests/megatron/test_fast_path.py)
@pytest.mark.parametrize(("exp", "native"), [("hf/llama3_tiny.yaml", ("torch_compile",)),
                                             ("torchtitan/llama3_tiny_cpu.yaml", ("compile", "enable"))])
def test_train_compile_sets_the_frameworks_switch(exp: str, native: tuple[str, ...]) -> None:
    from importlib.util import find_spec

    from primus.config.resolve import resolve

    if find_spec(f"primus_{exp.split('/')[0]}") is None:
        pytest.skip(f"primus-{exp.split('/')[0]} not installed in this session")

    for given in (True, None):
        overrides = [f"modules.pre_trainer.train.compile={str(given).lower()}"] if given else []
        value = resolve(ROOT / "examples" / exp, overrides, world_size=1).modules["pre_trainer"].native
        for part in native:
            value = value[part]
        assert value is bool(given)
