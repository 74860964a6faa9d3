"""Issue 13 on the maxtext backend: MaxText's DeepSeek block (DeepSeek-V3 and V2-Lite) and Llama 4
block from the neutral tiny presets, and transformers' own tiny models of the three families
(tests.hf_models.NEW_FAMILIES) loaded through `model: {hf_path}`. Real CLI, real MaxText.

Per family: a run on 2 host devices (a layout that splits what is new: experts, heads or the FSDP
shards) whose loss falls; `primus eval` of the Hugging Face init against transformers'
forward (tests.hf_models.PARITY_RTOL); for DeepSeek-V3 and Llama 4 (the selection bias, the
separate dense and MoE stacks, the scanned blocks of Llama 4 and its fused experts) a step at
learning rate 0 whose export is bit for bit the model it loaded. Fast checks first: every key of
the MaxText model file Primus borrows the name of is written by Primus, and MTP with HF weights is
refused at resolve.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from primus.config.resolve import core_preset_dir, resolve
from primus.errors import ConfigError
from tests.hf_models import NEW_FAMILIES, last_eval
from tests.support import (
    assert_config_error,
    assert_ok,
    experiment_template,
    run_dir_for,
    session_cache,
    write_yaml,
)

from .conftest import EXAMPLES, assert_trained, run_primus
from .test_weights import assert_close, evaluate, experiment, helper, tensors

pytestmark = pytest.mark.slow

TINY = {"deepseek_v3": "deepseek_v3_tiny", "deepseek_v2": "deepseek_v2_lite_tiny", "llama4": "llama4_tiny"}

TRAIN = experiment_template("maxtext", """\
    model: {model}
    train: {{steps: 4, lr: 3.0e-3, micro_batch_size: 2, seq_length: 32, seed: 1234, log_interval: 1,
             precision: fp32}}
    parallel: {parallel}
    data: {{mock: true}}
    overrides: {{attention: dot_product}}
""")


def tiny_model(family: str, **changes: object) -> str:
    """The tiny preset of `family` as an inline model mapping, with `changes`."""
    preset = yaml.safe_load((core_preset_dir() / "models" / f"{TINY[family]}.yaml").read_text())
    return json.dumps({**preset, **changes})


# --------------------------------------------------------------------------- fast checks


def test_primus_writes_every_key_of_the_model_file_it_names():
    """DeepSeek-V3's routing needs MaxText's model name deepseek3-*: the model file of that name must
    contribute nothing, so Primus writes each of its keys (next to the config, read first)."""
    import maxtext

    from primus_maxtext.translate import DEEPSEEK_V3_MODEL_KEYS, DEEPSEEK_V3_MODEL_NAME

    file = Path(maxtext.__file__).parent / "configs" / "models" / f"{DEEPSEEK_V3_MODEL_NAME}.yml"
    assert set(yaml.safe_load(file.read_text())) == set(DEEPSEEK_V3_MODEL_KEYS)


@pytest.mark.parametrize(("family", "changes", "needle"), [
    ("deepseek_v2", {"moe": {"experts": 8, "top_k": 2, "expert_ffn": 32, "norm_topk_prob": True}},
     "model.moe.norm_topk_prob: moe.norm_topk_prob true with softmax scores is not supported"),
    ("deepseek_v2", {"moe": {"experts": 8, "top_k": 2, "expert_ffn": 32, "norm_topk_prob": False, "groups": 4,
                             "top_k_groups": 2}}, "model.moe.groups: group-limited routing with softmax scores"),
    ("llama4", {"moe": {"experts": 4, "top_k": 2, "expert_ffn": 64, "shared_experts": 1, "score_function": "sigmoid",
                        "layer_interval": 2, "norm_topk_prob": False}}, "model.moe.top_k: a llama4 MoE"),
    ("llama4", {"num_layers": 6}, "model.num_layers: num_layers (6) must be a multiple of 4"),
])
def test_what_maxtexts_blocks_cannot_express_is_refused_naming_the_key(tmp_path, family, changes, needle):
    exp = write_yaml(tmp_path / "exp.yaml", TRAIN.format(name="exp", workspace=tmp_path / "ws", parallel="{}",
                                                         model=tiny_model(family, **changes)))
    with pytest.raises(ConfigError) as err:
        resolve(exp)
    assert needle in str(err.value)


@pytest.mark.parametrize(("example", "family", "patches"), [
    ("deepseek_v3", "deepseek, 671,025.4M parameters", ()),
    ("deepseek_v2_lite", "deepseek, 15,706.4M parameters", ()),
    ("llama4_scout", "llama4, 107,769.4M parameters", ("maxtext.llama4_rope_scaling",
                                                      "maxtext.llama4_attention_temperature")),
])
def test_real_size_example_dry_runs_on_8_devices(example, family, patches):
    r = run_primus("run", str(EXAMPLES / "maxtext" / f"{example}-pretrain.yaml"), "--dry-run", "--nproc-per-node", "8",
                   timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert family in r.stdout and "ici_expert=8" in r.stdout
    assert all(p in r.stdout for p in patches)


# --------------------------------------------------------------------------- training


# On 1 host device each tiny family trained too (loss fell; 2026-12-02, recorded in docs/guide/maxtext.md);
# those runs are left out of CI for its time budget: the round trips below train a step on 1 device.
@pytest.mark.parametrize(("family", "parallel", "changes"), [
    # experts split over the devices; MaxText's MTP block and loss trains along
    pytest.param("deepseek_v3", "{expert: 2, fsdp: false}", {"mtp_layers": 1}, id="deepseek_v3-expert2-mtp"),
    pytest.param("deepseek_v2", "{fsdp: true}", {}, id="deepseek_v2-fsdp2"),
    # heads split: chunked attention, NoPE layer and qk L2 norm per shard
    pytest.param("llama4", "{tensor: 2, fsdp: false}", {}, id="llama4-tensor2"),
])
def test_each_family_trains_on_two_devices(tmp_path, family, parallel, changes):
    exp = write_yaml(tmp_path / "exp.yaml", TRAIN.format(name="exp", workspace=tmp_path / "ws", parallel=parallel,
                                                         model=tiny_model(family, **changes)))
    result = run_primus("run", str(exp), "--nproc-per-node", "2")
    run = run_dir_for(tmp_path / "ws", "exp")
    assert_trained(result, run, 4)
    config = yaml.safe_load((run / "maxtext" / "pre_trainer.yml").read_text())
    assert config["decoder_block"] == ("llama4" if family == "llama4" else "deepseek")
    if changes.get("mtp_layers"):
        assert config["mtp_num_layers"] == 1


# --------------------------------------------------------------------------- Hugging Face weights


@pytest.fixture(scope="module")
def made() -> tuple[dict[str, Path], dict[str, tuple[float, int]]]:
    """transformers' tiny models of the new families and transformers' (summed loss, tokens) of each."""
    root = session_cache() / "maxtext-hf-models"
    scored = helper("make", str(root), *NEW_FAMILIES)
    return {f: root / f for f in NEW_FAMILIES}, {f: tuple(scored[str(root / f)]) for f in NEW_FAMILIES}


@pytest.mark.parametrize(("family", "devices"), [("deepseek_v3", 2), ("deepseek_v2", 1), ("llama4", 1)])
def test_eval_of_hf_init_matches_transformers(tmp_path, made, family, devices):
    models, references = made
    exp = experiment(tmp_path, models[family])
    evaluate(exp, "--nproc-per-node", str(devices))
    record = last_eval(run_dir_for(tmp_path / "ws", "exp"))
    assert record["checkpoint"] == "init" and record["world_size"] == devices
    assert_close(record, references[family], f"maxtext {family} on {devices} device(s)")


@pytest.mark.parametrize("family", ["deepseek_v3", "llama4"])
def test_round_trip_through_maxtext_is_exact(tmp_path, made, family):
    models, _ = made
    exp = experiment(tmp_path, models[family], steps=1)
    assert_ok(run_primus("run", str(exp), "learning_rate=0.0"))
    assert_ok(run_primus("export", str(run_dir_for(tmp_path / "ws", "exp")), str(tmp_path / "export")))
    original, exported = tensors(models[family]), tensors(tmp_path / "export")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and (exported[name] == tensor).all(), name


def test_hf_weights_with_mtp_are_refused_at_resolve(tmp_path, made):
    """A DeepSeek-V3 checkpoint with an MTP layer: one line before anything runs (its MTP weights are
    not mapped into MaxText's MTP block)."""
    models, _ = made
    model = tmp_path / "with-mtp"
    model.mkdir()
    for file in models["deepseek_v3"].iterdir():
        (model / file.name).symlink_to(file)
    config = json.loads((models["deepseek_v3"] / "config.json").read_text())
    (model / "config.json").unlink()
    (model / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    result = run_primus("run", str(experiment(tmp_path, model)), "--dry-run", timeout=120)
    assert_config_error(result, "model.hf_path", "multi-token prediction (mtp_layers 1)", "not supported")
    assert not (tmp_path / "ws").exists()
