"""Real MaxText training on CPU through `primus run`: a tiny Llama 3, a few steps, loss must fall.

Each run costs seconds of imports and XLA compilation, so every run here checks several things.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.support import primus_env

from .conftest import (
    assert_trained,
    corpus_data,
    free_port,
    losses,
    read_metrics,
    run_dir,
    run_primus,
    write_experiment,
)

pytestmark = pytest.mark.slow

# Resume equality needs the same learning-rate schedule whether a run stops at step 2 or goes on to 4.
RESUMABLE = {"learning_rate_schedule_steps": 4}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One device, synthetic data, checkpoints every 2 steps: the uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    exp = write_experiment(tmp, name="ref", checkpoint="{interval: 2}", overrides=RESUMABLE)
    result = run_primus("run", str(exp))
    return result, run_dir(tmp / "ws", "ref")


def test_one_device_trains_and_keeps_a_reproducible_maxtext_config(reference):
    result, directory = reference
    assert_trained(result, directory, 4)
    first = read_metrics(directory)[0]
    assert set(first) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"}
    assert "step 4/4 | loss" in result.stderr + result.stdout
    config = yaml.safe_load((directory / "maxtext" / "pre_trainer.yml").read_text())
    assert config["base_config"] == "base.yml" and config["hardware"] == "cpu"
    assert (config["base_emb_dim"], config["base_num_decoder_layers"], config["steps"]) == (64, 2, 4)
    assert config["run_name"] == "ref" and config["base_output_directory"] == str(directory.parent)
    assert any(p.name.isdigit() for p in (directory / "checkpoints").iterdir())


def test_resumed_run_matches_the_uninterrupted_one(reference, tmp_path):
    _, ref_dir = reference
    exp = write_experiment(tmp_path, name="ref", checkpoint="{interval: 2, resume: auto}", overrides=RESUMABLE)
    first = run_primus("run", str(exp), "train.steps=2")
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = run_primus("run", str(exp))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    directory = run_dir(tmp_path / "ws", "ref")
    steps = [m["step"] for m in read_metrics(directory)]
    assert steps == [1, 2, 3, 4], steps  # the second run started at step 3
    assert losses(directory)[4] == pytest.approx(losses(ref_dir)[4], rel=1e-5, abs=1e-6)
    # `primus runs` and `primus compare` read a maxtext run as any other (issue 15): two attempts, one history
    row, = json.loads(run_primus("runs", str(tmp_path / "ws"), "--json").stdout)
    assert (row["backend"], row["state"], row["step"], row["steps"], row["attempts"]) == ("maxtext", "done", 4, 4, 2)
    compared, = json.loads(run_primus("compare", str(directory), "--json").stdout)
    assert compared["last_loss"] == pytest.approx(losses(directory)[4]) and compared["tokens_per_s"] > 0


@pytest.mark.parametrize(("layout", "parallel", "data"), [
    ("fsdp", "{fsdp: true}", "{mock: true}"),
    ("tensor", "{tensor: 2, fsdp: false}", "{mock: true}"),
    ("data", "{data: 2}", corpus_data()),  # also the real corpus through MaxText's HF data path
])
def test_two_host_devices(tmp_path, layout, parallel, data):
    exp = write_experiment(tmp_path, name=layout, parallel=parallel, data=data)
    result = run_primus("run", str(exp), "--nproc-per-node", "2")
    directory = run_dir(tmp_path / "ws", layout)
    assert_trained(result, directory, 4)
    config = yaml.safe_load((directory / "maxtext" / "pre_trainer.yml").read_text())
    # the mesh MaxText ran with: each layout's axis holds both devices (never MaxText's -1 default,
    # which the translator fills for the job's devices), the other axes 1
    axis = {"fsdp": "ici_fsdp_parallelism", "tensor": "ici_tensor_parallelism", "data": "ici_data_parallelism"}
    assert {name: config.get(key, 1) for name, key in axis.items()} == {name: 2 if name == layout else 1
                                                                       for name in axis}
    log = (directory / "logs").rglob("*.log")
    assert any("Num_devices: 2" in p.read_text() for p in log)
    # tokens per step count the whole job: 2 devices x 4 sequences x 64 tokens
    m = read_metrics(directory)[-1]
    assert m["tokens_per_s"] * m["step_time_s"] == pytest.approx(2 * 4 * 64, rel=1e-3)


def test_two_real_jax_processes_train_together(tmp_path):
    """Two `primus run --nnodes 2` processes on this machine: JAX's coordinator at MASTER_ADDR:MASTER_PORT.

    Gloo gives the processes 30 s to meet at the first collective; on a badly overloaded machine their
    start-up can drift further apart than that, which fails this test rather than hanging it.
    """
    exp = write_experiment(tmp_path, name="multi", parallel="{data: 2}")
    port = str(free_port())
    env = primus_env({"JAX_PLATFORMS": "cpu"})
    # Output goes to files, not pipes: waiting on one process while the other's pipe fills would
    # block that one before the first collective, and gloo gives up after 30 s.
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "-m", "primus", "run", str(exp), "--nnodes", "2", "--node-rank",
                               str(rank), "--master-addr", "127.0.0.1", "--master-port", port],
                              stdout=log.open("w"), stderr=subprocess.STDOUT, text=True, env=env)
             for rank, log in zip((0, 1), logs, strict=True)]
    try:
        for p in procs:
            p.wait(timeout=420)
        outputs = [log.read_text() for log in logs]
    finally:
        for p in procs:  # a process whose peer died waits on the coordinator; do not leave it behind
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-5000:]
    directory = run_dir(tmp_path / "ws", "multi")
    seen = losses(directory)
    assert sorted(seen) == [1, 2, 3, 4] and seen[4] < seen[1]  # one writer: each step once
    # MaxText's own output goes to the run's per-rank log files (the console keeps Primus's lines)
    rank_logs = "".join(f.read_text() for f in (directory / "logs").rglob("*.log"))
    assert "Num_devices: 2" in rank_logs
