"""docs/backends/ is generated from the registries; committed pages must match (run by the nox session `e2e`; `nox -s docs -- --update` rewrites them)."""

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
            assert f"{name}.md" in pages, f"{pkg.name} is not installed in this session"


def test_docs_check_passes_on_the_committed_pages_and_fails_on_an_edited_one(tmp_path: Path):
    """`primus docs --check` as CI runs it, on a copy: exit 0 as committed; 1, naming the page and
    leaving it as it is, once a generated page was edited by hand; `primus docs` writes it back."""
    import shutil

    from tests.support import run_primus

    out = tmp_path / "backends"
    shutil.copytree(DOCS, out)
    r = run_primus("docs", "--check", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("checked ") and str(out / "overview.md") in r.stdout, r.stdout
    page = out / "overview.md"
    edited = page.read_text() + "\nA line added by hand.\n"
    page.write_text(edited)
    r = run_primus("docs", "--check", "--out", str(out))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "generated docs are out of date" in r.stderr and str(page) in r.stderr, r.stderr
    assert page.read_text() == edited  # --check only reads
    assert run_primus("docs", "--out", str(out)).returncode == 0
    assert page.read_text() == (DOCS / "overview.md").read_text()
    assert run_primus("docs", "--check", "--out", str(out)).returncode == 0
