"""Issue 12 on the maxtext backend: Hugging Face weights into MaxText's parameter tree, `primus eval`
against transformers (1 and 2 host devices), `primus export` from MaxText's Orbax checkpoints, an
exact round trip. Real CLI, tiny transformers models.

MaxText needs Python 3.12 and no CPU build of torch exists for it here, so the tiny models and
transformers' reference numbers come from a Python that has torch and transformers: this one when it
has them, else $PRIMUS_TORCH_PYTHON, else the repository's .venv (Python 3.11); the test is skipped,
saying so, when none has them.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hf_models import EVAL_BLOCKS, SEQ_LENGTH, assert_parity, last_eval
from tests.support import (
    CORPUS,
    ROOT,
    assert_config_error,
    assert_ok,
    experiment_template,
    run_dir_for,
    session_cache,
    write_yaml,
)

from .conftest import run_primus

pytestmark = pytest.mark.slow

EXPERIMENT = experiment_template("maxtext", """\
    model: {{hf_path: {model}}}
    train: {{steps: {steps}, lr: 1.0e-2, micro_batch_size: 2, seq_length: {seq}, seed: 1234, log_interval: 1,
             precision: fp32}}
    data: {{mock: true}}
    checkpoint: {{interval: {steps}}}
    overrides: {{attention: dot_product}}
""")

# Run by a Python with torch + transformers: make the tiny models, or score model directories.
HELPER = """
import json, sys
from pathlib import Path
import tests.hf_models as models
from tests.hf_models import eval_blocks, make_tiny_hf, reference_eval
# Llama 3.1's RoPE: MaxText rotates interleaved pairs for it, transformers the two halves of a head
models.CONFIGS["llama31"] = dict(models.CONFIGS["llama"], rope_parameters={
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192})
what, args = sys.argv[1], sys.argv[2:]
if what == "make":  # make the models, then score them
    args = [str(make_tiny_hf(family, Path(args[0]) / family)) for family in args[1:]]
blocks = eval_blocks()
print(json.dumps({d: reference_eval(Path(d), blocks) for d in args}))
"""


def _has_torch(python: str) -> bool:
    code = "import torch, transformers"
    return subprocess.run([python, "-c", code], capture_output=True, timeout=120).returncode == 0


@functools.cache
def torch_python() -> str:
    for candidate in (sys.executable, os.environ.get("PRIMUS_TORCH_PYTHON"), str(ROOT / ".venv" / "bin" / "python")):
        if candidate and Path(candidate).exists() and _has_torch(candidate):
            return candidate
    pytest.skip("no Python with torch and transformers for the reference (set PRIMUS_TORCH_PYTHON)")


def helper(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([torch_python(), "-c", HELPER, *args], capture_output=True, text=True, timeout=300,
                            env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


FAMILIES = ("llama", "llama31", "qwen2", "qwen3", "qwen3_moe", "mixtral")


@pytest.fixture(scope="module")
def made() -> tuple[dict[str, Path], dict[str, tuple[float, int]]]:
    """The tiny models of every family (never written into) and transformers' (summed loss, tokens)
    of each on core's evaluation blocks, from one process."""
    root = session_cache() / "maxtext-hf-models"
    scored = helper("make", str(root), *FAMILIES)
    return {f: root / f for f in FAMILIES}, {f: tuple(scored[str(root / f)]) for f in FAMILIES}


@pytest.fixture(scope="module")
def models(made) -> dict[str, Path]:
    return made[0]


@pytest.fixture(scope="module")
def references(made) -> dict[str, tuple[float, int]]:
    return made[1]


def experiment(tmp: Path, model: Path, *, name: str = "exp", steps: int = 3) -> Path:
    return write_yaml(tmp / f"{name}.yaml", EXPERIMENT.format(name=name, workspace=tmp / "ws", model=model,
                                                              steps=steps, seq=SEQ_LENGTH))


def assert_close(record: dict, reference: tuple[float, int], what: str) -> None:
    assert_parity(record, reference, what)  # 1e-6: tight enough to see a wrong RoPE feature order


def evaluate(exp: Path, *extra: str) -> None:
    assert_ok(run_primus("eval", str(exp), "--data", str(CORPUS), "--max-blocks", str(EVAL_BLOCKS), *extra))


def tensors(directory: Path) -> dict:
    from safetensors.numpy import load_file

    out: dict = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.parametrize("family,devices", [("llama31", 1), ("llama", 2), ("qwen2", 1), ("qwen3", 1), ("qwen3_moe", 1)])
def test_eval_of_hf_init_matches_transformers(tmp_path, models, references, family, devices):
    exp = experiment(tmp_path, models[family])
    evaluate(exp, "--nproc-per-node", str(devices))
    record = last_eval(run_dir_for(tmp_path / "ws", "exp"))
    assert record["step"] is None and record["checkpoint"] == "init" and record["world_size"] == devices
    assert_close(record, references[family], f"maxtext {family} on {devices} device(s)")


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, models):
    """Mixtral (MoE, query scale folded into MaxText's kernel) loaded under fsdp on 2 host devices
    (each shard read from its own slices) and trained one step at learning rate 0 (MaxText's own key;
    train.lr must be positive): its sharded checkpoint holds the loaded weights, exported in one process."""
    tmp = tmp_path_factory.mktemp("round-trip")
    exp = experiment(tmp, models["mixtral"], steps=1)
    assert_ok(run_primus("run", str(exp), "learning_rate=0.0", "--nproc-per-node", "2"))
    run = run_dir_for(tmp / "ws", "exp")
    result = run_primus("export", str(run), str(tmp / "export"))
    assert_ok(result)
    return exp, run, tmp / "export", result


def test_round_trip_through_maxtext_is_exact(models, round_trip):
    _, run, out, result = round_trip
    assert "step 1" in result.stdout
    assert (run / "maxtext" / "hf_init" / "pre_trainer" / "primus_source.json").is_file()  # converted once, kept
    original, exported = tensors(models["mixtral"]), tensors(out)
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and (exported[name] == tensor).all(), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "mixtral"
    assert (out / "tokenizer.json").is_file()


def test_eval_of_a_checkpoint_matches_transformers(references, round_trip):
    # saved under fsdp on 2 devices, evaluated on 1: the parameters are resharded as they load
    exp, run, _, _ = round_trip
    evaluate(exp, "--checkpoint", "latest")
    record = last_eval(run)
    assert record["step"] == 1 and record["checkpoint"] == "latest"
    assert_close(record, references["mixtral"], "maxtext mixtral checkpoint")


def test_trained_export_scores_like_the_maxtext_checkpoint(tmp_path, models):
    exp = experiment(tmp_path, models["llama"], steps=3)
    assert_ok(run_primus("run", str(exp)))
    run = run_dir_for(tmp_path / "ws", "exp")
    evaluate(exp, "--checkpoint", "latest")
    record = last_eval(run)
    assert record["step"] == 3
    out = tmp_path / "export"
    assert_ok(run_primus("export", str(run), str(out)))
    exported, original = tensors(out), tensors(models["llama"])
    assert not (exported["model.layers.0.self_attn.q_proj.weight"] == original[
        "model.layers.0.self_attn.q_proj.weight"]).all(), "training changed nothing"
    assert_close(record, tuple(helper("score", str(out))[str(out)]), "maxtext eval vs transformers on the export")
    # a step the run never saved: one line naming the steps it has
    assert_config_error(run_primus("export", str(run), str(tmp_path / "none"), "--step", "2"), "no checkpoint of step 2",
                        "steps: 1, 3")
    assert not (tmp_path / "none").exists()
