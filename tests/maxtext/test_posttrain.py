"""Issue 14 on the maxtext backend: full SFT from Hugging Face weights through MaxText's training step on
core's rows (primus_maxtext.posttrain), 1 and 2 host devices, unpacked and packed with isolated attention.

The reference is transformers on the same base model and core's own rows: the mean cross-entropy over the
trained (completion) tokens of every sample. The first step's loss MaxText reports is that number when its
batch holds every sample equally often, which each run's batch (all 32 unpacked rows, or the 16 packed
rows twice) does: so masked labels contribute nothing to the loss (or its gradients), the mean is over
trained tokens, and packing with segment ids is exact. Then the loss falls, and `<run dir>/hf/` loads in
transformers and scores lower than the base model on the same tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support import (
    ROOT,
    assert_config_error,
    assert_ok,
    experiment_template,
    run_dir_for,
    session_cache,
    write_yaml,
)

from .conftest import read_metrics, run_primus
from .test_weights import torch_python

pytestmark = pytest.mark.slow

INSTRUCTIONS = ROOT / "examples" / "data" / "instructions.jsonl"  # 32 prompt_completion records
SEQ = 32
STEPS = 12
EXPERIMENT = experiment_template("maxtext", """\
    config: sft_trainer.yaml
    model: {model}
    {settings}
    data: {data}
    overrides: {{attention: dot_product}}
""", module="post_trainer")
TRAIN = "train: {steps: %d, lr: 1.0e-2, micro_batch_size: %d, seq_length: %d, seed: 1234, log_interval: 1, precision: fp32}"

# Run by a Python with torch + transformers (and primus-core): make the base model, or score model
# directories on core's unpacked rows of the records: mean loss over trained labels, and over every label
# of the samples (what an unmasked loss would be).
HELPER = """
import json, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from primus.posttrain.data import IGNORE_INDEX, SFTData, tokenize
from tests.hf_models import make_tiny_hf
what, records, args = sys.argv[1], sys.argv[2], sys.argv[3:]
if what == "make":
    args = [str(make_tiny_hf("llama", Path(args[0])))]
out = {}
for directory in args:
    rows = tokenize(SFTData(records, None, None, int(SEQ), False, "right", directory),
                    AutoTokenizer.from_pretrained(directory))
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    trained = every = 0.0
    n_trained = n_every = 0
    for i in range(rows.count):
        row = rows.row(i)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0].double()
        labels = torch.tensor(row["labels"])
        nll = torch.nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        mask, real = labels != IGNORE_INDEX, torch.tensor(row["segment_ids"]) != 0
        trained += float(nll[mask].sum()); n_trained += int(mask.sum())
        targets = torch.tensor(row["input_ids"][1:] + [0])
        every_nll = torch.nn.functional.cross_entropy(logits[:-1], targets[:-1], reduction="none")
        every += float(every_nll[real[1:]].sum()); n_every += int(real[1:].sum())
    out[directory] = {"trained": trained / n_trained, "every": every / n_every, "rows": rows.count}
print(json.dumps(out))
""".replace("int(SEQ)", str(SEQ))


def helper(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([torch_python(), "-c", HELPER, *args], capture_output=True, text=True, timeout=300,
                            env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def base() -> tuple[Path, dict]:
    """The tiny Llama (random, saved with the example tokenizer) and transformers' numbers for it."""
    directory = session_cache() / "maxtext-sft-llama"
    return directory, helper("make", str(INSTRUCTIONS), str(directory))[str(directory)]


def fine_tune(tmp: Path, model: Path, *, name: str, devices: int, packing: bool) -> Path:
    micro = 32 // devices  # one step's batch: the 32 unpacked rows, or the 16 packed rows twice
    exp = write_yaml(tmp / f"{name}.yaml", EXPERIMENT.format(
        name=name, workspace=tmp / "ws", model=f"{{hf_path: {model}}}", settings=TRAIN % (STEPS, micro, SEQ),
        data=json.dumps({"path": str(INSTRUCTIONS), "packing": packing})))  # the tokenizer: hf_path's
    assert_ok(run_primus("train", "posttrain", "--config", str(exp), "--nproc-per-node", str(devices)))
    return run_dir_for(tmp / "ws", name)


@pytest.mark.parametrize(("devices", "packing"), [(1, False), (2, True)], ids=["1-device", "2-devices-packed"])
def test_sft_loss_is_the_mean_over_completion_tokens_and_falls(tmp_path, base, devices, packing):
    model, reference = base
    run = fine_tune(tmp_path, model, name=f"sft{devices}", devices=devices, packing=packing)
    losses = {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}
    assert sorted(losses) == list(range(1, STEPS + 1)), losses
    # step 1 is the base model on every sample: transformers' mean over the trained tokens only
    assert losses[1] == pytest.approx(reference["trained"], rel=1e-5), (losses[1], reference)
    assert abs(reference["every"] - reference["trained"]) > 0.01  # an unmasked loss would be told apart
    assert losses[STEPS] < 0.5 * losses[1], f"the completion loss did not fall: {losses}"
    config = (run / "maxtext" / "post_trainer.yml").read_text()
    assert "use_sft: true" in config and f"packing: {str(packing).lower()}" in config
    rows = [p for p in (run / "data-cache").iterdir() if p.suffix == ".bin"]
    assert len(rows) == 1  # tokenized once, cached in the run directory
    if devices == 1:
        # the fine-tuned model, as transformers loads it from <run dir>/hf/, learned the completions
        export = run / "hf"
        assert {"config.json", "tokenizer.json"} <= {p.name for p in export.iterdir()}
        scored = helper("score", str(INSTRUCTIONS), str(export))[str(export)]
        assert scored["trained"] < 0.5 * reference["trained"], (scored, reference)


def test_sft_example_validates_and_dry_runs(tmp_path):
    example = ROOT / "examples" / "maxtext" / "llama3_sft_tiny.yaml"
    workspace = f"workspace={tmp_path / 'ws'}"
    assert_ok(run_primus("config", "validate", str(example), workspace))
    assert_ok(run_primus("train", "posttrain", "--config", str(example), "--dry-run", workspace))
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize(("setting", "needle"), [
    ("finetune: {lora: {rank: 8}}", "does not do lora fine-tuning"),
    ("train: {eval_interval: 5}", "no held-out evaluation"),
], ids=["lora", "eval"])
def test_what_maxtext_post_training_cannot_do_is_refused(tmp_path, setting, needle):
    exp = write_yaml(tmp_path / "exp.yaml", EXPERIMENT.format(
        name="bad", workspace=tmp_path / "ws", model="llama3_tiny.yaml", settings=setting,
        data=json.dumps({"path": str(INSTRUCTIONS), "tokenizer": str(ROOT / "examples" / "data" / "tokenizer")})))
    assert_config_error(run_primus("train", "posttrain", "--config", str(exp)), needle)
    assert not (tmp_path / "ws").exists()


def test_rows_become_maxtexts_batch_arrays():
    from primus.posttrain.data import IGNORE_INDEX, build_rows
    from primus_maxtext.posttrain import maxtext_arrays

    # two samples packed into one row of 8 (+1): prompt tokens untrained, completions trained
    samples = [([5, 6, 7, 8], [False, False, True, True]), ([9, 10, 11], [False, True, True])]
    rows = build_rows(samples, 8, pad_id=1, packing=True)
    row = rows.row(0)
    isolated, causal = maxtext_arrays(rows, isolated=True), maxtext_arrays(rows, isolated=False)
    assert isolated["inputs"][0].tolist() == row["input_ids"] == [5, 6, 7, 8, 9, 10, 11, 1]
    assert isolated["inputs_position"][0].tolist() == row["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 7]
    assert isolated["inputs_segmentation"][0].tolist() == [1, 1, 1, 1, 2, 2, 2, 0]
    assert causal["inputs_segmentation"][0].tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    trained = [label != IGNORE_INDEX for label in row["labels"]]
    assert trained == [False, True, True, False, True, True, False, False]
    # the loss weight: the sample's segment where the label is trained, 0 elsewhere (the label itself is 0 there)
    assert isolated["targets_segmentation"][0].tolist() == [0, 1, 1, 0, 2, 2, 0, 0]
    assert isolated["targets"][0].tolist() == [0, 7, 8, 0, 10, 11, 0, 0]


def test_batches_visit_every_row_once_per_epoch_and_resume_where_they_stopped():
    from primus_maxtext.posttrain import batch_order

    batches = batch_order(10, 4, 0, shuffle=True, seed=3)
    seen = [i for _ in range(5) for i in next(batches)]  # two epochs
    assert sorted(seen[:10]) == sorted(seen[10:]) == list(range(10)) and seen[:10] != seen[10:]
    resumed = batch_order(10, 4, 3, shuffle=True, seed=3)  # a run resumed after 3 steps
    assert next(resumed) == seen[12:16]
    assert next(batch_order(10, 4, 0, shuffle=False, seed=3)) == [0, 1, 2, 3]
