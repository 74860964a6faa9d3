"""Run against built wheels installed into a fresh venv (nox session `wheels`), not the checkout.

Catches what a user would hit first: package data (presets) missing from a wheel, an entry point
that does not load, a console script that does not start.
"""

import shutil
import subprocess
import sys
from importlib import metadata, resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPO_BACKENDS = sorted(p.name.removeprefix("primus-") for p in (ROOT / "packages").iterdir()
                       if p.name != "primus-core" and (p / "pyproject.toml").exists())


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def test_core_comes_from_a_wheel_not_the_checkout():
    import primus

    assert "site-packages" in primus.__file__, primus.__file__
    direct_url = metadata.distribution("primus-core").read_text("direct_url.json") or ""
    assert '"editable": true' not in direct_url


def test_core_package_data():
    presets = resources.files("primus.presets")
    assert presets.joinpath("module_base.yaml").is_file()
    models = {p.name for p in presets.joinpath("models").iterdir()}
    assert {"llama3_tiny.yaml", "llama3.1_8B.yaml", "deepseek_v3.yaml"} <= models


@pytest.mark.parametrize("backend", REPO_BACKENDS)
def test_backend_wheel_registers_and_ships_presets(backend: str):
    if backend == "maxtext" and sys.version_info < (3, 12):
        pytest.skip("primus-maxtext needs Python >= 3.12")
    from primus.backends.discovery import discover

    found = discover().backends
    assert backend in found, f"primus-{backend} wheel did not register its entry point"
    spec = found[backend].spec
    assert (spec.preset_dir() / "pre_trainer.yaml").is_file(), "module preset missing from the wheel"


def test_console_script_runs():
    exe = shutil.which("primus")
    assert exe is not None
    r = subprocess.run([exe, "backends"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for backend in REPO_BACKENDS:
        if backend != "maxtext" or sys.version_info >= (3, 12):
            assert backend in r.stdout


EXAMPLES = sorted((ROOT / "examples").glob("*/*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_examples_dry_run_from_wheels(example: Path, tmp_path: Path):
    backend = example.parent.name
    if backend not in REPO_BACKENDS or not _installed(f"primus-{backend}"):
        pytest.skip(f"primus-{backend} not installed here")
    r = subprocess.run([shutil.which("primus") or "primus", "run", str(example), "--dry-run",
                        f"workspace={tmp_path}/ws"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "ws").exists()
