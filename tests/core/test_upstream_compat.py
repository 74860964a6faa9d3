"""Upstream Primus's experiment files through core's generic mechanism (primus.config.upstream),
with the toy backend's two tables: upstream model names, keys its framework lacks, 0/1 booleans,
`trainer_class`, post-training modules, and the strictness that stays for everything else."""

from __future__ import annotations

import pytest
from primus_toy.translate import ToyTranslator

from primus.config.resolve import resolve
from primus.errors import ConfigError

EXP = """
exp_name: up
workspace: {workspace}
modules:
  pre_trainer:
    framework: toy
    config: pre_trainer.yaml
    model: {model}
    overrides:
{overrides}
"""


@pytest.fixture
def exp(write, tmp_path):
    """exp(model=..., overrides=...) -> an upstream-form experiment file (native keys in overrides)."""

    def make(model: str = "toy_llama_up.yaml", overrides: str = "batch: 16", name: str = "exp.yaml"):
        body = "\n".join("      " + line for line in overrides.splitlines())
        return write(name, EXP.format(workspace=tmp_path / "ws", model=model, overrides=body))

    return make


def _module(path, *items, world_size=1):
    return resolve(path, list(items), world_size=world_size).modules["pre_trainer"]


def _error(path, *items) -> str:
    with pytest.raises(ConfigError) as err:
        resolve(path, list(items))
    return str(err.value)


# --------------------------------------------------------------------------- model names


def test_an_upstream_name_is_the_neutral_preset_it_maps_to(exp):
    m = _module(exp())
    assert m.model is not None and m.model.family == "llama" and m.model_alias == "toy_llama_up"
    assert (m.native["hidden"], m.native["layers"]) == (64, 2)
    assert m.explain("hidden").file.endswith("llama3_tiny.yaml")  # the neutral preset's own line


def test_a_variant_adds_the_native_keys_it_implies_with_their_source(exp):
    m = _module(exp(model="toy_llama_up-fp16.yaml"))
    assert m.native["precision_hint"] == "fp16" and m.native["verbose"] is True
    src = m.explain("precision_hint")
    assert src.layer == "model" and src.file.endswith("upstream_models.yaml") and src.line == 5
    assert m.explain("hidden").file.endswith("llama3_tiny.yaml")


def test_an_upstream_name_without_suffix_and_a_changed_spec(exp):
    m = _module(exp(model="toy_llama_up_1layer"))
    assert m.model.num_layers == 1 and m.native["layers"] == 1
    assert m.explain("layers").file.endswith("upstream_models.yaml")


def test_a_native_only_name_is_applied_as_native_keys(exp):
    m = _module(exp(model="toy_native_up.yaml"))
    assert m.model is None and (m.native["hidden"], m.native["layers"]) == (48, 3)
    assert m.model_alias == "toy_native_up"


def test_an_unbuilt_family_is_refused_in_one_line_naming_it(exp):
    path = exp(model="toy_gpt_oss_up.yaml")
    msg = _error(path)
    assert msg.startswith(f"{path}:7: modules.pre_trainer.model: model family 'gpt_oss'")
    assert "(upstream's toy_gpt_oss_up.yaml)" in msg and "not supported by the toy backend" in msg
    assert "mixtures of experts" in msg and "not found" not in msg and "\n" not in msg


def test_the_refusal_names_the_installed_backends_that_build_the_family(exp):
    # toy builds llama only; a neutral preset of another family is refused by core, naming builders
    msg = _error(exp(model="mixtral_tiny.yaml"))
    assert "model family 'mixtral' is not supported by the toy backend" in msg
    assert "built by: " in msg or "no installed backend builds it" in msg


def test_upstream_names_on_the_command_line(exp):
    m = _module(exp(model="llama3_tiny.yaml"), "model=toy_llama_up-fp16.yaml")
    assert m.model_alias == "toy_llama_up-fp16" and m.native["precision_hint"] == "fp16"
    assert _error(exp(), "model=toy_gpt_oss_up").startswith(
        "command line: model=toy_gpt_oss_up: model family 'gpt_oss'")


def test_an_unknown_name_is_still_not_found_with_a_suggestion(exp):
    msg = _error(exp(model="toy_llama_upp.yaml"))
    assert "model preset 'toy_llama_upp.yaml' not found" in msg and "did you mean 'toy_llama_up.yaml'" in msg


def test_a_users_own_upstream_form_native_model_file_next_to_the_experiment(exp, write):
    # upstream's per-backend model presets are native keys (with `extends`); one beside the
    # experiment wins over every table and preset of that name
    write("base_native.yaml", "layers: 3\n")
    write("toy_llama_up.yaml", "extends: base_native.yaml\nhidden: 24\n")
    m = _module(exp())
    assert m.model is None and m.model_alias is None
    assert (m.native["hidden"], m.native["layers"]) == (24, 3)
    assert m.explain("layers").file.endswith("base_native.yaml")


def test_a_typo_in_a_users_native_model_file_is_an_error(exp, write):
    write("mine.yaml", "hidden: 24\nlayrs: 3\n")
    msg = _error(exp(model="mine.yaml"))
    assert "mine.yaml:2" in msg and "did you mean 'layers'" in msg


# --------------------------------------------------------------------------- keys upstream knows


def test_an_upstream_key_the_framework_lacks_is_accepted_with_one_warning(exp):
    m = _module(exp(overrides="batch: 16\nlegacy_fused_kernel: true\nkernel_block_size: 256\nreport_to_service: true"))
    assert m.native["legacy_fused_kernel"] is True  # kept, so `config show` explains it
    notes = [n for n in m.notices if "upstream Primus key" in n]
    assert len(notes) == 2
    fused = next(n for n in notes if "fused kernel" in n)
    assert fused.startswith("legacy_fused_kernel, kernel_block_size: upstream Primus keys with no effect on the toy")
    assert any(n.startswith("report_to_service: upstream Primus key with no effect") for n in notes)


def test_upstream_defaults_and_nulls_ask_for_nothing_and_stay_silent(exp):
    m = _module(exp(overrides="batch: 16\nlegacy_fused_kernel: false\nkernel_block_size: 128\n"
                              "report_to_service: null\nold_logging: {endpoint: null}"))
    assert not [n for n in m.notices if "upstream Primus key" in n]


def test_a_section_of_upstream_keys_is_accepted_whole(exp):
    m = _module(exp(overrides="batch: 16\nold_logging: {endpoint: https://x, every: 3}"))
    note = next(n for n in m.notices if "old_logging" in n)
    assert "old_logging.endpoint, old_logging.every" in note and "service that is gone" in note


def test_an_empty_upstream_section_is_accepted(exp):
    m = _module(exp(overrides="batch: 16\nold_logging: {}"))
    assert m.native["old_logging"] == {} and not [n for n in m.notices if "upstream Primus key" in n]


def test_a_typo_of_an_upstream_key_is_still_an_error_with_did_you_mean(exp):
    path = exp(overrides="batch: 16\nlegacy_fused_kernal: true")
    msg = _error(path)
    assert f"{path}:" in msg and "overrides.legacy_fused_kernal: unknown key" in msg
    assert "did you mean 'legacy_fused_kernel'" in msg


def test_a_key_in_no_table_is_still_an_error(exp):
    assert "unknown key" in _error(exp(overrides="batch: 16\nnot_a_key_anywhere: 1"))
    assert "unknown key" in _error(exp(overrides="batch: 16"), "not_a_key_anywhere=1")


def test_upstream_keys_on_the_command_line(exp):
    m = _module(exp(), "legacy_fused_kernel=true")
    assert m.explain("legacy_fused_kernel").layer == "cli"
    assert any(n.startswith("legacy_fused_kernel:") for n in m.notices)


# --------------------------------------------------------------------------- value conventions


def test_zero_and_one_for_booleans_only_where_the_backend_opts_in(exp, monkeypatch):
    path = exp(overrides="batch: 16\nverbose: 1")
    assert "expects bool, got int 1" in _error(path)  # strict by default
    monkeypatch.setattr(ToyTranslator, "int_bools", True)
    m = _module(path)
    assert m.native["verbose"] is True and m.explain("verbose").layer == "overrides"
    assert _module(exp(overrides="batch: 16\nverbose: 0", name="off.yaml")).native["verbose"] is False
    assert _module(path, "verbose=0").native["verbose"] is False
    # other ints, and 0/1 for a key that is not a bool, keep their rules
    assert "expects bool, got int 2" in _error(exp(overrides="batch: 16\nverbose: 2", name="two.yaml"))
    assert _module(exp(overrides="batch: 1", name="b.yaml")).native["batch"] == 1


def test_null_valued_keys_load(exp):
    m = _module(exp(overrides="batch: 16\nseed: null\nresume: null"))
    assert m.native["seed"] is None


# --------------------------------------------------------------------------- module fields


def test_trainer_class_is_checked_against_the_backends_trainers(exp, write, tmp_path):
    text = exp().read_text().replace("    framework: toy\n", "    framework: toy\n    trainer_class: ToyTrainer\n")
    ok = write("tc.yaml", text)
    assert _module(ok).module.trainer_class == "ToyTrainer"
    bad = write("tc_bad.yaml", text.replace("ToyTrainer", "FluxPretrainTrainer"))
    msg = _error(bad)
    assert f"{bad}:6: modules.pre_trainer.trainer_class: trainer_class 'FluxPretrainTrainer' is not a trainer" in msg
    assert "it runs: ToyTrainer" in msg
    assert "did you mean 'ToyTrainer'" in _error(ok, "trainer_class=ToyTrainr")


def test_a_post_training_module_is_refused_in_one_line(write, tmp_path):
    path = write("sft.yaml", f"""
        exp_name: sft
        workspace: {tmp_path}
        modules:
          post_trainer:
            framework: toy
            config: sft_trainer.yaml
            model: llama3_tiny.yaml
    """)
    msg = _error(path)
    assert msg.startswith(f"{path}:6: modules.post_trainer.config: the toy backend has no post-training: no "
                          "'sft_trainer.yaml' module preset for module 'post_trainer'")
    assert "\n" not in msg


def test_an_upstream_sft_file_with_keys_of_its_own_is_refused_as_post_training(write, tmp_path):
    write("base_sft.yaml", f"""
        exp_name: sft
        workspace: {tmp_path}
        modules:
          post_trainer: {{framework: toy, config: sft_trainer.yaml, model: llama3_tiny.yaml}}
    """)
    path = write("lora.yaml", "extends: base_sft.yaml\nlora: {enabled: true, dim: 8}\nlr: 2.0e-4\n")
    msg = _error(path)
    assert "the toy backend has no post-training" in msg and "unknown key" not in msg


def test_the_post_training_refusal_exits_2_from_the_cli(write, tmp_path):
    from tests.support import run_primus

    path = write("sft.yaml", f"exp_name: s\nworkspace: {tmp_path}\nmodules:\n"
                             "  post_trainer: {framework: toy, config: sft_trainer.yaml}\n")
    r = run_primus("run", str(path), "--dry-run")
    assert r.returncode == 2 and "the toy backend has no post-training" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- Primus-form strictness


def test_primus_form_files_stay_strict(toy_exp, write):
    exp_path, _ = toy_exp
    text = exp_path.read_text()
    assert "did you mean 'batch'" in _error(write("a.yaml", text.replace("batch: 16", "bacth: 16")))
    assert "expects int" in _error(write("b.yaml", text.replace("batch: 16", "batch: true")))
    assert "unknown key" in _error(write("c.yaml", text.replace("batch: 16", "batch: 16\n      zzz_unknown: 1")))
    assert "unknown key" in _error(write("d.yaml", text.replace("    framework: toy", "    framework: toy\n    trainer_klass: X")))
