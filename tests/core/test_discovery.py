"""Discovery through real installed distributions (the toy fixture; a conflicting one in a --target dir)."""

import subprocess
import sys
from pathlib import Path

import pytest

from primus.backends.discovery import discover
from primus.errors import ConfigError

from .conftest import FIXTURES, run_primus


@pytest.fixture(scope="module")
def dupe_site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("dupe-site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(FIXTURES / "primus-toy-dupe")], check=True, timeout=300)
    return target


def test_toy_backend_is_discovered_with_its_distribution():
    d = discover()
    toy = d.backends["toy"]
    assert toy.distribution == "primus-toy-backend"
    assert toy.framework_ok and toy.status() == "ok"
    assert d.warnings == []


def test_disable_backends(monkeypatch):
    monkeypatch.setenv("PRIMUS_DISABLE_BACKENDS", "toy, other")
    d = discover()
    assert "toy" not in d.backends
    with pytest.raises(ConfigError, match="disabled by PRIMUS_DISABLE_BACKENDS"):
        d.get("toy")


def test_two_distributions_claiming_one_name(dupe_site: Path):
    r = run_primus("backends", env={"PYTHONPATH": str(dupe_site)})
    assert r.returncode == 2
    assert "backend 'toy' is registered by two distributions: primus-toy-backend and primus-toy-dupe" in r.stderr
    # the escape hatch: hide the conflicting name, the other backend of that package still loads
    r = run_primus("backends", env={"PYTHONPATH": str(dupe_site), "PRIMUS_DISABLE_BACKENDS": "toy"})
    assert r.returncode == 0 and "toyold" in r.stdout


def test_framework_outside_supported_range_warns(dupe_site: Path):
    r = run_primus("backends", env={"PYTHONPATH": str(dupe_site), "PRIMUS_DISABLE_BACKENDS": "toy"})
    assert "warning: backend 'toyold': packaging" in r.stderr and "outside the supported range <1" in r.stderr
    assert "outside supported <1" in r.stdout
