"""Launcher rendering (--dry-run) and quoting: hostile user strings never reach a shell unquoted."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

from primus.config.schema import ContainerSection, SlurmSection
from primus.launch.container import container_argv
from primus.launch.slurm import render_sbatch
from tests.support import assert_config_error, primus_env

from .conftest import run_primus

HOSTILE = "x $(touch PWNED) `touch PWNED2`; touch PWNED3 'q\" && echo"


def test_slurm_dry_run_shows_the_script_and_creates_nothing(toy_exp):
    exp, ws = toy_exp
    r = run_primus("run", str(exp), "--launcher", "slurm", "--nnodes", "2", "--nproc-per-node", "2", "--dry-run",
                   "--sbatch-arg=--qos=high", "--srun-arg=--cpu-bind=none")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=1" in out and "#SBATCH --qos=high" in out
    assert "#SBATCH --signal=TERM@120" in out
    assert "srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit=1 --cpu-bind=none" in out
    assert "-m primus.launch.node --run-dir" in out and "--nproc-per-node 2 --nnodes 2" in out
    assert not ws.exists()


def test_container_dry_run(toy_exp):
    exp, ws = toy_exp
    r = run_primus("run", str(exp), "--launcher", "container", "--image", "rocm/primus:latest", "--dry-run",
                   "--platform", "rocm")  # the ROCm devices go in for a ROCm target only (issue 18)
    assert r.returncode == 0, r.stderr
    for part in ("docker run --rm --ipc host --network host --group-add video", "--device /dev/kfd",
                 "--device /dev/dri", f"-v {ws.resolve()}:{ws.resolve()}", "rocm/primus:latest python -m primus.launch.node"):
        assert part in r.stdout, part
    r = run_primus("run", str(exp), "--launcher", "container", "--dry-run")
    assert r.returncode == 2 and "needs an image" in r.stderr


def test_local_two_node_plan_uses_c10d(toy_exp):
    exp, _ = toy_exp
    r = run_primus("run", str(exp), "--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "2",
                   "--master-addr", "10.1.2.3", "--master-port", "29400", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "--rdzv-backend c10d --rdzv-endpoint 10.1.2.3:29400" in r.stdout and "--node-rank 1" in r.stdout


def _fake_tool(bin_dir: Path, name: str, log: Path) -> None:
    script = bin_dir / name
    script.write_text(f'#!/usr/bin/env python3\nimport json, sys\nopen({str(log)!r}, "a").write(json.dumps(sys.argv[1:]) + "\\n")\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_hostile_strings_in_sbatch_script_stay_data(tmp_path: Path):
    run_dir = tmp_path / HOSTILE / "run"
    env = {"PRIMUS_NOTE": HOSTILE}
    script = render_sbatch(exp_name=HOSTILE, run_dir=run_dir, nnodes=1, gpus_per_node=0,
                           slurm=SlurmSection(partition=HOSTILE, srun_args=[HOSTILE], sbatch=["--comment=" + HOSTILE]),
                           env=env, node_command=["python", "-m", "primus.launch.node", "--run-dir", str(run_dir)])
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    _fake_tool(bin_dir, "srun", log)
    r = subprocess.run(["bash", str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=30,
                       env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    assert not any(tmp_path.glob("PWNED*"))
    import json

    argv = json.loads(log.read_text().splitlines()[0])
    assert HOSTILE in argv and str(run_dir) in argv  # each string arrived whole, as one argument
    # the job name is sanitised, #SBATCH values quoted: sbatch itself parses those lines
    assert "#SBATCH --job-name=x___touch_PWNED___" in script


def test_hostile_strings_in_container_argv_are_single_arguments(tmp_path: Path):
    argv = container_argv(ContainerSection(image="img"), mounts=[tmp_path / HOSTILE], env={"A": HOSTILE},
                          inner=["python", "-m", "primus.launch.node"], workdir=tmp_path)
    assert f"A={HOSTILE}" in argv
    assert any(a.startswith(str(tmp_path / HOSTILE)) for a in argv)


def test_hostile_exp_name_end_to_end_dry_run(tmp_path: Path):
    """The script `--dry-run` shows is run by bash with a stub srun: the hostile name arrives whole."""
    import json

    name = HOSTILE.replace(chr(34), "")
    exp = tmp_path / "exp.yaml"
    ws = tmp_path / "ws"
    exp.write_text(f'exp_name: "{name}"\nworkspace: {ws}\nmodules: {{m: {{framework: toy}}}}\n')
    r = run_primus("run", str(exp), "--launcher", "slurm", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not ws.exists()
    script = "\n".join(line[4:] for line in r.stdout.splitlines() if line.startswith("    "))
    assert script.startswith("#!/bin/bash") and "\nexec srun " in script, r.stdout
    (tmp_path / "job.sbatch").write_text(script + "\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    _fake_tool(bin_dir, "srun", log)
    ran = subprocess.run(["bash", str(tmp_path / "job.sbatch")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=30, env=primus_env({"PATH": f"{bin_dir}:{os.environ['PATH']}"}))
    assert ran.returncode == 0, ran.stderr
    assert not any(tmp_path.rglob("PWNED*")), ran.stderr
    (argv,) = [json.loads(line) for line in log.read_text().splitlines()]  # srun ran once
    run_dir = Path(argv[argv.index("--run-dir") + 1])
    assert run_dir.name == name and run_dir.parents[2] == ws.resolve(), argv  # one argument, intact


# values a user (or a shared environment) can put in front of the batch script: each must either
# arrive as data or be refused in one line before anything is written or submitted
HOSTILE_LINES = {
    "exp_name": ("exp_name: \"x\\ntouch PWNED\"", "exp_name"),
    "partition": ("launch: {slurm: {partition: \"p\\ntouch PWNED\"}}", "partition"),
    "sbatch option": ("launch: {slurm: {sbatch: [\"--comment=a\\ntouch PWNED\"]}}", "launch.slurm.sbatch"),
    "srun arg": ("launch: {slurm: {srun_args: [\"--label\\ntouch PWNED\"]}}", "launch.slurm.srun_args"),
    "env name": ("env: {\"A=1; touch PWNED; B\": x}", "not a variable name"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LINES))
def test_hostile_values_never_steer_the_batch_script(case: str, tmp_path: Path):
    line, needle = HOSTILE_LINES[case]
    ws = tmp_path / "ws"
    exp = tmp_path / "exp.yaml"
    body = f"exp_name: ok\nworkspace: {ws}\nmodules: {{m: {{framework: toy}}}}\n"
    key = line.split(":")[0]
    exp.write_text(line + "\n" + "\n".join(b for b in body.splitlines() if not b.startswith(key + ":")) + "\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    _fake_tool(bin_dir, "sbatch", log)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    for extra in (["--dry-run"], []):
        r = run_primus("run", str(exp), "--launcher", "slurm", *extra, cwd=tmp_path, env=env)
        assert_config_error(r, needle)
    assert not log.exists() and not ws.exists() and not any(tmp_path.rglob("PWNED*"))


def test_preflight_measures_the_fabric_with_a_payload_sized_for_gpus(monkeypatch):
    from primus.preflight.worker import payload

    assert payload("cuda") == (256, 20) and payload("cpu") == (16, 3)
    monkeypatch.setenv("PRIMUS_PREFLIGHT_PAYLOAD_MB", "1024")
    assert payload("cuda") == (1024, 20)
