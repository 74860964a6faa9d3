from pathlib import Path

import pytest

from primus.config.layered import load_with_extends
from primus.config.yamlfile import load_yaml, substitute_env
from primus.errors import ConfigError


def test_env_substitution_types_whole_values_and_keeps_text(write):
    path = write("a.yaml", """
        steps: ${STEPS:10}
        lr: ${LR}
        flag: ${FLAG:true}
        name: run-${USER_X:bob}-1
        nothing: ${EMPTY:}
    """)
    doc = load_yaml(path)
    substitute_env(doc, {"LR": "3.0e-3"})
    assert doc.data == {"steps": 10, "lr": 0.003, "flag": True, "name": "run-bob-1", "nothing": ""}


def test_missing_required_env_var_names_file_line_key_and_fix(write):
    path = write("a.yaml", """
        a: 1
        modules:
          m:
            workspace: ${NOT_SET_ANYWHERE}
    """)
    doc = load_yaml(path)
    with pytest.raises(ConfigError) as err:
        substitute_env(doc, {})
    text = str(err.value)
    assert f"{path}:4" in text and "modules.m.workspace" in text and "NOT_SET_ANYWHERE" in text
    assert "export NOT_SET_ANYWHERE" in text


def test_python_object_tag_is_refused_and_nothing_runs(write, tmp_path: Path):
    marker = tmp_path / "pwned"
    path = write("evil.yaml", f"""
        a: !!python/object/apply:os.system ["touch {marker}"]
    """)
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert "tag refused" in str(err.value) and f"{path}:1" in str(err.value)
    assert not marker.exists()


def test_syntax_error_reports_line(write):
    path = write("bad.yaml", "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path)
    assert "YAML syntax error" in str(err.value) and str(path) in str(err.value)
    assert err.value.line is not None


def test_empty_and_non_mapping_files(write):
    with pytest.raises(ConfigError, match="is empty"):
        load_yaml(write("empty.yaml", "\n# only a comment\n"))
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_yaml(write("list.yaml", "- 1\n- 2\n"))


def test_extends_chain_later_wins_file_wins(write):
    write("base1.yaml", "a: 1\nb: 1\nnested: {x: 1, y: 1}\n")
    write("base2.yaml", "extends: base1.yaml\nb: 2\nc: 2\nnested: {y: 2}\n")
    write("other.yaml", "c: 3\nd: 3\n")
    top = write("top.yaml", "extends: [base2.yaml, other.yaml]\nd: 4\n")
    data, sources = load_with_extends(top, search_dirs=[])
    assert data == {"a": 1, "b": 2, "c": 3, "d": 4, "nested": {"x": 1, "y": 2}}
    assert sources[("d",)].file == str(top) and sources[("d",)].line == 2
    assert sources[("c",)].file.endswith("other.yaml")
    assert sources[("nested", "y")].file.endswith("base2.yaml")


def test_extends_cycle_is_an_error(write):
    write("x.yaml", "extends: y.yaml\na: 1\n")
    write("y.yaml", "extends: z.yaml\n")
    write("z.yaml", "extends: x.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: entry.yaml -> x.yaml -> y.yaml -> z.yaml -> x.yaml"):
        load_with_extends(Path(write("entry.yaml", "extends: x.yaml\n")), search_dirs=[])


def test_extends_missing_file(write):
    with pytest.raises(ConfigError, match="extended file 'nope.yaml' not found"):
        load_with_extends(write("a.yaml", "extends: nope.yaml\n"), search_dirs=[])
