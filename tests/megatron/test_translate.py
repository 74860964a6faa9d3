"""Translation from neutral config to Megatron's names, and the light entry point (no torch import)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from mg_helpers import EXAMPLE, REPO, UPSTREAM_EXAMPLE

from primus.config.resolve import resolve
from primus.errors import ConfigError
from primus.models.spec import ModelSpec
from primus_megatron.translate import (
    MegatronTranslator,
    effective_batch_p2p_comm,
    recompute_layer_ids,
    virtual_pipeline_size,
)

LLAMA = dict(family="llama", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             ffn_hidden_size=172, max_position_embeddings=256, rope_theta=500000.0)


def test_entry_point_imports_neither_torch_nor_megatron() -> None:
    code = ("import sys, primus_megatron, primus_megatron.translate, primus_megatron.patches, primus_megatron.env;"
            "from primus.backends.discovery import discover; discover();"
            "bad = [m for m in ('torch', 'megatron') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_llama_model_keys() -> None:
    native = MegatronTranslator().translate_model(ModelSpec(**LLAMA)).values
    assert native["num_layers"] == 2 and native["hidden_size"] == 64 and native["ffn_hidden_size"] == 172
    assert native["num_attention_heads"] == 4
    assert native["group_query_attention"] is True and native["num_query_groups"] == 2
    assert native["normalization"] == "RMSNorm" and native["swiglu"] is True
    assert native["rotary_base"] == 500000 and native["untie_embeddings_and_output_weights"] is True
    assert native["add_qkv_bias"] is False and native["qk_layernorm"] is False


def test_qwen_mixtral_deepseek_keys() -> None:
    t = MegatronTranslator()
    qwen2 = t.translate_model(ModelSpec(**{**LLAMA, "family": "qwen2", "qkv_bias": True})).values
    assert qwen2["add_qkv_bias"] is True
    qwen3 = t.translate_model(ModelSpec(**{**LLAMA, "family": "qwen3", "qk_norm": True,
                                           "tie_embeddings": True})).values
    assert qwen3["qk_layernorm"] is True and qwen3["untie_embeddings_and_output_weights"] is False
    moe = {"experts": 4, "top_k": 2, "expert_ffn": 64, "shared_experts": 1, "first_dense_layers": 1}
    mixtral = t.translate_model(ModelSpec(**{**LLAMA, "family": "mixtral", "moe": moe})).values
    assert mixtral["num_experts"] == 4 and mixtral["moe_router_topk"] == 2 and mixtral["moe_ffn_hidden_size"] == 64
    assert mixtral["moe_layer_freq"] == [0, 1] and mixtral["moe_shared_expert_intermediate_size"] == 64
    mla = {"kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16}
    deepseek = t.translate_model(ModelSpec(**{**LLAMA, "family": "deepseek", "num_kv_heads": None, "mla": mla}))
    assert deepseek.values["multi_latent_attention"] is True and deepseek.values.get("q_lora_rank") is None
    assert (deepseek.values["qk_head_dim"], deepseek.values["qk_pos_emb_head_dim"]) == (16, 8)


def test_unsupported_rope_scaling_is_a_clear_error() -> None:
    spec = ModelSpec(**{**LLAMA, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="yarn"):  # yarn is MLA's (megatron-core's MLA builds it)
        MegatronTranslator().translate_model(spec)


def test_neutral_sections_resolve_to_megatron_names() -> None:
    resolved = resolve(EXAMPLE, ["train.steps=7", "parallel.tensor=2", "checkpoint.interval=3",
                                 "data.valid_fraction=0.1"], world_size=2)
    n = resolved.modules["pre_trainer"].native
    assert n["train_iters"] == 7 and n["lr"] == 3.0e-3 and n["min_lr"] == 3.0e-4 and n["lr_warmup_iters"] == 2
    assert n["lr_decay_style"] == "cosine" and n["micro_batch_size"] == 2 and n["global_batch_size"] == 4
    assert n["seq_length"] == 64 and n["seed"] == 1234 and n["clip_grad"] == 1.0
    assert n["tensor_model_parallel_size"] == 2 and n["save_interval"] == 3 and n["auto_continue_train"] is True
    assert n["mock_data"] is True and n["split"] == "90,10,0" and n["num_layers"] == 2


def test_upstream_file_resolves_and_reports_turbo_flags() -> None:
    module = resolve(UPSTREAM_EXAMPLE, world_size=8).modules["pre_trainer"]
    assert module.native["hidden_size"] == 4096 and module.native["seq_length"] == 8192
    assert module.native["use_rope_scaling"] is True
    assert any("enable_primus_turbo" in note for note in module.notices)


def test_pipeline_helpers() -> None:
    assert effective_batch_p2p_comm({"overlap_p2p_comm": True, "batch_p2p_comm": None}) is False
    assert effective_batch_p2p_comm({"overlap_p2p_comm": False, "batch_p2p_comm": None}) is True
    assert virtual_pipeline_size({"num_layers": 8, "pipeline_model_parallel_size": 2,
                                  "num_layers_per_virtual_pipeline_stage": 2}) == 2
    assert virtual_pipeline_size({"num_layers": 8}) is None


def test_recompute_layer_ids_accept_upstream_spellings() -> None:
    assert recompute_layer_ids("3, 1,1") == [1, 3] and recompute_layer_ids([0]) == [0]
    assert recompute_layer_ids(None) == [] and recompute_layer_ids("") == []
    with pytest.raises(ConfigError, match="not a list of layer ids"):
        recompute_layer_ids("0,x")


def test_enabling_a_tracker_without_its_package_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"disable_wandb: false needs the wandb package") as err:
        resolve(EXAMPLE, ["disable_wandb=false"], world_size=1)
    assert "primus-megatron[trackers]" in str(err.value)


def test_fsdp_switches_the_device_connections_to_8() -> None:
    from primus.platform.env import plan_env
    from primus_megatron.env import ENV

    assert plan_env(ENV, platform="rocm", arch=None, environ={}, config={})[0]["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    fsdp = plan_env(ENV, platform="rocm", arch=None, environ={}, config={"use_torch_fsdp2": True})[0]
    assert fsdp["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"


def test_force_load_balancing_reaches_megatron_core_and_needs_experts() -> None:
    from types import SimpleNamespace

    import torch

    from primus_megatron.trainer import transformer_config

    native = resolve(EXAMPLE, ["model=mixtral_tiny.yaml", "moe_router_force_load_balancing=true"],
                     world_size=1).modules["pre_trainer"].native
    config = transformer_config(SimpleNamespace(**{**native, "bf16": False}), torch.device("cpu"))
    assert config.moe_router_force_load_balancing is True and config.num_moe_experts == native["num_experts"]
    with pytest.raises(ConfigError, match="needs an MoE model"):
        resolve(EXAMPLE, ["moe_router_force_load_balancing=true"], world_size=1)


def test_moe_layer_freq_expressions_are_read_without_eval() -> None:
    from primus_megatron.translate import moe_layer_pattern

    assert moe_layer_pattern("([0]*1+[1]*3)", 4) == [0, 1, 1, 1]
    assert moe_layer_pattern("[1, 0]*2", 4) == [1, 0, 1, 0]
    assert moe_layer_pattern(2, 4) == 2 and moe_layer_pattern([1, 1], 2) == [1, 1]
    for bad, message in [("__import__('os').getcwd()", "not a layer pattern"), ("[0]*3", "3 entries for 4 layers"),
                         ("[2]*4", "one 0 (dense) or 1 (MoE)")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            moe_layer_pattern(bad, 4)


def test_build_args_fix_ups_reach_the_native_config() -> None:
    import logging

    from primus.patches.registry import PatchContext, PatchSet
    from primus_megatron.patches import PATCHES

    native = resolve(EXAMPLE, ["model=mixtral_tiny.yaml", "moe_layer_freq=([0]*1+[1]*1)", "stderr_sink_level=WARNING"],
                     world_size=1).modules["pre_trainer"].native
    patches = PatchSet(PATCHES, environ={})
    ctx = PatchContext(backend="megatron", platform="cpu", framework_version="0.16.1", config=native)
    applied = patches.apply_phase("build_args", ctx)
    try:
        assert {"megatron.args.moe_layer_freq_expression", "megatron.args.logging_level"} <= set(applied)
        assert native["moe_layer_freq"] == [0, 1] and native["logging_level"] == logging.WARNING
        assert logging.getLogger("megatron.core").level == logging.WARNING
    finally:
        patches.undo_all()
    assert native["moe_layer_freq"] == "([0]*1+[1]*1)"


# ---------------------------------------------------------------------------- issue 11: one owner per rule

TINY_LLAMA_3_LAYERS = ("{family: llama, vocab_size: 512, hidden_size: 64, num_layers: 3, num_heads: 4, "
                       "num_kv_heads: 2, ffn_hidden_size: 172, max_position_embeddings: 256}")
TINY_NATIVE_3_LAYERS = ("{num_layers: 3, hidden_size: 64, ffn_hidden_size: 172, num_attention_heads: 4, "
                        "group_query_attention: true, num_query_groups: 2, vocab_size: 512, "
                        "max_position_embeddings: 256}")


def _experiment(tmp_path: Path, module: str, name: str = "exp.yaml") -> Path:
    """A one-module megatron experiment; `module` is the module's body, indented by 4."""
    path = tmp_path / name
    path.write_text(f"exp_name: t\nworkspace: {tmp_path / 'ws'}\nmodules:\n  pre_trainer:\n"
                    f"    framework: megatron\n{module}")
    return path


def _error(exp: Path, *items: str, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as err:
        resolve(exp, list(items), world_size=world_size)
    return str(err.value)


def test_a_manual_pipeline_split_is_one_rule_for_neutral_and_native_models(tmp_path: Path) -> None:
    # 3 layers over 2 stages as 2+1: core judges the split (decoder_pipeline_manual_split_list) for
    # both spellings; it used to refuse the neutral one (3 % 2) while megatron's check passed the native one
    common = ("    train: {steps: 2, micro_batch_size: 2, global_batch_size: 4, seq_length: 64}\n"
              "    data: {mock: true}\n")
    neutral = _experiment(tmp_path, f"    model: {TINY_LLAMA_3_LAYERS}\n    parallel: {{pipeline: 2}}\n{common}"
                                    "    overrides:\n      decoder_pipeline_manual_split_list: [2, 1]\n", "neutral.yaml")
    native = _experiment(tmp_path, f"    model: {TINY_NATIVE_3_LAYERS}\n{common}    overrides:\n"
                                   "      pipeline_model_parallel_size: 2\n"
                                   "      decoder_pipeline_manual_split_list: [2, 1]\n", "native.yaml")
    for exp in (neutral, native):
        n = resolve(exp, world_size=2).modules["pre_trainer"].native
        assert n["num_layers"] == 3 and n["pipeline_model_parallel_size"] == 2
        assert n["decoder_pipeline_manual_split_list"] == [2, 1]
        msg = _error(exp, "decoder_pipeline_manual_split_list=[2,2]", world_size=2)
        assert msg.startswith("command line: decoder_pipeline_manual_split_list=[2,2]: "), msg
        assert "pipeline split [2, 2] must have 2 positive entries summing to the model's 3 layers" in msg
        written = tmp_path / f"bad-{exp.name}"
        written.write_text(exp.read_text().replace("[2, 1]", "[2, 2]"))
        msg = _error(written, world_size=2)
        line = written.read_text().splitlines().index("      decoder_pipeline_manual_split_list: [2, 2]") + 1
        assert msg.startswith(f"{written}:{line}: modules.pre_trainer.overrides.decoder_pipeline_manual_split_list: "), msg


def test_kv_heads_are_judged_on_the_resolved_num_query_groups() -> None:
    # the neutral model has 2 kv heads; a native override of the groups is what megatron builds
    assert resolve(EXAMPLE, ["parallel.tensor=2", "num_query_groups=4", "num_attention_heads=8"],
                   world_size=2).modules["pre_trainer"].native["num_query_groups"] == 4
    msg = _error(EXAMPLE, "tensor_model_parallel_size=4", "num_attention_heads=8", world_size=4)
    assert msg.startswith("command line: tensor_model_parallel_size=4: ")
    assert "tensor (4) does not divide the model's 2 key/value heads" in msg


def test_bad_values_are_located_where_they_were_written(tmp_path: Path) -> None:
    msg = _error(EXAMPLE, "data.mock=false", "data.path=/nope.jsonl")
    assert msg.startswith("command line: data.path=/nope.jsonl: corpus /nope.jsonl does not exist"), msg
    msg = _error(EXAMPLE, "parallel.tensor=3", world_size=2)
    assert msg.startswith("command line: parallel.tensor=3: tensor (3) x pipeline (1) x context (1)"), msg
    # a native key on the command line that core does not see (the corpus of an upstream-form file)
    msg = _error(EXAMPLE, "mock_data=false", "data_path=/nope.jsonl")
    assert msg.startswith("command line: data_path=/nope.jsonl: corpus /nope.jsonl does not exist"), msg

    # the same values written in the experiment file: its file and line
    exp = _experiment(tmp_path, "    model: llama3_tiny.yaml\n    train: {seq_length: 64}\n"
                                "    data: {path: /nope.jsonl}\n")
    assert _error(exp).startswith(f"{exp}:8: modules.pre_trainer.data.path: corpus /nope.jsonl does not exist")
    exp.write_text(exp.read_text().replace("{path: /nope.jsonl}", "{mock: true}\n    parallel: {tensor: 3}"))
    msg = _error(exp, world_size=2)
    assert msg.startswith(f"{exp}:9: modules.pre_trainer.parallel.tensor (tensor_model_parallel_size): tensor (3)"), msg


def test_seq_length_beyond_the_models_positions_is_refused() -> None:
    # megatron used to train 4096-token sequences with a 256-position model; Megatron-LM refuses it too
    msg = _error(EXAMPLE, "train.seq_length=4096")
    assert msg.startswith("command line: train.seq_length=4096: seq_length 4096 exceeds the model's "
                          "max_position_embeddings 256"), msg
    msg = _error(EXAMPLE, "max_position_embeddings=32")
    assert "seq_length 64 exceeds the model's max_position_embeddings 32" in msg
    # the upstream-form example trains at exactly its max_position_embeddings override (8192)
    native = resolve(UPSTREAM_EXAMPLE, world_size=8).modules["pre_trainer"].native
    assert native["seq_length"] == native["max_position_embeddings"] == 8192


def test_mock_data_beside_a_corpus_is_refused_in_either_spelling(tmp_path: Path) -> None:
    corpus = str(REPO / "examples" / "data" / "corpus.jsonl")
    tokenizer = str(REPO / "examples" / "data" / "tokenizer")
    assert "set either `mock: true` or `path`" in _error(EXAMPLE, f"data.path={corpus}",
                                                         f"data.tokenizer={tokenizer}")
    msg = _error(EXAMPLE, "mock_data=true", f"data_path={corpus}", f"tokenizer_model={tokenizer}")
    assert msg.startswith("command line: mock_data=true: mock_data is true beside data_path"), msg
    # an upstream-form file names only data_path (upstream's preset says mock_data: false): the
    # package preset's mock default gives way, recorded as derived from data_path
    module = resolve(EXAMPLE, ["data.mock=false", f"data_path={corpus}", f"tokenizer_model={tokenizer}"]
                     ).modules["pre_trainer"]
    assert module.native["mock_data"] is False and module.native["data_path"] == corpus
    upstream = resolve(UPSTREAM_EXAMPLE, ["mock_data=false", f"data_path={corpus}", f"tokenizer_model={tokenizer}"],
                       world_size=8).modules["pre_trainer"]
    assert upstream.native["mock_data"] is False
    exp = _experiment(tmp_path, "    model: llama3_tiny.yaml\n    train: {seq_length: 64}\n    overrides:\n"
                                f"      data_path: {corpus}\n      tokenizer_model: {tokenizer}\n")
    module = resolve(exp).modules["pre_trainer"]
    assert module.native["mock_data"] is False
    assert module.sources[("mock_data",)].origins == ("data_path",)
    # `data.mock: false` alone is not mock data (it used to leave the preset's mock default on)
    assert "no training data" in _error(EXAMPLE, "data.mock=false")


def test_upstreams_layers_per_virtual_stage_derive_the_chunk_count(tmp_path: Path) -> None:
    items = ["parallel.pipeline=2", "num_layers=4", "num_layers_per_virtual_pipeline_stage=1",
             "deallocate_pipeline_outputs=false"]
    module = resolve(EXAMPLE, items, world_size=2).modules["pre_trainer"]
    assert module.native["virtual_pipeline_model_parallel_size"] == 2  # what the trainer reads
    assert module.sources[("virtual_pipeline_model_parallel_size",)].origins == (
        "num_layers", "pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage")
    assert module.native["batch_p2p_comm"] is False  # Megatron-LM: the opposite of overlap_p2p_comm
    assert "does not divide the 2 layers of each of the 2 pipeline stages" in _error(
        EXAMPLE, *items[:2], "num_layers_per_virtual_pipeline_stage=3", world_size=2)
    msg = _error(EXAMPLE, *items, "virtual_pipeline_model_parallel_size=4", world_size=2)
    assert msg.startswith("command line: virtual_pipeline_model_parallel_size=4: ") and "contradicts" in msg


def test_explain_names_the_step_key_and_what_a_value_was_derived_from() -> None:
    from primus.cli.config_cmd import explain

    module = resolve(EXAMPLE, ["train.steps=7"]).modules["pre_trainer"]
    lines = explain(module, "train.steps")
    assert lines[0].startswith("pre_trainer.train.steps = 7  -> train_iters"), lines
    assert "cli (command line: train.steps=7)" in lines[1]
    assert module.total_steps == 7  # the worker's progress line reads steps_key
    lines = explain(module, "batch_p2p_comm")
    assert lines == ["pre_trainer.batch_p2p_comm = False  <- derived from overlap_p2p_comm"], lines


def test_check_only_reads_and_every_neutral_field_is_honoured() -> None:
    from primus.config.resolve import CORE_CONSUMED_FIELDS
    from primus.config.schema import NEUTRAL_SECTIONS

    # every neutral field translates, except those core acts on itself (checkpoint.dir, .export, ...)
    declared = MegatronTranslator.neutral_fields
    every = {f"{s}.{f}" for s, cls in NEUTRAL_SECTIONS.items() for f in cls.model_fields}
    assert every - declared == CORE_CONSUMED_FIELDS
    module = resolve(EXAMPLE, ["train.precision=fp32", "checkpoint.keep_last=3"]).modules["pre_trainer"]
    assert not [note for note in module.notices if "not used by" in note]
