"""Post-training's overhead: SFT through `primus train posttrain` and through a plain script (hf, megatron).

    python bench/sft_overhead.py [--rounds 3 --steps 300]
    python bench/sft_overhead.py --plain --steps 300      (one run of the plain side, what the bench starts)
    python bench/sft_overhead.py --backend megatron --rounds 7 --steps 60   (plain side: plain_megatron_sft.py)

Both sides fine-tune the same tiny Llama (llama3_tiny.yaml: random init, fp32, CPU) on the bundled toy
instruction set (examples/data/instructions.jsonl), one sample per row of 64 tokens, 8 rows a step, with the
same masking (labels -100 on the prompt and the padding; the completion and EOS trained), AdamW, warmup +
cosine and gradient clipping. The plain script tokenizes the records itself with the tokenizer and imports
nothing from Primus. Compared, as bench/overhead.py does: the wall time from the end of step 1 to the end of
step N (Primus's rank-0 log timestamps; the script's own clock), median steps/s over rounds, and their ratio
(target >= 0.97). Then Primus packed vs unpacked: trained samples/s and real (non-padding) tokens/s of the
same records in rows of 64 tokens: one sample per row (8 rows a step) vs packed (2 rows a step, about 4 samples
each). Not run by the tests; OMP_NUM_THREADS=1.

Measured on the 2-core development machine while other jobs shared it (load average 3 to 11, so single
rounds vary by 2x; medians of 3 rounds of 200 steps): primus 14.6 steps/s, plain 12.9 steps/s, ratio 1.13
(the loop adds nothing measurable per step); packed rows 2.3x the samples/s and real tokens/s of one sample
per row at the same seq_length 64 (271 vs 117 samples/s). Rerun on a quiet machine for figures to quote.

megatron (`--backend megatron --rounds 7 --steps 60`, 2026-12-03, the same 2-core machine at load average 7 to 19
during a CI run): primus / plain per pair 0.33, 2.08, 2.62, 0.59, 0.49, 1.35, 0.90, median 0.90 (min 0.33, max
2.62); single runs ranged 5 to 29 steps/s on both sides, so the load decides these numbers, not the loop. Both
sides log the same losses (step 5 of a 6-step check: 5.7171 on each). Rerun on a quiet machine for figures to quote.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "instructions.jsonl"
TOKENIZER = ROOT / "examples" / "data" / "tokenizer"
BATCH = 8

EXPERIMENT = """
work_group: bench
user_name: bench
exp_name: sft
workspace: {workspace}
modules:
  post_trainer:
    framework: hf
    config: sft_trainer.yaml
    model: llama3_tiny.yaml
    train: {{steps: {steps}, lr: 3.0e-3, warmup_steps: 2, lr_schedule: cosine, micro_batch_size: {batch},
             global_batch_size: {batch}, seq_length: {seq}, seed: 1234, weight_decay: 0.1, grad_clip: 1.0,
             log_interval: 1}}
    data: {{path: {data}, tokenizer: {tokenizer}, packing: {packing}}}
    overrides: {{save_strategy: "no"}}
"""


# --------------------------------------------------------------------------- the plain side


def plain_rows(seq_length: int) -> tuple[Any, Any]:
    """(inputs, labels of the next token) of the toy records, one per row of `seq_length`, tokenized here: the
    prompt, then the completion and EOS; -100 on the prompt and the padding (the masking of core's rows)."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    rows, labels = [], []
    for line in DATA.read_text().splitlines():
        record = json.loads(line)
        prompt = tokenizer.encode(record["prompt"])
        answer = tokenizer.encode(record["completion"], add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = (prompt + answer)[:seq_length + 1]
        pad = seq_length + 1 - len(ids)
        rows.append(ids + [tokenizer.pad_token_id] * pad)
        labels.append([-100] * len(prompt) + answer[:len(ids) - len(prompt)] + [-100] * pad)
    tokens, targets = torch.tensor(rows), torch.tensor(labels)
    return tokens[:, :-1], targets[:, 1:]  # labels of the next token, as core's rows


def plain(steps: int, seq_length: int = 64, seed: int = 1234) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

    sys.path.insert(0, str(ROOT / "bench"))
    from plain_hf import CONFIG  # llama3_tiny.yaml as the hf backend translates it

    inputs, targets = plain_rows(seq_length)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(inputs), generator=generator) for _ in range(steps * BATCH // len(inputs) + 1)])
    model.train()
    first_step_done = 0.0
    for step in range(steps):
        pick = order[step * BATCH:(step + 1) * BATCH]
        batch, target = inputs[pick], targets[pick]
        count = (target != -100).sum()
        loss = model(input_ids=batch, labels=target, shift_labels=target, num_items_in_batch=count,
                     use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last = loss.item()
        if step == 0:
            first_step_done = time.perf_counter()
    print(f"plain_sft steps={steps} loss={last:.4f} loop_s={time.perf_counter() - first_step_done:.4f}")


# --------------------------------------------------------------------------- the bench


def primus_side(steps: int, workdir: Path, env: dict[str, str], *, packing: bool) -> tuple[float, int]:
    from overhead import primus_loop_seconds, run_child

    workspace = Path(tempfile.mkdtemp(dir=workdir))
    exp = workspace / "sft.yaml"
    exp.write_text(textwrap.dedent(EXPERIMENT).format(
        workspace=workspace, steps=steps, batch=BATCH if not packing else 2, seq=64,
        data=DATA, tokenizer=TOKENIZER, packing=str(packing).lower()).lstrip())
    _, rss = run_child([sys.executable, "-m", "primus", "train", "posttrain", "--config", str(exp)], env)
    return primus_loop_seconds(workspace, steps, module="post_trainer"), rss


def row_contents(packing: bool) -> tuple[float, float]:
    """(samples, real tokens) per row of the Primus side's rows."""
    from transformers import AutoTokenizer

    from primus.posttrain.data import SFTData, tokenize

    request = SFTData(path=str(DATA), format=None, chat_template=None, seq_length=64,
                      packing=packing, truncation="right", tokenizer_dir=str(TOKENIZER))
    rows = tokenize(request, AutoTokenizer.from_pretrained(str(TOKENIZER)))
    real = sum(1 for s in rows.segments if s > 0)
    return rows.stats["samples"] / rows.count, real / rows.count


def megatron(pairs: int, steps: int, env: dict[str, str]) -> None:
    """SFT steps/s of examples/megatron/llama3_sft_tiny.yaml (one sample per row of 64, 8 rows a step) through
    `primus train posttrain` and of bench/plain_megatron_sft.py, in alternating pairs; the median per-pair ratio."""
    from overhead import primus_loop_seconds, run_child
    from plain_megatron_sft import PRIMUS_OVERRIDES, SETTINGS

    from primus.config.resolve import resolve

    example = ROOT / "examples" / "megatron" / "llama3_sft_tiny.yaml"
    overrides = [f"train.steps={steps}", *PRIMUS_OVERRIDES]
    native = resolve(example, overrides, world_size=1, environ={}).modules["post_trainer"].native
    differ = {k: (v, native.get(k)) for k, v in SETTINGS.items() if native.get(k) != v}
    if differ:
        sys.exit(f"plain settings differ from what Primus resolves (plain, primus): {differ}")
    plain_script = ROOT / "bench" / "plain_megatron_sft.py"
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="primus-bench-") as tmp:
        for pair in range(pairs):
            rate: dict[str, float] = {}
            for side in ("primus", "plain") if pair % 2 == 0 else ("plain", "primus"):
                if side == "plain":
                    import re

                    text, _ = run_child([sys.executable, str(plain_script), "--steps", str(steps)], env)
                    seconds = float(re.search(r"loop_s=(\S+)", text).group(1))
                else:
                    workspace = Path(tempfile.mkdtemp(dir=tmp))
                    run_child([sys.executable, "-m", "primus", "train", "posttrain", "--config", str(example),
                               f"workspace={workspace}", *overrides], env)
                    seconds = primus_loop_seconds(workspace, steps, module="post_trainer")
                rate[side] = (steps - 1) / seconds
            ratios.append(rate["primus"] / rate["plain"])
            print(f"pair {pair + 1}: primus {rate['primus']:6.2f} steps/s, plain {rate['plain']:6.2f} steps/s, "
                  f"ratio {ratios[-1]:.3f}", flush=True)
    print(f"\nmegatron SFT: primus / plain, median of {pairs} pairs {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}; target >= 0.97)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("hf", "megatron"), default="hf")
    parser.add_argument("--rounds", type=int, default=3, help="hf: rounds; megatron: alternating pairs (>= 7)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--plain", action="store_true", help="run the hf plain side once and print its loop time")
    args = parser.parse_args()
    if args.plain:
        plain(args.steps)
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from overhead import run_child

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false"}
    if args.backend == "megatron":
        megatron(args.rounds, args.steps, {**env, "CUDA_DEVICE_MAX_CONNECTIONS": "1"})
        return
    rates: dict[str, list[float]] = {"primus": [], "plain": [], "packed": []}
    with tempfile.TemporaryDirectory(prefix="primus-bench-") as tmp:
        for round_index in range(args.rounds):
            sides = ["primus", "plain", "packed"] if round_index % 2 == 0 else ["packed", "plain", "primus"]
            for side in sides:
                if side == "plain":
                    import re

                    text, _ = run_child([sys.executable, __file__, "--plain", "--steps", str(args.steps)], env)
                    seconds = float(re.search(r"loop_s=(\S+)", text).group(1))
                else:
                    seconds, _ = primus_side(args.steps, Path(tmp), env, packing=side == "packed")
                rates[side].append((args.steps - 1) / seconds)
                print(f"round {round_index + 1} {side:>6}: {rates[side][-1]:7.2f} steps/s", flush=True)
    primus, plain_rate, packed = (statistics.median(rates[k]) for k in ("primus", "plain", "packed"))
    print(f"\nhf SFT: primus {primus:.2f} steps/s, plain {plain_rate:.2f} steps/s, ratio {primus / plain_rate:.3f} "
          f"(target >= 0.97)")
    (s_unpacked, t_unpacked), (s_packed, t_packed) = row_contents(False), row_contents(True)
    unpacked_rows, packed_rows = BATCH, 2
    print(f"unpacked (8 rows x 64): {primus * unpacked_rows * s_unpacked:.0f} samples/s, "
          f"{primus * unpacked_rows * t_unpacked:.0f} real tokens/s")
    print(f"packed   (2 rows x 64): {packed * packed_rows * s_packed:.0f} samples/s, "
          f"{packed * packed_rows * t_packed:.0f} real tokens/s "
          f"({packed * packed_rows * t_packed / (primus * unpacked_rows * t_unpacked):.2f}x)")


if __name__ == "__main__":
    main()
