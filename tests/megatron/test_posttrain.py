"""Issue 14 on the megatron backend, through the real CLI on a tiny Hugging Face Llama: `primus train posttrain`
fine-tunes it on the bundled toy instruction set (loss on the completions only) and `primus generate` answers the
training prompts from `<run dir>/hf/` (the base: the hf backend's tests' tiny Llama, tests/hf/test_posttrain.py);
isolated packing gives unpacked's per-token loss; upstream's SFT files
resolve and refuse a hub dataset in one line; LoRA under TP=2 leaves the base weights bit-identical and writes a
peft adapter whose merge equals base + adapter; its checkpoints hold the adapters only and resume to the same
losses; masked positions (the loop built in this process) change neither the loss nor a gradient."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.hf.test_posttrain import base_model
from tests.support import (
    EXAMPLES,
    TOKENIZER,
    assert_ok,
    experiment_template,
    free_port,
    read_jsonl,
    read_metrics,
    run_dir_for,
    run_primus,
    write_yaml,
)

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
INSTRUCTIONS = EXAMPLES / "data" / "instructions.jsonl"
EXPERIMENT = experiment_template("megatron", """\
    config: sft_trainer.yaml
    model: {{hf_path: {model}}}
    train: {{steps: {steps}, lr: {lr}, min_lr: 1.0e-3, warmup_steps: 4, lr_schedule: cosine, micro_batch_size: {mbs},
             global_batch_size: {gbs}, seq_length: 32, seed: 1234, grad_clip: 1.0, precision: fp32}}
    data: {data}
    {sections}
    overrides:
      log_interval: 1
""").replace("  pre_trainer:", "  post_trainer:")


def experiment(tmp: Path, name: str, *, steps: int, gbs: int, mbs: int = 8, lr: float = 3e-3,
               data: dict | None = None, sections: str = "", overrides: str = "") -> Path:
    text = EXPERIMENT.format(name=name, workspace=tmp / "ws", model=base_model(), steps=steps, gbs=gbs, mbs=mbs, lr=lr,
                             data=json.dumps({"path": str(INSTRUCTIONS)} if data is None else data),
                             sections=sections)
    return write_yaml(tmp / f"{name}.yaml", text + overrides)


def train(exp: Path, *args: str) -> None:
    assert_ok(run_primus("train", "posttrain", "--config", str(exp), *args, timeout=400))


def exact_answers(run: Path) -> float:
    """Share of the training prompts `primus generate` answers exactly (greedy)."""
    result = run_primus("generate", str(run), "--prompts", str(INSTRUCTIONS), "--max-new-tokens", "6")
    assert_ok(result)
    got = [json.loads(line)["completion"].strip() for line in result.stdout.splitlines() if line.startswith("{")]
    want = [r["completion"].strip() for r in read_jsonl(INSTRUCTIONS)]
    assert len(got) == len(want), result.stdout[-2000:]
    return sum(g == w for g, w in zip(got, want, strict=True)) / len(want)


def toy_rows(*, packing: bool, seq_length: int = 32):
    """Core's rows of the toy set (packed: a global batch of `count` rows is exactly one epoch)."""
    from transformers import AutoTokenizer

    from primus.posttrain.data import SFTData, tokenize

    request = SFTData(path=str(INSTRUCTIONS), format=None, chat_template=None, seq_length=seq_length, packing=packing,
                      truncation="right", tokenizer_dir=str(TOKENIZER))
    return tokenize(request, AutoTokenizer.from_pretrained(str(TOKENIZER)))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full SFT of the tiny Llama on the toy set: packed rows, isolated attention, one epoch per step."""
    tmp = tmp_path_factory.mktemp("full")
    rows = toy_rows(packing=True).count
    exp = experiment(tmp, "full", steps=60, gbs=rows, mbs=rows,
                     data={"path": str(INSTRUCTIONS), "packing": True, "packed_attention": "isolated"})
    train(exp)
    return run_dir_for(tmp / "ws", "full")


def lora_experiment(tmp: Path) -> Path:
    """LoRA rank 8 on every linear layer under TP=2, merged at the end, a checkpoint after step 57 and 60."""
    rows = toy_rows(packing=True).count
    return experiment(tmp, "lora", steps=60, gbs=rows, mbs=rows, lr=1e-2,
                      data={"path": str(INSTRUCTIONS), "packing": True},
                      sections="finetune: {method: lora, lora: {rank: 8, alpha: 16, merge: true}}\n    "
                               "parallel: {tensor: 2}\n    checkpoint: {interval: 57}")


def train_lora(exp: Path, *args: str) -> None:
    train(exp, *args, "--nproc-per-node", "2", "--master-port", str(free_port()))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The LoRA run (two processes)."""
    tmp = tmp_path_factory.mktemp("lora")
    train_lora(lora_experiment(tmp))
    return run_dir_for(tmp / "ws", "lora")


@pytest.mark.parametrize("which", ["full", "lora"])
def test_fine_tuned_model_answers_the_training_prompts(which: str, request: pytest.FixtureRequest) -> None:
    run = request.getfixturevalue(f"{which}_run")
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert len(losses) == 60 and losses[-1] < 0.1 * losses[0], losses
    hf = run / "hf"  # full: the last checkpoint exported; LoRA: base + adapter merged
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in hf.iterdir()}
    if importlib.util.find_spec("primus_hf") is None:
        pytest.skip("the loss fell and hf/ is written; primus generate needs the hf backend package (primus-hf)")
    assert exact_answers(run) >= 0.9  # (LoRA: the adapter on the base gives the merge's logits, tested below)


def test_lora_adapter_loads_in_peft_and_the_merge_equals_base_plus_adapter(lora_run: Path) -> None:
    peft = pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    log = "".join(p.read_text() for p in (lora_run / "logs").rglob("*.log"))
    assert "LoRA: base weights bit-identical after training (every rank)" in log
    config = json.loads((lora_run / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and len(config["target_modules"]) == 7
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(str(base_model())).eval()
        plain = base(input_ids=ids).logits
        adapted = peft.PeftModel.from_pretrained(base, str(lora_run / "adapter")).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(lora_run / "hf")).eval()(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(merged, adapted, rtol=0, atol=1e-5 * adapted.abs().max().item())  # of their scale


def test_lora_checkpoint_holds_the_adapters_only_and_resumes_to_the_same_losses(lora_run: Path,
                                                                               tmp_path: Path) -> None:
    """A LoRA checkpoint keeps A and B (with their optimizer state, schedule, step and RNG), never the frozen base;
    a run resumed from the one after step 57 (the base loaded from hf_path again) logs steps 58-60 with the
    uninterrupted run's losses, bit for bit (a restart from step 1, or from the base without the adapters or
    their optimizer state, logs other steps or other losses)."""
    from primus_megatron.checkpoint import _read_metadata, checkpoints

    saved = checkpoints(lora_run / "checkpoints")
    assert [p.name for p in saved] == ["iter_0000057", "iter_0000060"]
    keys = list(_read_metadata(saved[0] / ".metadata").state_dict_metadata)
    model_keys = [k for k in keys if k.startswith(("decoder.", "embedding.", "output_layer."))]
    assert model_keys and all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in model_keys), keys
    train_lora(lora_experiment(tmp_path), f"overrides.load={saved[0]}", "overrides.finetune=false",
               "overrides.disable_last_saving=true")  # Megatron-LM's resume from a named checkpoint
    whole = {r["step"]: r["loss"] for r in read_metrics(lora_run / "metrics.jsonl")}
    resumed = read_metrics(run_dir_for(tmp_path / "ws", "lora") / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [58, 59, 60]
    assert [r["loss"] for r in resumed] == [whole[s] for s in (58, 59, 60)]


def test_isolated_packing_gives_the_unpacked_loss(full_run: Path) -> None:
    """The packed run's first step (every sample once, several to a row, attention kept inside each) has the loss
    transformers gives the same samples one per row: the mean over their completion tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    rows = toy_rows(packing=False)
    model = AutoModelForCausalLM.from_pretrained(str(base_model()), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(rows.count):
            r = rows.row(i)
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits[0]
            labels = torch.tensor(r["labels"])
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    first = read_metrics(full_run / "metrics.jsonl")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(total / count, rel=1e-5)


@pytest.fixture
def sft_loop(tmp_path_factory: pytest.TempPathFactory):
    """The megatron SFT loop of a full fine-tune (one sample per row, a step is the whole toy set), built in this
    process as one rank: the adapter's build_args and setup patches applied, PostTrainLoop.setup; closed and the
    patches undone right after the test (the other tests of this process see megatron-core unpatched)."""
    from importlib.metadata import version
    from types import SimpleNamespace

    import torch

    from primus.config.resolve import resolve
    from primus.patches.registry import PatchContext, PatchSet
    from primus_megatron.patches import PATCHES
    from primus_megatron.posttrain.loop import PostTrainLoop
    from primus_megatron.posttrain.settings import read_settings

    tmp = tmp_path_factory.mktemp("mask")
    rows = toy_rows(packing=False).count
    m = resolve(experiment(tmp, "mask", steps=1, gbs=rows, mbs=rows), [], world_size=1,
                environ={}).modules["post_trainer"]
    sft = read_settings(m, m.native)
    patches = PatchSet(PATCHES, environ={})
    ctx = PatchContext(backend="megatron", platform="cpu", framework_version=version("megatron-core"),
                       config=m.native, state={"checkpoint_dir": tmp / "checkpoints", "run_dir": tmp, "rank": 0})
    loop = None
    try:
        patches.apply_phase("build_args", ctx)
        patches.apply_phase("setup", ctx)
        loop = PostTrainLoop(SimpleNamespace(**m.native), ctx=SimpleNamespace(module=m, run_dir=tmp, rank=0), sft=sft,
                             checkpoint_dir=tmp / "checkpoints", device=torch.device("cpu"), on_step=print,
                             on_eval=print, model_spec=m.model)
        loop.setup()
        yield loop
    finally:
        if loop is not None:
            loop.close()
        patches.undo_all()


def test_masked_positions_contribute_nothing_to_loss_or_gradients(sft_loop) -> None:
    """The hf test of the same name on megatron, through the loop's own rows, forward step, loss function and
    gradient reduction: megatron's loss counts exactly the completion tokens and EOS of the records; changing the
    padding tokens leaves the loss and every gradient bit-identical; training the masked positions too (labels =
    the next input token, as pretraining does) changes the loss, so the mask is what this test sees."""
    import torch
    from transformers import AutoTokenizer

    loop = sft_loop
    samples = [loop.train_data[i] for i in range(loop.args.global_batch_size)]  # the first step: the whole set
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    want = sum(len(tokenizer.encode(r["completion"], add_special_tokens=False)) + 1 for r in read_jsonl(INSTRUCTIONS))
    params = [p for chunk in loop.model for p in chunk.parameters() if p.requires_grad]

    def loss_and_grads(batch: list[dict]) -> tuple[float, int, list[torch.Tensor]]:
        for chunk in loop.model:
            chunk.zero_grad_buffer()
        losses = loop._forward_backward(batch, 0, forward_only=False)
        counted = int(sum(item["lm loss"][1].item() for item in losses))
        return loop._mean_loss(losses), counted, [p.main_grad.clone() for p in params]

    loss, counted, grads = loss_and_grads(samples)
    assert counted == want and loss > 0
    padding = [s["tokens"] == tokenizer.pad_token_id for s in samples]
    assert all(p.any() for p in padding)
    repadded = [{**s, "tokens": s["tokens"].masked_fill(p, 77)} for s, p in zip(samples, padding, strict=True)]
    again, _, grads_again = loss_and_grads(repadded)
    assert again == loss and all(torch.equal(a, b) for a, b in zip(grads, grads_again, strict=True))
    unmasked = [{**s, "labels": torch.where(s["loss_mask"] > 0, s["labels"], torch.roll(s["tokens"], -1)),
                 "loss_mask": torch.ones_like(s["loss_mask"])} for s in samples]
    leaked, leaked_count, _ = loss_and_grads(unmasked)
    assert leaked_count > counted and leaked != pytest.approx(loss, rel=1e-3)


@pytest.mark.parametrize("path", sorted((EXAMPLES / "megatron").glob("*sft*.yaml")) + [
    HERE / "upstream_form" / "llama3_8B-BF16-sft.yaml"], ids=lambda p: p.name)
def test_sft_experiments_resolve_with_their_meaning(path: Path) -> None:
    """The examples and upstream's form: post_trainer modules; upstream's `lora: {enabled: true}` is LoRA on every
    linear layer (no export of a checkpoint), the others full fine-tunes that end as <run dir>/hf/."""
    from primus.config.resolve import resolve

    m = resolve(path, [], world_size=1 if "tiny" in path.name else 8, environ={}).modules["post_trainer"]
    lora = "lora" in path.name
    assert m.kind == "posttrain" and m.module.finetune.is_lora == lora
    assert m.module.checkpoint.export == (None if lora else "hf")
    if lora:
        assert len(m.module.finetune.lora.targets()) == 7 and m.module.finetune.lora.rank == 32


def test_upstream_keys_mean_the_neutral_fields_and_a_hub_dataset_is_refused(tmp_path: Path) -> None:
    """upstream's sft keys naming a local JSONL are the neutral data fields (its records checked at resolve); a hub
    id resolves (a dry run works) and is refused, naming the key, when the run starts (before any model)."""
    from primus.config.resolve import resolve
    from primus.errors import ConfigError
    from primus_megatron.posttrain.settings import read_settings

    exp = HERE / "upstream_form" / "llama3_8B-BF16-sft.yaml"
    local = write_yaml(tmp_path / "local.yaml", exp.read_text() + f"""\
      sft_dataset_name: {INSTRUCTIONS}
      tokenizer_model: {TOKENIZER}
      enable_packed_sequences: true
      use_packed_attention: false
""")
    m = resolve(local, [], world_size=8, environ={}).modules["post_trainer"]
    d = m.module.data
    assert (d.path, d.tokenizer, d.format, d.chat_template, d.packing, d.packed_attention) == (
        str(INSTRUCTIONS), str(TOKENIZER), "prompt_completion", "chatml", True, "causal")  # the file's sft_conversation_format: chatml
    # upstream's sft_dataset_split of a local file: train (its default) reads it whole, another split is refused
    # wherever it is written (here on the command line), naming the file
    assert resolve(local, ["sft_dataset_split=train"], world_size=8, environ={}).modules["post_trainer"]
    with pytest.raises(ConfigError, match=r"'validation': the local file .*instructions.jsonl is one split"):
        resolve(local, ["sft_dataset_split=validation"], world_size=8, environ={})
    m = resolve(exp, ["sft_dataset_name=tatsu-lab/alpaca"], world_size=8, environ={}).modules["post_trainer"]
    with pytest.raises(ConfigError) as err:
        read_settings(m, m.native)
    assert str(err.value).startswith("sft_dataset_name: 'tatsu-lab/alpaca' is not a local file: a hub dataset")
