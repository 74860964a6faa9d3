"""Megatron post-training (docs/guide/posttrain.md, "## megatron"): the `post_trainer` module.

- `settings`: the run's SFT settings from the neutral sections or upstream's native keys (presets/sft_trainer.yaml).
- `loop`: PostTrainLoop, the pretraining loop with core's SFT rows, response-only loss and a Hugging Face result.
- `lora`: LoRA adapters on megatron-core's tensor-parallel linear layers, exported in peft's format.
"""
