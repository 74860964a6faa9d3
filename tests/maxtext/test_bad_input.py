"""Bad input through the real CLI: exit 2 with one line, before JAX starts, nothing left behind."""

from __future__ import annotations

import pytest

from .conftest import corpus_data, run_primus, write_experiment


@pytest.mark.parametrize(("kwargs", "args", "expected"), [
    ({"overrides": {"per_device_batch_sise": 2}}, [], "did you mean 'per_device_batch_size'"),
    ({}, ["unknown_maxtext_key=1"], "unknown key"),
    ({"parallel": "{tensor: 2}", "overrides": {"ici_fsdp_parallelism": 1}}, ["--nproc-per-node", "4"],
     "ici_tensor_parallelism=2 does not match the job's 4 devices"),
    ({"overrides": {"ici_fsdp_parallelism": 2, "ici_data_parallelism": 2}}, ["--nproc-per-node", "2"],
     "= 4 does not match the job's 2 devices"),
    ({"data": corpus_data(tokenizer="/nonexistent/tokenizer")}, [], "tokenizer directory /nonexistent/tokenizer"),
    ({"data": corpus_data(tokenizer=None)}, [], "needs a tokenizer"),
    # a bad neutral value typed on the command line is reported there, not at the experiment's line
    ({"data": "{}"}, ["data.path=/nope.jsonl"], "command line: data.path=/nope.jsonl: corpus /nope.jsonl does not exist"),
    ({}, ["parallel.tensor=3", "--nproc-per-node", "4"], "command line: parallel.tensor=3: tensor (3)"),
])
def test_bad_input_exits_2_and_leaves_nothing(tmp_path, kwargs, args, expected):
    workspace = tmp_path / "ws"
    exp = write_experiment(tmp_path, workspace=workspace, **kwargs)
    r = run_primus("run", str(exp), *args)
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("primus: error:")]
    assert len(errors) == 1 and expected in errors[0], r.stderr
    assert "Traceback" not in r.stderr and "jax" not in r.stderr.lower()
    assert not workspace.exists()
