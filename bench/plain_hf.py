"""The baseline for bench/overhead.py: the same tiny Llama trained by a plain transformers + torch loop.

No Primus import: model from a LlamaConfig, seeded Markov-chain tokens, AdamW, warmup + cosine,
gradient clipping, the loss read back every step (as a logging loop does). Prints the wall time
of steps 2..N, the span bench/overhead.py also measures on the Primus side.

    python bench/plain_hf.py --steps 200 [--micro-batch 8 --seq-length 64 --seed 1234]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

# llama3_tiny.yaml, as the hf backend translates it
CONFIG = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, intermediate_size=172, max_position_embeddings=256, rms_norm_eps=1e-5,
              tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


def markov_tokens(count: int, seq_length: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    tokens = torch.empty(count, seq_length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (count,), generator=g)
    choice = torch.randint(0, 4, (count, seq_length), generator=g)
    for t in range(1, seq_length):
        tokens[:, t] = successors[tokens[:, t - 1], choice[:, t]]
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    data = markov_tokens(2048, args.seq_length, CONFIG["vocab_size"], args.seed)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=args.steps)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))
    model.train()
    first_step_done = 0.0
    for step in range(args.steps):
        first = step * args.micro_batch % len(data)
        rows = data[order[first:first + args.micro_batch]]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = loss.item()
        if step == 0:
            first_step_done = time.perf_counter()
    # steps 2..N, timed like Primus's log timestamps of step 1 and step N
    loop_s = time.perf_counter() - first_step_done
    print(f"plain_hf steps={args.steps} loss={last_loss:.4f} loop_s={loop_s:.4f}")


if __name__ == "__main__":
    main()
