"""Issue 13's user mistakes in the new model fields, through the real CLI: exit 2, one line naming
the file and the key, nothing created.

The mistakes are the model's, so any backend shows them: the toy backend in the core session, the
hf backend where it is installed (tests/hf/test_families.py runs the Llama 4 case in the hf session,
where a backend builds Llama 4: the toy one builds llama only)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.support import assert_config_error, run_primus, write_yaml

FRAMEWORK = "hf" if importlib.util.find_spec("primus_hf") else "toy"

EXPERIMENT = """
work_group: team
user_name: me
exp_name: bad
workspace: {workspace}
modules:
  pre_trainer:
    framework: {framework}
    config: pre_trainer.yaml
    model: {model}
    train: {{steps: 2, lr: 0.1, micro_batch_size: 1, global_batch_size: {world}, seq_length: {seq}}}
    parallel: {{expert: {expert}}}
"""

_BASE = """\
vocab_size: 512
hidden_size: 64
num_layers: 2
num_heads: 4
ffn_hidden_size: 128
max_position_embeddings: 256
"""
MLA = "mla: {kv_lora_rank: 32, qk_nope_head_dim: 16, qk_rope_head_dim: 8, v_head_dim: 16}\n"
MOE = "moe: {{experts: {experts}, top_k: {top_k}, expert_ffn: 32}}\n"
FAMILY = "llama" if FRAMEWORK == "toy" else "mixtral"  # a family the backend builds, with routed experts

#: case -> (model preset text or preset name, experiment values, what the one line must name)
CASES = {
    "mla head dims": ("family: deepseek\nhead_dim: 32\n" + _BASE + MLA, {},
                      ("bad_model.yaml", "head_dim", "mla.qk_nope_head_dim")),
    "top_k above experts": (f"family: {FAMILY}\n" + _BASE + MOE.format(experts=4, top_k=6), {},
                            ("bad_model.yaml", "moe", "moe.top_k (6) cannot exceed moe.experts (4)")),
    "expert parallel": (f"family: {FAMILY}\n" + _BASE + MOE.format(experts=8, top_k=2), {"expert": 3, "world": 6},
                        ("exp.yaml", "parallel.expert", "expert (3) does not divide the model's 8 experts")),
    "llama4 chunk above seq_length": ("llama4_tiny.yaml", {"seq": 8},
                                      ("exp.yaml", "train.seq_length", "attention_chunk_size 16 is larger than "
                                                                       "seq_length 8")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_impossible_model_families_input_is_one_line_exit_2_nothing_created(case: str, tmp_path: Path):
    model, values, needles = CASES[case]
    if model.endswith(".yaml"):
        if FRAMEWORK == "toy":
            pytest.skip("the toy backend builds llama only: the hf session runs this case")
    else:
        write_yaml(tmp_path / "bad_model.yaml", model)
        model = "bad_model.yaml"
    workspace = tmp_path / "ws"
    settings = {"seq": 32, "expert": 1, "world": 1, **values}
    exp = write_yaml(tmp_path / "exp.yaml", EXPERIMENT.format(workspace=workspace, framework=FRAMEWORK, model=model,
                                                              **settings))
    before = sorted(tmp_path.rglob("*"))
    assert_config_error(run_primus("run", str(exp), "--nproc-per-node", str(settings["world"])), *needles)
    assert not workspace.exists() and sorted(tmp_path.rglob("*")) == before
