"""The package without training: light import, discovery, key list, translation, examples."""

from __future__ import annotations

import subprocess
import sys

import pytest

from primus.errors import ConfigError
from primus_torchtitan.config_keys import config_keys, model_flavors, recorded_version
from primus_torchtitan.translate import TorchTitanTranslator

from .conftest import EXAMPLES, ROOT, run_primus, write_experiment


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


# ----------------------------------------------------------------------------- derive, explain, notices


def _module(experiment, *items: str, world_size: int = 1):
    from primus.config.resolve import resolve

    (module,) = resolve(experiment, list(items), world_size=world_size).modules.values()
    return module


def test_explain_train_steps_names_torchtitans_step_key(tmp_path) -> None:
    experiment = write_experiment(tmp_path, steps=6)
    result = run_primus("config", "show", str(experiment), "--explain", "train.steps")
    assert result.returncode == 0, result.stderr
    assert "train.steps = 6  -> training.steps" in result.stdout
    assert f"pre_trainer.training.steps = 6  <- neutral train ({experiment}:" in result.stdout
    assert _module(experiment).total_steps == 6  # the worker's progress line reads training.steps


def test_auto_data_degree_is_derived_from_the_world_size(tmp_path) -> None:
    """TorchTitan's -1 (and `parallel.fsdp: false`, which replicates) becomes the number of data
    ranks, explained as derived; a replicated run needs it, as TorchTitan refuses a -1 replica degree."""
    experiment = write_experiment(tmp_path)
    result = run_primus("config", "show", str(experiment), "parallel.tensor=2", "--nproc-per-node", "4",
                        "--explain", "parallelism.data_parallel_shard_degree")
    assert result.returncode == 0, result.stderr
    assert ("pre_trainer.parallelism.data_parallel_shard_degree = 2  <- derived from "
            "parallelism.tensor_parallel_degree, world_size") in result.stdout, result.stdout

    def degrees(*items: str) -> tuple[int, int]:
        p = _module(experiment, *items, world_size=2).native["parallelism"]
        return p["data_parallel_replicate_degree"], p["data_parallel_shard_degree"]

    assert degrees() == (1, 2)
    assert degrees("parallel.fsdp=true") == (1, 2)
    assert degrees("parallel.fsdp=false") == (2, 1)
    assert degrees("parallelism.data_parallel_replicate_degree=2") == (2, 1)


def test_min_lr_becomes_a_factor_of_the_resolved_learning_rate(tmp_path) -> None:
    experiment = write_experiment(tmp_path)  # train.lr 1e-2
    factor = _module(experiment, "train.min_lr=1e-4").native["lr_scheduler"]["min_lr_factor"]
    assert factor == pytest.approx(0.01)
    # an LR given natively is the one the schedule scales
    module = _module(experiment, "train.min_lr=1e-4", "optimizer.lr=1e-3")
    assert module.native["lr_scheduler"]["min_lr_factor"] == pytest.approx(0.1)
    assert module.explain("lr_scheduler.min_lr_factor").describe() == "derived from train.min_lr, optimizer.lr"
    # a factor written natively wins, as native keys win over the neutral sections
    module = _module(experiment, "train.min_lr=1e-4", "lr_scheduler.min_lr_factor=0.5")
    assert module.native["lr_scheduler"]["min_lr_factor"] == 0.5


def test_checkpoint_keys_on_the_command_line_native_and_neutral(tmp_path) -> None:
    """`checkpoint.enable` is TorchTitan's (native), `checkpoint.interval` is a neutral field too:
    both work from the command line and `--explain` names the item that set each."""
    experiment = write_experiment(tmp_path, checkpoint="{interval: 10}")
    items = ("checkpoint.enable=false", "checkpoint.interval=5")
    native = _module(experiment, *items).native["checkpoint"]
    assert native["enable"] is False and native["interval"] == 5
    for key, value, item in (("checkpoint.enable", "False", items[0]), ("checkpoint.interval", "5", items[1])):
        result = run_primus("config", "show", str(experiment), *items, "--explain", key)
        assert result.returncode == 0, result.stderr
        assert f"pre_trainer.{key} = {value}  <- cli (command line: {item})" in result.stdout, result.stdout


@pytest.mark.parametrize("example", sorted(p.name for p in (EXAMPLES / "torchtitan").glob("*.yaml")))
def test_no_neutral_field_is_reported_unused_falsely(example: str) -> None:
    """Every neutral field the examples set is used (checkpoint.resume by the adapter too)."""
    module = _module(EXAMPLES / "torchtitan" / example, world_size=8)
    assert not [n for n in module.notices if "is not used by" in n], module.notices


def test_a_neutral_field_torchtitan_does_not_use_is_reported(tmp_path) -> None:
    experiment = write_experiment(tmp_path, checkpoint="{resume: never}")
    notices = _module(experiment, "data.valid_fraction=0.1").notices
    assert notices == ["data.valid_fraction is not used by the torchtitan backend; ignored"], notices
