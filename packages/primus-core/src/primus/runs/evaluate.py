"""`primus eval`: one definition of the evaluation blocks, and the worker that scores them.

The blocks are core's so that every backend sees the same tokens: the corpus's documents in file
order, each tokenized with the run's tokenizer and followed by its EOS token, concatenated, cut into
blocks of `seq_length + 1` tokens (the last partial block dropped). A block predicts its last
`seq_length` tokens from the ones before them; the loss is the mean over every predicted token of
every block, and the perplexity its exponential.

The command (primus.cli.eval_cmd) writes `<run dir>/eval/<stamp>/` with the resolved config and
`request.json`, launches this module like a training worker (one process, torchrun, or one process
per host), and reads back `result.json`, written by rank 0. A backend takes part by implementing
`Adapter.evaluate(request)`.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from primus.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, ConfigError

REQUEST_FILE = "request.json"
RESULT_FILE = "result.json"
EVAL_LOG = "eval.jsonl"
MAX_EVAL_BLOCKS = 100_000  # an evaluation corpus of ~10^8 tokens at seq 1024: beyond it, sample


@dataclass(frozen=True)
class EvalRequest:
    """What to score: `checkpoint` is None (the model's init: its hf_path weights, else the seeded
    random init), "latest" (the run's newest complete checkpoint) or a checkpoint directory."""

    data: str  # a .jsonl or text corpus (primus.runs.corpus)
    tokenizer: str  # a tokenizer directory
    seq_length: int
    checkpoint: str | None = None
    max_blocks: int | None = None

    @classmethod
    def read(cls, directory: Path) -> EvalRequest:
        return cls(**json.loads((directory / REQUEST_FILE).read_text()))

    def write(self, directory: Path) -> None:
        from primus.runs.files import write_json

        write_json(directory / REQUEST_FILE, asdict(self))


@dataclass(frozen=True)
class EvalResult:
    """Summed token loss (natural log) and the number of predicted tokens; the step scored."""

    loss_sum: float
    tokens: int
    step: int | None = None  # the checkpoint's step; None for an init

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens

    def record(self, **extra: object) -> dict[str, object]:
        loss = self.loss
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": self.tokens, "step": self.step,
                **extra}


def eval_blocks(texts: Iterable[str], encode: Callable[[str], list[int]], eos_id: int, seq_length: int,
                max_blocks: int | None = None) -> list[list[int]]:
    """The evaluation blocks (module docstring): each `seq_length + 1` token ids long."""
    size = seq_length + 1
    blocks: list[list[int]] = []
    pending: list[int] = []
    limit = min(max_blocks or MAX_EVAL_BLOCKS, MAX_EVAL_BLOCKS)
    for text in texts:
        pending.extend(encode(text))
        pending.append(eos_id)
        while len(pending) >= size and len(blocks) < limit:
            blocks.append(pending[:size])
            pending = pending[size:]
        if len(blocks) >= limit:
            break
    return blocks


def blocks_for(request: EvalRequest, encode: Callable[[str], list[int]], eos_id: int) -> list[list[int]]:
    """The blocks of `request` with the caller's tokenizer; a corpus too short for one is an error."""
    from primus.runs.corpus import read_documents

    path = Path(request.data)
    blocks = eval_blocks(read_documents(path), encode, eos_id, request.seq_length, request.max_blocks)
    if not blocks:
        raise ConfigError(f"{path} holds fewer than seq_length + 1 = {request.seq_length + 1} tokens: "
                          "no evaluation block", key="--data", fix="evaluate on a longer corpus or a shorter seq_length")
    return blocks


def shard(blocks: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Block i goes to data-parallel rank i % world; losses are summed, so the order does not matter."""
    return blocks[rank::world]


# --------------------------------------------------------------------------- the worker


def run_eval_worker(eval_dir: Path, module_name: str) -> int:
    """Like primus.runs.worker, but the adapter's `evaluate` runs instead of `run`."""
    import os

    from loguru import logger

    from primus.runs.worker import _os_cause, worker_context

    eval_dir = eval_dir.resolve()
    ctx, backend, platform = worker_context(eval_dir, eval_dir.parent.parent, module_name, evaluating=True)
    request = EvalRequest.read(eval_dir)
    rank, world_size, patches = ctx.rank, ctx.world_size, ctx.patches
    try:
        ctx.apply_patches("before_import")
        adapter = backend.spec.load_adapter_class()(ctx)
        # the console stays for the result line (and an error's one line): the rest goes to the log file
        logger.bind(file_only=True).info(f"evaluating {module_name} with {backend.name} on {platform.describe()}, "
                                         f"rank {rank}/{world_size}")
        result = adapter.evaluate(request)
    except ConfigError as exc:
        ctx.metrics.set_status("config-error", error=str(exc))  # Primus's torchrun entry prints it once
        if os.environ.get("PRIMUS_LAUNCHER") != "torchrun" and (rank == 0 or world_size == 1):
            print(f"primus: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"primus: error: evaluation failed on rank {rank}: {_os_cause(exc)}", file=sys.stderr)
        return EXIT_FAILURE
    except NotImplementedError:
        if rank == 0:
            print(f"primus: error: the {backend.name} backend cannot evaluate (its adapter has no evaluate)",
                  file=sys.stderr)
        return EXIT_USAGE
    finally:
        patches.undo_all()
    if rank == 0:
        if result is None:
            print(f"primus: error: the {backend.name} adapter returned no result on rank 0", file=sys.stderr)
            return EXIT_FAILURE
        from primus.runs.files import write_json

        write_json(eval_dir / RESULT_FILE, asdict(result))
    if os.environ.get("PRIMUS_LAUNCHER") == "torchrun":
        logger.complete()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m primus.runs.evaluate EVAL_DIR MODULE", file=sys.stderr)
        return EXIT_USAGE
    return run_eval_worker(Path(args[0]), args[1])


if __name__ == "__main__":
    sys.exit(main())
