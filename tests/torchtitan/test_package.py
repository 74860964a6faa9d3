"""The package without training: light import, discovery, key list, translation, examples."""

from __future__ import annotations

import subprocess
import sys

import pytest

from primus.errors import ConfigError
from primus_torchtitan.config_keys import config_keys, model_flavors, recorded_version
from primus_torchtitan.translate import TorchTitanTranslator

from .conftest import EXAMPLES, ROOT, run_primus


def test_import_and_discovery_load_no_torch() -> None:
    code = ("import sys, primus_torchtitan, primus_torchtitan.translate\n"
            "from primus.backends.discovery import discover\n"
            "assert 'torchtitan' in discover().backends\n"
            "heavy = [m for m in ('torch', 'torchtitan') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shipped_key_list_matches_installed_torchtitan() -> None:
    """`python -m primus_torchtitan.config_keys` regenerates it after a torchtitan upgrade."""
    code = ("import json, torchtitan\n"
            "from primus_torchtitan import config_keys as c\n"
            "print(json.dumps({'v': torchtitan.__version__, 'keys': c.current_keys(), 'flavors': c.current_flavors()}))")
    prelude = ("from primus.patches.registry import PatchContext\n"
               "from primus.platform.detect import detect_platform\n"
               "from primus_torchtitan.patches import PATCHES\n"
               "ctx = PatchContext(backend='torchtitan', platform=detect_platform().kind, framework_version=None)\n"
               "[p.apply(ctx) for p in PATCHES if p.phase == 'before_import' and ctx.platform in p.platforms]\n")
    out = subprocess.run([sys.executable, "-c", prelude + code], check=True, capture_output=True, text=True)
    import json

    current = json.loads(out.stdout.strip().splitlines()[-1])
    assert current["v"] == recorded_version()
    assert current["keys"] == config_keys(), "run: python -m primus_torchtitan.config_keys"
    assert current["flavors"] == model_flavors()


@pytest.mark.parametrize(("path", "why"), [
    (("training", "steps"), None),
    (("parallelism", "tensor_parallel_degree"), None),
    (("optimizer", "lr"), None),  # Primus shorthand (upstream form)
    (("model", "flavor"), None),
    (("training", "dataset"), None),  # upstream alias of dataloader.dataset
    (("primus_turbo", "use_turbo_attention"), None),  # upstream switch, reported as unavailable
    (("training", "stepz"), "did you mean 'training.steps'"),
    (("parallelism", "tensor_parallel"), "did you mean 'parallelism.tensor_parallel_degree'"),
    (("trainingg", "seq_len"), "did you mean 'training.seq_len'"),
])
def test_native_keys_are_checked_against_torchtitan(path: tuple[str, ...], why: str | None) -> None:
    translator = TorchTitanTranslator()
    known = translator.native_keys({"trainable": True})
    result = translator.check_native_key(path, known)
    if why is None:
        assert result is None
    else:
        assert result is not None and why in result


def test_neutral_sections_translate_to_torchtitan_names(tmp_path) -> None:
    from primus.config.resolve import resolve

    exp = tmp_path / "e.yaml"
    exp.write_text(
        "exp_name: t\nworkspace: " + str(tmp_path / "ws") + "\nmodules:\n  pre_trainer:\n    framework: torchtitan\n"
        "    model: qwen3_tiny.yaml\n"
        "    train: {steps: 7, lr: 1.0e-3, micro_batch_size: 2, global_batch_size: 8, seq_length: 32, seed: 3}\n"
        "    parallel: {tensor: 2}\n    data: {mock: true}\n    checkpoint: {interval: 5, keep_last: 2}\n")
    native = resolve(exp, world_size=4).modules["pre_trainer"].native
    assert native["training"]["steps"] == 7 and native["optimizer"]["lr"] == 1.0e-3
    assert native["training"]["local_batch_size"] == 2 and native["training"]["global_batch_size"] == 8
    assert native["training"]["seq_len"] == 32 and native["debug"]["seed"] == 3
    assert native["parallelism"]["tensor_parallel_degree"] == 2
    assert native["checkpoint"] == {**native["checkpoint"], "enable": True, "interval": 5, "keep_latest_k": 2}
    assert native["model"]["name"] == "qwen3" and native["model"]["flavor"] == "custom"
    assert native["model"]["dim"] == 64 and native["model"]["tie_embeddings"] is True


def test_unsupported_family_says_so() -> None:
    from primus.models.spec import ModelSpec
    from primus_torchtitan.translate import TorchTitanTranslator

    spec = ModelSpec(family="mixtral", vocab_size=8, hidden_size=8, num_layers=1, num_heads=2,
                     ffn_hidden_size=8, max_position_embeddings=8)
    with pytest.raises(ConfigError, match="not supported by the torchtitan backend"):
        TorchTitanTranslator().translate_model(spec)


@pytest.mark.parametrize("example", ["llama3_tiny_cpu.yaml", "llama3_tiny_corpus.yaml",
                                     "llama3.1_8B-BF16-pretrain.yaml"])
def test_examples_validate_and_dry_run(example: str) -> None:
    path = EXAMPLES / "torchtitan" / example
    result = run_primus("config", "validate", str(path))
    assert result.returncode == 0, result.stderr
    result = run_primus("run", str(path), "--dry-run", "--nproc-per-node", "8")
    assert result.returncode == 0, result.stderr
    assert "backend torchtitan" in result.stdout


def test_upstream_turbo_switches_are_reported_not_rejected() -> None:
    result = run_primus("run", str(EXAMPLES / "torchtitan" / "llama3.1_8B-BF16-pretrain.yaml"), "--dry-run",
                        "--nproc-per-node", "8")
    assert result.returncode == 0, result.stderr
    assert "primus_turbo.enable_primus_turbo: accepted for compatibility but not available here" in result.stderr


def test_repo_root_is_where_tests_expect() -> None:
    assert (ROOT / "packages" / "primus-torchtitan" / "pyproject.toml").is_file()
