"""primus.models.hf: Hugging Face config.json <-> ModelSpec, the on-disk tensor names, and the
safetensors header checks `model: {hf_path: DIR}` runs at resolve time.

The core session has neither torch nor transformers: model directories are written by hand here
(config.json, and a safetensors file whose header is made byte by byte: 8 bytes little-endian
header length, the JSON header, then the data). The one test that builds transformers models is
skipped where transformers is not installed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from primus.models.hf import (
    INDEX_FILE,
    Unbuilt,
    check_weights,
    hf_config,
    hf_tensor_shapes,
    read_weight_index,
    spec_from_hf,
    write_weights,
)
from primus.models.spec import ModelSpec
from tests.hf_models import _COMMON, CONFIGS, FAMILIES, NEW_FAMILIES
from tests.support import assert_config_error, run_primus, write_yaml


def family_config(family: str) -> dict:
    """The config.json of tests.hf_models' tiny `family` model, as its values are written."""
    return {**_COMMON, **CONFIGS[family]}


def safetensors_bytes(shapes: dict[str, tuple[int, ...]], *, cut: int = 0) -> bytes:
    """A float32 safetensors file of zeros holding `shapes`, its last `cut` bytes missing."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    data = len(raw).to_bytes(8, "little") + raw + bytes(offset)
    return data[:len(data) - cut] if cut else data


def model_dir(base: Path, family: str = "llama", *, config: dict | None = None,
              shapes: dict[str, tuple[int, ...]] | None = None, cut: int = 0) -> Path:
    """A model directory: config.json and model.safetensors (the tensors its config implies, unless given)."""
    base.mkdir(parents=True, exist_ok=True)
    config = config or family_config(family)
    (base / "config.json").write_text(json.dumps(config))
    if shapes is None:
        shapes = hf_tensor_shapes(spec_from_hf(config))
    (base / "model.safetensors").write_bytes(safetensors_bytes(shapes, cut=cut))
    return base


# --------------------------------------------------------------------------- config.json <-> ModelSpec


@pytest.mark.parametrize("family", FAMILIES)
def test_config_spec_config_round_trip(family: str):
    config = family_config(family)
    spec = spec_from_hf(config)
    again = hf_config(spec)
    assert again["model_type"] == config["model_type"]
    assert spec_from_hf(again) == spec
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "num_experts",
                "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
        if key in config:
            assert again[key] == config[key], (family, key)
    assert again["intermediate_size"] == config["intermediate_size"]
    assert again["rope_parameters"]["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert spec.qkv_bias == (family == "qwen2") and spec.qk_norm == family.startswith("qwen3")
    assert (spec.moe is not None) == (family in ("qwen3_moe", "mixtral"))


def test_spec_facts_of_the_tiny_models():
    """Numbers, not just round trips: GQA, head size, experts and tied embeddings as config.json says."""
    llama = spec_from_hf(family_config("llama"))
    assert (llama.num_heads, llama.kv_heads, llama.head_size, llama.rope_theta) == (4, 2, 16, 500000.0)
    shapes = hf_tensor_shapes(llama)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (32, 64)
    assert shapes["lm_head.weight"] == (512, 64) and len(shapes) == 3 + 2 * 9
    qwen3 = hf_tensor_shapes(spec_from_hf(family_config("qwen3")))
    assert "lm_head.weight" not in qwen3 and qwen3["model.layers.0.self_attn.q_norm.weight"] == (16,)
    moe = hf_tensor_shapes(spec_from_hf(family_config("qwen3_moe")))
    assert moe["model.layers.0.mlp.gate.weight"] == (4, 64) and moe["model.layers.0.mlp.experts.3.down_proj.weight"] == (64, 64)
    mixtral = hf_tensor_shapes(spec_from_hf(family_config("mixtral")))
    assert mixtral["model.layers.1.block_sparse_moe.experts.2.w3.weight"] == (64, 64)


NEW_PRESETS = ("deepseek_v3_tiny", "deepseek_v2_lite_tiny", "llama4_tiny", "deepseek_v3", "deepseek_v2",
               "deepseek_v2_lite", "llama4_scout", "llama4_maverick")


def preset(name: str) -> ModelSpec:
    from importlib import resources

    import yaml

    text = resources.files("primus.presets").joinpath("models", f"{name}.yaml").read_text()
    return ModelSpec.model_validate(yaml.safe_load(text))


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_new_family_presets_survive_spec_config_spec(name: str):
    """Every DeepSeek and Llama 4 preset, tiny and real, is a transformers config and back unchanged."""
    spec = preset(name)
    config = hf_config(spec)
    assert config["model_type"] == {"deepseek": "deepseek_v3" if spec.moe.score_function == "sigmoid"
                                    else "deepseek_v2", "llama4": "llama4_text"}[spec.family]
    assert spec_from_hf(config) == spec


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_new_family_tiny_configs_survive_config_spec_config(family: str):
    config = family_config(family)
    spec = spec_from_hf(config)
    assert spec_from_hf(hf_config(spec)) == spec
    again = hf_config(spec)
    for key, value in CONFIGS[family].items():  # the family's own keys, as the tiny model writes them
        if key != "head_dim":  # deepseek: derived by transformers
            assert again[key] == value, (family, key)


def test_new_family_facts_from_config_json():
    """Numbers, not just round trips: what each transformers key becomes in the spec."""
    v3 = spec_from_hf(family_config("deepseek_v3"))
    assert (v3.mla.q_lora_rank, v3.mla.qk_head_dim, v3.moe.groups, v3.moe.top_k_groups) == (32, 24, 4, 2)
    assert (v3.moe.score_function, v3.moe.expert_bias, v3.moe.routed_scaling_factor) == ("sigmoid", True, 2.5)
    assert v3.rope_scaling.type == "yarn" and v3.rope_scaling.mscale_all_dim == 1.0
    assert [v3.moe.is_moe_layer(i) for i in range(3)] == [False, True, True]
    v2 = spec_from_hf(family_config("deepseek_v2"))
    assert v2.mla.q_lora_rank is None and v2.moe.score_function == "softmax" and not v2.moe.norm_topk_prob
    assert v2.moe.groups is None and v2.moe.shared_experts == 2
    l4 = spec_from_hf(family_config("llama4"))
    assert [l4.moe.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    assert [l4.uses_rope(i) for i in range(4)] == [True, True, True, False]
    assert (l4.ffn_hidden_size, l4.moe.expert_ffn, l4.attention_chunk_size, l4.attn_floor_scale) == (128, 64, 16, 4)
    assert l4.qk_l2_norm and l4.attn_temperature_tuning and not l4.moe.norm_topk_prob
    shapes = hf_tensor_shapes(v3)
    assert shapes["model.layers.1.mlp.gate.e_score_correction_bias"] == (8,)
    assert shapes["model.layers.2.self_attn.q_b_proj.weight"] == (4 * 24, 32)
    assert shapes["model.layers.2.self_attn.kv_a_proj_with_mqa.weight"] == (32 + 8, 64)
    assert shapes["model.layers.1.mlp.shared_experts.up_proj.weight"] == (32, 64)
    assert "model.layers.0.mlp.gate.weight" not in shapes and shapes["model.layers.0.mlp.up_proj.weight"] == (128, 64)
    v2_shapes = hf_tensor_shapes(v2)
    assert v2_shapes["model.layers.1.self_attn.q_proj.weight"] == (96, 64)
    assert v2_shapes["model.layers.1.mlp.shared_experts.down_proj.weight"] == (64, 64)  # 2 shared experts of 32
    assert "model.layers.1.mlp.gate.e_score_correction_bias" not in v2_shapes
    l4_shapes = hf_tensor_shapes(l4)
    assert l4_shapes["model.layers.1.feed_forward.experts.gate_up_proj"] == (4, 64, 128)
    assert l4_shapes["model.layers.3.feed_forward.experts.down_proj"] == (4, 64, 64)
    assert l4_shapes["model.layers.2.feed_forward.up_proj.weight"] == (128, 64)


def test_a_llama4_multimodal_config_gives_its_text_model():
    text = dict(family_config("llama4"))
    del text["model_type"]
    config = {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"], "text_config": text,
              "vision_config": {"hidden_size": 88}}
    assert spec_from_hf(config) == spec_from_hf(family_config("llama4"))
    from primus.errors import ConfigError

    with pytest.raises(ConfigError, match="quantization_config"):  # FP8 Maverick says so outside text_config
        spec_from_hf({**config, "quantization_config": {"quant_method": "fbgemm_fp8"}})


UNBUILT_CONFIGS = {  # config.json values no ModelSpec field can say: one line naming the key
    "quantization_config": ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}),
    "scoring_func": ("deepseek_v3", {"scoring_func": "softmax"}),
    "norm_topk_prob": ("deepseek_v2", {"norm_topk_prob": True}),
    "num_key_value_heads": ("deepseek_v2", {"num_key_value_heads": 2}),
    "head_dim": ("deepseek_v3", {"head_dim": 16}),
    "moe_layers": ("llama4", {"moe_layers": [0, 3]}),
    "no_rope_layers": ("llama4", {"no_rope_layers": [1, 0, 1, 1]}),
    "text_config": ("llama4", {"model_type": "llama4"}),
}


@pytest.mark.parametrize("key", sorted(UNBUILT_CONFIGS))
def test_new_family_configs_primus_cannot_build_are_refused_naming_the_key(key: str):
    from primus.errors import ConfigError

    family, change = UNBUILT_CONFIGS[key]
    with pytest.raises(ConfigError) as err:
        spec_from_hf({**family_config(family), **change})
    assert err.value.key == key, str(err.value)


def test_specs_transformers_has_no_class_for_are_refused():
    """DeepseekV3 always selects with the expert bias; DeepseekV2 never renormalises; Llama 4's router
    is its own: a spec asking otherwise is Unbuilt, not silently built differently."""
    v3 = preset("deepseek_v3_tiny")
    for spec in (v3.model_copy(update={"moe": v3.moe.model_copy(update={"expert_bias": False})}),
                 preset("deepseek_tiny"),  # softmax with renormalisation
                 preset("llama4_tiny").model_copy(update={"moe": preset("llama4_tiny").moe.model_copy(
                     update={"norm_topk_prob": True})})):
        with pytest.raises(Unbuilt):
            hf_config(spec)


def test_mtp_weights_are_accepted_not_required(tmp_path: Path):
    """DeepSeek checkpoints carry multi-token prediction layers as model.layers.<num_layers>.*:
    check_weights takes them (transformers ignores them) but does not ask for them."""
    spec = preset("deepseek_v3_tiny").model_copy(update={"mtp_layers": 1})
    config = hf_config(spec)
    shapes = dict(hf_tensor_shapes(spec))
    assert not any(name.startswith("model.layers.3.") for name in shapes)
    check_weights(model_dir(tmp_path / "without", config=config, shapes=shapes), spec)
    mtp = {"model.layers.3.eh_proj.weight": (64, 128), "model.layers.3.enorm.weight": (64,)}
    check_weights(model_dir(tmp_path / "with", config=config, shapes={**shapes, **mtp}), spec)
    from primus.errors import ConfigError

    with pytest.raises(ConfigError, match="model.layers.4.enorm.weight"):  # one past the MTP layers
        check_weights(model_dir(tmp_path / "past", config=config, shapes={**shapes, "model.layers.4.enorm.weight": (64,)}), spec)


def test_a_multimodal_llama4_directory_is_refused_with_the_fix(tmp_path: Path):
    from primus.errors import ConfigError

    spec = spec_from_hf(family_config("llama4"))
    shapes = {f"language_model.{n}": s for n, s in hf_tensor_shapes(spec).items()}
    shapes["vision_model.patch_embedding.linear.weight"] = (8, 8)
    with pytest.raises(ConfigError) as err:
        check_weights(model_dir(tmp_path / "mm", family="llama4", shapes=shapes), spec)
    assert "multimodal Llama 4" in str(err.value) and "Llama4ForCausalLM" in str(err.value)


@pytest.mark.parametrize("family", FAMILIES + NEW_FAMILIES)
def test_hf_config_builds_a_transformers_model_with_the_tensors_of_hf_tensor_shapes(family: str, tmp_path: Path):
    """What transformers writes to disk for hf_config(spec) is exactly hf_tensor_shapes(spec)."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    spec = spec_from_hf(family_config(family))
    values = dict(hf_config(spec))
    values.pop("architectures")
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(tmp_path))
    written = {name: shape for name, (_, _, shape) in read_weight_index(tmp_path).items()}
    assert written == hf_tensor_shapes(spec)
    check_weights(tmp_path, spec)


def test_write_weights_shards_and_indexes_what_read_weight_index_reads_back(tmp_path: Path):
    """write_weights with a hand-made save_file: shards cut at the limit, an index naming each tensor."""
    def save_file(tensors: dict, path: str, metadata: dict) -> None:
        Path(path).write_bytes(safetensors_bytes({n: s for n, s in tensors.items()}))

    spec = spec_from_hf(family_config("llama"))
    shapes = hf_tensor_shapes(spec)
    files = write_weights(tmp_path, shapes, save_file=save_file, nbytes=lambda s: math.prod(s) * 4,
                          max_shard_bytes=200_000)
    assert files[-1] == INDEX_FILE and len(files) > 2
    assert {n: s for n, (_, _, s) in read_weight_index(tmp_path).items()} == shapes
    check_weights(tmp_path, spec)


# --------------------------------------------------------------------------- bad model directories


def _broken(kind: str, base: Path) -> tuple[Path, tuple[str, ...]]:
    """A model directory with one fault, and what the one error line must name."""
    spec = spec_from_hf(family_config("llama"))
    shapes = dict(hf_tensor_shapes(spec))
    if kind == "model_type":
        return model_dir(base, config={**family_config("llama"), "model_type": "gpt2"}, shapes={}), (
            "model_type 'gpt2' is not a family Primus builds", "config.json")
    if kind == "missing":
        del shapes["model.layers.1.mlp.up_proj.weight"]
        return model_dir(base, shapes=shapes), ("model.layers.1.mlp.up_proj.weight", "[128, 64]", "missing")
    if kind == "misshapen":
        shapes["model.layers.0.self_attn.k_proj.weight"] = (64, 64)
        return model_dir(base, shapes=shapes), ("model.layers.0.self_attn.k_proj.weight", "[64, 64]", "[32, 64]")
    if kind == "truncated":
        return model_dir(base, cut=1000), ("model.safetensors", "truncated")
    if kind == "index_escape":
        directory = model_dir(base)
        (directory.parent / "x").write_bytes(safetensors_bytes(shapes))
        weight_map = {name: "model.safetensors" for name in shapes}
        weight_map["lm_head.weight"] = "../x"
        (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        return directory, ("'../x'", "not a file of the model directory")
    raise AssertionError(kind)


EXPERIMENT = """
work_group: team
user_name: me
exp_name: hfspec
workspace: {workspace}
modules:
  pre_trainer:
    framework: toy
    config: pre_trainer.yaml
    model: {{hf_path: {model}}}
    train: {{steps: 2, lr: 0.1}}
"""

FAULTS = ("model_type", "missing", "misshapen", "truncated", "index_escape")


@pytest.mark.parametrize("command", [("config", "validate"), ("run", "--dry-run")])
@pytest.mark.parametrize("fault", FAULTS)
def test_a_bad_model_directory_is_one_line_exit_2_and_writes_nothing(fault: str, command: tuple[str, ...],
                                                                     tmp_path: Path):
    directory, needles = _broken(fault, tmp_path / "model" / "dir")
    workspace = tmp_path / "ws"
    exp = write_yaml(tmp_path / "exp.yaml", EXPERIMENT.format(workspace=workspace, model=directory))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert_config_error(run_primus(*command, str(exp)), *needles)
    assert not workspace.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_good_model_directory_validates_and_gives_the_spec(tmp_path: Path):
    """The contrast to the faults above: the same directory without a fault resolves, and the
    module's model is config.json's."""
    directory = model_dir(tmp_path / "model")
    exp = write_yaml(tmp_path / "exp.yaml", EXPERIMENT.format(workspace=tmp_path / "ws", model=directory))
    result = run_primus("config", "validate", str(exp))
    assert result.returncode == 0, result.stderr[-2000:]
    from primus.config.resolve import resolve

    module = resolve(exp, [], world_size=1).modules["pre_trainer"]
    assert module.hf_path == str(directory.resolve())
    assert module.model == spec_from_hf(family_config("llama"))
    assert module.native["hidden"] == 64 and module.native["layers"] == 2


def test_unsupported_model_type_is_refused_by_spec_from_hf():
    from primus.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        spec_from_hf({"model_type": "gemma3"})
    assert "gemma3" in str(err.value) and "llama, qwen2, qwen3, qwen3_moe, mixtral" in str(err.value)
