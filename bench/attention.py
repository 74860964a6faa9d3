"""Attention cost on this machine: megatron with megatron-core's local attention and with Primus's
SDPAttention, beside hf (transformers' SDPA), at long sequences.

    python bench/attention.py [--seqs 1024 4096 8192] [--steps 4]

Each run is one `primus run` of the same tiny Llama 3 (examples' llama3_tiny presets), micro batch 1,
global batch 1, mock data, no checkpoints; printed: tokens/s of the last step (from metrics.jsonl)
and the process's peak RSS. The issue's targets at seq 4096: megatron peak RSS within 1.3x of hf's,
tok/s at least 0.8x hf's. Not run by the tests; OMP_NUM_THREADS=1 as they use; it competes with
whatever else runs on the machine (run it alone for figures to quote).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from overhead import run_child  # bench/ is on sys.path when this runs as a script

ROOT = Path(__file__).resolve().parent.parent
SIDES = {
    "megatron local": ("megatron/llama3_tiny-pretrain.yaml", ["use_flash_attn=false"]),
    "megatron SDPA": ("megatron/llama3_tiny-pretrain.yaml", []),
    "hf SDPA": ("hf/llama3_tiny.yaml", []),
}
MAX_POSITIONS = {"megatron": "max_position_embeddings", "hf": "model_config.max_position_embeddings"}


def measure(side: str, seq: int, steps: int, workdir: Path, env: dict[str, str]) -> tuple[float, float]:
    """(tokens/s of the last step, peak RSS MiB) of one run."""
    exp, extra = SIDES[side]
    backend = exp.split("/")[0]
    workspace = Path(tempfile.mkdtemp(dir=workdir))
    argv = [sys.executable, "-m", "primus", "run", str(ROOT / "examples" / exp), f"workspace={workspace}",
            f"train.steps={steps}", f"train.seq_length={seq}", "train.micro_batch_size=1",
            "train.global_batch_size=1", "train.log_interval=1", "train.eval_interval=null",
            "checkpoint.interval=null", f"{MAX_POSITIONS[backend]}={seq}", *extra]
    argv += ["disable_last_saving=true"] if backend == "megatron" else ['save_strategy="no"']
    _, rss = run_child(argv, env)
    records = [json.loads(line) for line in next(workspace.rglob("metrics.jsonl")).read_text().splitlines()]
    last = [r for r in records if "tokens_per_s" in r][-1]
    return last["tokens_per_s"], rss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 8192])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"{'seq':>6} {'side':<16} {'tok/s':>9} {'peak RSS MiB':>13}")
    with tempfile.TemporaryDirectory(prefix="primus-bench-attn-") as tmp:
        for seq in args.seqs:
            rows = {}
            for side in args.sides:
                rows[side] = measure(side, seq, args.steps, Path(tmp), env)
                print(f"{seq:>6} {side:<16} {rows[side][0]:>9,.0f} {rows[side][1]:>13,.0f}", flush=True)
            if "hf SDPA" in rows and "megatron SDPA" in rows:
                (mt, mr), (ht, hr) = rows["megatron SDPA"], rows["hf SDPA"]
                print(f"{seq:>6} megatron SDPA / hf: tok/s {mt / ht:.2f}x (target >= 0.8), "
                      f"peak RSS {mr / hr:.2f}x (target <= 1.3)", flush=True)


if __name__ == "__main__":
    main()
