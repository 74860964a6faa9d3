"""Full supervised fine-tuning on maxtext: core's rows through MaxText's own training step.

A post_trainer module (`config: sft_trainer.yaml`) trains with MaxText's training entry, as a pre_trainer
module does, with MaxText's SFT switch on (`use_sft`, as `maxtext.trainers.post_train.sft.train_sft_native`
sets it). What changes is where the batches come from: core makes the tokens once for every backend
(`primus.posttrain.data`: chat template, loss mask, padding or packing, cached in the run directory), and the
registered feature patch `maxtext.sft_rows` hands those rows to MaxText in place of its data iterator.

A row maps onto MaxText's batch arrays one to one:

- `inputs` / `targets`: the row's tokens and the next token at each position (a label that is not trained
  becomes the pad id: MaxText one-hot encodes every target);
- `inputs_position`: position ids that restart at each packed sample (RoPE sees each sample from 0);
- `inputs_segmentation`: the sample of each position (1, 2, ...; 0 on padding). MaxText's attention lets a
  position attend only within its own segment, so packed samples stay apart (`data.packed_attention:
  isolated`, exact: the same per-token loss as one sample per row); `causal` gives every real token of a
  row segment 1;
- `targets_segmentation`: the segment where the label is trained, 0 where it is not. MaxText multiplies
  each token's cross-entropy by `targets_segmentation != 0` and divides the sum by the count of those
  tokens over the global batch, so the reported loss is the mean over trained tokens, and masked labels
  contribute nothing to it or to the gradients.

Rows are read in a seeded order, reshuffled each epoch (`enable_data_shuffling`, seed `train.seed`); a
resumed run starts at the batch after its newest checkpoint. The preset checkpoints the last step, which
core exports to `<run dir>/hf/` when the run ends (a full fine-tune's `checkpoint.export: hf`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from primus.backends.translator import NativeValues
from primus.errors import ConfigError
from primus.patches.registry import Patch, PatchContext, Undo, replace_attr
from primus_maxtext import FRAMEWORK_RANGE

if TYPE_CHECKING:
    from primus.backends.adapter import RunContext
    from primus.config.resolve import ResolvedModule
    from primus.posttrain.data import Rows

PIPELINE = "maxtext.input_pipeline.input_pipeline_interface"
ROWS_PATCH = "maxtext.sft_rows"
#: MaxText's own SFT pipeline reads these columns of the records (for the written config file: a run of it
#: without Primus reads the same records with MaxText's tokenization)
FORMAT_COLUMNS = {"messages": ["messages"], "alpaca": ["instruction", "input", "output"],
                  "prompt_completion": ["prompt", "completion"]}


# --------------------------------------------------------------------------- resolve time


def tokenizer_dir(resolved: ResolvedModule) -> str | None:
    """The tokenizer the rows are made with: data.tokenizer, else the model's hf_path."""
    return resolved.module.data.tokenizer or resolved.hf_path


def derive_posttrain(resolved: ResolvedModule, out: NativeValues) -> None:
    """MaxText keys of a post_trainer module: its SFT switch, packing, the tokenizer, and a checkpoint of
    the last step (what core's export at the end reads)."""
    data = resolved.module.data
    out.set("use_sft", True, "config")
    out.set("sft_train_on_completion_only", True, "config")
    out.set("packing", bool(data.packing), "data.packing")
    out.set("enable_checkpointing", True, "config")
    out.set("save_checkpoint_on_completion", True, "config")
    if data.format in FORMAT_COLUMNS:
        out.set("train_data_columns", FORMAT_COLUMNS[data.format], "data.format")
    if not data.tokenizer and resolved.hf_path:
        out.set("tokenizer_type", "huggingface", "model.hf_path")
        out.set("tokenizer_path", resolved.hf_path, "model.hf_path")


def check_posttrain(resolved: ResolvedModule) -> None:
    """What a maxtext post_trainer module cannot do: said before anything starts."""
    module, native = resolved.module, resolved.native
    if not module.data.path:
        raise ConfigError("post-training on maxtext reads a local JSONL of records", key="data.path",
                          fix="set data.path (formats: messages, alpaca, prompt_completion)")
    if int(native.get("eval_interval") or -1) > 0:
        raise ConfigError("post-training on maxtext has no held-out evaluation", key="train.eval_interval",
                          fix="remove train.eval_interval; `primus eval` scores the run afterwards")
    if resolved.model is None:
        raise ConfigError("post-training on maxtext needs a model spec (a neutral preset or model: {hf_path})",
                          key="model", fix="use model: {hf_path: DIR} to fine-tune Hugging Face weights")


# --------------------------------------------------------------------------- the rows


def load_rows(ctx: RunContext, seq_length: int, process_id: int) -> Rows:
    """The run's rows (tokenized once, cached in `<run dir>/data-cache`)."""
    from transformers import AutoTokenizer

    from primus.posttrain.data import SFTData, load_or_tokenize

    directory = tokenizer_dir(ctx.module)
    assert directory is not None  # core refuses a post-training module without a tokenizer
    request = SFTData.from_module(ctx.module.module, seq_length, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return load_or_tokenize(request, tokenizer, ctx.run_dir / "data-cache", rank=process_id)


def maxtext_arrays(rows: Rows, *, isolated: bool) -> dict[str, Any]:
    """Every row as MaxText's batch arrays (count x seq_length, int32). A target that is not trained is
    token 0 (MaxText one-hot encodes every target; its weight is 0)."""
    import numpy as np

    tokens = np.frombuffer(rows.tokens, dtype=np.int32).reshape(rows.count, rows.width)
    trained = np.frombuffer(rows.trainable, dtype=np.int32).reshape(rows.count, rows.width)[:, 1:] != 0
    positions = np.frombuffer(rows.positions, dtype=np.int32).reshape(rows.count, rows.width)[:, :-1]
    segments = np.frombuffer(rows.segments, dtype=np.int32).reshape(rows.count, rows.width)[:, :-1]
    if not isolated:
        segments = (segments != 0).astype(np.int32)  # packed samples attend across their boundaries
    return {
        "inputs": np.ascontiguousarray(tokens[:, :-1]),
        "inputs_position": np.ascontiguousarray(positions),
        "inputs_segmentation": np.ascontiguousarray(segments),
        "targets": np.where(trained, tokens[:, 1:], 0).astype(np.int32),
        "targets_position": np.ascontiguousarray(positions),
        "targets_segmentation": np.where(trained, segments, 0).astype(np.int32),
    }


def batch_order(count: int, batch: int, start: int, *, shuffle: bool, seed: int) -> Iterator[list[int]]:
    """Row indices of each global batch from batch number `start` on: the rows in a seeded order,
    reshuffled every epoch (or in file order), wrapping around without end."""
    import numpy as np

    epoch_order: dict[int, Any] = {}

    def order(epoch: int) -> Any:
        if epoch not in epoch_order:
            epoch_order.clear()
            epoch_order[epoch] = (np.random.default_rng([seed, epoch]).permutation(count) if shuffle
                                  else np.arange(count))
        return epoch_order[epoch]

    position = start * batch
    while True:
        out = []
        for p in range(position, position + batch):
            out.append(int(order(p // count)[p % count]))
        position += batch
        yield out


def first_batch(config: Any) -> int:
    """The batch a (resumed) run starts at: the steps its newest checkpoint holds (MaxText names a step's
    directory by its 0-based index; the adapter set damaged ones aside before JAX started)."""
    from primus_maxtext.checkpoint import steps

    if not config.enable_checkpointing or not config.checkpoint_dir:
        return 0
    found = steps(Path(config.checkpoint_dir))
    return int(found[-1].name) + 1 if found else 0


def local_batches(arrays: Mapping[str, Any], config: Any, process: int, processes: int) -> Iterator[dict[str, Any]]:
    """This process's share of each global batch (MaxText assembles the global arrays from the shares)."""
    count = len(arrays["inputs"])
    size = int(config.global_batch_size_to_load)
    if size % processes:
        raise ConfigError(f"the global batch ({size} rows) does not split over {processes} JAX processes",
                          key="train.micro_batch_size")
    share = size // processes
    for indices in batch_order(count, size, first_batch(config), shuffle=bool(config.enable_data_shuffling),
                               seed=int(config.data_shuffle_seed)):
        mine = indices[process * share:(process + 1) * share]
        yield {k: v[mine] for k, v in arrays.items()}


def feed_rows(ctx: PatchContext) -> Undo:
    """MaxText's data iterator factory, replaced by one over the run's rows (no eval iterator: the
    translator refuses train.eval_interval)."""
    import jax
    from maxtext.input_pipeline import input_pipeline_interface, multihost_dataloading

    rows, isolated = ctx.state["sft_rows"]
    arrays = maxtext_arrays(rows, isolated=isolated)

    def create_data_iterator(config: Any, mesh: Any) -> tuple[Any, None]:
        batches = local_batches(arrays, config, jax.process_index(), jax.process_count())
        return multihost_dataloading.MultiHostDataLoadIterator(batches, mesh), None

    return replace_attr(input_pipeline_interface, "create_data_iterator", create_data_iterator)


SFT_PATCHES: list[Patch] = [
    Patch(
        id=ROWS_PATCH,
        backend="maxtext",
        target=f"{PIPELINE}.create_data_iterator",
        phase="setup",
        description="A post_trainer module's batches are core's post-training rows (tokens, loss mask as "
                    "targets_segmentation, per-sample positions and segments) in place of MaxText's data pipeline.",
        apply=feed_rows,
        versions=FRAMEWORK_RANGE,
        kind="feature",
        predicate=lambda ctx: ctx.state.get("sft_rows") is not None,
        predicate_doc="a post_trainer module (config: sft_trainer.yaml)",
        needs=("sft_rows",),
    ),
]


# --------------------------------------------------------------------------- the adapter's part


def prepare(ctx: RunContext, config: Mapping[str, Any], process_id: int) -> tuple[Rows, bool]:
    """The setup-phase state `sft_rows` of a post_trainer module: its rows, and whether packed samples are
    kept apart."""
    rows = load_rows(ctx, int(config["max_target_length"]), process_id)
    data = ctx.module.module.data
    return rows, not (data.packing and data.packed_attention == "causal")
