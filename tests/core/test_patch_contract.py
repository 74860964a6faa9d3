"""The patch contract: one phase order, declared run-state needs, one framework range per package.

Registry tests use tiny fake patches; the repo checks read the backend packages' sources and
pyproject files (no framework import), and compare with what is installed where one is.
"""

from __future__ import annotations

import ast
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from primus.backends.adapter import RunContext
from primus.backends.spec import BackendSpec, framework_range, load_object
from primus.patches.registry import (
    PHASES,
    Patch,
    PatchContext,
    PatchPhaseOrder,
    PatchSet,
    PatchStateMissing,
    patches_markdown,
)

REPO = Path(__file__).resolve().parents[2]
BACKEND_PACKAGES = sorted(p for p in (REPO / "packages").iterdir()
                          if p.name.startswith("primus-") and p.name != "primus-core"
                          and (p / "pyproject.toml").exists())


def _patch(id: str = "t.p", phase: str = "setup", **kw) -> Patch:
    seen = kw.pop("seen", None)

    def apply(ctx: PatchContext) -> None:
        if seen is not None:
            seen.append((id, {k: ctx.state[k] for k in kw.get("needs", ())}))

    return Patch(id=id, backend="toy", target="os.sep", phase=phase, description="d", apply=apply, **kw)


def _ctx(**kw) -> PatchContext:
    return PatchContext(**{"backend": "toy", "platform": "cpu", "framework_version": "1.0", **kw})


# --------------------------------------------------------------------------- needs


def test_a_missing_need_fails_with_the_patch_id_phase_and_key():
    ps = PatchSet([_patch(id="toy.wants_model", phase="before_train", needs=("model", "loop"))], environ={})
    ctx = _ctx(state={"loop": object()})
    with pytest.raises(PatchStateMissing) as err:
        ps.apply_phase("before_train", ctx)
    message = str(err.value)
    assert "toy.wants_model" in message and "before_train" in message and "'model'" in message
    assert "'loop'" not in message.split("passed so far")[0]  # only the missing key is named as missing
    assert ps.applied == []


def test_needs_are_met_by_state_passed_at_this_phase_or_an_earlier_one():
    seen: list = []
    ps = PatchSet([_patch(id="a", phase="build_args", needs=("args",), seen=seen),
                   _patch(id="b", phase="before_train", needs=("args", "model"), seen=seen)], environ={})
    run = RunContext(module=None, run_dir=Path("."), platform="cpu", arch=None,  # type: ignore[arg-type]
                     rank=0, local_rank=0, world_size=1, patches=ps, patch_context=_ctx(),
                     metrics=None)  # type: ignore[arg-type]
    assert run.apply_patches("build_args", args="A") == ["a"]
    assert run.apply_patches("before_train", model="M") == ["b"]
    assert seen == [("a", {"args": "A"}), ("b", {"args": "A", "model": "M"})]


def test_a_patch_that_does_not_apply_is_not_asked_for_its_needs():
    ps = PatchSet([_patch(needs=("model",), platforms=frozenset({"rocm"})),
                   _patch(id="off", needs=("model",), enabled_by="use_it", enabled_by_default=False)],
                  environ={})
    assert ps.apply_phase("setup", _ctx()) == []


def test_needs_is_a_tuple_of_keys_and_phases_are_known():
    assert _patch(needs="model").needs == ("model",)
    assert _patch(needs=["model", "loop"]).needs == ("model", "loop")
    with pytest.raises(ValueError, match="t.p: unknown phase 'before_setup'"):
        _patch(phase="before_setup")


# --------------------------------------------------------------------------- phase order


def test_phases_apply_in_one_order_each_once():
    ps = PatchSet([_patch(id=phase, phase=phase) for phase in PHASES], environ={})
    ctx = _ctx()
    assert ps.apply_phase("build_args", ctx) == ["build_args"]
    assert ps.apply_phase("before_train", ctx) == ["before_train"]  # skipping `setup` is allowed
    with pytest.raises(PatchPhaseOrder, match=r"phase 'setup' applied after phase 'before_train'"):
        ps.apply_phase("setup", ctx)
    with pytest.raises(PatchPhaseOrder, match=r"phase 'before_train' applied again"):
        ps.apply_phase("before_train", ctx)
    assert ps.applied == ["build_args", "before_train"]
    assert ps.apply_phase("after_train", ctx) == ["after_train"]
    with pytest.raises(ValueError, match="unknown patch phase 'teardown'"):
        ps.apply_phase("teardown", _ctx())  # type: ignore[arg-type]


def test_phase_order_counts_phases_without_patches():
    ps = PatchSet([_patch(phase="setup")], environ={})
    ctx = _ctx()
    assert ps.apply_phase("before_train", ctx) == []
    with pytest.raises(PatchPhaseOrder, match="'setup'"):
        ps.apply_phase("setup", ctx)


def _adapter_calls(adapter: Path) -> list[tuple[str, list[str]]]:
    """(phase, state keys) of every `apply_patches(...)` call, in the order written."""
    calls = []
    for node in ast.walk(ast.parse(adapter.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "apply_patches" and node.args and isinstance(node.args[0], ast.Constant)):
            calls.append((node.lineno, node.args[0].value, [k.arg for k in node.keywords if k.arg]))
    return [(phase, keys) for _, phase, keys in sorted(calls)]


@pytest.mark.parametrize("package", BACKEND_PACKAGES, ids=lambda p: p.name)
def test_repo_adapters_apply_the_phases_in_order(package: Path):
    (adapter,) = package.glob("src/*/adapter.py")
    phases = [phase for phase, _ in _adapter_calls(adapter)]
    assert phases, f"{adapter} applies no patch phase"
    assert all(p in PHASES and p != "before_import" for p in phases), phases  # core applies before_import
    assert [PHASES.index(p) for p in phases] == sorted({PHASES.index(p) for p in phases}), (
        f"{adapter}: phases applied as {phases}; the order is {PHASES}, each once")


# --------------------------------------------------------------------------- generated docs


def test_patch_table_lists_needs():
    md = patches_markdown("toy", [_patch(id="t.a", needs=("model", "run_dir")), _patch(id="t.b")])
    header, _, row_a, row_b = md.splitlines()
    assert header.endswith("| what it does | needs |")
    assert row_a.endswith("| d | `model`, `run_dir` |") and row_b.endswith("| d | - |")


def _installed_repo_backends() -> list:
    from primus.backends.discovery import discover

    repo_dists = {p.name for p in BACKEND_PACKAGES}
    found = [b for b in discover().backends.values() if b.distribution in repo_dists]
    if not found:
        pytest.skip("no backend package of this repository is installed here")
    return found


def test_generated_backend_pages_list_each_patchs_needs():
    from primus.docs.generate import generate_docs

    backends = _installed_repo_backends()
    pages = generate_docs()
    for backend in backends:
        page = pages[f"{backend.name}.md"]
        for patch in backend.spec.load_patches():
            row = next(line for line in page.splitlines() if line.startswith(f"| `{patch.id}` |"))
            assert row.endswith(f"| {', '.join(f'`{k}`' for k in patch.needs) or '-'} |"), row


@pytest.mark.parametrize("package", BACKEND_PACKAGES, ids=lambda p: p.name)
def test_repo_patches_need_only_state_their_adapter_passes(package: Path):
    """Every declared need is a key the backend's adapter passes at the patch's phase or earlier."""
    dist = package.name
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{dist} is not installed here")
    from primus.backends.discovery import discover

    (backend,) = [b for b in discover().backends.values() if b.distribution == dist]
    (adapter,) = package.glob("src/*/adapter.py")
    passed_by: dict[str, set[str]] = {}
    keys: set[str] = set()
    calls = dict(_adapter_calls(adapter))
    for phase in PHASES:
        keys |= set(calls.get(phase, []))
        passed_by[phase] = set(keys)
    for patch in backend.spec.load_patches():
        missing = set(patch.needs) - passed_by[patch.phase]
        assert not missing, f"{patch.id} ({patch.phase}) needs {sorted(missing)}; {adapter.name} never passes them"


# --------------------------------------------------------------------------- one framework range per package


def _declared_framework(package: Path) -> tuple[str, str, SpecifierSet]:
    """(import dir, framework, range in pyproject): the framework named by `framework_range(dist, fw)`
    in the package's `__init__`, and the package's own dependency on it."""
    (init,) = package.glob("src/*/__init__.py")
    calls = [node for node in ast.walk(ast.parse(init.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "framework_range"]
    assert len(calls) == 1, f"{init} must read its range once, with framework_range(dist, framework)"
    dist, framework = (arg.value for arg in calls[0].args)
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    assert dist == project["name"], f"{init} reads the range of {dist}, but the package is {project['name']}"
    deps = [Requirement(d) for d in project["dependencies"]]
    (requirement,) = [r for r in deps if r.name == framework and r.marker is None]
    assert requirement.specifier, f"{package.name}/pyproject.toml gives {framework} no range"
    return str(init.parent), framework, requirement.specifier


@pytest.mark.parametrize("package", BACKEND_PACKAGES, ids=lambda p: p.name)
def test_no_module_repeats_the_packages_framework_range(package: Path):
    src, framework, declared = _declared_framework(package)
    repeats = []
    for path in sorted(Path(src).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            literal = isinstance(node, ast.Constant) and isinstance(node.value, str)
            if literal and re.search(r"[<>=~]", node.value):
                try:
                    if SpecifierSet(node.value) == declared:
                        repeats.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
                except InvalidSpecifier:
                    continue
    assert not repeats, (f"{framework} {declared} is declared in {package.name}/pyproject.toml; import "
                         f"FRAMEWORK_RANGE from the package instead of repeating it:\n" + "\n".join(repeats))


@pytest.mark.parametrize("package", BACKEND_PACKAGES, ids=lambda p: p.name)
def test_installed_spec_range_is_the_pyprojects(package: Path):
    try:
        metadata.distribution(package.name)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{package.name} is not installed here")
    from primus.backends.discovery import discover

    _, framework, declared = _declared_framework(package)
    (backend,) = [b for b in discover().backends.values() if b.distribution == package.name]
    assert backend.spec.framework == framework
    # an editable install keeps the metadata of its last `pip install -e`: reinstall after editing the range
    assert SpecifierSet(backend.spec.supported) == declared, (
        f"{package.name}: installed metadata says {backend.spec.supported}, pyproject.toml {declared}; "
        "reinstall it")
    package_range = load_object(f"{backend.spec.presets.split('.')[0]}:FRAMEWORK_RANGE")
    assert package_range == backend.spec.supported


def test_framework_range_reads_the_unconditional_requirement(monkeypatch: pytest.MonkeyPatch):
    requires = {"primus-fake": ["primus-core<0.2,>=0.1", "fakeframework<0.17,>=0.16",
                                "fakeframework<2; extra == 'old'", "Other_Lib~=1.2; python_version < '3.12'",
                                "urlpkg @ https://example.invalid/urlpkg-1.0-py3-none-any.whl"]}
    monkeypatch.setattr(metadata, "requires", lambda dist: requires[dist])
    framework_range.cache_clear()
    try:
        assert framework_range("primus-fake", "fakeframework") == ">=0.16,<0.17"  # lower bound first
        assert framework_range("primus-fake", "FakeFramework") == ">=0.16,<0.17"  # names compare normalised
        with pytest.raises(LookupError, match="primus-fake declares no dependency on other-lib"):
            framework_range("primus-fake", "other-lib")  # only behind a marker
        assert framework_range("primus-fake", "urlpkg") == ""  # a direct reference has no range: any
    finally:
        framework_range.cache_clear()


def test_framework_range_of_an_installed_distribution_and_a_literal_still_works():
    assert SpecifierSet(framework_range("primus-core", "pydantic")) == SpecifierSet(">=2.6,<3")
    with pytest.raises(LookupError, match="primus-no-such-dist is not installed"):
        framework_range("primus-no-such-dist", "x")
    spec = BackendSpec(name="x", framework="x", supported=">=1,<2", presets="p", adapter="a:A",
                       translator="t:T")
    assert spec.supported == ">=1,<2"
