"""Issue 15 on maxtext: a damaged newest checkpoint (`checkpoint.on_damaged`) and a bad corpus line
named by file and line, both found before JAX starts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from primus.errors import ConfigError

from .conftest import CORPUS, TOKENIZER, losses, read_metrics, run_dir, run_primus, write_experiment

pytestmark = pytest.mark.slow

RESUMABLE = {"learning_rate_schedule_steps": 4}  # one LR schedule whether a run stops at step 3 or goes on to 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run: 4 steps, MaxText checkpoints at its steps 0, 2 and 3."""
    tmp = tmp_path_factory.mktemp("reference")
    result = run_primus("run", str(write_experiment(tmp, name="ref", checkpoint="{interval: 2}", overrides=RESUMABLE)))
    assert result.returncode == 0, result.stderr[-4000:]
    directory = run_dir(tmp / "ws", "ref")
    assert sorted(p.name for p in (directory / "checkpoints").iterdir()) == ["0", "2", "3"]
    return directory


def _only_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-4000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("primus: error:")]
    assert len(errors) == 1, result.stderr[-4000:]
    return errors[0]


def _largest_data_file(step: Path) -> Path:
    return max((step / "items").rglob("ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)


def test_damaged_newest_checkpoint_fails_by_default_and_previous_resumes_before_it(reference, tmp_path):
    exp = write_experiment(tmp_path, name="ref", checkpoint="{interval: 2, resume: auto}", overrides=RESUMABLE)
    first = run_primus("run", str(exp), "train.steps=3")  # MaxText checkpoints at its steps 0 and 2
    assert first.returncode == 0, first.stderr[-4000:]
    directory = run_dir(tmp_path / "ws", "ref")
    newest = directory / "checkpoints" / "2"
    shard = _largest_data_file(newest)
    half = shard.stat().st_size // 2
    os.truncate(shard, half)

    failed = run_primus("run", str(exp))  # on_damaged: fail, the default
    error = _only_error(failed)
    assert f"checkpoint {newest} cannot be loaded: {shard.relative_to(newest)} is truncated" in error, error
    assert "checkpoint.on_damaged=previous" in error and "delete it" in error, error
    assert "jax" not in failed.stderr.lower()  # found before JAX started
    assert shard.stat().st_size == half  # nothing moved or deleted

    resumed = run_primus("run", str(exp), "checkpoint.on_damaged=previous")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    warnings = [line for line in resumed.stderr.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], resumed.stderr[-4000:]
    assert f"checkpoint {newest} is damaged" in warnings[0] and "resuming from step 0" in warnings[0]
    assert (directory / "checkpoints" / "2.damaged" / shard.relative_to(newest)).stat().st_size == half  # kept
    records = [m for m in read_metrics(directory) if "loss" in m]
    last = max(m["attempt"] for m in records)
    resumed_losses = {m["step"]: m["loss"] for m in records if m["attempt"] == last}
    assert sorted(resumed_losses) == [2, 3, 4], records  # restored MaxText's step 0: after Primus step 1
    expected = losses(reference)
    assert resumed_losses == pytest.approx({step: expected[step] for step in (2, 3, 4)}, rel=1e-5, abs=1e-6)


def _damage(step: Path, how: str) -> str:
    """Damage a copy of a complete checkpoint; returns what the error must say."""
    if how == "truncated data file":
        shard = _largest_data_file(step)
        os.truncate(shard, shard.stat().st_size // 2)
        return f"{shard.relative_to(step)} is truncated ("
    if how == "missing data file":
        shard = _largest_data_file(step)
        shard.unlink()
        return f"{shard.relative_to(step)} is missing"
    if how == "truncated B+tree node":
        node = next((step / "items" / "d").iterdir())
        os.truncate(node, node.stat().st_size // 2)
        return f"items/d/{node.name} cannot be read ("
    if how == "missing manifest":
        (step / "items" / "manifest.ocdbt").unlink()
        return "items/manifest.ocdbt is missing"
    if how == "truncated _METADATA":
        meta = step / "items" / "_METADATA"
        os.truncate(meta, meta.stat().st_size // 2)
        return "items/_METADATA cannot be read ("
    if how == "missing items":
        shutil.rmtree(step / "items")
        return "items/ is missing"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated data file", "missing data file", "truncated B+tree node",
                                 "missing manifest", "truncated _METADATA", "missing items"])
def test_check_complete_names_the_damaged_file(reference, tmp_path, how):
    from primus_maxtext.checkpoint import DamagedCheckpoint, check_complete

    step = tmp_path / "2"
    shutil.copytree(reference / "checkpoints" / "2", step)
    check_complete(step)  # whole: no error
    expected = _damage(step, how)
    with pytest.raises(DamagedCheckpoint) as caught:
        check_complete(step)
    assert caught.value.path == step and expected in caught.value.reason, caught.value.reason


def test_resolve_damaged_fails_or_moves_the_step_aside(reference, tmp_path):
    from primus_maxtext.checkpoint import resolve_damaged

    checkpoints = tmp_path / "checkpoints"
    for name in ("0", "2", "3"):
        shutil.copytree(reference / "checkpoints" / name, checkpoints / name)
    assert resolve_damaged(checkpoints, None) == checkpoints / "3"
    _damage(checkpoints / "3", "truncated data file")
    _damage(checkpoints / "2", "missing manifest")
    with pytest.raises(ConfigError, match="checkpoint.on_damaged=previous"):
        resolve_damaged(checkpoints, "fail")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["0", "2", "3"]
    # two damaged in a row: each is moved aside, and the newest complete one is what MaxText restores
    assert resolve_damaged(checkpoints, "previous") == checkpoints / "0"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["0", "2.damaged", "3.damaged"]
    _damage(checkpoints / "0", "truncated _METADATA")
    with pytest.raises(ConfigError, match="no older checkpoint"):
        resolve_damaged(checkpoints, "previous")
    assert (checkpoints / "0").is_dir()  # the last one is never moved: the error says to delete it


def test_a_bad_corpus_line_is_named_by_file_and_line(tmp_path):
    good = [line for line in CORPUS.read_text().splitlines() if line.strip()][:5]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(good[:2] + ["{not json"] + good[2:]) + "\n")
    data = json.dumps({"path": str(corpus), "text_key": "text", "tokenizer": str(TOKENIZER)})
    result = run_primus("run", str(write_experiment(tmp_path, name="corpus", data=data)))
    error = _only_error(result)
    assert f"{corpus}:3: data.path: is not a JSON line" in error, error
    assert "jax" not in result.stderr.lower()  # found before JAX started, not by MaxText's loader


def test_corpora_are_the_local_jsonl_files_maxtext_reads(tmp_path):
    from primus_maxtext.data import corpora

    for name in ("a.jsonl", "b.jsonl", "c.json"):
        (tmp_path / name).write_text('{"text": "x"}\n')
    config = {"dataset_type": "hf", "hf_path": "json", "hf_train_files": str(tmp_path / "*"),
              "train_data_columns": ["body"], "hf_eval_files": str(tmp_path / "a.jsonl"), "eval_interval": -1}
    assert corpora(config) == [(tmp_path / "a.jsonl", "body"), (tmp_path / "b.jsonl", "body")]
    assert corpora({**config, "eval_interval": 5})[-1] == (tmp_path / "a.jsonl", "text")  # base.yml's column
    assert corpora({**config, "hf_train_files": "gs://bucket/*.jsonl"}) == []
    assert corpora({**config, "dataset_type": "synthetic"}) == []
