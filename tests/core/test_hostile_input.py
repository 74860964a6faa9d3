"""Hostile input: refused with exit 2 and one located line, in bounded time and memory.

Each case runs the real CLI in a subprocess capped at 1 GiB of address space and 20 seconds, so a
loader that expands, recurses, blocks or reads without end fails the test instead of the machine.
The hostile files are under tests/core/hostile/ (see its README); FIFOs, symlink loops and a
sparse huge file are made here in tmp_path.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from primus.config import yamlfile
from primus.config.layered import find_file, load_with_extends
from primus.config.yamlfile import load_yaml, parse_scalar, substitute_env
from primus.errors import ConfigError
from tests.support import primus_env

HOSTILE = Path(__file__).parent / "hostile"
ADDRESS_SPACE_LIMIT = 1 << 30  # far above what validating a config needs, far below a runaway loader
TIME_LIMIT_S = 20

TOY_EXP = "exp_name: toy\nmodules:\n  pre_trainer:\n    framework: toy\n"


def _cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def primus(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The `primus` CLI in a child capped in memory and time."""
    env = primus_env()
    return subprocess.run([sys.executable, "-m", "primus", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIME_LIMIT_S, preexec_fn=_cap_address_space)


def validate(path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return primus("config", "validate", str(path), cwd=cwd)


def assert_refused(result: subprocess.CompletedProcess[str], file: Path, expected: str) -> str:
    """Exit 2, no traceback, and exactly one stderr line that names `file` and says `expected`."""
    assert result.returncode == 2, (result.stdout, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"primus: error: {file}"), lines[0]
    assert expected in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- case 1: alias expansion


@pytest.mark.parametrize(("name", "expected"), [
    ("billion_laughs.yaml", f"more than {yamlfile.MAX_NODES} values"),
    ("merge_key_bomb.yaml", f"more than {yamlfile.MAX_NODES} values"),
    ("recursive_alias.yaml", "alias refers to a mapping or list that contains it"),
])
def test_alias_expansion_is_refused(name: str, expected: str, tmp_path: Path):
    path = HOSTILE / name
    assert_refused(validate(path, tmp_path), path, expected)


def test_small_anchors_and_merge_keys_still_work(write):
    path = write("anchors.yaml", """
        defaults: &defaults {lr: 0.1, steps: 10}
        a: {<<: *defaults, steps: 20}
        b: *defaults
        c: [*defaults, *defaults]
    """)
    doc = load_yaml(path)
    substitute_env(doc, {})
    assert doc.data["a"] == {"lr": 0.1, "steps": 20}
    assert doc.data["b"] == {"lr": 0.1, "steps": 10} and doc.data["c"] == [doc.data["b"]] * 2
    assert doc.lines[("a", "steps")] == 2


def test_node_limit_counts_expanded_values(write):
    # just under the limit loads; one alias that doubles it past the limit is refused
    items = ", ".join(["1"] * (yamlfile.MAX_NODES // 2 - 10))
    assert load_yaml(write("wide.yaml", f"a: &a [{items}]\n")).data["a"][0] == 1
    with pytest.raises(ConfigError, match="more than"):
        load_yaml(write("doubled.yaml", f"a: &a [{items}]\nb: *a\nc: *a\n"))


# --------------------------------------------------------------------------- case 2: nesting


@pytest.mark.parametrize("name", ["deep_mapping.yaml", "deep_list.yaml"])
def test_deep_nesting_is_refused(name: str, tmp_path: Path):
    path = HOSTILE / name
    line = assert_refused(validate(path, tmp_path), path, f"nested more than {yamlfile.MAX_DEPTH} levels")
    assert f"{path}:5:" in line  # the line where the nesting passes the limit


def test_depth_through_aliases_is_refused(write):
    # each level is shallow as written; the aliases stack them 70 deep
    text = "l0: &l0 [1]\n" + "".join(f"l{i}: &l{i} [*l{i - 1}]\n" for i in range(1, 70))
    with pytest.raises(ConfigError, match="nested more than"):
        load_yaml(write("stacked.yaml", text))


def test_pure_python_loader_is_bounded_too(write, monkeypatch):
    # without libyaml pyyaml composes in Python, recursing once per level: the event check comes first
    monkeypatch.setattr(yamlfile, "_SafeLoader", yamlfile._primus_loader(yaml.SafeLoader))
    for name in ("deep_mapping.yaml", "deep_list.yaml", "billion_laughs.yaml", "recursive_alias.yaml"):
        with pytest.raises(ConfigError):
            load_yaml(HOSTILE / name)
    assert load_yaml(write("f.yaml", "lr: 1e-3\n")).data == {"lr": 0.001}


# --------------------------------------------------------------------------- case 3: file size


@pytest.mark.parametrize("via", ["experiment", "extends"])
def test_oversized_file_is_refused_before_it_is_read(via: str, tmp_path: Path):
    huge = tmp_path / "huge.yaml"
    with huge.open("wb") as handle:
        handle.truncate(2 << 30)  # sparse: 2 GiB that take no disk, more than the child may allocate
    target = huge
    if via == "extends":
        target = tmp_path / "exp.yaml"
        target.write_text("extends: huge.yaml\n" + TOY_EXP)
    assert_refused(validate(target, tmp_path), huge, f"larger than the {yamlfile.MAX_FILE_BYTES >> 20} MiB")


# --------------------------------------------------------------------------- case 4: regular files only


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _symlink_loop(path: Path) -> Path:
    path.symlink_to(path.name)  # a link to itself: every lookup fails with ELOOP
    return path


@pytest.mark.parametrize("case", [
    "extends_dev_zero", "model_dev_zero", "extends_fifo", "experiment_fifo",
    "experiment_symlink_loop", "extends_symlink_loop",
])
def test_only_regular_files_are_read(case: str, tmp_path: Path):
    if case in ("extends_dev_zero", "model_dev_zero"):
        path = HOSTILE / f"{case}.yaml"
        expected = {"extends_dev_zero": "'/dev/zero' is a character device, not a regular file",
                    "model_dev_zero": "model preset '/dev/zero' not found"}[case]
    elif case.startswith("experiment_"):
        make = _fifo if case.endswith("fifo") else _symlink_loop
        path = make(tmp_path / "exp.yaml")
        expected = "is a FIFO, not a regular file" if case.endswith("fifo") else "path is a symlink loop"
    else:
        make = _fifo if case.endswith("fifo") else _symlink_loop
        make(tmp_path / "base.yaml")
        path = tmp_path / "exp.yaml"
        path.write_text("extends: base.yaml\n" + TOY_EXP)
        expected = "is a FIFO, not a regular file" if case.endswith("fifo") else "is a symlink loop"
    assert_refused(validate(path, tmp_path), path, expected)


def test_find_file_returns_regular_files_only(tmp_path: Path):
    (tmp_path / "a.yaml").write_text("a: 1\n")
    (tmp_path / "link.yaml").symlink_to("a.yaml")
    _fifo(tmp_path / "fifo.yaml")
    _symlink_loop(tmp_path / "loop.yaml")
    assert find_file("link.yaml", relative_to=tmp_path, search_dirs=[]) == (tmp_path / "a.yaml").resolve()
    for name in ("fifo.yaml", "loop.yaml", str(tmp_path / "fifo.yaml"), "/dev/zero", str(tmp_path)):
        assert find_file(name, relative_to=tmp_path, search_dirs=[tmp_path]) is None, name


def test_load_with_extends_refuses_a_symlink_loop_it_is_given(tmp_path: Path):
    loop = _symlink_loop(tmp_path / "loop.yaml")
    with pytest.raises(ConfigError, match="symlink loop"):
        load_with_extends(loop, search_dirs=[])


# --------------------------------------------------------------------------- case 5: YAML 1.2 floats


def test_yaml12_floats_load_as_floats(tmp_path: Path):
    path = HOSTILE / "yaml12_floats.yaml"
    result = validate(path, tmp_path)
    assert result.returncode == 0, result.stderr
    data = load_yaml(path).data["modules"]["pre_trainer"]
    assert data["train"]["lr"] == 0.001 and data["overrides"]["lr"] == 0.0005
    # the command line types `key=value` the same way (upstream's `--lr 1e-3` habit)
    result = primus("config", "show", str(path), "lr=1e-3", "--explain", "lr", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lr = 0.001" in result.stdout, result.stdout


@pytest.mark.parametrize(("text", "value"), [
    ("1e-3", 0.001), ("1E+5", 1e5), ("-2e4", -2e4), (".5", 0.5), ("-.5", -0.5), ("3.0e-3", 0.003),
    ("1.5", 1.5), ("10", 10), ("-7", -7), ("0x10", 16), ("true", True), ("false", False), ("yes", True),
    ("null", None), ("~", None), ("[1, 2]", [1, 2]), ("{a: 1}", {"a": 1}), ("", ""), ("abc", "abc"),
    ("1e", "1e"), ("e5", "e5"), ("1.2.3", "1.2.3"), ("v1e5", "v1e5"), ("a b", "a b"),
])
def test_parse_scalar_types_like_yaml_12(text: str, value):
    result = parse_scalar(text)
    assert result == value and type(result) is type(value)


def test_parse_scalar_keeps_non_finite_floats():
    assert parse_scalar(".inf") == float("inf") and parse_scalar("-.inf") == float("-inf")
    nan = parse_scalar(".nan")
    assert isinstance(nan, float) and nan != nan


@pytest.mark.parametrize("text", [
    "2024-01-01",  # a date: text, not datetime.date
    "!!binary aGk=", "!!set {a}", "!!int abc", "!!timestamp x", "!!python/object/apply:os.system [ls]",
    "1" + "0" * 5000,  # more digits than Python converts
    "[" * 200 + "]" * 200, "&a [*a]", "a: b: c", "a\n---\nb", "[1, 2", "'unclosed", "\x00", "%YAML 9\n--- a",
    "x" * (yamlfile.MAX_SCALAR_CHARS + 1),
])
def test_parse_scalar_returns_text_for_anything_else(text: str):
    assert parse_scalar(text) == text


def test_parse_scalar_bounds_alias_expansion():
    laughs = (HOSTILE / "billion_laughs.yaml").read_text()
    flow = "[" + ", ".join(line.split(": ", 1)[1] for line in laughs.splitlines()[1:10]) + "]"
    assert parse_scalar(flow) == flow


def test_env_substitution_types_yaml12_floats(write):
    doc = load_yaml(write("a.yaml", "lr: ${LR:1e-3}\nname: ${NAME:2024-01-01}\n"))
    substitute_env(doc, {})
    assert doc.data == {"lr": 0.001, "name": "2024-01-01"}


def test_the_global_safe_loader_is_unchanged():
    assert yaml.safe_load("a: 1e-3") == {"a": "1e-3"}
    assert yaml.load("a: 1e-3", Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) == {"a": "1e-3"}


# --------------------------------------------------------------------------- case 6: messages


def test_error_line_escapes_control_characters(tmp_path: Path):
    path = HOSTILE / "control_chars.yaml"
    line = assert_refused(validate(path, tmp_path), path, "unknown key")
    assert "\x1b" not in line and "\u202e" not in line
    assert r"bogus\nprimus: error: forged line\x1b[2J\u202e" in line


def test_config_error_is_one_line_and_keeps_ordinary_text():
    error = ConfigError("got 'a\nb'\t\x00", file="dir\r/é.yaml", line=3, key="clé.中\u2028x", fix="use \x1b[31m")
    text = str(error)
    assert text == r"dir\r/é.yaml:3: clé.中\u2028x: got 'a\nb'\t\x00 (use \x1b[31m)"
    assert len(text.splitlines()) == 1 and text.isprintable()


# --------------------------------------------------------------------------- values that cannot be built


def test_unbuildable_value_is_located(tmp_path: Path):
    path = HOSTILE / "huge_integer.yaml"
    line = assert_refused(validate(path, tmp_path), path, "YAML value cannot be read")
    assert f"{path}:5:" in line and "set_int_max_str_digits" not in line
