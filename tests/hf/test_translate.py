"""The light half: model translation per family, section translation, native keys, staying light."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources

import pytest
import yaml

from primus.errors import ConfigError
from primus.models.spec import ModelSpec
from primus_hf.training_args import current_fields, recorded_version, training_arguments
from primus_hf.translate import HFTranslator


def preset(name: str) -> ModelSpec:
    text = resources.files("primus.presets").joinpath("models", name).read_text()
    return ModelSpec.model_validate(yaml.safe_load(text))


def model_config(spec: ModelSpec) -> dict:
    return HFTranslator().translate_model(spec).values["model_config"]


def test_llama_maps_to_llama_config_names():
    cfg = model_config(preset("llama3_tiny.yaml"))
    assert cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["vocab_size"]) == (64, 2, 4, 2, 172, 512)
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}


def test_llama31_rope_scaling_becomes_rope_parameters():
    rope = model_config(preset("llama3.1_8B.yaml"))["rope_parameters"]
    assert rope == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                    "original_max_position_embeddings": 8192, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def test_qwen2_qwen3_mixtral_and_qwen3_moe():
    assert model_config(preset("qwen2.5_7B.yaml"))["model_type"] == "qwen2"
    qwen3 = model_config(preset("qwen3_tiny.yaml"))
    assert qwen3["model_type"] == "qwen3" and qwen3["tie_word_embeddings"] is True and qwen3["head_dim"] == 16
    mixtral = model_config(preset("mixtral_tiny.yaml"))
    assert (mixtral["model_type"], mixtral["num_local_experts"], mixtral["num_experts_per_tok"],
            mixtral["intermediate_size"]) == ("mixtral", 4, 2, 128)
    moe = model_config(preset("qwen3_30B_A3B.yaml"))
    assert (moe["model_type"], moe["num_experts"], moe["moe_intermediate_size"]) == ("qwen3_moe", 128, 768)


@pytest.mark.parametrize("name", ["llama3_tiny.yaml", "qwen3_tiny.yaml", "mixtral_tiny.yaml"])
def test_translated_tiny_configs_build_transformers_models(name: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(model_config(preset(name)))
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 512, (1, 16))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64


def test_a_deepseek_router_transformers_has_no_class_for_is_refused_with_a_clear_error():
    """deepseek_tiny renormalises softmax top-k weights: DeepseekV2 does not, DeepseekV3 routes with a sigmoid."""
    with pytest.raises(ConfigError, match="softmax routing with moe.expert_bias or moe.norm_topk_prob.*not supported "
                                          "by the hf backend"):
        HFTranslator().translate_model(preset("deepseek_tiny.yaml"))


def test_layouts_transformers_cannot_express_are_refused():
    llama_with_bias = preset("llama3_tiny.yaml").model_copy(update={"qkv_bias": True})
    with pytest.raises(ConfigError, match="not supported by the hf backend"):
        HFTranslator().translate_model(llama_with_bias)


def test_neutral_sections_map_to_training_arguments_names():
    from primus.config.schema import ModuleConfig

    module = ModuleConfig.model_validate({
        "framework": "hf",
        "train": {"steps": 7, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2, "lr_schedule": "constant",
                  "micro_batch_size": 2, "global_batch_size": 8, "seq_length": 64, "seed": 3, "weight_decay": 0.0,
                  "grad_clip": 0.5, "precision": "bf16", "log_interval": 2, "eval_interval": 4, "eval_steps": 3},
        "parallel": {"fsdp": True},
        "data": {"path": "/c.jsonl", "tokenizer": "/tok", "text_key": "body", "valid_fraction": 0.1},
        "checkpoint": {"interval": 5, "keep_last": 1, "resume": "auto"},
    })
    v = HFTranslator().translate_sections(module, None).values
    assert v["max_steps"] == 7 and v["learning_rate"] == 1e-3 and v["min_lr"] == 1e-4
    assert v["lr_scheduler_type"] == "constant_with_warmup" and v["warmup_steps"] == 2
    assert v["per_device_train_batch_size"] == 2 and v["global_batch_size"] == 8 and v["seq_length"] == 64
    assert v["max_grad_norm"] == 0.5 and v["bf16"] is True and v["fp16"] is False
    assert v["logging_steps"] == 2 and v["eval_strategy"] == "steps" and v["eval_steps"] == 4 and v["eval_iters"] == 3
    assert v["fsdp"] == "full_shard"
    assert v["data_path"] == "/c.jsonl" and v["mock_data"] is False and v["text_key"] == "body"
    assert v["save_steps"] == 5 and v["save_total_limit"] == 1 and v["auto_continue_train"] is True


def test_precision_auto_leaves_the_per_device_choice_to_the_run():
    from primus.config.schema import ModuleConfig

    module = ModuleConfig.model_validate({"framework": "hf", "train": {"precision": "auto"}})
    assert "bf16" not in HFTranslator().translate_sections(module, None).values


def test_native_keys_are_the_preset_plus_every_training_arguments_field():
    from primus.backends.discovery import discover

    spec = discover().get("hf").spec
    text = (spec.preset_dir() / "pre_trainer.yaml").read_text()
    keys = HFTranslator().native_keys(yaml.safe_load(text))
    assert {"learning_rate", "disable_wandb", "auto_continue_train", "hf_path", "dataloader_num_workers"} <= keys


def test_training_arguments_list_matches_installed_transformers():
    import transformers

    shipped, installed = set(training_arguments()), set(current_fields())
    assert shipped == installed, (
        f"TrainingArguments of transformers {transformers.__version__} differ from the shipped list "
        f"({recorded_version()}): added {sorted(installed - shipped)}, removed {sorted(shipped - installed)}; "
        "refresh with `python -m primus_hf.training_args`")


def test_importing_the_package_and_translator_stays_light():
    code = ("import sys, primus_hf, primus_hf.translate, primus_hf.patches, primus_hf.env\n"
            "from primus.backends.discovery import discover\n"
            "discover().get('hf').spec.load_translator()\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'accelerate', 'numpy'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
