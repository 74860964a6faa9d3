"""Translation from neutral config to Megatron's names, and the light entry point (no torch import)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from mg_helpers import EXAMPLE, UPSTREAM_EXAMPLE

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
    with pytest.raises(ConfigError, match="multi-latent attention"):
        t.translate_model(ModelSpec(**{**LLAMA, "family": "deepseek", "num_kv_heads": None, "mla": mla}))


def test_unsupported_rope_scaling_is_a_clear_error() -> None:
    spec = ModelSpec(**{**LLAMA, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ConfigError, match="yarn"):
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
