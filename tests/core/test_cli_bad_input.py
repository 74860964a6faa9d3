"""Every user mistake: exit 2, one line naming file/key/fix, no traceback, nothing created."""

from pathlib import Path

import pytest

from .conftest import run_primus

BASE = """
exp_name: bad
workspace: {ws}
modules:
  pre_trainer:
    framework: toy
    model: llama3_tiny.yaml
    train: {steps: 5}
"""

CASES = {
    "unknown key": (BASE.replace("steps: 5", "stepss: 5"), "did you mean 'steps'"),
    "unknown native key": (BASE + "    overrides: {lrr: 1.0}\n", "did you mean 'lr'"),
    "wrong type": (BASE.replace("steps: 5", "steps: [1]"), "train.steps"),
    "missing env var": (BASE.replace("exp_name: bad", "exp_name: ${PRIMUS_TEST_UNSET_VAR}"),
                        "export PRIMUS_TEST_UNSET_VAR"),
    "extends cycle": ("extends: exp.yaml\n" + BASE, "`extends` cycle"),
    "missing preset": (BASE.replace("llama3_tiny.yaml", "nope_7B.yaml"), "model preset 'nope_7B.yaml' not found"),
    "unknown framework": (BASE.replace("framework: toy", "framework: tpu_magic"), "unknown framework 'tpu_magic'"),
    "yaml syntax": (BASE.replace("train: {steps: 5}", "train: {steps: 5"), "YAML syntax error"),
    "empty file": ("# nothing\n", "is empty"),
    # a payload that leaves evidence: an unsafe loader would run it and create {hacked}
    "python tag": (BASE + "    overrides: !!python/object/apply:os.system ['touch {hacked}']\n", "tag refused"),
    "zero steps": (BASE.replace("steps: 5", "steps: 0"), "greater than 0"),
    "negative steps": (BASE.replace("steps: 5", "steps: -3"), "greater than 0"),
    "tensor vs world": (BASE.replace("train: {steps: 5}", "train: {steps: 5}\n    parallel: {tensor: 3}"),
                        "does not divide the world size"),
    "tensor vs heads": (BASE.replace("train: {steps: 5}", "train: {steps: 5}\n    parallel: {tensor: 8}"),
                        "does not divide the model's 4 attention heads"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_clear_line(case: str, tmp_path: Path):
    text, expected = CASES[case]
    ws = tmp_path / "ws"
    hacked = tmp_path / "hacked"
    exp = tmp_path / "exp.yaml"
    exp.write_text(text.replace("{ws}", str(ws)).replace("{hacked}", str(hacked)))
    extra = ["--nproc-per-node", "8", "--dry-run"] if case.startswith("tensor") else []
    for cmd in (["run", str(exp), *extra], ["config", "validate", str(exp)]):
        if cmd[0] == "config" and extra:
            cmd += ["--nproc-per-node", "8"]
        r = run_primus(*cmd, cwd=tmp_path)
        assert not hacked.exists(), ("the YAML payload ran", r.stderr)
        assert r.returncode == 2, (case, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1, r.stderr
        assert lines[0].startswith("primus: error: ") and expected in lines[0], lines[0]
        assert "Traceback" not in r.stderr
        assert not ws.exists()


def test_missing_experiment_file_and_bad_override(tmp_path: Path):
    r = run_primus("run", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "experiment file not found" in r.stderr
    r = run_primus("config", "show", str(tmp_path / "none.yaml"), "notakeyvalue")
    assert r.returncode == 2 and "notakeyvalue: is not key=value" in r.stderr, r.stderr


def test_usage_errors_exit_2():
    r = run_primus("run")
    assert r.returncode == 2 and "primus: error: the following arguments are required: exp" in r.stderr, r.stderr
    r = run_primus("frobnicate")
    assert r.returncode == 2 and "invalid choice: 'frobnicate'" in r.stderr, r.stderr
