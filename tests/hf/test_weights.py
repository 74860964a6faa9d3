"""Issue 12 on the hf backend: Hugging Face weights in and out, and `primus eval` against transformers.

Every number comes from the real CLI (`primus eval`, `primus run`, `primus export`) on the tiny
random models of tests.hf_models, compared with a plain transformers forward on the same blocks
(tests.hf_models.PARITY_RTOL relative) or tensor by tensor (exact)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.hf_models import (
    EVAL_BLOCKS,
    FAMILIES,
    SEQ_LENGTH,
    assert_parity,
    eval_blocks,
    hf_tensors,
    last_eval,
    reference_eval,
    tiny_hf,
)
from tests.support import (
    CORPUS,
    TOKENIZER,
    assert_config_error,
    assert_late_error,
    assert_ok,
    corpus_data,
    experiment_template,
    free_port,
    read_metrics,
    run_dir_for,
    run_primus,
    write_yaml,
)

pytestmark = pytest.mark.slow

EXPERIMENT = experiment_template("hf", """\
    model: {{hf_path: {model}}}
    train: {{steps: {steps}, lr: 1.0e-3, warmup_steps: 0, lr_schedule: constant, micro_batch_size: 2,
             global_batch_size: {global_batch}, seq_length: {seq}, seed: 1234, log_interval: 1}}
    data: {data}
    checkpoint: {{interval: {steps}}}
    overrides: {overrides}
""")


def experiment(base: Path, name: str, model: Path, *, steps: int = 3, global_batch: int = 4,
               overrides: str = "{}") -> tuple[Path, Path]:
    """An hf experiment on `model`'s weights and the example corpus; (its file, its run directory)."""
    path = write_yaml(base / f"{name}.yaml", EXPERIMENT.format(
        name=name, workspace=base / "ws", model=model, steps=steps, global_batch=global_batch, seq=SEQ_LENGTH,
        data=corpus_data(valid_fraction=0.0), overrides=overrides))
    return path, run_dir_for(base / "ws", name)


def primus_eval(exp: Path, *args: str) -> dict:
    result = run_primus("eval", str(exp), "--data", str(CORPUS), "--max-blocks", str(EVAL_BLOCKS),
                        "--master-port", str(free_port()), *args)
    assert_ok(result)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def blocks() -> list[list[int]]:
    return eval_blocks()


# --------------------------------------------------------------------------- eval parity


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_of_the_hf_init_matches_transformers(family: str, blocks, tmp_path: Path):
    exp, run = experiment(tmp_path, family, tiny_hf(family))
    record = primus_eval(exp)
    assert_parity(record, reference_eval(tiny_hf(family), blocks), f"hf {family}, 1 process")
    assert record["step"] is None and record["checkpoint"] == "init"
    assert last_eval(run) == record  # appended to the run's eval.jsonl


def test_eval_on_two_fsdp_processes_matches_transformers(blocks, tmp_path: Path):
    """7 blocks: the ranks score 4 and 3 (FSDP's extra forward on the short rank is not counted); the
    hf_path weights are read as per-rank slices (primus_hf.sharded_load). Two DDP processes split the
    blocks the same way with a whole model each: no case of their own (CI time)."""
    exp, _ = experiment(tmp_path, "llama", tiny_hf("llama"))
    result = run_primus("eval", str(exp), "--data", str(CORPUS), "--max-blocks", "7", "--nproc-per-node", "2",
                        "--master-port", str(free_port()), "parallel.fsdp=true")
    assert_ok(result)
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["world_size"] == 2
    # built on meta, sharded, then each rank read its rows (not from_pretrained)
    assert "each rank reads only its shards" in result.stderr
    assert_parity(record, reference_eval(tiny_hf("llama"), blocks[:7]), "hf llama, 2 processes fsdp")


# --------------------------------------------------------------------------- export


def test_export_names_match_transformers_on_disk_for_every_family():
    """A transformers 5 state dict in memory (fused experts, mlp.gate) -> the on-disk names, exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    from primus.models.hf import check_tensors, read_hf_config, spec_from_hf
    from primus_hf.export import to_hf_names

    for family in FAMILIES:
        model_dir = tiny_hf(family)
        spec = spec_from_hf(read_hf_config(model_dir))
        state = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).state_dict()
        exported = to_hf_names(state, spec)
        check_tensors(((n, tuple(t.shape)) for n, t in exported.items()), spec, family)
        originals = hf_tensors(model_dir)
        assert sorted(exported) == sorted(originals), family
        for name, tensor in originals.items():
            assert torch.equal(exported[name], tensor), (family, name)


def test_round_trip_hf_run_export_is_exact(tmp_path: Path):
    """qwen3_moe (fused experts in memory, per-expert on disk): HF -> one step at lr 0 -> export,
    by `checkpoint.export: hf` at the end of the run (the interval of 5 never saves: the last step's
    checkpoint is made for it) and by `primus export`."""
    import torch

    model = tiny_hf("qwen3_moe")
    exp, run = experiment(tmp_path, "roundtrip", model, steps=1, global_batch=2,
                          overrides="{learning_rate: 0.0}")
    assert_ok(run_primus("run", str(exp), "checkpoint.interval=5", "checkpoint.export=hf"))
    at_end = hf_tensors(run / "hf")
    assert sorted(at_end) == sorted(hf_tensors(model))
    assert all(torch.equal(at_end[n], t) for n, t in hf_tensors(model).items())
    out = tmp_path / "exported"
    result = run_primus("export", str(run), str(out))
    assert_ok(result)
    assert "step 1" in result.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_moe"
    exported, originals = hf_tensors(out), hf_tensors(model)
    assert sorted(exported) == sorted(originals)
    different = [n for n, t in originals.items() if not torch.equal(exported[n], t)]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """3 steps of llama from its HF init on 2 processes with FSDP (a sharded layout), checkpoint at
    the end; (experiment, run dir). Exported and evaluated on 1 process (DCP reshards 2 -> 1)."""
    base = tmp_path_factory.mktemp("trained")
    exp, run = experiment(base, "trained", tiny_hf("llama"), steps=3)
    assert_ok(run_primus("run", str(exp), "--nproc-per-node", "2", "--master-port", str(free_port()),
                         "parallel.fsdp=true"))
    return exp, run


def test_after_training_eval_of_the_export_equals_eval_of_the_checkpoint(trained, blocks, tmp_path: Path):
    exp, run = trained
    # FSDP's ranks saved the checkpoint as DCP shards, a file each: no rank gathered the whole model
    checkpoint = run / "checkpoints" / "checkpoint-3"
    assert not (checkpoint / "model.pt").exists() and (checkpoint / "shards" / ".metadata").is_file()
    assert len(list((checkpoint / "shards").glob("*.distcp"))) == 2
    record = primus_eval(exp, "--checkpoint", "latest")  # one process reads both ranks' shards
    assert record["step"] == 3 and record["checkpoint"] == "latest"
    out = tmp_path / "exported"
    assert_ok(run_primus("export", str(run), str(out)))
    reference = reference_eval(out, blocks)
    assert_parity(record, reference, "hf checkpoint-3 vs its export through transformers")
    init = reference_eval(tiny_hf("llama"), blocks)
    assert record["loss"] < init[0] / init[1] - 0.01  # the weights trained: not the init exported again
    # the export equals the run's own save_pretrained output, tensor by tensor
    import torch

    saved, exported = hf_tensors(run / "model"), hf_tensors(out)
    assert sorted(saved) == sorted(exported) and all(torch.equal(saved[n], exported[n]) for n in saved)
    # and it generates with its own tokenizer (copied by export)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    prompt = tokenizer("This is a story about", return_tensors="pt").input_ids
    generated = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == prompt.shape[1] + 5
    assert isinstance(tokenizer.decode(generated[0, prompt.shape[1]:]), str)


def test_first_step_loss_on_eval_blocks_equals_eval_of_the_init(blocks, tmp_path: Path):
    """`data_blocks: eval` trains on core's evaluation blocks in file order: step 1 of a global batch
    of 4 (2 micro batches of 2) scores exactly the first 4 blocks, so its loss is the eval loss of
    the init on them; this is the number to compare backends with."""
    exp, run = experiment(tmp_path, "first", tiny_hf("llama"), steps=1,
                          overrides="{data_blocks: eval, save_strategy: 'no', disable_last_saving: true}")
    assert_ok(run_primus("run", str(exp), "train.micro_batch_size=2", "train.global_batch_size=4"))
    first = read_metrics(run / "metrics.jsonl")[0]
    loss_sum, tokens = reference_eval(tiny_hf("llama"), blocks[:4])
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)


# --------------------------------------------------------------------------- bad input


def test_eval_of_latest_without_a_checkpoint_is_one_line(tmp_path: Path):
    exp, run = experiment(tmp_path, "nockpt", tiny_hf("llama"))
    result = run_primus("eval", str(exp), "--data", str(CORPUS), "--checkpoint", "latest")
    assert_late_error(result, str(run / "checkpoints"), "no complete checkpoint")


def test_export_without_a_checkpoint_is_one_line_and_writes_nothing(trained, tmp_path: Path):
    _, run = trained
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    out = tmp_path / "out"
    assert_config_error(run_primus("export", str(empty), str(out)), str(empty / "checkpoints"),
                        "no complete checkpoint")
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert_config_error(run_primus("export", str(run), str(out), "--step", "2"), "no complete checkpoint of step 2")


def test_eval_with_a_tokenizer_larger_than_the_model_is_one_line(tmp_path: Path):
    """The model's 512 tokens against a tokenizer of 600: exit 2 before any block is scored."""
    tokenizer = tmp_path / "big-tokenizer"
    tokenizer.mkdir()
    data = json.loads((TOKENIZER / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    for i in range(600 - len(vocab)):
        vocab[f"extra{i}"] = len(vocab)
    (tokenizer / "tokenizer.json").write_text(json.dumps(data))
    (tokenizer / "tokenizer_config.json").write_text((TOKENIZER / "tokenizer_config.json").read_text())
    exp, _ = experiment(tmp_path, "bigtok", tiny_hf("llama"))
    result = run_primus("eval", str(exp), "--data", str(CORPUS), f"data.tokenizer={tokenizer}")
    assert_config_error(result, "600 tokens", "vocab_size is 512")
