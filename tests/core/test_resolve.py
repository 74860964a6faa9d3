"""Resolution layers, provenance and validation against the real toy backend package."""

import pytest

from primus.config.resolve import resolve
from primus.errors import ConfigError


def test_layers_and_provenance(toy_exp):
    exp, _ = toy_exp
    m = resolve(exp, ["seed=7"]).modules["pre_trainer"]
    n = m.native
    assert n["file_sink_level"] == "DEBUG"  # module_base
    assert n["trainable"] is True  # module preset over module_base
    assert n["hidden"] == 64 and n["layers"] == 2  # model preset, translated
    assert n["iters"] == 12 and n["lr"] == 0.1  # neutral sections
    assert n["batch"] == 16  # overrides
    assert n["seed"] == 7  # command line
    assert m.explain("iters").layer == "neutral train" and m.explain("iters").line == 10
    assert m.explain("batch").layer == "overrides" and m.explain("batch").line == 12
    assert m.explain("hidden").file.endswith("llama3_tiny.yaml")
    assert m.explain("seed").layer == "cli"
    assert m.explain("lr").file == str(exp)


def test_cli_override_of_neutral_section_and_experiment_field(toy_exp, tmp_path):
    exp, _ = toy_exp
    r = resolve(exp, ["train.steps=3", f"workspace={tmp_path}/other", "overrides.batch=4"])
    assert r.modules["pre_trainer"].native["iters"] == 3
    assert r.modules["pre_trainer"].native["batch"] == 4
    assert str(r.run_dir).startswith(f"{tmp_path}/other")


def _error(exp, overrides=(), **kw) -> str:
    with pytest.raises(ConfigError) as err:
        resolve(exp, list(overrides), **kw)
    return str(err.value)


def test_unknown_native_key_suggests(toy_exp, write):
    exp, _ = toy_exp
    text = exp.read_text().replace("batch: 16", "bacth: 16")
    bad = write("bad.yaml", text)
    msg = _error(bad)
    assert f"{bad}:12" in msg and "modules.pre_trainer.overrides.bacth" in msg and "did you mean 'batch'" in msg


def test_unknown_neutral_key_suggests(toy_exp, write):
    exp, _ = toy_exp
    bad = write("bad.yaml", exp.read_text().replace("steps: 12", "stepz: 12"))
    msg = _error(bad)
    assert "modules.pre_trainer.train.stepz" in msg and "did you mean 'steps'" in msg and f"{bad}:10" in msg


def test_wrong_types(toy_exp, write):
    exp, _ = toy_exp
    bad = write("bad.yaml", exp.read_text().replace("batch: 16", "batch: lots"))
    assert "expects int, got string 'lots'" in _error(bad)
    bad = write("bad2.yaml", exp.read_text().replace("steps: 12", "steps: many"))
    assert "modules.pre_trainer.train.steps" in _error(bad)


def test_zero_or_negative_steps(toy_exp, write):
    exp, _ = toy_exp
    for value in ("0", "-5"):
        bad = write("bad.yaml", exp.read_text().replace("steps: 12", f"steps: {value}"))
        msg = _error(bad)
        assert "modules.pre_trainer.train.steps" in msg and "greater than 0" in msg


def test_unknown_framework_lists_installed_and_pip_hint(toy_exp, write):
    exp, _ = toy_exp
    bad = write("bad.yaml", exp.read_text().replace("framework: toy", "framework: megatronn"))
    msg = _error(bad)
    assert "unknown framework 'megatronn'" in msg and "toy" in msg
    bad = write("bad2.yaml", exp.read_text().replace("framework: toy", "framework: maxtext"))
    import importlib.util

    if importlib.util.find_spec("primus_maxtext") is None:
        assert "pip install primus-maxtext" in _error(bad)


def test_missing_presets(toy_exp, write):
    exp, _ = toy_exp
    bad = write("bad.yaml", exp.read_text().replace("llama3_tiny.yaml", "llama3_tinny.yaml"))
    msg = _error(bad)
    assert "model preset 'llama3_tinny.yaml' not found" in msg and "did you mean 'llama3_tiny.yaml'" in msg
    bad = write("bad2.yaml", exp.read_text().replace("config: pre_trainer.yaml", "config: post.yaml"))
    assert "module preset 'post.yaml' not found" in _error(bad)


def test_parallel_sizes_checked_against_world_and_model(toy_exp, write):
    exp, _ = toy_exp
    tp3 = write("tp3.yaml", exp.read_text().replace("overrides:", "parallel: {tensor: 3}\n    overrides:"))
    assert "does not divide the world size 4" in _error(tp3, world_size=4)
    # llama3_tiny has 4 heads and 2 kv heads: tensor 4 divides the world but not the kv heads
    tp4 = write("tp4.yaml", exp.read_text().replace("overrides:", "parallel: {tensor: 4}\n    overrides:"))
    assert "does not divide the model's 2 key/value heads" in _error(tp4, world_size=4)
    dp = write("dp.yaml", exp.read_text().replace("overrides:", "parallel: {data: 3}\n    overrides:"))
    assert "!= world size 2" in _error(dp, world_size=2)


def test_global_batch_arithmetic(toy_exp, write):
    exp, _ = toy_exp
    bad = write("gb.yaml", exp.read_text().replace("lr: 0.1}", "lr: 0.1, micro_batch_size: 2, global_batch_size: 6}")
                .replace("batch: 16", "seed: 1"))
    msg = _error(bad, world_size=2)
    assert "global_batch_size 6 is not a multiple of micro_batch_size 2 x data-parallel 2" in msg


def test_backend_check_hook_runs(toy_exp, write):
    exp, _ = toy_exp
    bad = write("big.yaml", exp.read_text().replace("batch: 16", "batch: 5000"))
    assert "batch too large for the toy backend" in _error(bad)


def test_unavailable_upstream_flag_is_a_notice_not_an_error(toy_exp, write):
    exp, _ = toy_exp
    ok = write("turbo.yaml", exp.read_text().replace("batch: 16", "batch: 16\n      use_turbo: true"))
    m = resolve(ok).modules["pre_trainer"]
    assert any("use_turbo" in n and "not available" in n for n in m.notices)


def test_experiment_skeleton_errors(write):
    assert "modules" in _error(write("a.yaml", "exp_name: x\n"))
    msg = _error(write("b.yaml", "exp_name: x\nmodulez: {}\nmodules: {m: {framework: toy}}\n"))
    assert "unknown key" in msg and "did you mean 'modules'" in msg
    assert "plain name" in _error(write("c.yaml", "exp_name: ../x\nmodules: {m: {framework: toy}}\n"))


def test_model_preset_errors_point_into_the_preset(write, tmp_path):
    write("models/broken.yaml", "family: llama\nvocab_size: 10\nhidden_size: 64\nnum_layers: 2\nnum_heads: 3\n"
          "ffn_hidden_size: 8\nmax_position_embeddings: 8\nrope_thetaa: 1\n")
    exp = write("exp.yaml", f"""
        exp_name: x
        workspace: {tmp_path}
        modules:
          m: {{framework: toy, model: models/broken.yaml}}
    """)
    msg = _error(exp)
    assert "broken.yaml" in msg and "rope_thetaa" in msg and "did you mean 'rope_theta'" in msg


def test_native_model_preset_keys_are_checked(write, tmp_path):
    write("native.yaml", "hidden: 32\nlayrs: 1\n")
    exp = write("exp.yaml", f"exp_name: x\nworkspace: {tmp_path}\nmodules:\n  m: {{framework: toy, model: native.yaml}}\n")
    msg = _error(exp)
    assert "native.yaml:2" in msg and "did you mean 'layers'" in msg


def test_cli_dotted_native_keys_sharing_a_module_field_name():
    """TorchTitan-style native sections (`checkpoint.enable`, `model.flavor`) stay native; a neutral
    section's own field, or a section the backend does not have natively, is neutral."""
    from primus.config.resolve import _route_to_native, parse_command_line

    items = parse_command_line(["model.flavor=8B", "checkpoint.enable=false", "checkpoint.interval=5",
                                "train.steps=3", "training.steps=4", "train.step=3"]).items
    titan_keys = {"model", "checkpoint", "training"}
    assert [_route_to_native(i, titan_keys) for i in items] == [True, True, False, False, True, False]
    flat_keys = {"train_iters", "lr"}  # a flat backend: train.step is a neutral typo, not a native key
    assert [_route_to_native(i, flat_keys) for i in items] == [True, False, False, False, True, False]
