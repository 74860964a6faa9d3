"""Issue 14 on the torchtitan backend: full supervised fine-tuning with loss masking, from Hugging Face
weights to a Hugging Face model, through the real CLI (`primus train posttrain`).

Every step of these runs reads every sample of a toy instruction set (global batch = all rows), so
a step's loss is the mean over all trained tokens whatever the batching, and full-batch training
gives the same losses however the samples are laid out. One process with one sample per row is
checked against transformers' own loss on the same masked rows; two FSDP processes with packed,
isolated rows (different trained-token counts per rank) must follow the same loss curve.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.hf_models import tiny_hf
from tests.support import (
    EXAMPLES,
    assert_ok,
    experiment_template,
    free_port,
    read_metrics,
    run_dir_for,
    run_primus,
    write_yaml,
)

SEQ = 32
STEPS = 10
#: names of the example corpus; one to four reversed per record, so responses (and the trained
#: tokens of a row, or of a rank) differ in length
WORDS = ["Ada", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivo", "June", "Kofi", "Lena"]
EXPERIMENT = experiment_template("torchtitan", """\
    config: sft_trainer.yaml
    model: {{hf_path: {model}}}
    train: {{steps: {steps}, lr: 6.0e-3, warmup_steps: 1, micro_batch_size: {micro}, seq_length: {seq}, seed: 1234,
             log_interval: 1, precision: fp32}}
    data: {data}
    overrides:
      activation_checkpoint: {{mode: none}}
      optimizer: {{implementation: foreach}}
""").replace("  pre_trainer:\n", "  post_trainer:\n")


def toy_records(count: int = 16) -> list[dict[str, str]]:
    rng = random.Random(14)
    out = []
    for i in range(count):
        words = rng.sample(WORDS, 1 + i % 4)
        out.append({"prompt": f"reverse: {' '.join(words)} ->", "completion": " " + " ".join(reversed(words))})
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_records()))
    return path


def rows(toy: Path, *, packing: bool):
    """Core's rows of the toy set for the tiny model's tokenizer (what the runs train on)."""
    from transformers import AutoTokenizer

    from primus.posttrain.data import SFTData, tokenize

    model = tiny_hf("llama")
    request = SFTData(str(toy), "prompt_completion", None, SEQ, packing, "right", str(model))
    return tokenize(request, AutoTokenizer.from_pretrained(str(model)))


def experiment(tmp: Path, toy: Path, name: str, *, micro: int, packing: bool = False, steps: int = STEPS) -> Path:
    data = {"path": str(toy), **({"packing": True} if packing else {})}
    return write_yaml(tmp / f"{name}.yaml", EXPERIMENT.format(name=name, workspace=tmp / "ws", model=tiny_hf("llama"),
                                                              steps=steps, micro=micro, seq=SEQ, data=json.dumps(data)))


def losses(exp: Path, name: str) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir_for(exp.parent / "ws", name) / "metrics.jsonl")]


def masked_loss(model_dir: Path, toy: Path, *, masked: bool = True) -> float:
    """transformers' mean cross-entropy over the trained tokens of every unpacked row (masked), or over
    every token of the samples (not masked)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    data = rows(toy, packing=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(data.count):
            row = data.row(i)
            following = zip(row["input_ids"][1:] + [0], row["segment_ids"][1:] + [0], strict=True)
            labels = torch.tensor(row["labels"] if masked else [t if s else -100 for t, s in following])
            logits = model(torch.tensor([row["input_ids"]]), position_ids=torch.tensor([row["position_ids"]])).logits[0]
            total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, toy: Path) -> Path:
    """1 process, one sample per row, every row in each step."""
    tmp = tmp_path_factory.mktemp("one")
    exp = experiment(tmp, toy, "one", micro=rows(toy, packing=False).count)
    assert_ok(run_primus("train", "posttrain", "--config", str(exp)))
    return exp


def test_step_loss_is_transformers_mean_over_trained_tokens_and_falls(one_process: Path, toy: Path) -> None:
    got = losses(one_process, "one")
    reference = masked_loss(tiny_hf("llama"), toy)
    assert got[0] == pytest.approx(reference, rel=1e-5)
    # the tolerance tells the masked mean from the mean over every token of the samples (0.6% apart
    # on the random model), so a prompt token counted would fail it
    assert abs(masked_loss(tiny_hf("llama"), toy, masked=False) - reference) > 1e-3 * reference
    assert len(got) == STEPS and got[-1] < 0.6 * got[0], got


def test_export_is_the_fine_tuned_model_for_transformers(one_process: Path, toy: Path) -> None:
    run = run_dir_for(one_process.parent / "ws", "one")
    tuned = masked_loss(run / "hf", toy)  # loads with transformers (config, safetensors, tokenizer)
    assert (run / "hf" / "tokenizer.json").is_file()
    assert tuned < losses(one_process, "one")[-1] < 0.6 * masked_loss(tiny_hf("llama"), toy)


def test_fsdp_with_packed_isolated_rows_follows_the_same_losses(tmp_path: Path, toy: Path, one_process: Path) -> None:
    """Two FSDP ranks, packed rows (5 or 9 trained tokens each, so the ranks' counts differ): the
    loss is still the mean over the global batch's trained tokens, and packed samples do not see
    each other, so full-batch training matches the unpacked single process step by step."""
    packed = rows(toy, packing=True).count
    assert packed < rows(toy, packing=False).count and packed % 2 == 0
    exp = experiment(tmp_path, toy, "fsdp", micro=packed // 2, packing=True)
    assert_ok(run_primus("train", "posttrain", "--config", str(exp), "parallel.fsdp=true", "--nproc-per-node", "2",
                         "--master-port", str(free_port())))
    assert losses(exp, "fsdp") == pytest.approx(losses(one_process, "one"), rel=1e-5)


def test_masked_labels_contribute_nothing(toy: Path) -> None:
    """The batches TorchTitan trains on, through its own loss: prompt tokens changed (as labels)
    leave the loss and its gradient unchanged, and no gradient reaches a masked position."""
    import torch
    from torchtitan.components.loss import CrossEntropyLoss

    from primus_torchtitan.posttrain import SFTRowsDataset

    data = rows(toy, packing=False)
    changed = rows(toy, packing=False)
    for i, trained in enumerate(changed.trainable):
        if not trained:
            changed.tokens[i] = (changed.tokens[i] + 7) % 512
    loss_fn = CrossEntropyLoss.Config(global_vocab_size=512).build()
    logits = torch.randn(1, SEQ, 512, generator=torch.Generator().manual_seed(0))

    def loss_and_grad(source):
        batch, labels = SFTRowsDataset(source, seq_len=SEQ, seed=1, dp_rank=0, dp_world=1, batch=1,
                                       isolated=True).sample(3)
        pred = logits.clone().requires_grad_(True)
        loss, _ = loss_fn(pred, labels[None], (labels != -100).sum())
        loss.backward()
        return batch, labels, float(loss.detach()), pred.grad

    batch, labels, loss, grad = loss_and_grad(data)
    other_batch, _, other_loss, other_grad = loss_and_grad(changed)
    assert not torch.equal(batch["input"], other_batch["input"])  # the prompt did change
    assert other_loss == loss and torch.equal(other_grad, grad)
    assert (labels == -100).any() and not grad[0, labels == -100].any()


@pytest.mark.parametrize(("items", "needles"), [
    (["finetune.method=lora"], ["finetune.method", "lora"]),
    (["data.packing=true", "model.attn_backend=sdpa"], ["model.attn_backend", "document masks"]),
    (["train.eval_interval=5"], ["train.eval_interval", "no validation set"]),
])
def test_what_torchtitan_cannot_fine_tune_is_refused(tmp_path: Path, toy: Path, items: list[str],
                                                     needles: list[str]) -> None:
    from primus.config.resolve import resolve
    from primus.errors import ConfigError

    exp = experiment(tmp_path, toy, "bad", micro=2)
    assert resolve(exp).modules["post_trainer"].native["dataloader"]["dataset"] == "primus_sft"
    with pytest.raises(ConfigError) as error:
        resolve(exp, items)
    assert all(n in str(error.value) for n in needles), str(error.value)


def test_example_resolves() -> None:
    from primus.config.resolve import resolve

    (example,) = (EXAMPLES / "torchtitan").glob("*sft*tiny*.yaml")
    module = resolve(example).modules["post_trainer"]
    assert module.kind == "posttrain" and module.module.checkpoint.export == "hf"
