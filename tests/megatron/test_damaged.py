"""Issue 15 on megatron: a damaged newest checkpoint (`checkpoint.on_damaged`), checkpoint files read
without unpickling code, and a bad corpus line named by file and line."""

from __future__ import annotations

import io
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from mg_helpers import EXAMPLE, assert_trained, run_dir, run_primus, train

from tests.support import CORPUS, TOKENIZER, assert_config_error, attempts, read_metrics

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace whose run of 6 steps stopped after step 4, with checkpoints at steps 2 and 4."""
    workspace = tmp_path_factory.mktemp("two-checkpoints")
    result = train(workspace, "checkpoint.interval=2", "exit_interval=4")
    assert result.returncode == 0, result.stderr[-3000:]
    found = sorted(p.name for p in (run_dir(workspace) / "checkpoints").iterdir() if p.is_dir())
    assert found == ["iter_0000002", "iter_0000004"], found
    return workspace


def _copy(workspace: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ws"
    shutil.copytree(workspace, copy)
    return copy


def _only_error(result) -> str:
    """Exit 2, no traceback, and exactly one `primus: error:` line (the log lines before it are the
    run's own console output)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-4000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("primus: error:")]
    assert len(errors) == 1, result.stderr[-4000:]
    return errors[0]


class _Payload:
    """Unpickled with code allowed, this creates `marker`: a planted checkpoint file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_damaged_newest_checkpoint_fails_by_default_and_previous_resumes_before_it(two_checkpoints, tmp_path):
    whole = tmp_path / "whole"
    reference = assert_trained(train(whole, "disable_last_saving=true"), whole)
    workspace = _copy(two_checkpoints, tmp_path)
    ckpts = run_dir(workspace) / "checkpoints"
    newest = ckpts / "iter_0000004"
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    half = shard.stat().st_size // 2
    os.truncate(shard, half)

    failed = train(workspace, "disable_last_saving=true")  # on_damaged: fail, the default
    error = _only_error(failed)
    assert f"checkpoint {newest} cannot be loaded: {shard.name} is truncated" in error, error
    assert "checkpoint.on_damaged=previous" in error and "delete it" in error, error
    assert newest.is_dir() and shard.stat().st_size == half  # nothing moved or deleted

    resumed = train(workspace, "checkpoint.on_damaged=previous", "disable_last_saving=true")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    warnings = [line for line in resumed.stderr.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], resumed.stderr[-4000:]
    assert f"checkpoint {newest} is damaged" in warnings[0] and "resuming from iter_0000002" in warnings[0]
    kept = ckpts / "iter_0000004.damaged"
    assert (kept / shard.name).stat().st_size == half  # moved aside as it was, never deleted
    runs = attempts(run_dir(workspace) / "metrics.jsonl")
    last = max(runs)
    assert runs[last] == [3, 4, 5, 6], runs  # resumed after step 2, not from 1 and not after 4
    losses = {r["step"]: r["loss"] for r in read_metrics(run_dir(workspace) / "metrics.jsonl") if r["attempt"] == last}
    assert losses == {step: reference[step] for step in (3, 4, 5, 6)}  # bit for bit


DAMAGE = {
    "truncated shard": ("__0_1.distcp", "truncate", "__0_1.distcp is truncated ("),
    "missing common.pt": ("common.pt", "delete", "common.pt is missing"),
    "truncated common.pt": ("common.pt", "truncate", "common.pt cannot be read"),
    "truncated .metadata": (".metadata", "truncate", ".metadata cannot be read"),
    "planted .metadata": (".metadata", "plant", ".metadata cannot be read (it refers to posix.system"),
    "planted common.pt": ("common.pt", "plant", "common.pt cannot be read (Weights only load failed"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_check_complete_names_the_damaged_file_and_runs_no_planted_code(case, two_checkpoints, tmp_path):
    import torch

    from primus_megatron.checkpoint import DamagedCheckpoint, check_complete

    name, how, expected = DAMAGE[case]
    step = tmp_path / "iter_0000004"
    shutil.copytree(run_dir(two_checkpoints) / "checkpoints" / step.name, step)
    assert check_complete(step)["step"] == 4
    marker = tmp_path / "PWNED"
    target = step / name
    if how == "truncate":
        os.truncate(target, target.stat().st_size // 2)
    elif how == "delete":
        target.unlink()
    elif name == "common.pt":
        torch.save({"step": _Payload(marker)}, target)
    else:
        target.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(DamagedCheckpoint) as caught:
        check_complete(step)
    assert caught.value.path == step and expected in caught.value.reason, caught.value.reason
    assert not marker.exists()


def test_loading_reads_distcp_objects_and_metadata_without_code(two_checkpoints, tmp_path):
    """What megatron-core's torch_dist load reads through torch: the `.metadata` pickle and the
    objects (RNG state, optimizer layout) stored as bytes in the .distcp files."""
    import torch
    from megatron.core.dist_checkpointing.strategies import torch as strategy

    from primus_megatron.checkpoint import _weights_only_reads

    original = strategy.MCoreLoadPlanner, strategy._get_filesystem_reader
    good = run_dir(two_checkpoints) / "checkpoints" / "iter_0000002"
    planted = tmp_path / "iter_0000002"
    shutil.copytree(good, planted)
    marker = tmp_path / "PWNED"
    (planted / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    payload, plain = io.BytesIO(), io.BytesIO()
    torch.save(_Payload(marker), payload)
    torch.save({"tracker": torch.ones(2)}, plain)
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="rng_state"))
    with _weights_only_reads():
        assert strategy._get_filesystem_reader(str(good), cache_metadata=True).read_metadata().storage_data
        with pytest.raises(pickle.UnpicklingError, match="posix.system"):
            strategy._get_filesystem_reader(str(planted)).read_metadata()
        planner = strategy.MCoreLoadPlanner(flatten_state_dict=False)
        planner.state_dict = {}
        planner.load_bytes(item, io.BytesIO(plain.getvalue()))
        assert torch.equal(planner.state_dict["rng_state"]["tracker"], torch.ones(2))
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            planner.load_bytes(item, io.BytesIO(payload.getvalue()))
    assert not marker.exists()
    assert (strategy.MCoreLoadPlanner, strategy._get_filesystem_reader) == original  # only during a load


@pytest.fixture
def bad_corpus(tmp_path: Path) -> Path:
    good = [line for line in CORPUS.read_text().splitlines() if line.strip()][:5]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(good[:2] + ["{not json"] + good[2:]) + "\n")
    return corpus


def test_a_bad_corpus_line_is_named_by_file_and_line(bad_corpus, tmp_path):
    cache = tmp_path / "cache"
    data = ["data.mock=false", f"data.path={bad_corpus}", f"data.tokenizer={TOKENIZER}", f"data_cache_path={cache}"]
    error = _only_error(train(tmp_path / "ws", *data))
    assert f"{bad_corpus}:3: data.path: is not a JSON line" in error, error
    assert not list(cache.glob("*")), list(cache.glob("*"))  # no partial .bin left in the cache
    # `primus data prepare` reads the corpus the same way, before its progress bar starts
    prepared = run_primus("data", "prepare", str(EXAMPLE), "--backend", "megatron", *data)
    assert_config_error(prepared, f"{bad_corpus}:3: data.path: is not a JSON line")


def test_a_json_corpus_is_read_as_json_lines_like_megatron_lm(tmp_path):
    """Megatron-LM's `.json` corpora are JSON lines; core's reader takes only `.jsonl` for JSON."""
    from primus.errors import ConfigError
    from primus_megatron.data import corpus_documents

    good = tmp_path / "good.json"
    good.write_text('{"text": "a"}\n\n{"text": "b", "id": 2}\n')
    assert list(corpus_documents(good, "text")) == ["a", "b"]
    bad = tmp_path / "corpus.json"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ConfigError) as caught:
        list(corpus_documents(bad, "text"))
    assert str(caught.value).startswith(f"{bad}:2: data.text_key: has no text field 'text'")
