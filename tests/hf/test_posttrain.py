"""Post-training on the hf backend (issue 14): full SFT and LoRA through `primus train posttrain`, answered
back through `primus generate`, on the bundled toy instruction set (examples/data/instructions.jsonl:
"reverse: Ada Bruno Chen ->" -> " Chen Bruno Ada").

The base model is a tiny random Llama saved with the example tokenizer, initialised with a larger
initializer_range (0.2) than transformers' 0.02: LoRA leaves the output layer frozen, and a near-zero
random output layer cannot express a confident answer whatever the adapters do (a pretrained model's can).
Each trained run is shared by the tests that read it (module fixtures)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    EXAMPLES,
    TOKENIZER,
    assert_config_error,
    assert_ok,
    free_port,
    read_jsonl,
    read_metrics,
    run_dir_for,
    run_primus,
    session_cache,
)

pytestmark = pytest.mark.slow

INSTRUCTIONS = EXAMPLES / "data" / "instructions.jsonl"
STEPS = 150
LORA = "{method: lora, lora: {rank: 8, alpha: 16, merge: true}}"

EXPERIMENT = """
work_group: team
user_name: me
exp_name: {name}
workspace: {workspace}
modules:
  post_trainer:
    framework: hf
    config: sft_trainer.yaml
    model: {model}
    train: {{steps: {steps}, lr: {lr}, warmup_steps: 10, lr_schedule: cosine, micro_batch_size: {micro},
             global_batch_size: 8, seq_length: {seq}, seed: 1234, log_interval: 10}}
    data: {data}
    finetune: {finetune}
    checkpoint: {checkpoint}
"""


def write_sft(directory: Path, name: str, *, model: str | None = None, steps: int = STEPS, lr: float = 3e-3,
              micro: int = 8, seq: int = 64, data: dict[str, Any] | None = None, finetune: str = "{}",
              checkpoint: str = "{}") -> Path:
    path = directory / f"{name}.yaml"
    path.write_text(EXPERIMENT.format(
        name=name, workspace=directory / "ws", model=model or json.dumps({"hf_path": str(base_model())}),
        steps=steps, lr=lr, micro=micro, seq=seq, data=json.dumps(data or {"path": str(INSTRUCTIONS), "packing": True}),
        finetune=finetune, checkpoint=checkpoint).lstrip())
    return path


def base_model() -> Path:
    """The tiny Llama every test fine-tunes (made once per session; never written into)."""
    directory = session_cache() / "sft-base"
    if (directory / "model.safetensors").is_file():
        return directory
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                  max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0,
                                  eos_token_id=0, pad_token_id=1, initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = directory.with_name(".sft-base.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for file in TOKENIZER.iterdir():
        shutil.copyfile(file, tmp / file.name)
    tmp.rename(directory)
    return directory


def train(path: Path, *extra: str) -> Path:
    result = run_primus("train", "posttrain", "--config", str(path), *extra)
    assert_ok(result)
    return run_dir_for(path.parent / "ws", path.stem)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full SFT of the base model, packed rows (isolated attention), 150 steps."""
    return train(write_sft(tmp_path_factory.mktemp("full"), "full"))


def lora_experiment(directory: Path) -> Path:
    """LoRA (rank 8 on every linear layer) of the base, merged at the end; every step logged."""
    return write_sft(directory, "lora", lr=1e-2, finetune=LORA, checkpoint="{resume: auto}")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(lora_experiment(tmp_path_factory.mktemp("lora")), "train.log_interval=1")


def _accuracy(run_dir: Path) -> float:
    result = run_primus("generate", str(run_dir), "--prompts", str(INSTRUCTIONS), "--max-new-tokens", "5")
    assert_ok(result)
    answers = {r["prompt"]: r["completion"] for r in read_jsonl_text(result.stdout)}
    expected = {r["prompt"]: r["completion"].strip() for r in read_jsonl(INSTRUCTIONS)}
    assert set(answers) == set(expected)
    return sum(answers[p] == expected[p] for p in expected) / len(expected)


def read_jsonl_text(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("which", ["full", "lora merged", "lora adapter"])
def test_fine_tuned_model_answers_the_training_prompts(which: str, request: pytest.FixtureRequest,
                                                       tmp_path: Path):
    """>= 90% exact answers under greedy `primus generate`: the full fine-tune's hf/, the LoRA run's merged
    hf/, and (hf/ taken away) its adapter/ on the base model through peft. The loss on the response tokens
    falls from an untrained model's (about ln 512) to near zero."""
    run = request.getfixturevalue("full_run" if which == "full" else "lora_run")
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert losses[0] > 5.0 and losses[-1] < 0.1, losses
    if which == "lora adapter":
        copy = tmp_path / "run"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("hf", "checkpoints"))
        run = copy
    assert _accuracy(run) >= 0.9


def test_full_run_exports_a_hugging_face_model(full_run: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(full_run / "hf"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(AutoTokenizer.from_pretrained(str(full_run / "hf"))) == 512
    assert not (full_run / "adapter").exists()


def test_lora_keeps_the_base_weights_and_the_merge_equals_base_plus_adapter(lora_run: Path):
    """The frozen weights after training are bit-identical to the base model's (the run logs a digest of them,
    compared here with one of the base's safetensors); peft loads the adapter; the merged hf/ gives the logits
    of base + adapter to 1e-5 (relative to the largest logit), and they are not the base's."""
    import hashlib

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = load_file(str(base_model() / "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(base):
        digest.update(name.encode())
        digest.update(base[name].contiguous().view(torch.uint8).numpy().tobytes())
    log = (lora_run / "logs" / "post_trainer" / "rank-0" / "primus.log").read_text()
    assert f"base weights bit-identical after training (frozen weights sha256 {digest.hexdigest()})" in log
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and len(config["target_modules"]) == 7

    ids = torch.tensor([[5, 17, 99, 230, 41, 7, 300, 12]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(str(base_model())).eval()
        base_logits = plain(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(plain, str(lora_run / "adapter")).eval()
        adapter_logits = adapted(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(lora_run / "hf")).eval()(input_ids=ids).logits
    # 1e-5 of the logits' scale (about 10 here): fp32 rounds W + s B A and W x + s B (A x) differently
    assert torch.allclose(merged, adapter_logits, atol=1e-5 * float(adapter_logits.abs().max()), rtol=0), \
        (merged - adapter_logits).abs().max()
    assert (adapter_logits - base_logits).abs().max() > 0.1


def test_a_stopped_lora_run_resumes_to_the_uninterrupted_losses(lora_run: Path, tmp_path: Path):
    """The LoRA experiment stopped after step 3 checkpoints the adapter and its optimizer state only (a fraction of
    the model's size); resumed (and stopped again after step 6) it logs the uninterrupted run's losses bit for bit;
    `primus export` merges the checkpoint's adapter into the base."""
    import torch

    path = lora_experiment(tmp_path)
    run = train(path, "train.log_interval=1", "exit_at_step=3")
    checkpoint = run / "checkpoints" / "checkpoint-3"
    saved = torch.load(checkpoint / "model.pt", weights_only=True)
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), sorted(saved)[:3]
    assert len(saved) == 2 * 7 * 2  # A and B of 7 modules in 2 layers
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    model_size = (base_model() / "model.safetensors").stat().st_size
    assert size < model_size / 2, (size, model_size)  # a whole-model checkpoint is over 1.5x the model
    assert (checkpoint / "model.pt").stat().st_size < model_size / 5  # 74 kB of 560 kB (embeddings dominate here)
    assert not (run / "adapter").exists()
    train(path, "train.log_interval=1", "exit_at_step=6")
    log = (run / "logs" / "post_trainer" / "rank-0" / "primus.log").read_text()
    assert "resumed from" in log and "checkpoint-3" in log
    resumed = {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl")}
    uninterrupted = {r["step"]: r["loss"] for r in read_metrics(lora_run / "metrics.jsonl")}
    assert sorted(resumed) == list(range(1, 7))
    assert [resumed[s] for s in range(4, 7)] == [uninterrupted[s] for s in range(4, 7)]  # bit for bit

    # `primus export` of a LoRA checkpoint (its exporter, in process): the base of hf_path with W + (alpha / r) B A
    from safetensors.torch import load_file

    from primus.runs.export import export_run

    assert export_run(run, "post_trainer", None, tmp_path / "merged")[0] == 6
    merged, base = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(str(base_model() /
                                                                                          "model.safetensors"))
    adapter = torch.load(run / "checkpoints" / "checkpoint-6" / "model.pt", weights_only=True)
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    update = 2.0 * adapter[f"{prefix}.lora_B.default.weight"] @ adapter[f"{prefix}.lora_A.default.weight"]
    name = "model.layers.1.mlp.down_proj.weight"
    assert update.abs().max() > 1e-3 and torch.allclose(merged[name], base[name] + update, atol=1e-6)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


# --------------------------------------------------------------------------- the loss, in process


def _rows(packing: bool, seq: int = 64, tmp: Path | None = None):
    from transformers import AutoTokenizer

    from primus.posttrain.data import SFTData, tokenize
    from primus_hf.posttrain import rows_tensor

    request = SFTData(path=str(INSTRUCTIONS), format=None, chat_template=None, seq_length=seq, packing=packing,
                      truncation="right", tokenizer_dir=str(TOKENIZER))
    return rows_tensor(tokenize(request, AutoTokenizer.from_pretrained(str(TOKENIZER))))


def _token_losses(model: Any, rows: Any, isolated: bool = True) -> Any:
    """The loss of every trained label, in row order."""
    import torch

    from primus_hf.posttrain import sft_forward

    logits = sft_forward(model, rows, 1.0, isolated=isolated).logits
    labels = rows[:, 1]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return losses[labels != -100]


@pytest.fixture(scope="module")
def model() -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(base_model()), dtype=torch.float32)


def test_masked_positions_contribute_nothing_to_loss_or_gradients(model: Any):
    """What loss masking promises. (The issue's wording, "a sample whose prompt tokens are changed shows the
    loss unchanged", cannot hold under causal attention: an answer is conditioned on its prompt; that a
    sample's prompt does not reach the *other* samples of a packed row is the packing test's.) Checked: the
    loss is the mean of -log p over exactly the completion tokens and EOS of the records (counted from the
    records themselves); changing the padding tokens leaves the loss and every gradient bit-identical; and
    training the masked positions too (labels = the next input token, as pretraining does) changes the loss,
    so the mask is what this test sees."""
    import torch
    from transformers import AutoTokenizer

    from primus_hf.posttrain import sft_forward, trained_labels

    rows = _rows(packing=False, seq=16)[:8]
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    completions = [r["completion"] for r in read_jsonl(INSTRUCTIONS)[:8]]
    assert trained_labels(rows) == sum(len(tokenizer.encode(c, add_special_tokens=False)) + 1 for c in completions)

    def loss_and_grads(batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = sft_forward(model, batch, float(trained_labels(rows))).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = loss_and_grads(rows)
    with torch.no_grad():
        assert torch.allclose(loss, _token_losses(model, rows).mean(), rtol=1e-6)
    padding = rows[:, 0] == tokenizer.pad_token_id
    assert padding.any()
    repadded = rows.clone()
    repadded[:, 0][padding] = 77
    again, grads_again = loss_and_grads(repadded)
    assert torch.equal(loss, again) and all(torch.equal(a, b) for a, b in zip(grads, grads_again, strict=True))
    unmasked = rows.clone()
    unmasked[:, 1] = torch.where(rows[:, 1] == -100, torch.roll(rows[:, 0], -1, dims=1), rows[:, 1])
    leaked, _ = loss_and_grads(unmasked)
    assert not torch.allclose(leaked, loss)


def test_packed_rows_give_each_token_the_loss_it_has_unpacked(model: Any):
    """Packed rows (isolated attention) score every trained token exactly as one sample per row does: the
    first step's loss is the same, token by token. Attention across the packed samples (causal) does not."""
    import torch

    unpacked, packed = _rows(packing=False, seq=16), _rows(packing=True, seq=64)
    assert len(packed) < len(unpacked) // 3  # several samples per row
    with torch.no_grad():
        alone = _token_losses(model, unpacked)
        isolated = _token_losses(model, packed)
        causal = _token_losses(model, packed, isolated=False)
    assert alone.shape == isolated.shape
    assert torch.allclose(alone, isolated, atol=1e-5, rtol=0), (alone - isolated).abs().max()
    assert (alone - causal).abs().max() > 1e-3


# --------------------------------------------------------------------------- processes


@pytest.fixture(scope="module", params=["full", "lora"])
def fsdp_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """One process and two FSDP ranks, 4 steps of full fine-tuning or LoRA (merged), on records whose completions
    have different lengths, rendered with the ChatML template."""
    import random

    tmp_path = tmp_path_factory.mktemp(request.param)
    rng = random.Random(0)
    records = tmp_path / "varied.jsonl"
    names = ["Ada", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana"]
    lines = []
    for _ in range(16):
        words = rng.sample(names, rng.randint(1, 6))
        lines.append(json.dumps({"prompt": f"reverse: {' '.join(words)} ->", "completion": " " + " ".join(words[::-1])}))
    records.write_text("\n".join(lines) + "\n")
    kw = {"steps": 4, "micro": 4, "seq": 64, "data": {"path": str(records), "chat_template": "chatml"},
          **({"finetune": LORA, "lr": 1e-2} if request.param == "lora" else {})}
    one = train(write_sft(tmp_path, "one", **kw), "train.log_interval=1")
    two = train(write_sft(tmp_path, "two", **kw), "train.log_interval=1", "--nproc-per-node", "2",
                "--master-port", str(free_port()), "parallel.fsdp=true")
    return request.param, one, two


def test_two_fsdp_ranks_train_as_one_process_does(fsdp_pair: tuple[str, Path, Path]):
    """The loss is the mean over the trained tokens of the global batch, not of each rank's rows: records
    whose completions have different lengths, split over 2 FSDP ranks, give the one-process losses, for full
    fine-tuning and for LoRA (peft's model sharded by FSDP2), and the same adapter."""
    method, one, two = fsdp_pair
    losses = [[r["loss"] for r in read_metrics(run / "metrics.jsonl")] for run in (one, two)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-5), losses
    assert losses[0][-1] < losses[0][0] - 0.05, losses  # it trains: the steps are not all the first one's
    if method == "lora":
        import torch
        from safetensors.torch import load_file

        adapters = [load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (one, two)]
        assert set(adapters[0]) == set(adapters[1])
        for key, value in adapters[0].items():
            assert torch.allclose(value, adapters[1][key], atol=1e-5), key


def test_the_chat_template_travels_with_the_model(fsdp_pair: tuple[str, Path, Path]):
    """`data.chat_template: chatml` (the tokenizer has none): the exported model (full: core's export; LoRA: the
    merged model) and the adapter carry it, as transformers 5 saves one, and render a chat with it."""
    from transformers import AutoTokenizer

    method, one, two = fsdp_pair
    chat = [{"role": "user", "content": "hi"}]
    for directory in [one / "hf", two / "hf"] + ([one / "adapter"] if method == "lora" else []):
        assert (directory / "chat_template.jinja").is_file(), directory
        rendered = AutoTokenizer.from_pretrained(str(directory)).apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True)
        assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", (directory, rendered)


# --------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize(("records", "finetune", "extra", "needles"), [
    ([{"messages": [{"role": "user", "content": "hi"}]}], "{}", [], [":1: data.path: chat has no assistant turn"]),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], "{}", [],
     [":2: data.path: prompt_completion record: field 'completion' is missing"]),
    ([{"prompt": "a", "completion": "b"}], "{lora: {target_modules: [q_prj]}}", [], ["did you mean 'q_proj'"]),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}], "{}", [],
     ["has no chat template", "data.chat_template: chatml"]),
    ([{"prompt": "a", "completion": "b"}], "{lora: {rank: 0}}", [], ["rank"]),
    ([{"prompt": "a", "completion": "b"}], "{}", ["pretrain"], ["post_trainer", "primus train posttrain"]),
    ([{"prompt": "a", "completion": "b"}], "{}", ["posttrain", "train.eval_interval=5"],
     ["train.eval_interval=5: the hf post_trainer holds no records out"]),
], ids=["no-assistant-turn", "missing-field", "unknown-lora-target", "no-chat-template", "rank-0", "pretrain-task",
        "eval-interval"])
def test_mistakes_are_one_line_exit_2_and_create_nothing(tmp_path: Path, records: list, finetune: str,
                                                         extra: list, needles: list):
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    path = write_sft(tmp_path, "bad", data={"path": str(data)}, finetune=finetune)
    result = run_primus("train", *(extra or ["posttrain"]), "--config", str(path))
    assert_config_error(result, *needles)
    assert not (tmp_path / "ws").exists()
