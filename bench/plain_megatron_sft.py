"""The plain side of `bench/sft_overhead.py --backend megatron`: SFT of the tiny Llama on megatron-core alone.

    python bench/plain_megatron_sft.py --steps 60

examples/megatron/llama3_sft_tiny.yaml's model and training settings with one sample per row of 64 tokens, 8 rows
a step (SETTINGS; sft_overhead.py checks them against what Primus resolves before its first round), in one CPU
process (gloo, fp32, the distributed optimizer as the preset has it), written the way a Megatron user would:
the toy records tokenized here (prompt, then completion + EOS; labels only on the completion and EOS, the masking
core's rows have), rows read in a new seeded order every epoch, megatron-core's GPTModel on the local layer spec,
DistributedDataParallel, get_megatron_optimizer, OptimizerParamScheduler and get_forward_backward_func with
`calculate_per_token_loss` (the loss and gradient are the mean over the step's trained tokens), the loss read back
every step. The one Primus import is overhead_megatron.py's: the registered CPU patches megatron-core 0.16 needs to
run on a CPU at all. Prints the wall time of steps 2..N.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead_megatron import SETTINGS as PRETRAIN  # noqa: E402  (llama3_tiny.yaml under Megatron's names)
from overhead_megatron import build_plain, masked_loss, plain_script, train_plain  # noqa: E402

#: the SFT example's settings under Megatron's argument names (the tiny model, then the bench's train: section)
SETTINGS = {**PRETRAIN, "micro_batch_size": 8, "global_batch_size": 8, "seq_length": 64, "min_lr": 1e-3,
            "lr_warmup_iters": 4, "calculate_per_token_loss": True}
#: what the bench sets on the Primus side to get SETTINGS from examples/megatron/llama3_sft_tiny.yaml (the
#: checkpoint after the last step and its export to <run dir>/hf/ come after the timed steps)
PRIMUS_OVERRIDES = ["data.packing=false", "data.packed_attention=null", "train.global_batch_size=8",
                    "train.seq_length=64", "overrides.log_interval=1", "overrides.eval_iters=0",
                    "overrides.save_interval=1000000000"]


def plain_main(steps: int) -> None:
    import numpy as np
    import torch
    from sft_overhead import plain_rows

    s = SETTINGS
    mbs, gbs, seq = s["micro_batch_size"], s["global_batch_size"], s["seq_length"]
    inputs, targets = plain_rows(seq)
    _config, ddp, optimizer, scheduler = build_plain(s, steps, calculate_per_token_loss=True)

    orders: dict[int, np.ndarray] = {}
    positions = torch.arange(seq).unsqueeze(0).expand(mbs, seq)

    def microbatches(step: int):
        """Global batch `step`: samples [step * gbs, (step + 1) * gbs) of the endless stream of epochs."""
        for first in range(step * gbs, (step + 1) * gbs, mbs):
            picks = []
            for i in range(first, first + mbs):
                epoch, at = divmod(i, len(inputs))
                if epoch not in orders:
                    orders[epoch] = np.random.default_rng([s["seed"], epoch]).permutation(len(inputs))
                picks.append(int(orders[epoch][at]))
            labels = targets[picks]
            yield {"tokens": inputs[picks], "labels": labels.clamp(min=0), "loss_mask": (labels != -100).float()}

    def forward_step(batches, chunk):
        batch = next(batches)
        per_token = chunk(batch["tokens"], positions, attention_mask=None, labels=batch["labels"])
        return per_token, lambda out: masked_loss(batch["loss_mask"], out)

    last_loss, loop_s = train_plain(s, steps, ddp, optimizer, scheduler, microbatches, forward_step)
    print(f"plain_megatron_sft steps={steps} loss={last_loss:.4f} loop_s={loop_s:.4f}", flush=True)


def main() -> None:
    plain_script(__doc__.splitlines()[0], 60, plain_main)


if __name__ == "__main__":
    main()
