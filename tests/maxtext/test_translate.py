"""The light half: translation, key checks, env, docs and the generated MaxText config. No JAX here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from primus.backends.discovery import discover
from primus.config.resolve import resolve
from primus.config.schema import NEUTRAL_SECTIONS
from primus.errors import ConfigError
from primus.models.spec import ModelSpec
from primus.platform.env import core_entries, plan_env
from primus_maxtext.adapter import (
    JobTopology,
    build_maxtext_config,
    check_devices,
    prepare_process_environment,
    write_maxtext_config,
)
from primus_maxtext.base_config import KEY_FILE, installed_base_yml, read_base_yml, render_key_file
from primus_maxtext.env import ENV
from primus_maxtext.translate import MaxTextTranslator, check_mesh, mesh_axes, translate_model_spec

from .conftest import (
    DATA_LINE,
    EXAMPLES,
    OVERRIDES_LINE,
    PARALLEL_LINE,
    ROOT,
    TOKENIZER,
    TRAIN_LINE,
    run_primus,
    write_experiment,
)

PRESETS = Path(__file__).resolve().parents[2] / "packages" / "primus-core" / "src" / "primus" / "presets" / "models"
NO_TEXT_CORPUS = Path(__file__).with_name("data") / "no_text.jsonl"  # records keyed "content", not "text"


def model(name: str) -> ModelSpec:
    import yaml

    return ModelSpec.model_validate(yaml.safe_load((PRESETS / name).read_text()))


def test_llama_translates_to_base_keys():
    v = translate_model_spec(model("llama3.1_8B.yaml")).values
    assert v["decoder_block"] == "llama2" and v["model_name"] == "default"
    assert (v["base_emb_dim"], v["base_num_query_heads"], v["base_num_kv_heads"], v["head_dim"]) == (4096, 32, 8, 128)
    assert (v["base_mlp_dim"], v["base_num_decoder_layers"], v["vocab_size"]) == (14336, 32, 128256)
    assert v["rope_max_timescale"] == 500000 and isinstance(v["rope_max_timescale"], int)
    assert v["rope_type"] == "llama3.1" and v["normalization_layer_epsilon"] == 1e-5


@pytest.mark.parametrize(("preset", "block", "extra"), [
    ("qwen3_tiny.yaml", "qwen3", {"use_qk_norm": True, "logits_via_embedding": True}),
    ("qwen2.5_7B.yaml", "qwen2", {"attention_bias": True}),
    ("mixtral_tiny.yaml", "mixtral", {"num_experts": 4, "num_experts_per_tok": 2, "base_moe_mlp_dim": 128}),
    ("qwen3_30B_A3B.yaml", "qwen3_moe", {"num_experts": 128, "num_experts_per_tok": 8}),
    ("deepseek_v3.yaml", "deepseek", {"attention_type": "mla", "q_lora_rank": 1536, "first_num_dense_layers": 3,
                                      "rope_type": "yarn", "rope_factor": 40}),
])
def test_families(preset, block, extra):
    v = translate_model_spec(model(preset)).values
    assert v["decoder_block"] == block
    assert {k: v[k] for k in extra} == extra


def test_neutral_sections_and_key_file_are_maxtext_keys(tmp_path):
    exp = write_experiment(tmp_path, parallel="{tensor: 2, fsdp: true}", checkpoint="{interval: 5, keep_last: 2}")
    m = resolve(exp, ["train.min_lr=3.0e-4", "train.warmup_steps=1", "train.weight_decay=0.01"],
                world_size=4).modules["pre_trainer"]
    n = m.native
    assert (n["steps"], n["learning_rate"], n["per_device_batch_size"], n["max_target_length"]) == (4, 3e-3, 4, 64)
    assert n["learning_rate_final_fraction"] == pytest.approx(0.1) and n["warmup_steps_fraction"] == 0.25
    # fsdp takes the 2 devices tensor leaves: MaxText's -1 is filled here, from the job's 4 devices
    assert (n["ici_tensor_parallelism"], n["ici_fsdp_parallelism"], n["ici_data_parallelism"]) == (2, 2, 1)
    assert (n["enable_checkpointing"], n["checkpoint_period"], n["max_to_keep"]) == (True, 5, 2)
    assert n["adam_weight_decay"] == 0.01 and n["init_weights_seed"] == 1234
    assert m.explain("ici_tensor_parallelism").layer == "neutral parallel"
    fsdp = m.explain("ici_fsdp_parallelism")
    assert fsdp.layer == "derived" and fsdp.origins == ("parallel.fsdp", "parallel.tensor", "world_size")


@pytest.mark.parametrize(("parallel", "world_size", "mesh"), [
    ("{}", 2, {"ici_fsdp_parallelism": 2, "ici_data_parallelism": 1}),  # MaxText's own default: fsdp fills
    ("{fsdp: false}", 2, {"ici_fsdp_parallelism": 1, "ici_data_parallelism": 2}),
    ("{fsdp: true, data: 4}", 4, {"ici_fsdp_parallelism": 4, "ici_data_parallelism": 1}),
    ("{tensor: 2, data: auto}", 4, {"ici_tensor_parallelism": 2, "ici_fsdp_parallelism": 1, "ici_data_parallelism": 2}),
])
def test_parallel_layout_gives_the_mesh_it_means(tmp_path, parallel, world_size, mesh):
    """Each -1 axis is filled for the job's devices; fsdp shards over the whole data-parallel extent."""
    native = resolve(write_experiment(tmp_path, parallel=parallel), world_size=world_size).modules["pre_trainer"].native
    axes = mesh_axes(native, "ici_")  # with MaxText's base.yml defaults for the axes not set
    assert {k: axes[k] for k in mesh} == mesh


def test_a_fill_written_in_overrides_is_filled_and_explained(tmp_path):
    """`-1` in overrides asks for the devices the other axes leave: derived, not a contradiction."""
    exp = write_experiment(tmp_path, overrides={"ici_data_parallelism": -1, "ici_fsdp_parallelism": 1})
    m = resolve(exp, world_size=2).modules["pre_trainer"]
    assert m.native["ici_data_parallelism"] == 2
    assert m.explain("ici_data_parallelism").origins == ("ici_data_parallelism", "world_size")
    # a size written by hand stays the user's: a wrong one is refused where it was written
    with pytest.raises(ConfigError, match=f"exp.yaml:{OVERRIDES_LINE}: .*overrides.ici_data_parallelism"):
        resolve(write_experiment(tmp_path, overrides={"ici_data_parallelism": 3, "ici_fsdp_parallelism": 1}),
                world_size=2)


def test_accumulation_and_mesh_are_derived_with_their_origins(tmp_path):
    exp = write_experiment(tmp_path, parallel="{fsdp: true}", train={"global_batch_size": 16})
    m = resolve(exp, world_size=2).modules["pre_trainer"]
    assert (m.native["gradient_accumulation_steps"], m.native["ici_fsdp_parallelism"]) == (2, 2)
    accumulation = m.explain("gradient_accumulation_steps")
    assert accumulation.layer == "derived"
    assert accumulation.origins == ("train.global_batch_size", "train.micro_batch_size", "world_size")
    assert m.explain("ici_fsdp_parallelism").origins == ("parallel.fsdp", "world_size")
    config = build_maxtext_config(m.native, platform="cpu", checkpoint_dir=tmp_path / "checkpoints",
                                  topology=JobTopology(1, 0, None, 2))
    assert (config["gradient_accumulation_steps"], config["ici_fsdp_parallelism"]) == (2, 2)


# An error names where the culprit was written: the command-line item as typed, or the file's line.
@pytest.mark.parametrize(("kwargs", "args", "world_size", "where", "message"), [
    ({"data": "{}"}, ["data.path=/nope.jsonl"], 1, "command line: data.path=/nope.jsonl",
     "corpus /nope.jsonl does not exist"),
    ({"data": "{path: /nope.jsonl}"}, [], 1, f"{{exp}}:{DATA_LINE}: modules.pre_trainer.data.path",
     "corpus /nope.jsonl does not exist"),
    ({}, ["parallel.tensor=3"], 4, "command line: parallel.tensor=3", "= 3 does not divide the world size 4"),
    ({"parallel": "{tensor: 3}"}, [], 4, f"{{exp}}:{PARALLEL_LINE}: modules.pre_trainer.parallel.tensor",
     "= 3 does not divide the world size 4"),
    ({}, ["ici_data_parallelism=3"], 2, "command line: ici_data_parallelism=3",
     "ici_data_parallelism=3 does not divide the job's 2 devices"),
    ({}, ["train.precision=fp16"], 1, "command line: train.precision=fp16", "fp16 is not supported"),
    ({"train": {"precision": "fp16"}}, [], 1, f"{{exp}}:{TRAIN_LINE}: modules.pre_trainer.train.precision",
     "fp16 is not supported"),
    # MaxText's global batch counts every device (tensor too): core's micro x data-parallel rule passes 8
    ({"parallel": "{tensor: 2, fsdp: true}"}, ["train.global_batch_size=8"], 4,
     "command line: train.global_batch_size=8", "not a multiple of per_device_batch_size 4 x 4 devices = 16"),
    ({"parallel": "{tensor: 2, fsdp: true}", "train": {"global_batch_size": 8}}, [], 4,
     f"{{exp}}:{TRAIN_LINE}: modules.pre_trainer.train.global_batch_size", "not a multiple of"),
    ({"overrides": {"gradient_accumulation_steps": 3}}, ["train.global_batch_size=16"], 2,
     f"{{exp}}:{OVERRIDES_LINE}: modules.pre_trainer.overrides.gradient_accumulation_steps",
     "gradient_accumulation_steps 3 contradicts 2, which the maxtext backend derives from "
     "train.global_batch_size, train.micro_batch_size, world_size"),
    # MaxText's default text column is checked although data.text_key is not given
    ({"data": json.dumps({"path": str(NO_TEXT_CORPUS), "tokenizer": str(TOKENIZER)})}, [], 1,
     f"{{exp}}:{DATA_LINE}: modules.pre_trainer.data.text_key (train_data_columns)",
     "has no text field 'text'"),
    # a native dimension is judged like the neutral one: core's heads rule reads ici_tensor_parallelism
    ({"overrides": {"ici_tensor_parallelism": 8}}, [], 8,
     f"{{exp}}:{OVERRIDES_LINE}: modules.pre_trainer.overrides.ici_tensor_parallelism",
     "tensor (8) does not divide the model's 4 attention heads"),
])
def test_error_names_the_command_line_item_or_the_file_line(tmp_path, kwargs, args, world_size, where, message):
    exp = write_experiment(tmp_path, **kwargs)
    with pytest.raises(ConfigError) as err:
        resolve(exp, args, world_size=world_size)
    text = str(err.value)
    assert text.startswith(where.format(exp=exp)) and message in text, text


def test_explain_names_derived_origins_and_the_step_key(tmp_path):
    exp = write_experiment(tmp_path, parallel="{fsdp: true}")
    r = run_primus("config", "show", str(exp), "--nproc-per-node", "2", "--explain", "ici_fsdp_parallelism")
    assert r.returncode == 0, r.stderr
    assert "pre_trainer.ici_fsdp_parallelism = 2  <- derived from parallel.fsdp, world_size" in r.stdout
    r = run_primus("config", "show", str(exp), "--explain", "train.steps")
    assert r.returncode == 0, r.stderr
    assert "pre_trainer.train.steps = 4  -> steps" in r.stdout
    assert f"pre_trainer.steps = 4  <- neutral train ({exp}:{TRAIN_LINE})" in r.stdout


def test_neutral_fields_are_the_schema_fields_maxtext_honours(tmp_path):
    """The adapter reads checkpoint.resume itself: setting it is not reported as ignored."""
    every = {f"{section}.{name}" for section, model in NEUTRAL_SECTIONS.items() for name in model.model_fields}
    assert MaxTextTranslator.neutral_fields <= every
    exp = write_experiment(tmp_path, checkpoint="{resume: never, interval: 2, keep_last: 1}",
                           train={"warmup_steps": 1, "min_lr": 1.0e-4, "lr_schedule": "cosine", "weight_decay": 0.1,
                                  "grad_clip": 1.0, "precision": "fp32", "eval_interval": 2, "eval_steps": 1})
    m = resolve(exp).modules["pre_trainer"]
    assert not [n for n in m.notices if "not used" in n], m.notices


def test_shipped_key_file_matches_installed_maxtext():
    from importlib import resources
    from importlib.metadata import version

    shipped = resources.files("primus_maxtext").joinpath(KEY_FILE).read_text()
    assert shipped == render_key_file(read_base_yml(installed_base_yml()), version("maxtext")), (
        "regenerate with: python -m primus_maxtext.base_config")


def test_unknown_native_key_is_rejected_with_a_suggestion(tmp_path):
    exp = write_experiment(tmp_path, overrides={"ici_fsdp_paralelism": 1})
    with pytest.raises(ConfigError) as err:
        resolve(exp)
    assert "did you mean 'ici_fsdp_parallelism'" in str(err.value) and err.value.line


def test_wrong_kind_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="expects a number"):
        resolve(write_experiment(tmp_path, overrides={"adam_b1": "high"}))


@pytest.mark.parametrize(("native", "devices", "ok"), [
    ({}, 1, True),  # fsdp -1 fills
    ({"ici_fsdp_parallelism": 2}, 2, True),
    ({"ici_fsdp_parallelism": 1, "ici_tensor_parallelism": 2}, 2, True),
    ({"ici_fsdp_parallelism": 1, "ici_tensor_parallelism": 2}, 4, False),
    ({"ici_fsdp_parallelism": -1, "ici_tensor_parallelism": 3}, 4, False),
    ({"ici_fsdp_parallelism": -1, "ici_data_parallelism": -1}, 4, False),
])
def test_mesh_must_fill_the_devices(native, devices, ok):
    if ok:
        check_mesh(native, devices)
    else:
        with pytest.raises(ConfigError):
            check_mesh(native, devices)


def test_upstream_form_real_size_example_validates_and_dry_runs():
    exp = EXAMPLES / "maxtext" / "llama3_8B-pretrain.yaml"
    r = run_primus("config", "validate", str(exp), "--nproc-per-node", "8")
    assert r.returncode == 0, r.stderr
    r = run_primus("run", str(exp), "--dry-run", "--nproc-per-node", "8")
    assert r.returncode == 0, r.stderr
    assert "ici_fsdp=8" in r.stdout and "8,030.0M parameters" in r.stdout
    assert "run_name is set by Primus" in r.stderr


def test_tiny_example_dry_runs():
    r = run_primus("run", str(EXAMPLES / "maxtext" / "llama3_tiny-pretrain.yaml"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "maxtext.metrics_to_primus" in r.stdout and "in-process" in r.stdout


def test_importing_the_backend_loads_no_jax():
    code = ("import sys, primus_maxtext; from primus.backends.discovery import discover; "
            "b = discover().get('maxtext'); b.spec.load_translator(); b.spec.load_env(); b.spec.load_patches(); "
            "heavy = [m for m in ('jax', 'jaxlib', 'maxtext', 'flax', 'torch') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_xla_flags_merge_flag_by_flag_and_arch_gating():
    entries = core_entries("jax") + ENV
    user = {"XLA_FLAGS": "--xla_gpu_autotune_level=0 --xla_dump_to=/tmp/x"}
    changes, _ = plan_env(entries, platform="rocm", arch="gfx942", environ=user)
    flags = changes["XLA_FLAGS"].split()
    assert "--xla_gpu_autotune_level=0" in flags and "--xla_gpu_autotune_level=4" not in flags
    assert "--xla_dump_to=/tmp/x" in flags and "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert changes["HSA_NO_SCRATCH_RECLAIM"] == "1" and "RCCL_WARP_SPEED_AUTO" not in changes
    assert changes["JAX_PLATFORMS"] == "rocm"  # never a silent fall-back to the CPU on a GPU node
    assert plan_env(entries, platform="cuda", arch=None, environ={})[0]["JAX_PLATFORMS"] == "cuda"
    gfx950, _ = plan_env(entries, platform="rocm", arch="gfx950", environ={})
    assert gfx950["RCCL_WARP_SPEED_AUTO"] == "0" and "HSA_NO_SCRATCH_RECLAIM" not in gfx950
    cpu, _ = plan_env(entries, platform="cpu", arch=None, environ={})
    assert cpu == {"JAX_PLATFORMS": "cpu"}


def test_process_environment_gives_cpu_devices_and_autotune_level():
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    prepare_process_environment(env, platform="cpu", topology=JobTopology(1, 0, None, devices=2))
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"
    env = {"XLA_FLAGS": "--xla_gpu_autotune_level=4", "XLA_GPU_AUTOTUNE_LEVEL": "1"}
    prepare_process_environment(env, platform="rocm", topology=JobTopology(1, 0, None, devices=8))
    assert env["XLA_FLAGS"] == "--xla_gpu_autotune_level=1"


def test_topology_from_core_plan_or_master_variables():
    t = JobTopology.from_environ({"PRIMUS_COORDINATOR": "10.0.0.1:1234", "PRIMUS_NUM_PROCESSES": "2",
                                  "PRIMUS_PROCESS_ID": "1"}, devices=16)
    assert (t.num_processes, t.process_id, t.coordinator, t.devices_per_process) == (2, 1, "10.0.0.1:1234", 8)
    t = JobTopology.from_environ({"MASTER_ADDR": "h0", "MASTER_PORT": "7000", "NNODES": "4", "NODE_RANK": "3"},
                                 devices=32)
    assert (t.num_processes, t.process_id, t.coordinator) == (4, 3, "h0:7000")


def test_jax_must_see_the_devices_the_mesh_was_sized_for():
    check_devices(2, JobTopology(1, 0, None, devices=2))
    with pytest.raises(ConfigError, match="JAX sees 8 devices .* for 1 .*--nproc-per-node 8"):
        check_devices(8, JobTopology(1, 0, None, devices=1))


def test_generated_config_points_maxtext_at_the_run_directory(tmp_path):
    m = resolve(write_experiment(tmp_path)).modules["pre_trainer"]
    run = tmp_path / "ws" / "team" / "me" / "exp"
    config = build_maxtext_config(m.native, platform="cpu", checkpoint_dir=run / "checkpoints",
                                  topology=JobTopology(1, 0, None, 1))
    assert (config["hardware"], config["skip_jax_distributed_system"]) == ("cpu", True)
    assert (config["base_output_directory"], config["run_name"]) == (str(run.parent), "exp")
    assert "trainable" not in config and "sink_level" not in config
    path = write_maxtext_config(run, "pre_trainer", config, run / "env.json")
    text = path.read_text()
    assert "python -m maxtext.trainers.pre_train.train" in text and "base_config: base.yml" in text


def test_docs_page_is_current():
    from primus.docs.generate import generate_docs

    committed = (ROOT / "docs" / "backends" / "maxtext.md").read_text()
    assert generate_docs()["maxtext.md"] == committed, "regenerate: primus docs --out /tmp/gen; copy maxtext.md"


def test_backend_is_discovered():
    b = discover().get("maxtext")
    assert b.spec.process_model == "per-host" and b.framework_ok
