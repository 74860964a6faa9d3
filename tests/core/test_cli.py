import json
import subprocess
import sys

from primus.runs.metrics import TRAIN_KEYS, read_metrics
from tests.support import primus_env

from .conftest import run_primus

HEAVY = ("torch", "jax", "megatron", "transformers", "torchtitan", "maxtext")


def test_help_and_backends_import_no_framework():
    code = (
        "import sys\n"
        "from primus.cli.main import main\n"
        "for argv in (['backends'], ['patches'], ['env', '--backend', 'toy']):\n"
        "    assert main(argv) == 0\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "print('HEAVY', heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import sys; from primus.cli.main import main\n"
                        "try:\n  main(['--help'])\nexcept SystemExit: pass\n"
                        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic','torch','loguru')))"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().endswith("[]"), r.stdout  # --help does not even import pydantic


def test_backends_lists_toy():
    r = run_primus("backends")
    assert r.returncode == 0 and "toy" in r.stdout and "primus-toy-backend" in r.stdout


def test_config_show_explain_and_schema(toy_exp):
    exp, _ = toy_exp
    r = run_primus("config", "show", str(exp), "seed=3")
    assert r.returncode == 0 and "iters: 12" in r.stdout and "seed: 3" in r.stdout
    r = run_primus("config", "show", str(exp), "--explain", "batch")
    assert r.returncode == 0 and f"overrides ({exp}:12)" in r.stdout
    r = run_primus("config", "show", str(exp), "--explain", "bach")
    assert r.returncode == 2 and "did you mean 'batch'" in r.stderr
    r = run_primus("config", "schema")
    schema = json.loads(r.stdout)
    assert "modules" in schema["properties"] and "TrainSection" in schema["$defs"]


def test_dry_run_prints_plan_and_touches_nothing(toy_exp):
    exp, ws = toy_exp
    r = run_primus("run", str(exp), "--dry-run", "--nproc-per-node", "2", "--master-port", "29999")
    assert r.returncode == 0, r.stderr
    assert "primus.launch.torchrun --nproc-per-node 2" in r.stdout and "--master-port 29999" in r.stdout
    assert "toy.mark_env" in r.stdout and "TOY_CPU_SETTING=on" in r.stdout
    assert not ws.exists()


def test_run_writes_run_dir_metrics_logs(toy_exp):
    exp, ws = toy_exp
    r = run_primus("run", str(exp), env={"XLA_FLAGS": "--other=9", "PRIMUS_TEAM": "x"})
    assert r.returncode == 0, r.stderr
    run_dir = ws / "team" / "me" / "toy"
    for name in ("config.yaml", "env.json", "versions.json", "metrics.jsonl", "checkpoints"):
        assert (run_dir / name).exists(), name
    assert (run_dir / "logs" / "pre_trainer" / "rank-0" / "primus.log").read_text().count("step ") >= 12
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(set(TRAIN_KEYS) <= set(row) for row in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] / 4
    env = json.loads((run_dir / "env.json").read_text())
    assert env["TOY_CPU_SETTING"] == "on"
    assert env["XLA_FLAGS"] == "--other=9 --toy_flag=1"  # merged flag by flag; the user's value wins
    assert "step 12/12 | loss" in r.stderr  # the rank-0 progress line
    assert json.loads((run_dir / "versions.json").read_text())["packaging"]


def test_upstream_train_pretrain_alias(toy_exp):
    exp, ws = toy_exp
    r = run_primus("train", "pretrain", "--config", str(exp), "train.steps=3")
    assert r.returncode == 0, r.stderr
    assert len(read_metrics(ws / "team" / "me" / "toy" / "metrics.jsonl")) == 3


def test_training_failure_exits_1(toy_exp):
    exp, ws = toy_exp
    r = run_primus("run", str(exp), "fail_at_step=3")
    assert r.returncode == 1
    assert "toy failure at step 3" in r.stderr
    log = (ws / "team" / "me" / "toy" / "logs" / "pre_trainer" / "rank-0" / "primus.log").read_text()
    assert "Traceback" in log  # the whole story is in the log file


def test_experiment_env_wins_over_shell(toy_exp, write):
    exp, ws = toy_exp
    text = exp.read_text().replace("modules:", "env: {TOY_CPU_SETTING: from-exp, PRIMUS_X: 1}\nmodules:")
    exp2 = write("exp2.yaml", text)
    r = run_primus("run", str(exp2), env={"TOY_CPU_SETTING": "from-shell"})
    assert r.returncode == 0, r.stderr
    env = json.loads((ws / "team" / "me" / "toy" / "env.json").read_text())
    assert env["TOY_CPU_SETTING"] == "from-exp" and env["PRIMUS_X"] == "1"


def test_patches_and_env_commands():
    r = run_primus("patches", "--backend", "toy")
    assert r.returncode == 0
    assert "apply  toy.mark_env" in r.stdout
    assert "skip   toy.rocm_only" in r.stdout and "platform cpu" in r.stdout
    assert "skip   toy.old_framework" in r.stdout and "outside <1" in r.stdout
    r = run_primus("patches", "--backend", "toy", "--platform", "rocm")
    assert "apply  toy.rocm_only" in r.stdout
    r = run_primus("patches", "--backend", "toy", env={"PRIMUS_PATCHES": "none"})
    assert "PRIMUS_PATCHES=none" in r.stdout
    r = run_primus("patches", "--markdown")
    assert "| `toy.mark_env` | feature | setup |" in r.stdout
    r = run_primus("env", "--backend", "toy", "--platform", "rocm", "--arch", "gfx950")
    assert r.returncode == 0 and "RCCL_WARP_SPEED_AUTO=0" in r.stdout and "HSA_NO_SCRATCH_RECLAIM=1" in r.stdout
    r = run_primus("env", "--backend", "toy", "--platform", "rocm", "--arch", "gfx942")
    assert "RCCL_WARP_SPEED_AUTO" not in r.stdout
    r = run_primus("env", "--backend", "toy", "--platform", "rocm", env={"USING_AINIC": "1"})
    assert "NCCL_IB_GID_INDEX=1" in r.stdout
    r = run_primus("env", "--backend", "toy", "--platform", "rocm", env={"NCCL_IB_GID_INDEX": "7"})
    assert "NCCL_IB_GID_INDEX" not in r.stdout
    r = run_primus("env", "--backend", "toy", "--platform", "cpu")
    assert "HSA_ENABLE_SDMA" not in r.stdout


def test_presets_command():
    r = run_primus("presets")
    assert r.returncode == 0 and "llama3.1_8B.yaml" in r.stdout and "deepseek_v3.yaml" in r.stdout


def test_data_prepare_calls_the_backend_hook(toy_exp, write):
    exp, _ = toy_exp
    corpus = write("corpus.jsonl", '{"text": "a"}\n{"text": "b"}\n')
    exp2 = write("exp_data.yaml", exp.read_text().replace("overrides:", "data: {path: corpus.jsonl}\n    overrides:"))
    r = run_primus("data", "prepare", str(exp2))
    assert r.returncode == 0, r.stderr
    assert corpus.with_suffix(".toycache").read_text() == "2"
    r = run_primus("data", "prepare", str(exp))
    assert "nothing to prepare" in r.stdout


def test_resume_auto_matches_uninterrupted_run(toy_exp, tmp_path):
    exp, _ = toy_exp
    full = run_primus("run", str(exp), f"workspace={tmp_path}/full")
    assert full.returncode == 0, full.stderr
    first = run_primus("run", str(exp), f"workspace={tmp_path}/resumed", "train.steps=5", "save_interval=5")
    assert first.returncode == 0, first.stderr
    ledger = tmp_path / "resumed/team/me/toy/checkpoints.json"  # which attempt wrote each checkpoint
    assert json.loads(ledger.read_text())["pre_trainer"]["steps"] == {"5": 1}
    second = run_primus("run", str(exp), f"workspace={tmp_path}/resumed", "save_interval=5")
    assert second.returncode == 0, second.stderr
    steps = json.loads(ledger.read_text())["pre_trainer"]["steps"]
    assert steps["5"] == 1 and {a for s, a in steps.items() if s != "5"} == {2}, steps
    a = read_metrics(tmp_path / "full/team/me/toy/metrics.jsonl")
    b = read_metrics(tmp_path / "resumed/team/me/toy/metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 13))
    assert b[-1]["loss"] == a[-1]["loss"]


def test_sigterm_stops_at_a_step_boundary_with_checkpoint(toy_exp):
    import signal
    import time

    exp, ws = toy_exp
    run_dir = ws / "team" / "me" / "toy"
    proc = subprocess.Popen([sys.executable, "-m", "primus", "run", str(exp), "train.steps=400", "step_sleep=0.02"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=primus_env())
    deadline = time.time() + 60
    while time.time() < deadline and len(read_metrics(run_dir / "metrics.jsonl")) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # a second one must not corrupt anything
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    status = json.loads((run_dir / "logs/pre_trainer/rank-0/status.json").read_text())
    assert status["state"] == "preempted"
    ckpts = sorted(run_dir.glob("checkpoints/step-*.json"))
    assert len(ckpts) == 1 and json.loads(ckpts[0].read_text())["step"] == status["step"]
    r = run_primus("run", str(exp), "train.steps=400", "step_sleep=0")
    assert r.returncode == 0
    steps = [row["step"] for row in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, 401))


def test_core_source_never_imports_a_framework():
    """ARCHITECTURE §1: primus-core depends on pydantic, pyyaml, loguru only; backends bring torch/jax."""
    import re
    from pathlib import Path

    import primus

    pattern = re.compile(r"^\s*(import|from)\s+(torch|jax|megatron|transformers|torchtitan|maxtext)\b", re.M)
    offenders = [str(p) for p in Path(primus.__file__).parent.rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_user_name_defaults_to_the_login_name(monkeypatch, write, tmp_path):
    """An experiment without `user_name` runs under <workspace>/<work_group>/<login name>/, not
    .../root/ whoever the user is (issue 15); "user" when there is no login name."""
    import getpass

    from primus.config.schema import Experiment

    modules = {"pre_trainer": {"framework": "toy"}}
    monkeypatch.setenv("LOGNAME", "primus-login-test")  # getpass reads LOGNAME first
    assert getpass.getuser() == "primus-login-test"
    assert Experiment(exp_name="x", modules=modules).user_name == "primus-login-test"
    assert Experiment(exp_name="x", user_name="me", modules=modules).user_name == "me"

    for error in (KeyError("uid 4242"), OSError("no login name")):  # no passwd entry: 3.11 / 3.13
        def no_login(error=error):
            raise error
        monkeypatch.setattr(getpass, "getuser", no_login)
        assert Experiment(exp_name="x", modules=modules).user_name == "user"

    exp = write("nouser.yaml", f"""
        exp_name: toy-login
        workspace: {tmp_path / "ws"}
        modules:
          pre_trainer: {{framework: toy, config: pre_trainer.yaml, model: llama3_tiny.yaml, train: {{steps: 2}}}}
        """)
    r = run_primus("run", str(exp), "--dry-run", env={"LOGNAME": "primus-login-test"})
    assert r.returncode == 0, r.stderr
    assert f"{tmp_path / 'ws' / 'amd' / 'primus-login-test' / 'toy-login'}" in r.stdout
