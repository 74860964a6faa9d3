"""Upstream Primus's experiment files on the maxtext backend (issue 16): its model names (a neutral
preset, MaxText's own model configs, a family not built), a ROCm MaxText v26.6 key the installed
MaxText lacks, a user's own native model file, and strictness for the rest. The files under
upstream_form/ are written for these tests in upstream's shape; resolution is in-process, 8 devices."""

from __future__ import annotations

from pathlib import Path

from primus.backends.discovery import discover
from primus.config.resolve import resolve
from primus.config.upstream import upstream_tables
from primus.errors import ConfigError
from tests.support import config_error, resolve_upstream_form, upstream_notes

HERE = Path(__file__).parent / "upstream_form"


def _module(name: str, *items: str, **kw):
    return resolve_upstream_form(HERE, name, *items, **kw)


def _error(name: str, *items: str, **kw) -> str:
    return config_error(_module, name, *items, **kw)


_upstream_notes = upstream_notes


def test_a_v26_6_key_the_installed_maxtext_lacks_is_accepted():
    m = _module("mixtral_8x7B-fp8-pretrain.yaml")
    assert m.model is not None and m.model.family == "mixtral" and m.native["pure_nnx_decoder"] is False
    assert not _upstream_notes(m)  # false asks for the decoder MaxText 0.2.5 has


def test_asking_for_the_pure_nnx_decoder_warns_once(tmp_path):
    text = (HERE / "mixtral_8x7B-fp8-pretrain.yaml").read_text().replace("pure_nnx_decoder: false",
                                                                        "pure_nnx_decoder: true")
    notes = _upstream_notes(_module("x.yaml", text=text, tmp_path=tmp_path))
    assert len(notes) == 1 and notes[0].startswith("pure_nnx_decoder: upstream Primus key with no effect on the "
                                                   "maxtext backend")


def test_a_typo_of_it_is_an_error_with_did_you_mean(tmp_path):
    text = (HERE / "mixtral_8x7B-fp8-pretrain.yaml").read_text().replace("pure_nnx_decoder:", "pure_nnx_decodr:")
    msg = _error("x.yaml", text=text, tmp_path=tmp_path)
    assert "overrides.pure_nnx_decodr: unknown key" in msg and "did you mean 'pure_nnx_decoder'" in msg


def test_upstream_name_of_deepseek_v2_lite():
    m = _module("deepseek_v2_16B-bf16-pretrain.yaml")
    assert m.model_alias == "deepseek_v2_16B" and m.model.family == "deepseek"
    assert m.native["attention_type"] == "mla" and m.native["num_experts"] == 64


def test_gemma4_is_maxtexts_own_model_config():
    m = _module("gemma4_26B-bf16-pretrain.yaml")
    assert m.model is None and m.model_alias == "gemma4_26B" and m.native["model_name"] == "gemma4-26b"
    assert m.explain("model_name").file.endswith("upstream_models.yaml")


def test_a_family_this_backend_does_not_build_is_refused_naming_it():
    msg = _error("grok1-fp8-pretrain.yaml")
    assert ("grok1-fp8-pretrain.yaml:11: modules.pre_trainer.model: model family 'grok' (upstream's grok1.yaml) "
            "is not supported by the maxtext backend") in msg and "not found" not in msg


def test_a_users_upstream_form_native_model_file():
    m = _module("my_model-pretrain.yaml")
    assert m.model is None and m.native["model_name"] == "llama3-8b"
    assert m.explain("model_name").file.endswith("my_model.yaml")


def test_a_key_in_no_table_is_an_error(tmp_path):
    text = (HERE / "mixtral_8x7B-fp8-pretrain.yaml").read_text() + "      not_a_maxtext_key: 1\n"
    assert "overrides.not_a_maxtext_key: unknown key" in _error("x.yaml", text=text, tmp_path=tmp_path)


def test_every_upstream_name_resolves_or_is_refused_naming_its_family(tmp_path):
    tables = upstream_tables(discover().backends["maxtext"])
    assert tables.models
    for name, alias in tables.models.items():
        exp = tmp_path / "exp.yaml"
        exp.write_text(f"exp_name: x\nworkspace: {tmp_path}\nmodules:\n  pre_trainer:\n    framework: maxtext\n"
                       f"    model: {name}.yaml\n    overrides: {{max_target_length: 128, dataset_type: synthetic}}\n")
        try:
            m = resolve(exp, world_size=8).modules["pre_trainer"]
        except ConfigError as err:
            assert not alias.built and f"model family '{alias.family}'" in str(err), (name, str(err))
        else:
            assert alias.built and m.model_alias == name


def test_the_generated_docs_list_the_tables():
    from primus.docs.generate import generate_docs

    page = generate_docs()["maxtext.md"]
    assert "| `gemma4_26B` | `model_name: gemma4-26b` |" in page and "`pure_nnx_decoder`" in page
