"""docs/backends/ is generated from the registries; committed pages must match (nox session `docs`)."""

from importlib import metadata
from pathlib import Path

import pytest

from primus.docs.generate import generate_docs

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "backends"


@pytest.fixture(autouse=True)
def _only_this_repos_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """The committed pages describe this repository's backends: a backend installed from elsewhere
    (a developer's venv with the toy fixture or the template) is hidden while they are generated."""
    ours = {p.name.removeprefix("primus-") for p in (ROOT / "packages").iterdir()}
    others = {ep.name for ep in metadata.entry_points(group="primus.backends")} - ours
    monkeypatch.setenv("PRIMUS_DISABLE_BACKENDS", ",".join(sorted(others)))


def test_committed_backend_docs_match_the_registries():
    pages = generate_docs()
    assert "overview.md" in pages
    stale = [name for name, text in pages.items()
             if not (DOCS / name).exists() or (DOCS / name).read_text() != text]
    assert not stale, f"regenerate with `primus docs --out docs/backends` and commit: {stale}"


def test_every_repo_backend_has_a_page():
    pages = generate_docs()
    repo = Path(__file__).resolve().parents[2] / "packages"
    for pkg in repo.iterdir():
        name = pkg.name.removeprefix("primus-")
        if pkg.name != "primus-core" and name != "maxtext" and (pkg / "pyproject.toml").exists():
            assert f"{name}.md" in pages, f"{pkg.name} is not installed in the docs session"
