"""Upstream Primus's experiment files on the torchtitan backend (issue 16): its model names (neutral
presets, TorchTitan's own DeepSeek V3 flavors, families not built), TorchTitan 0.2.2 spellings that
0.3 renamed or dropped, upstream's quantization section, tokenizers named by their Hugging Face
repository, and strictness for the rest. The files under upstream_form/ are written for these tests
in upstream's shape; resolution is in-process, 8 processes."""

from __future__ import annotations

import sys
import types
from pathlib import Path

from primus.backends.discovery import discover
from primus.config.resolve import resolve
from primus.config.upstream import upstream_tables
from primus.errors import ConfigError
from primus_torchtitan.adapter import native_settings
from primus_torchtitan.translate import tokenizer_location
from tests.support import config_error, resolve_upstream_form, upstream_notes

HERE = Path(__file__).parent / "upstream_form"


def _module(name: str, *items: str, **kw):
    return resolve_upstream_form(HERE, name, *items, **kw)


def _error(name: str, *items: str, **kw) -> str:
    return config_error(_module, name, *items, **kw)


_upstream_notes = upstream_notes


def test_an_upstream_model_name_with_renamed_and_dropped_keys():
    m = _module("qwen3_8B-pretrain.yaml")
    n = m.native
    assert m.model is not None and m.model.family == "qwen3" and m.model_alias == "qwen3_8b"
    assert n["model"]["name"] == "qwen3" and n["model"]["dim"] == 4096
    assert n["training"]["mock_data"] is True  # upstream's default: no data named, synthetic tokens
    # TorchTitan 0.2.2's `profiling.*` and `parallelism.enable_async_tensor_parallel` reach 0.3's names,
    # in the resolved config (with the spelling they came from) and in what the adapter sets
    assert n["profiler"]["enable_profiling"] is True
    assert m.explain("profiler.enable_profiling").origins == ("profiling.enable_profiling",)
    settings = native_settings(n)
    assert settings["profiler.enable_profiling"] is True and settings["profiler.profile_freq"] == 5
    assert settings["profiler.save_traces_folder"] == "profile_trace"
    assert settings["compile.enable_async_tensor_parallel"] is False
    # a dropped key at upstream's default and a quantization switch left off: accepted, silent
    assert n["parallelism"]["expert_tensor_parallel_degree"] == 1
    assert not _upstream_notes(m)


def test_an_fp8_variant_with_upstream_data_and_a_hub_tokenizer():
    m = _module("llama3.1_8B-FP8-pretrain.yaml")
    n = m.native
    assert m.model_alias == "llama3.1_8B-fp8" and n["model"]["converters"] == ["quantize.linear.float8"]
    assert n["hf_assets_path"] == "meta-llama/Llama-3.1-8B"
    assert m.explain("hf_assets_path").file.endswith("upstream_models.yaml")
    notes = "\n".join(m.notices)
    assert "tokenizer is read from the Hugging Face repository meta-llama/Llama-3.1-8B" in notes
    assert "model.converters: accepted for compatibility but not available here" in notes
    quantize = _upstream_notes(m)
    assert len(quantize) == 1 and quantize[0].startswith(
        "quantize.linear.float8.enable_fsdp_float8_all_gather, quantize.linear.float8.filter_fqns: upstream Primus "
        "keys with no effect on the torchtitan backend")


def test_a_renamed_key_replaces_the_presets_default_and_the_new_name_wins_when_both_are_written(tmp_path):
    text = (HERE / "qwen3_8B-pretrain.yaml").read_text().replace(
        "        steps: 10\n", "        steps: 10\n        deterministic: true\n        dataset: c4_test\n"
                           "        debug_moe_force_load_balance: true\n")
    n = _module("x.yaml", text=text, tmp_path=tmp_path).native
    assert n["debug"]["deterministic"] is True and n["dataloader"]["dataset"] == "c4_test"
    assert n["debug"]["moe_force_load_balance"] is True  # upstream v26.5.1's spelling
    both = text.replace("      metrics:\n", "      debug: {deterministic: false}\n      metrics:\n")
    assert _module("y.yaml", text=both, tmp_path=tmp_path).native["debug"]["deterministic"] is False


def test_deepseek_v3_is_torchtitans_own_flavor():
    m = _module("deepseek_v3_16b-BF16-pretrain.yaml")
    assert m.model is None and m.model_alias == "deepseek_v3_16b"
    assert (m.native["model"]["name"], m.native["model"]["flavor"]) == ("deepseek_v3", "16B")


def test_a_family_this_backend_does_not_build_is_refused_naming_it():
    msg = _error("gpt_oss_20B-BF16-pretrain.yaml")
    assert ("gpt_oss_20B-BF16-pretrain.yaml:11: modules.pre_trainer.model: model family 'gpt_oss' (upstream's "
            "gpt_oss_20b.yaml) is not supported by the torchtitan backend") in msg
    assert "not found" not in msg


def test_a_users_upstream_form_native_model_file():
    m = _module("my_model-pretrain.yaml")
    n = m.native
    assert m.model is None and (n["model"]["name"], n["model"]["flavor"]) == ("llama3", "debugmodel")
    # TorchTitan 0.2.2's model.hf_assets_path is 0.3's hf_assets_path (synthetic data reads none);
    # upstream's job section is accepted
    assert native_settings(n)["hf_assets_path"] == "meta-llama/Llama-3.1-8B"
    assert tokenizer_location(n) == "meta-llama/Llama-3.1-8B" and n["job"]["dump_folder"] == "./outputs"
    assert m.explain("model.hf_assets_path").file.endswith("my_model.yaml")


def test_a_users_native_model_file_with_a_typo_is_an_error(tmp_path):
    (tmp_path / "my_model.yaml").write_text((HERE / "my_model.yaml").read_text().replace("flavor:", "flavour:"))
    msg = _error("x.yaml", text=(HERE / "my_model-pretrain.yaml").read_text(), tmp_path=tmp_path)
    assert "my_model.yaml:8" in msg and "model.flavour" in msg and "did you mean 'model.flavor'" in msg


def test_typos_of_upstream_spellings_stay_errors(tmp_path):
    text = (HERE / "qwen3_8B-pretrain.yaml").read_text().replace("enable_profiling: true", "enable_profilng: true")
    msg = _error("x.yaml", text=text, tmp_path=tmp_path)
    assert "profiling.enable_profilng" in msg and "did you mean 'profiling.enable_profiling'" in msg
    text = (HERE / "qwen3_8B-pretrain.yaml").read_text() + "      not_a_section: {x: 1}\n"
    assert "unknown TorchTitan key 'not_a_section.x'" in _error("y.yaml", text=text, tmp_path=tmp_path)


def test_a_dropped_key_set_away_from_upstreams_default_warns(tmp_path):
    text = (HERE / "qwen3_8B-pretrain.yaml").read_text().replace("expert_tensor_parallel_degree: 1",
                                                                "expert_tensor_parallel_degree: 2")
    notes = _upstream_notes(_module("x.yaml", text=text, tmp_path=tmp_path))
    assert len(notes) == 1 and notes[0].startswith("parallelism.expert_tensor_parallel_degree: upstream Primus key "
                                                   "with no effect on the torchtitan backend: TorchTitan 0.3 dropped")


def test_real_data_without_a_tokenizer_says_so_without_printing_none(tmp_path):
    text = (HERE / "my_model-pretrain.yaml").read_text().replace("steps: 10}", "steps: 10, mock_data: false}")
    (tmp_path / "my_model.yaml").write_text((HERE / "my_model.yaml").read_text().replace(
        '  hf_assets_path: "meta-llama/Llama-3.1-8B"\n', ""))
    msg = _error("x.yaml", text=text, tmp_path=tmp_path)
    assert "a corpus needs a tokenizer" in msg and "None" not in msg


def test_a_local_tokenizer_path_that_does_not_exist_is_not_taken_for_a_repository(tmp_path):
    text = (HERE / "my_model-pretrain.yaml").read_text().replace("steps: 10}", "steps: 10, mock_data: false}")
    (tmp_path / "my_model.yaml").write_text((HERE / "my_model.yaml").read_text().replace(
        "meta-llama/Llama-3.1-8B", "./tokenizers/llama"))
    assert "tokenizer directory './tokenizers/llama' does not exist" in _error("x.yaml", text=text, tmp_path=tmp_path)


def test_a_hub_tokenizer_is_downloaded_only_when_real_data_reads_it(monkeypatch, tmp_path):
    from primus_torchtitan.data import TOKENIZER_FILES, tokenizer_directory

    calls = []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        calls.append((repo_id, allow_patterns))
        return str(tmp_path / "snapshot")

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=snapshot_download))
    assert tokenizer_directory("Qwen/Qwen3-8B", mock=False, fallback="/run") == str(tmp_path / "snapshot")
    assert calls == [("Qwen/Qwen3-8B", TOKENIZER_FILES)] and "tokenizer.json" in TOKENIZER_FILES
    assert tokenizer_directory("Qwen/Qwen3-8B", mock=True, fallback="/run") == "/run"
    assert tokenizer_directory(str(tmp_path), mock=False, fallback="/run") == str(tmp_path)
    assert tokenizer_directory(None, mock=False, fallback="/run") == "/run"
    assert len(calls) == 1


def test_every_upstream_name_resolves_or_is_refused_naming_its_family(tmp_path):
    tables = upstream_tables(discover().backends["torchtitan"])
    assert tables.models
    for name, alias in tables.models.items():
        exp = tmp_path / "exp.yaml"
        exp.write_text(f"exp_name: x\nworkspace: {tmp_path}\nmodules:\n  pre_trainer:\n    framework: torchtitan\n"
                       f"    model: {name}.yaml\n    overrides: {{training: {{seq_len: 8192}}}}\n")
        try:
            m = resolve(exp, world_size=8).modules["pre_trainer"]
        except ConfigError as err:
            assert not alias.built and f"model family '{alias.family}'" in str(err), (name, str(err))
        else:
            assert alias.built and m.model_alias == name


def test_the_generated_docs_list_the_tables():
    from primus.docs.generate import generate_docs

    page = generate_docs()["torchtitan.md"]
    assert "| `qwen3_8b` | `qwen3_8B.yaml` + `hf_assets_path: Qwen/Qwen3-8B` |" in page
    assert "| `profiling.enable_profiling` | `profiler.enable_profiling` |" in page
    assert "`parallelism.expert_tensor_parallel_degree` = `1`" in page and "`quantize.`" in page
