"""docs/backends/ is generated from the registries; committed pages must match (nox session `docs`)."""

from pathlib import Path

from primus.docs.generate import generate_docs

DOCS = Path(__file__).resolve().parents[2] / "docs" / "backends"


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
