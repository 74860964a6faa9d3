"""Post-training (SFT, LoRA), the backend-neutral half (docs/guide/posttrain.md).

- `rules`: what core checks before a post_trainer module runs (formats, records, templates, what the backend can do).
- `data`: instruction and chat records -> token sequences with a loss mask, packed or padded, cached per run; the
  same tokens on every backend.
- `lora`: the neutral LoRA layer names and the peft adapter directory every backend writes.
- `generate`: `primus generate`, greedy generation with a run's model through transformers.

Nothing here imports torch or transformers at module level; the tokenizer is passed in by the backend.
"""
