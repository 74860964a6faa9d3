"""Upstream Primus's experiment files on the megatron backend (issue 16): its model names, 0/1 for
flags, Megatron-LM keys megatron-core 0.16's trainer here does not use, `trainer_class`, post-training
modules, a user's own native model file, and strictness for the rest. The files under upstream_form/
are written for these tests in upstream's shape; resolution is in-process, 8 processes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from primus.backends.discovery import discover
from primus.config.resolve import resolve
from primus.config.upstream import upstream_tables
from primus.errors import ConfigError

HERE = Path(__file__).parent / "upstream_form"
PACKAGE = Path(__file__).resolve().parents[2] / "packages" / "primus-megatron" / "src" / "primus_megatron"
ENV = {"PRIMUS_WORKSPACE": "/tmp/primus-upstream-form"}  # nothing is written: resolution only


def _resolve(name: str, *items: str, text: str | None = None, tmp_path: Path | None = None):
    path = HERE / name
    if text is not None:
        assert tmp_path is not None
        path = tmp_path / name
        path.write_text(text)
        for helper in ("my_llama.yaml", "my_llama_base.yaml"):
            (tmp_path / helper).write_text((HERE / helper).read_text())
    return resolve(path, list(items), world_size=8, environ=ENV).modules


def _error(name: str, *items: str, **kw) -> str:
    with pytest.raises(ConfigError) as err:
        _resolve(name, *items, **kw)
    return str(err.value)


def test_upstream_model_name_flags_and_keys_resolve():
    m = _resolve("mixtral_8x7B-BF16-pretrain.yaml")["pre_trainer"]
    n = m.native
    assert m.model is not None and m.model.family == "mixtral" and m.model_alias == "mixtral_8x7B_v0.1"
    assert n["num_experts"] == 8 and n["hidden_size"] == 4096
    # 0/1 flags become booleans, recorded where they were written
    assert n["sequence_parallel"] is True and n["auto_continue_train"] is False
    assert m.explain("sequence_parallel").layer == "overrides"
    # null-valued keys load
    assert n["lr_decay_iters"] is None and n["load"] is None
    # the keys megatron-core 0.16's trainer does not use: kept, one warning per reason for those
    # set to something upstream would act on, silent at upstream's default or null
    assert n["moe_use_legacy_grouped_gemm"] is True
    warned = [note for note in m.notices if "upstream Primus key" in note]
    assert len(warned) == 1, warned
    assert warned[0].startswith("moe_use_legacy_grouped_gemm, use_precision_aware_optimizer: upstream Primus keys "
                                "with no effect on the megatron backend: megatron-core 0.16 has this option")
    for quiet in ("moe_shared_expert_overlap", "check_for_spiky_loss", "moe_router_dtype", "apply_rope_fusion"):
        assert quiet not in warned[0]


def test_the_warnings_reach_the_dry_run_once(tmp_path):
    from tests.support import run_primus

    r = run_primus("run", str(HERE / "mixtral_8x7B-BF16-pretrain.yaml"), "--nproc-per-node", "8", "--dry-run",
                   env={"PRIMUS_WORKSPACE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "upstream Primus key" in ln]
    assert len(lines) == 1 and lines[0].startswith("primus: warning: pre_trainer: moe_use_legacy_grouped_gemm")
    assert "upstream name mixtral_8x7B_v0.1" in r.stdout
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("value", "why"), [(2, "expects bool, got int 2"), ("'1'", "expects bool, got string '1'")])
def test_flags_take_only_0_and_1_besides_booleans(tmp_path, value, why):
    text = (HERE / "mixtral_8x7B-BF16-pretrain.yaml").read_text().replace("sequence_parallel: 1",
                                                                         f"sequence_parallel: {value}")
    msg = _error("x.yaml", text=text, tmp_path=tmp_path)
    assert "overrides.sequence_parallel" in msg and why in msg


def test_a_typo_of_an_upstream_key_is_an_error_with_did_you_mean(tmp_path):
    text = (HERE / "mixtral_8x7B-BF16-pretrain.yaml").read_text().replace(
        "moe_use_legacy_grouped_gemm: true", "moe_use_legacy_grouped_gem: true")
    msg = _error("x.yaml", text=text, tmp_path=tmp_path)
    assert "x.yaml:38: modules.pre_trainer.overrides.moe_use_legacy_grouped_gem: unknown key" in msg
    assert "did you mean 'moe_use_legacy_grouped_gemm'?" in msg


def test_a_key_in_no_table_is_an_error(tmp_path):
    text = (HERE / "mixtral_8x7B-BF16-pretrain.yaml").read_text() + "      moe_not_a_megatron_key: 1\n"
    assert "overrides.moe_not_a_megatron_key: unknown key" in _error("x.yaml", text=text, tmp_path=tmp_path)


def test_an_unbuilt_family_is_refused_naming_it():
    msg = _error("gpt_oss_20B-BF16-pretrain.yaml")
    assert ("gpt_oss_20B-BF16-pretrain.yaml:11: modules.pre_trainer.model: model family 'gpt_oss' (upstream's "
            "gpt_oss_20B.yaml) is not supported by the megatron backend") in msg
    assert "not found" not in msg


def test_deepseek_and_llama4_upstream_names_resolve():
    n = _resolve("deepseek_v2_lite-BF16-pretrain.yaml")["pre_trainer"].native
    assert n["multi_latent_attention"] is True and n["kv_lora_rank"] == 512 and n["num_experts"] == 64
    assert n["moe_layer_freq"][:2] == [0, 1] and n["expert_model_parallel_size"] == 8
    m = _resolve("deepseek_v2_lite-BF16-pretrain.yaml", "modules.pre_trainer.model=llama4_17B16E.yaml",
                 "seq_length=8192")["pre_trainer"]
    assert m.model is not None and m.model.family == "llama4" and m.model_alias == "llama4_17B16E"
    assert m.native["no_rope_freq"][:4] == [0, 0, 0, 1] and m.native["attention_chunk_size"] == 8192


def test_a_diffusion_experiment_is_refused_as_its_family():
    msg = _error("flux_12b-FP8-pretrain.yaml")
    assert "model family 'flux' (upstream's diffusion/flux_12b.yaml)" in msg and "diffusion" in msg


def test_a_users_upstream_form_native_model_file_works():
    m = _resolve("my_llama-pretrain.yaml")["pre_trainer"]
    n = m.native
    assert m.model is None and m.module.trainer_class == "MegatronPretrainTrainer"
    assert (n["num_layers"], n["hidden_size"], n["num_query_groups"], n["rotary_base"]) == (4, 256, 2, 500000)
    assert m.explain("rotary_base").file.endswith("my_llama_base.yaml")
    assert n["sequence_parallel"] is False
    # upstream's model-preset keys this trainer does not use are accepted like overrides
    assert n["attention_softmax_in_fp32"] is True


def test_a_native_model_file_is_still_judged_by_the_neutral_rules(tmp_path):
    text = (HERE / "my_llama-pretrain.yaml").read_text().replace("tensor_model_parallel_size: 1",
                                                                 "tensor_model_parallel_size: 3")
    msg = _error("x.yaml", text=text, tmp_path=tmp_path)
    assert "tensor" in msg and "tensor_model_parallel_size" in msg


def test_another_trainer_class_is_refused(tmp_path):
    text = (HERE / "my_llama-pretrain.yaml").read_text().replace("MegatronPretrainTrainer", "MegatronPretrainTrainr")
    msg = _error("x.yaml", text=text, tmp_path=tmp_path)
    assert "trainer_class 'MegatronPretrainTrainr' is not a trainer of the megatron backend" in msg
    assert "did you mean 'MegatronPretrainTrainer'" in msg


# --------------------------------------------------------------------------- the two tables


def _tables():
    return upstream_tables(discover().backends["megatron"])


def test_every_upstream_name_resolves_or_is_refused_naming_its_family(tmp_path):
    for name, alias in _tables().models.items():
        exp = tmp_path / "exp.yaml"
        seq = 8192 if name.startswith("llama4") else 128  # at least Llama 4's attention chunk
        exp.write_text(f"exp_name: x\nworkspace: {tmp_path}\nmodules:\n  pre_trainer:\n    framework: megatron\n"
                       f"    model: {name}.yaml\n    overrides: {{seq_length: {seq}, global_batch_size: 16}}\n")
        try:
            m = resolve(exp, world_size=8).modules["pre_trainer"]
        except ConfigError as err:
            assert not alias.built and f"model family '{alias.family}'" in str(err), (name, str(err))
        else:
            assert alias.built and m.model_alias == name


def test_the_key_table_keeps_off_this_backends_own_keys_and_out_of_its_code():
    """A key with no effect here must be one the backend neither lists nor reads: listed, it would
    be two things at once; read, the warning would lie."""
    own = set(yaml.safe_load((PACKAGE / "presets" / "pre_trainer.yaml").read_text()))
    keys = {k for g in _tables().groups for k in g.keys}
    assert keys and not keys & own
    code = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    native = r"(?<![.\w])(?:args|n|native|config|settings)"  # the native config's names in the code
    read = {k for k in keys if re.search(rf"{native}(?:\.|\.get\(\s*[\"']|\[\s*[\"']){re.escape(k)}\b", code)}
    assert not read, f"read by primus_megatron although listed as having no effect: {sorted(read)}"


def test_the_generated_docs_list_the_tables():
    from primus.docs.generate import generate_docs

    page = generate_docs()["megatron.md"]
    assert "## Upstream Primus files" in page and "| `mixtral_8x7B_v0.1` | `mixtral_8x7B.yaml` |" in page
    assert "`moe_use_legacy_grouped_gemm` = `false`" in page and "Megatron-LM d3528a2" in page
