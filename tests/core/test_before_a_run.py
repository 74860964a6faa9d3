"""Issue 11: before a run starts, the experiment is resolved once, every value has its true source,
every error is located (file:line or the command line), and nothing is created until all checks pass.

Each test here failed on 4161131. They drive the real CLI against the real toy backend package.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from primus.config.resolve import resolve
from primus.errors import ConfigError
from tests.support import assert_config_error as _fails
from tests.support import run_primus


def _stub_tool(directory: Path, name: str, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tool = directory / name
    tool.write_text("#!/bin/sh\n" + body + "\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return directory


def test_launch_options_reach_the_recorded_config(toy_exp, tmp_path):
    """--image used to be applied to a second parse: config.yaml said `image: null`."""
    exp, workspace = toy_exp
    bin_dir = _stub_tool(tmp_path / "bin", "sbatch", "echo 4242")
    r = run_primus("run", str(exp), "--launcher", "slurm", "--container", "--image", "myimage:1",
                   env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    recorded = yaml.safe_load((workspace / "team" / "me" / "toy" / "config.yaml").read_text())
    assert recorded["experiment"]["launch"]["container"]["image"] == "myimage:1"


def test_slurm_without_sbatch_leaves_nothing(toy_exp, tmp_path):
    exp, workspace = toy_exp
    empty_bin = tmp_path / "nobin"
    empty_bin.mkdir()
    python_dir = str(Path(os.sys.executable).parent)
    r = run_primus("run", str(exp), "--launcher", "slurm", env={"PATH": f"{empty_bin}{os.pathsep}{python_dir}"})
    _fails(r, "sbatch not found")
    assert not workspace.exists()


def test_neutral_key_on_the_command_line_has_the_cli_source(toy_exp):
    exp, _ = toy_exp
    r = run_primus("config", "show", str(exp), "train.lr=0.5", "--explain", "lr")
    assert r.returncode == 0, r.stderr
    assert "cli (command line: train.lr=0.5)" in r.stdout and "exp.yaml" not in r.stdout
    _fails(run_primus("config", "validate", str(exp), "train.steps=ten"), "command line: train.steps=ten:")


def test_derived_values_name_what_they_came_from(toy_exp):
    exp, _ = toy_exp
    r = run_primus("config", "show", str(exp), "--explain", "samples_per_step", "--nproc-per-node", "2")
    assert r.returncode == 0, r.stderr
    assert "= 32" in r.stdout and "derived from train.micro_batch_size, world_size" in r.stdout


def test_translator_errors_are_located_through_provenance(toy_exp):
    exp, _ = toy_exp
    _fails(run_primus("config", "validate", str(exp), "batch=5000"), "command line: batch=5000: batch too large")
    bad = exp.with_name("big.yaml")
    bad.write_text(exp.read_text().replace("batch: 16", "batch: 5000"))
    _fails(run_primus("config", "validate", str(bad)), "big.yaml:12: modules.pre_trainer.overrides.batch:")


def test_bad_corpus_on_the_command_line_names_the_command_line(toy_exp):
    exp, _ = toy_exp
    _fails(run_primus("config", "validate", str(exp), "data.path=/nope.jsonl"),
           "command line: data.path=/nope.jsonl: corpus /nope.jsonl does not exist")


def test_explain_speaks_neutral_and_native(toy_exp):
    exp, _ = toy_exp
    for key in ("train.steps", "steps"):
        r = run_primus("config", "show", str(exp), "--explain", key)
        assert r.returncode == 0, r.stderr
        assert "train.steps = 12  -> iters" in r.stdout and "exp.yaml:10" in r.stdout
    _fails(run_primus("config", "show", str(exp), "--explain", "stepz"), "did you mean 'steps'?")
    _fails(run_primus("config", "validate", str(exp), "train.step=10"), "command line: train.step=10",
           "did you mean 'steps'?")
    _fails(run_primus("run", str(exp), "--dryrun"), "unknown option --dryrun; did you mean --dry-run?")


def test_a_copy_of_an_example_beside_it_is_not_taken_for_the_model(toy_exp, tmp_path):
    """`model: llama3_tiny.yaml` once found a sibling experiment file of that name."""
    exp, _ = toy_exp
    (tmp_path / "llama3_tiny.yaml").write_text(exp.read_text())
    copy = tmp_path / "my_exp.yaml"
    copy.write_text(exp.read_text())
    m = resolve(copy).modules["pre_trainer"]
    assert m.model is not None and m.model.family == "llama"
    assert "presets" in m.model_file


def test_sequence_longer_than_the_model_is_refused_once_for_every_backend(toy_exp):
    exp, _ = toy_exp
    _fails(run_primus("config", "validate", str(exp), "train.seq_length=4096"),
           "command line: train.seq_length=4096", "exceeds the model's max_position_embeddings 256")


def test_env_without_a_backend_shows_core_entries():
    r = run_primus("env", "--platform", "rocm", "--arch", "gfx942")
    assert r.returncode == 0, r.stderr
    assert "HSA_ENABLE_SDMA=1" in r.stdout


def test_command_line_module_names_are_checked(toy_exp):
    exp, _ = toy_exp
    _fails(run_primus("config", "validate", str(exp), "modules.nosuch.train.steps=3"),
           "command line: modules.nosuch.train.steps=3", "no module 'nosuch'")


@pytest.mark.parametrize("item", ["train.lr=.inf", "lr=.nan", "train.grad_clip=-.inf"])
def test_non_finite_numbers_are_refused(toy_exp, item):
    exp, _ = toy_exp
    _fails(run_primus("config", "validate", str(exp), item), f"command line: {item}", "finite")


@pytest.mark.parametrize("env_line, needle", [
    ("{'A=B': x}", "not a variable name"),
    ("{'': x}", "not a variable name"),
    ("{GOOD: \"a\\0b\"}", "NUL"),
])
def test_env_names_and_values_are_checked_before_anything_exists(toy_exp, env_line, needle):
    exp, workspace = toy_exp
    bad = exp.with_name("env.yaml")
    bad.write_text(exp.read_text().replace("modules:", f"env: {env_line}\nmodules:"))
    _fails(run_primus("config", "validate", str(bad)), "env.yaml", needle)
    _fails(run_primus("run", str(bad)), "env.yaml", needle)
    assert not workspace.exists()


@pytest.mark.parametrize("option", [["--nnodes", "0"], ["--master-port", "99999"], ["--max-restarts", "-3"],
                                    ["--nproc-per-node", "0"]])
def test_launch_options_are_range_checked(toy_exp, option):
    exp, workspace = toy_exp
    _fails(run_primus("run", str(exp), *option), option[0])
    assert not workspace.exists()


def test_unknown_framework_suggests_an_installed_backend(toy_exp):
    exp, _ = toy_exp
    bad = exp.with_name("fw.yaml")
    bad.write_text(exp.read_text().replace("framework: toy", "framework: toyy"))
    _fails(run_primus("config", "validate", str(bad)), "fw.yaml:7", "did you mean 'toy'?")


def test_neutral_fields_a_backend_ignores_are_reported(toy_exp):
    exp, _ = toy_exp
    r = run_primus("config", "validate", str(exp), "train.weight_decay=0.1")
    assert r.returncode == 0, r.stderr
    assert "train.weight_decay is not used by the toy backend; ignored" in r.stderr


def test_check_must_not_change_values(toy_exp, monkeypatch):
    from primus_toy.translate import ToyTranslator

    def rewriting_check(self, resolved):
        resolved.native["batch"] = 1

    monkeypatch.setattr(ToyTranslator, "check", rewriting_check)
    with pytest.raises(RuntimeError, match="check\\(\\) changed batch"):
        resolve(toy_exp[0])


def test_resolve_takes_the_parsed_experiment_once(toy_exp, monkeypatch):
    """The file is read once per command: a LoadedExperiment is resolved without reading it again."""
    from primus.config import resolve as resolve_module
    from primus.config.resolve import load_experiment

    exp, _ = toy_exp
    loaded = load_experiment(exp, ["train.steps=3"])
    reads = []
    original = resolve_module.load_yaml
    monkeypatch.setattr(resolve_module, "load_yaml", lambda p, **kw: reads.append(p) or original(p, **kw))
    m = resolve(loaded).modules["pre_trainer"]
    assert m.native["iters"] == 3 and exp not in reads
    with pytest.raises(TypeError):
        resolve(loaded, ["train.steps=4"])


def test_errors_never_become_tracebacks_for_command_line_shapes(toy_exp):
    exp, _ = toy_exp
    deep = ".".join(["a"] * 1500) + "=1"
    _fails(run_primus("config", "validate", str(exp), deep), "command line")
    _fails(run_primus("config", "validate", str(exp), "=3"), "command line: =3")
    with pytest.raises(ConfigError, match="names no key"):
        resolve(exp, ["modules.pre_trainer=3"])


def test_a_written_value_the_backend_would_derive_otherwise_is_refused(toy_exp):
    exp, _ = toy_exp
    _fails(run_primus("config", "validate", str(exp), "samples_per_step=5"),
           "command line: samples_per_step=5", "contradicts 16", "derives from train.micro_batch_size")
    assert run_primus("config", "validate", str(exp), "samples_per_step=16").returncode == 0
