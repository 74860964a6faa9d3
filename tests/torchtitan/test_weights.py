"""Issue 12 on the torchtitan backend: Hugging Face weights in (each rank reading its own slices),
`primus eval` against transformers, `primus export` from DCP checkpoints of any layout, and a
checkpoint saved under FSDP resuming on one process. Real CLI, tiny transformers models."""

from __future__ import annotations

import functools
import json
from importlib.util import find_spec
from pathlib import Path

import pytest

from tests.hf_models import assert_parity, eval_blocks, hf_tensors, last_eval, reference_eval, tiny_hf
from tests.support import (
    CORPUS,
    assert_config_error,
    assert_ok,
    experiment_template,
    free_port,
    read_metrics,
    run_dir_for,
    run_primus,
    write_yaml,
)

EXPERIMENT = experiment_template("torchtitan", """\
    config: pre_trainer.yaml
    model: {{hf_path: {model}}}
    train: {{steps: {steps}, lr: 1.0e-2, warmup_steps: 1, micro_batch_size: 2, global_batch_size: 4, seq_length: 32,
             seed: 1234, log_interval: 1, precision: fp32}}
    data: {data}
    checkpoint: {{interval: {interval}, resume: auto}}
    overrides:
      activation_checkpoint: {{mode: none}}
      optimizer: {{implementation: foreach}}
""")
TWO = {"one": [], "fsdp": ["parallel.fsdp=true"], "tp": ["parallel.tensor=2"]}


def experiment(tmp: Path, family: str, *, name: str = "exp", steps: int = 3, interval: int = 100,
               mock: bool = False) -> Path:
    model = tiny_hf(family)
    data = "{mock: true}" if mock else json.dumps({"path": str(CORPUS), "text_key": "text", "tokenizer": str(model)})
    return write_yaml(tmp / f"{name}.yaml", EXPERIMENT.format(name=name, workspace=tmp / "ws", model=model, steps=steps,
                                                              interval=interval, data=data))


def procs(layout: str) -> list[str]:
    return [*TWO[layout], "--nproc-per-node", "2", "--master-port", str(free_port())] if TWO[layout] else []


@pytest.fixture(scope="module")
def blocks() -> list[list[int]]:
    return eval_blocks()


@pytest.fixture(scope="module")
def reference(blocks):
    """transformers' (summed loss, tokens) of a family's tiny model, computed once per module."""
    return functools.cache(lambda family: reference_eval(tiny_hf(family), blocks))


@pytest.mark.parametrize("family,layout", [("llama", "one"), ("llama", "fsdp"), ("llama", "tp"), ("qwen3", "one")])
def test_eval_of_hf_init_matches_transformers(tmp_path: Path, blocks, reference, family: str, layout: str) -> None:
    exp = experiment(tmp_path, family)
    assert_ok(run_primus("eval", str(exp), "--max-blocks", str(len(blocks)), *procs(layout)))
    record = last_eval(run_dir_for(tmp_path / "ws", "exp"))
    assert record["step"] is None and record["checkpoint"] == "init"
    assert_parity(record, reference(family), f"torchtitan {family} {layout}")


def test_round_trip_from_an_fsdp_checkpoint_is_exact(tmp_path: Path) -> None:
    # lr 0 (TorchTitan's own key: train.lr must be positive): one optimizer step under FSDP 2 leaves
    # every weight as loaded, and the checkpoint is sharded over the two ranks
    exp = experiment(tmp_path, "llama", steps=1)
    assert_ok(run_primus("run", str(exp), "optimizer.lr=0", *procs("fsdp")))
    out = tmp_path / "export"
    result = run_primus("export", str(run_dir_for(tmp_path / "ws", "exp")), str(out))
    assert_ok(result)
    assert "step 1" in result.stdout
    run = run_dir_for(tmp_path / "ws", "exp")
    assert_config_error(run_primus("export", str(run), str(tmp_path / "other"), "--step", "7"),
                        "no complete checkpoint of step 7", str(run / "checkpoints"))
    assert not (tmp_path / "other").exists()
    original, exported = hf_tensors(tiny_hf("llama")), hf_tensors(out)
    assert sorted(exported) == sorted(original)
    different = [n for n in original if not (exported[n].dtype == original[n].dtype and
                                             exported[n].shape == original[n].shape and
                                             bool((exported[n] == original[n]).all()))]
    assert not different, f"changed by the round trip: {different}"


def test_trained_tp_checkpoint_exports_what_eval_scores(tmp_path: Path, blocks, reference) -> None:
    # 3 steps under TP 2 (a TP-sharded checkpoint); export in one process; transformers' loss of the
    # export equals `primus eval --checkpoint latest` in one process (DCP reshards TP 2 -> 1)
    exp = experiment(tmp_path, "qwen3")
    assert_ok(run_primus("run", str(exp), *procs("tp")))
    run = run_dir_for(tmp_path / "ws", "exp")
    out = tmp_path / "export"
    assert_ok(run_primus("export", str(run), str(out)))
    trained, original = hf_tensors(out), hf_tensors(tiny_hf("qwen3"))
    assert not bool((trained["model.layers.0.self_attn.q_proj.weight"]
                     == original["model.layers.0.self_attn.q_proj.weight"]).all()), "training changed nothing"
    assert_ok(run_primus("eval", str(exp), "--checkpoint", "latest", "--max-blocks", str(len(blocks))))
    record = last_eval(run)
    assert record["step"] == 3 and record["checkpoint"] == "latest"
    assert_parity(record, reference_eval(out, blocks), "torchtitan qwen3 step 3 vs its export in transformers")
    init_loss, tokens = reference("qwen3")
    assert abs(record["loss"] - init_loss / tokens) > 1e-3, "the score did not move from the init's"


def test_fsdp_checkpoint_resumes_on_one_process(tmp_path: Path) -> None:
    # uninterrupted: 6 steps on one process (global batch 4 = 2 micro-batches of 2); split: 3 steps
    # under FSDP 2 (2 ranks x 2), then resumed on one process from that sharded checkpoint
    whole = experiment(tmp_path, "llama", name="whole", steps=6, interval=3, mock=True)
    assert_ok(run_primus("run", str(whole)))
    split = experiment(tmp_path, "llama", name="split", steps=6, interval=3, mock=True)
    assert_ok(run_primus("run", str(split), "training.exit_at_step=3", *procs("fsdp")))
    assert_ok(run_primus("run", str(split)))
    expected = {m["step"]: m["loss"] for m in read_metrics(run_dir_for(tmp_path / "ws", "whole") / "metrics.jsonl")}
    lines = read_metrics(run_dir_for(tmp_path / "ws", "split") / "metrics.jsonl")
    assert [(m["attempt"], m["step"]) for m in lines] == [(1, 1), (1, 2), (1, 3), (2, 4), (2, 5), (2, 6)]
    for m in lines:
        assert m["loss"] == pytest.approx(expected[m["step"]], abs=1e-5), (m["step"], m["loss"], expected[m["step"]])


def config_only(tmp: Path, family: str) -> Path:
    """A model directory with the tiny model's config.json and no weights: enough to be refused."""
    from tests.hf_models import _COMMON, CONFIGS

    directory = tmp / f"hf-{family}"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({**_COMMON, **CONFIGS[family]}))
    return directory


def test_refusals_are_one_line(tmp_path: Path) -> None:
    for family, needle in (("qwen3_moe", "moe of a qwen3 model are not built by the torchtitan"),
                           ("qwen2", "'qwen2' is not supported by the torchtitan")):  # q/k/v biases
        exp = write_yaml(tmp_path / f"{family}.yaml", EXPERIMENT.format(
            name=family, workspace=tmp_path / "ws", model=config_only(tmp_path, family), steps=1, interval=1,
            data="{mock: true}"))
        # the refusal names the installed backends that build the family (none in the torchtitan session)
        builders = ["megatron"] if find_spec("primus_megatron") is not None else []
        assert_config_error(run_primus("run", str(exp), "--dry-run"), needle, *builders)
