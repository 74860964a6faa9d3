"""Tiny Hugging Face models of every family Primus loads, and transformers' own numbers for them.

The reference for every backend's weights parity (issue 12): a random model made with transformers
in the test session (fp32, hidden 64, 2 layers, GQA 4/2, the example tokenizer's 512 tokens; DeepSeek
and Llama 4 in NEW_FAMILIES with 3 and 4 layers and every feature of theirs switched on), saved
as safetensors with the tokenizer beside it; `reference_eval` scores core's evaluation blocks with a
plain transformers forward. Imported as `tests.hf_models`; needs torch, transformers and tokenizers
(every backend's test session installs them).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any

from tests.support import CORPUS, TOKENIZER, session_cache

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
#: issue 13's families, kept apart so that tests parametrized over FAMILIES do not grow with them
NEW_FAMILIES = ("deepseek_v3", "deepseek_v2", "llama4")
#: relative agreement a backend's eval loss must reach with transformers' (fp32, CPU). The issue
#: asks for 1e-4, but on these tiny random models a RoPE feature order or a top-k normalisation
#: left wrong moves the loss by only 1e-5 to 1e-4; every backend measures 1e-7 or better.
PARITY_RTOL = 1e-6
SEQ_LENGTH = 32
SHARPEN = 4.0  # NEW_FAMILIES' weights (see make_tiny_hf)
EVAL_BLOCKS = 8

_COMMON = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
               tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1)
CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "qwen2": dict(model_type="qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": dict(model_type="qwen3", rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                  tie_word_embeddings=True),
    "qwen3_moe": dict(model_type="qwen3_moe", rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "mixtral": dict(model_type="mixtral", rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                    num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
}
# head_dim is the RoPE width in transformers' DeepSeek configs (qk_rope_head_dim; any other value breaks it)
_MLA = dict(num_hidden_layers=3, num_key_value_heads=4, head_dim=8, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            first_k_dense_replace=1)
CONFIGS.update({
    # DeepSeek-V3 at toy size: q LoRA, YaRN with mscale (the softmax scale moves), sigmoid routing with a
    # non-zero expert bias (make_tiny_hf fills it), 4 groups of which 2 are chosen, scaling 2.5, a dense layer first
    "deepseek_v3": dict(model_type="deepseek_v3", **_MLA, q_lora_rank=32, n_shared_experts=1, n_group=4,
                        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, num_nextn_predict_layers=0,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                         "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                         "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # DeepSeek-V2-Lite at toy size: no q LoRA, softmax routing without renormalisation, two shared experts
    "deepseek_v2": dict(model_type="deepseek_v2", **_MLA, q_lora_rank=None, n_shared_experts=2, topk_method="greedy",
                        norm_topk_prob=False, routed_scaling_factor=1.0,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    # Llama 4 text at toy size: MoE on layers 1 and 3 (a shared expert each), layer 3 without RoPE (and with
    # attention temperature: floor_scale 4, attn_scale 1 so it moves within SEQ_LENGTH), chunks of 16 < SEQ_LENGTH,
    # qk L2 norm
    "llama4": dict(model_type="llama4_text", num_hidden_layers=4, intermediate_size=64, intermediate_size_mlp=128,
                   num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layer_interval=4,
                   attention_chunk_size=16, use_qk_norm=True, attn_temperature_tuning=True, floor_scale=4,
                   attn_scale=1.0, router_aux_loss_coef=0.0,
                   rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
})


def make_tiny_hf(family: str, directory: Path, *, seed: int = 0) -> Path:
    """A random `family` model saved to `directory` (config.json, model.safetensors, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {**_COMMON, **CONFIGS[family]}
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms at 1.0 would hide a norm loaded into the wrong place
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.02)
            elif family in NEW_FAMILIES and "embed" not in name and "lm_head" not in name:
                # weights at 0.02 leave attention near uniform and the routed experts faint, so a lost
                # RoPE variant, temperature or router weighting would move the loss by less than
                # PARITY_RTOL: sharper weights make each feature count (measured 1e-5 to 1e-3)
                p.mul_(SHARPEN)
        for name, b in model.named_buffers():  # DeepSeek-V3's selection bias: zero would hide a lost one
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    for file in TOKENIZER.iterdir():
        shutil.copyfile(file, directory / file.name)
    return directory


@functools.cache
def tiny_hf(family: str) -> Path:
    """`make_tiny_hf` once per test session (the directory is shared: never write into it)."""
    return make_tiny_hf(family, session_cache() / "hf-models" / family)


def eval_blocks(data: Path = CORPUS, seq_length: int = SEQ_LENGTH, max_blocks: int = EVAL_BLOCKS) -> list[list[int]]:
    """Core's evaluation blocks of `data` with the example tokenizer."""
    from tokenizers import Tokenizer

    from primus.runs.evaluate import EvalRequest, blocks_for

    tokenizer = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    request = EvalRequest(data=str(data), tokenizer=str(TOKENIZER), seq_length=seq_length, max_blocks=max_blocks)
    return blocks_for(request, lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                      tokenizer.token_to_id("<|endoftext|>"))


def reference_eval(model_dir: Path, blocks: list[list[int]]) -> tuple[float, int]:
    """(summed token loss, tokens) of transformers' forward on `blocks`: the number to match."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = torch.tensor(blocks, dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits.double()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum")
    return float(loss), int(ids[:, 1:].numel())


def assert_parity(record: dict[str, Any], reference: tuple[float, int], what: str) -> None:
    """A `primus eval` JSON line against `reference_eval`'s numbers."""
    loss_sum, tokens = reference
    assert record["tokens"] == tokens, f"{what}: scored {record['tokens']} tokens, transformers {tokens}"
    expected = loss_sum / tokens
    assert math.isclose(record["loss"], expected, rel_tol=PARITY_RTOL), (
        f"{what}: eval loss {record['loss']:.7f} vs transformers {expected:.7f} "
        f"(relative {abs(record['loss'] - expected) / expected:.2e} > {PARITY_RTOL})")


def last_eval(run_dir: Path) -> dict[str, Any]:
    lines = (run_dir / "eval.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


def hf_tensors(model_dir: Path) -> dict[str, Any]:
    """Every tensor of a saved model directory (safetensors, all shards), by name."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out
