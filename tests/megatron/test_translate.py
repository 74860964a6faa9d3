"""Translation from neutral config to Megatron's names, and the light entry point (no torch import)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mg_helpers import EXAMPLE, UPSTREAM_EXAMPLE

from primus.config.resolve import resolve
from primus.errors import ConfigError
from primus.models.spec import ModelSpec
from primus_megatron.translate import MegatronTranslator, effective_batch_p2p_comm, virtual_pipeline_size

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
