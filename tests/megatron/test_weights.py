"""Issue 12 on the megatron backend, through the real CLI on tiny transformers models: Hugging Face
weights in at TP/PP/EP (each rank reading its slices), `primus eval` against transformers' forward,
`primus export` from torch_dist checkpoints of any layout (bit-exact round trip; a trained export
scores like its checkpoint), and checkpoints resuming under another tensor/pipeline layout."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.hf_models import (
    EVAL_BLOCKS,
    FAMILIES,
    assert_parity,
    eval_blocks,
    hf_tensors,
    last_eval,
    reference_eval,
    tiny_hf,
)
from tests.support import (
    CORPUS,
    assert_config_error,
    assert_ok,
    attempts,
    experiment_template,
    free_port,
    read_metrics,
    run_dir_for,
    run_primus,
    write_yaml,
)

pytestmark = pytest.mark.slow

EXPERIMENT = experiment_template("megatron", """\
    config: pre_trainer.yaml
    model: {{hf_path: {model}}}
    train: {{steps: {steps}, lr: 3.0e-3, min_lr: 3.0e-4, warmup_steps: 1, lr_schedule: cosine, micro_batch_size: 2,
             global_batch_size: 4, seq_length: 32, seed: 1234, grad_clip: 1.0, precision: fp32}}
    data: {data}
    checkpoint: {{interval: 100, resume: auto}}
    overrides:
      log_interval: 1
      eval_interval: 0
      # allgather: megatron-core's all-to-all dispatcher hands gloo tensors where it wants lists
      moe_token_dispatcher_type: allgather
""")


def experiment(tmp: Path, family: str, name: str = "exp", steps: int = 3) -> Path:
    model = tiny_hf(family)
    data = json.dumps({"path": str(CORPUS), "text_key": "text", "tokenizer": str(model)})
    return write_yaml(tmp / f"{name}.yaml", EXPERIMENT.format(name=name, workspace=tmp / "ws", model=model,
                                                              steps=steps, data=data))


def two(*layout: str) -> list[str]:
    return [*layout, "--nproc-per-node", "2", "--master-port", str(free_port())]


def evaluate(exp: Path, *args: str) -> dict:
    result = run_primus("eval", str(exp), "--max-blocks", str(EVAL_BLOCKS), *args)
    assert_ok(result)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def blocks() -> list[list[int]]:
    return eval_blocks()


@pytest.fixture(scope="module")
def references(blocks: list[list[int]]) -> dict[str, tuple[float, int]]:
    return {family: reference_eval(tiny_hf(family), blocks) for family in FAMILIES}


# ------------------------------------------------------------------------------------- weights in


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_of_the_hf_init_matches_transformers(family: str, tmp_path: Path, references: dict) -> None:
    record = evaluate(experiment(tmp_path, family))
    assert record["step"] is None and record["checkpoint"] == "init"
    assert_parity(record, references[family], f"megatron {family} TP=1")


@pytest.mark.parametrize("layout", ["parallel.tensor=2", "parallel.pipeline=2"])
def test_llama_eval_matches_transformers_when_sharded(layout: str, tmp_path: Path, references: dict) -> None:
    record = evaluate(experiment(tmp_path, "llama"), *two(layout))
    assert record["world_size"] == 2
    assert_parity(record, references["llama"], f"megatron llama {layout}")


def test_moe_eval_matches_transformers_under_expert_parallel(tmp_path: Path, references: dict) -> None:
    # each rank builds and loads 2 of the 4 experts of every layer
    record = evaluate(experiment(tmp_path, "qwen3_moe"), *two("parallel.expert=2"))
    assert_parity(record, references["qwen3_moe"], "megatron qwen3_moe EP=2")


def test_a_tokenizer_beyond_the_models_vocabulary_is_refused(tmp_path: Path) -> None:
    # the example tokenizer's ids reach 511; a model of 256 tokens cannot score them
    exp = experiment(tmp_path, "llama")
    result = run_primus("eval", str(exp), "vocab_size=256", "--max-blocks", "2")
    # exit 2 from the worker, the error its last line (the worker's start-up log precedes it)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("primus: error:") and "vocabulary has 256" in last, last
    assert "loaded" not in result.stderr  # refused before a model was built


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_qwen3_moe_routing_follows_norm_topk_prob(norm_topk_prob: bool) -> None:
    # renormalised top-k is megatron's softmax over the top-k logits; without it the top-k of the
    # softmax over every expert (pre-softmax): 1e-4 apart on the tiny model, so it matters
    from primus.models.hf import read_hf_config, spec_from_hf
    from primus_megatron.translate import MegatronTranslator

    config = {**read_hf_config(tiny_hf("qwen3_moe")), "norm_topk_prob": norm_topk_prob}
    native = MegatronTranslator().translate_model(spec_from_hf(config)).values
    assert native["moe_router_pre_softmax"] is (not norm_topk_prob)


def test_llama3_rope_scaling_of_another_shape_reaches_megatron() -> None:
    """megatron-core fixes the low/high frequency factors and original length (1, 4, 8192); other values are
    translated to the keys patch megatron.rope.llama3_shape applies (it was a refusal before that patch)."""
    from primus.models.hf import read_hf_config, spec_from_hf
    from primus_megatron.translate import MegatronTranslator

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 2.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    spec = spec_from_hf({**read_hf_config(tiny_hf("llama")), "rope_parameters": rope})
    native = MegatronTranslator().translate_model(spec).values
    assert native["use_rope_scaling"] is True and native["rope_scaling_low_freq_factor"] == 2.0


# ------------------------------------------------------------------------------------- weights out


@pytest.fixture(scope="module")
def untrained_tp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One step at learning rate 0 over 2 tensor-parallel ranks: a checkpoint of the loaded weights
    (its distributed-optimizer state per data-parallel shard, the default)."""
    base = tmp_path_factory.mktemp("mg-untrained")
    exp = experiment(base, "llama", steps=1)
    assert_ok(run_primus("run", str(exp), "lr=0", "min_lr=0", *two("parallel.tensor=2")))
    return run_dir_for(base / "ws", "exp")


def test_round_trip_through_a_tp2_checkpoint_is_exact(untrained_tp2: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    result = run_primus("export", str(untrained_tp2), str(out))
    assert_ok(result)
    assert "step 1" in result.stdout
    original, exported = hf_tensors(tiny_hf("llama")), hf_tensors(out)
    assert sorted(exported) == sorted(original)
    differ = [name for name in original if not original[name].equal(exported[name])]
    assert not differ, f"{len(differ)} tensors differ after the round trip, first {differ[0]}"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").is_file()


def test_per_shard_optimizer_state_at_another_tp_is_one_line(untrained_tp2: Path, tmp_path: Path) -> None:
    exp = experiment(tmp_path, "llama", steps=2)
    shutil.copytree(untrained_tp2, run_dir_for(tmp_path / "ws", "exp"))
    result = run_primus("run", str(exp))
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "ckpt_fully_parallel_save" in last and "tp 2 pp 1" in last and "tp 1 pp 1" in last, last


# ------------------------------------------------------------------------------------- trained, resharded


@pytest.fixture(scope="module")
def stopped_at_3(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """HF llama trained 3 of 6 steps at TP=2 and at PP=2 (exit_interval), with optimizer state any
    layout can resume (ckpt_fully_parallel_save: false), plus an uninterrupted one-process run."""
    base = tmp_path_factory.mktemp("mg-weights")
    runs = {}
    for name, layout in (("tp2", "parallel.tensor=2"), ("pp2", "parallel.pipeline=2")):
        exp = experiment(base, "llama", name=name, steps=6)
        assert_ok(run_primus("run", str(exp), "exit_interval=3", "ckpt_fully_parallel_save=false", *two(layout)))
        runs[name] = run_dir_for(base / "ws", name)
        runs[name + ".yaml"] = exp
    reference = experiment(base, "llama", name="ref", steps=6)
    assert_ok(run_primus("run", str(reference), "disable_last_saving=true"))
    runs["ref"] = run_dir_for(base / "ws", "ref")
    return runs


def test_trained_export_scores_like_its_checkpoint(stopped_at_3: dict[str, Path], tmp_path: Path,
                                                   blocks: list[list[int]]) -> None:
    run = stopped_at_3["tp2"]
    out = tmp_path / "hf"
    assert_ok(run_primus("export", str(run), str(out)))
    # the TP=2 checkpoint scored on one process; the export scored by transformers
    record = evaluate(stopped_at_3["tp2.yaml"], "--checkpoint", "latest")
    assert record["step"] == 3 and last_eval(run)["step"] == 3
    assert_parity(record, reference_eval(out, blocks), "megatron checkpoint vs transformers on its export")
    # training moved the weights: the init scores differently
    init = reference_eval(tiny_hf("llama"), blocks)
    assert not math.isclose(record["loss"], init[0] / init[1], rel_tol=1e-3)


def test_export_of_a_missing_step_is_one_line(stopped_at_3: dict[str, Path], tmp_path: Path) -> None:
    result = run_primus("export", str(stopped_at_3["tp2"]), "--step", "2", str(tmp_path / "out"))
    assert_config_error(result, "no checkpoint of step 2", "iter_0000003")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("saved", ["tp2", "pp2"])
def test_a_checkpoint_resumes_under_another_layout(saved: str, stopped_at_3: dict[str, Path],
                                                   tmp_path: Path) -> None:
    # a copy, so the other tests keep the stopped run; resumed on one process (TP=1, PP=1)
    exp = experiment(tmp_path, "llama", name=saved, steps=6)
    run = run_dir_for(tmp_path / "ws", saved)
    shutil.copytree(stopped_at_3[saved], run)
    result = run_primus("run", str(exp), "disable_last_saving=true")
    assert_ok(result)
    assert attempts(run / "metrics.jsonl")[2] == [4, 5, 6]
    resumed = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["step"] > 3}
    reference = {r["step"]: r["loss"] for r in read_metrics(stopped_at_3["ref"] / "metrics.jsonl") if r["step"] > 3}
    assert resumed == pytest.approx(reference, rel=1e-4)
