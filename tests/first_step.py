"""The first training step, defined once for every backend (issue 12: "the first-step training loss of
the four backends from the same init and same batch agrees to 1e-4").

- **Init.** `tiny_hf("llama")` (tests/hf_models.py: transformers' random Llama, seed 0, fp32), rebuilt
  in every backend's test session; `FIRST_STEP_LOSS` pins transformers' loss on it, so a session whose
  torch or transformers made another model fails here instead of comparing against a different one.
- **Batch.** Pretraining-style rows through core's post-training data (primus.posttrain.data, the
  same rows on every backend): the first `ROWS` documents of the example corpus as prompt_completion
  records with an empty prompt, each cut to `SEQ_LENGTH + 1` tokens, so every row is full and every
  predicted token is trained (a plain causal-LM loss, no mask, no padding). Each backend reads the rows
  in its own seeded order; the global batch is every row (`ROWS` = micro = global batch, one process),
  so step 1 scores exactly these rows, once each, whatever that order.
- **Reference.** transformers' mean cross-entropy over every predicted token of the rows: the number
  each backend's step-1 loss (its metrics.jsonl) must equal to `FIRST_STEP_RTOL` relative. The four
  backends agree with each other through it.

Imported as `tests.first_step` by the torch sessions; the maxtext session (Python 3.12, no torch) runs
`python -m tests.first_step DIR` with a torch Python, which makes the model in DIR and the data beside
it and prints {"model", "data", "loss"} as JSON.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from tests.hf_models import PARITY_RTOL, SEQ_LENGTH
from tests.support import CORPUS, experiment_template, read_metrics, write_yaml

ROWS = 8
#: the issue asks 1e-4; held to the eval parity's 1e-6 (a RoPE or normalisation slip moves the loss 1e-5
#: to 1e-4 on these models), which every backend meets with room: hf 1.1e-7, megatron 3e-8, torchtitan 3e-8,
#: maxtext 1.8e-7 (fp32, CPU)
FIRST_STEP_RTOL = PARITY_RTOL
#: transformers' loss on the batch (torch 2.13, transformers 5). A model that ignored the weights is far
#: from it: uniform logits (ln 512) 4.4e-3, the same Llama made with seed 1 1.3e-3
FIRST_STEP_LOSS = 6.2660992
#: how far the pin may move between CPUs (fp32 kernels differ in the last bits)
PIN_RTOL = 1e-6

#: the settings that pin the first batch: every row in one global batch, one process, fp32
TRAIN = {"steps": 1, "lr": 1.0e-3, "micro_batch_size": ROWS, "global_batch_size": ROWS, "seq_length": SEQ_LENGTH,
         "seed": 1234, "log_interval": 1, "precision": "fp32"}
#: per backend: native keys that keep a one-step CPU run plain (none changes the first step's loss)
OVERRIDES: dict[str, dict[str, Any]] = {
    "hf": {},
    "megatron": {"log_interval": 1},
    "torchtitan": {"activation_checkpoint": {"mode": "none"}, "optimizer": {"implementation": "foreach"}},
    "maxtext": {"attention": "dot_product"},
}


def write_data(path: Path) -> Path:
    """The first ROWS corpus documents as prompt_completion records, every token a completion token."""
    records = []
    with CORPUS.open() as f:
        for line in f:
            records.append({"prompt": "", "completion": json.loads(line)["text"]})
            if len(records) == ROWS:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rows(model_dir: Path, data: Path) -> Any:
    """Core's rows of `data` with the model's tokenizer: what every backend trains on."""
    from transformers import AutoTokenizer

    from primus.posttrain.data import SFTData, tokenize

    request = SFTData(path=str(data), format="prompt_completion", chat_template=None, seq_length=SEQ_LENGTH,
                      packing=False, truncation="right", tokenizer_dir=str(model_dir))
    return tokenize(request, AutoTokenizer.from_pretrained(str(model_dir)))


def reference_loss(model_dir: Path, data: Path) -> float:
    """transformers' mean loss over every predicted token of the batch; checks the batch is pretraining-style."""
    import torch
    from transformers import AutoModelForCausalLM

    from primus.posttrain.data import IGNORE_INDEX

    batch = rows(model_dir, data)
    assert batch.count == ROWS, f"{batch.count} rows, not {ROWS}"
    got = [batch.row(i) for i in range(ROWS)]
    ids = torch.tensor([r["input_ids"] for r in got])
    labels = torch.tensor([r["labels"] for r in got])
    assert ids.shape == (ROWS, SEQ_LENGTH) and bool((labels != IGNORE_INDEX).all()), "a row is short or masked"
    assert torch.equal(labels[:, :-1], ids[:, 1:]), "labels are not the next tokens"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))


def check_pin(loss: float) -> None:
    assert math.isclose(loss, FIRST_STEP_LOSS, rel_tol=PIN_RTOL), (
        f"transformers' first-step loss is {loss!r}, not the pinned {FIRST_STEP_LOSS!r}: this session's tiny "
        "Llama differs from the other backends' (torch/transformers changed its init); update FIRST_STEP_LOSS "
        "in tests/first_step.py once every session agrees")


def reference(model_dir: Path, data: Path) -> float:
    loss = reference_loss(model_dir, data)
    check_pin(loss)
    return loss


def experiment(tmp: Path, framework: str, model_dir: Path, data: Path, name: str = "first") -> Path:
    """A post_trainer module of `framework`: one step on the batch, from the model's Hugging Face weights."""
    body = ("    config: sft_trainer.yaml\n    model: {model}\n    train: {train}\n    data: {data}\n"
            "    overrides: {overrides}\n")
    text = experiment_template(framework, body, module="post_trainer").format(
        name=name, workspace=tmp / "ws", model=json.dumps({"hf_path": str(model_dir)}), train=json.dumps(TRAIN),
        data=json.dumps({"path": str(data), "format": "prompt_completion"}),
        overrides=json.dumps(OVERRIDES[framework]))
    return write_yaml(tmp / f"{name}.yaml", text)


def assert_first_step(run_dir: Path, expected: float, what: str) -> None:
    """Step 1's loss in the run's metrics.jsonl equals `expected` to FIRST_STEP_RTOL."""
    first = read_metrics(run_dir / "metrics.jsonl")[0]
    assert first["step"] == 1, first
    diff = abs(first["loss"] - expected) / expected
    print(f"{what}: step-1 loss {first['loss']:.7f}, transformers {expected:.7f}, relative {diff:.1e}")
    assert diff <= FIRST_STEP_RTOL, (f"{what}: step-1 loss {first['loss']:.7f} vs transformers {expected:.7f} "
                                     f"(relative {diff:.1e} > {FIRST_STEP_RTOL})")


def check_backend(tmp: Path, framework: str) -> None:
    """The whole test of a torch backend: `primus run` of the step, its loss against the reference."""
    from tests.hf_models import tiny_hf
    from tests.support import assert_ok, run_dir_for, run_primus

    model, data = tiny_hf("llama"), write_data(tmp / "first-step.jsonl")
    assert_ok(run_primus("run", str(experiment(tmp, framework, model, data))))
    assert_first_step(run_dir_for(tmp / "ws", "first"), reference(model, data), framework)


def main(directory: str) -> None:
    from tests.hf_models import make_tiny_hf

    model = Path(directory)
    if not (model / "model.safetensors").is_file():
        make_tiny_hf("llama", model)
    data = write_data(model.parent / f"{model.name}-first-step.jsonl")
    print(json.dumps({"model": str(model), "data": str(data), "loss": reference(model, data)}))


if __name__ == "__main__":
    main(sys.argv[1])
