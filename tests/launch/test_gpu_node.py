"""What a real GPU node sees, simulated on CPU (issue 18): fake sysfs/procfs trees, visibility and
Slurm variables, stub sbatch/srun/docker/apptainer executables. Launch-plan tests only: nothing
trains here."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from primus.config.schema import ContainerSection
from primus.errors import ConfigError
from primus.launch.container import container_argv
from primus.platform.detect import detect_platform
from primus.platform.env import core_entries, plan_env
from tests.support import assert_config_error, assert_ok, primus_env, run_dir_for, write_yaml

from .conftest import TEAM, USER, stub_tool

ROOT = Path(__file__).resolve().parents[2]
GPU_CHECK = ROOT / "bench" / "gpu_check.sh"
PLANNED_VAR = "PRIMUS_PLANNED_ENV"  # primus.launch.target.PLANNED_VAR
NO_GPU = {"CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": "", "ROCR_VISIBLE_DEVICES": ""}  # any host: none

TOY = f"work_group: {TEAM}\nuser_name: {USER}\n" + """
exp_name: gpu-node
workspace: {ws}
modules:
  pre_trainer:
    framework: toy
    train: {{steps: 3, lr: 0.1}}
{extra}"""


def _exp(tmp_path: Path, extra: str = "") -> tuple[Path, Path]:
    ws = tmp_path / "ws"
    return write_yaml(tmp_path / "exp.yaml", TOY.format(ws=ws, extra=extra)), ws


def _env(**extra: str) -> dict[str, str]:
    """A `primus` subprocess environment without this machine's own platform or visibility settings."""
    base = {k: v for k, v in primus_env().items()
            if k not in ("PRIMUS_PLATFORM", "PRIMUS_GFX_ARCH", "GPUS_PER_NODE", "NNODES", "NODE_RANK",
                         "MASTER_ADDR", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")}
    return {**base, **extra}


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "primus", *args], capture_output=True, text=True, timeout=120,
                          env=_env(**env))


def _script_exports(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            out[name] = shlex.split(value)[0] if value else ""
    return out


def plan_node(args: Namespace, environ: dict[str, str]):
    from primus.launch.node import plan_node as plan  # imported here: each test fails alone on older code

    return plan(args, environ)


def _sbatch_lines(stdout: str) -> str:
    return "\n".join(line[4:] for line in stdout.splitlines() if line.startswith("    "))


# ------------------------------------------------------------------ 1. devices and arch


def test_device_count_honours_the_visibility_variables(fake_node):
    fake_node("rocm", 8, "gfx942")
    assert detect_platform({}).devices == 8 and detect_platform({}).arch == "gfx942"
    cases = {
        (("HIP_VISIBLE_DEVICES", "0,1"),): 2,
        (("HIP_VISIBLE_DEVICES", ""),): 0,  # empty: none
        (("CUDA_VISIBLE_DEVICES", "3"),): 1,  # HIP honours it when HIP_VISIBLE_DEVICES is unset
        (("CUDA_VISIBLE_DEVICES", "0,1,2"), ("HIP_VISIBLE_DEVICES", "5")): 1,  # HIP's wins
        (("ROCR_VISIBLE_DEVICES", "0,2,4,6"),): 4,
        (("ROCR_VISIBLE_DEVICES", "0,2,4,6"), ("HIP_VISIBLE_DEVICES", "1,3")): 2,  # relative to ROCr's set
        (("ROCR_VISIBLE_DEVICES", "0,2"), ("HIP_VISIBLE_DEVICES", "1,2,3")): 1,  # 2 is out of ROCr's range
        (("HIP_VISIBLE_DEVICES", "0,9,1"),): 1,  # the list ends at the first index out of range
        (("HIP_VISIBLE_DEVICES", "-1"),): 0,
        (("HIP_VISIBLE_DEVICES", "1,1"),): 1,  # a repeat ends it too
        (("ROCR_VISIBLE_DEVICES", f"GPU-{1003:016x},GPU-{1005:016x}"),): 2,  # UUIDs from the KFD unique_id
        (("ROCR_VISIBLE_DEVICES", "GPU-ffffffffffffffff"),): 0,  # a UUID this node does not have
        (("SLURM_GPUS_ON_NODE", "4"),): 4,  # cgroup-constrained allocation: sysfs still lists 8
        (("SLURM_STEP_GPUS", "0-1"), ("SLURM_GPUS_ON_NODE", "4")): 2,  # the step's GPUs first
        (("SLURM_JOB_GPUS", "2,3,5"),): 3,
        (("SLURM_GPUS_ON_NODE", "4"), ("HIP_VISIBLE_DEVICES", "0,1")): 2,
    }
    for env, expected in cases.items():
        p = detect_platform(dict(env))
        assert (p.kind, p.devices) == ("rocm", expected), (env, p)
    assert "2 device(s) visible of 8" in detect_platform({"HIP_VISIBLE_DEVICES": "0,1"}).describe()


def test_cuda_count_honours_cuda_visible_devices(fake_node):
    fake_node("cuda", 4)
    assert detect_platform({}) .devices == 4 and detect_platform({}).kind == "cuda"
    assert detect_platform({"CUDA_VISIBLE_DEVICES": "1,3"}).devices == 2
    assert detect_platform({"CUDA_VISIBLE_DEVICES": ""}).devices == 0
    assert detect_platform({"CUDA_VISIBLE_DEVICES": "GPU-00000002"}).devices == 1  # a UUID prefix
    assert detect_platform({"CUDA_VISIBLE_DEVICES": "0,7"}).devices == 1
    assert detect_platform({"HIP_VISIBLE_DEVICES": "0"}).devices == 4  # not CUDA's variable


def test_forced_platform_still_reads_the_device(fake_node):
    fake_node("rocm", 8, "gfx950")
    forced = detect_platform({"PRIMUS_PLATFORM": "rocm"})
    assert (forced.kind, forced.arch, forced.devices) == ("rocm", "gfx950", 8)  # was gfx942 and 0
    assert detect_platform({"PRIMUS_PLATFORM": "rocm", "PRIMUS_GFX_ARCH": "gfx942"}).arch == "gfx942"
    assert detect_platform({"PRIMUS_PLATFORM": "rocm", "HIP_VISIBLE_DEVICES": "0,1,2"}).devices == 3
    assert detect_platform({"PRIMUS_PLATFORM": "cpu"}).devices == 0
    # MI355X keeps its own entry, the NaN guard
    changes, _ = plan_env(core_entries("torch"), platform=forced.kind, arch=forced.arch, environ={})
    assert changes["RCCL_WARP_SPEED_AUTO"] == "0"
    mi300, _ = plan_env(core_entries("torch"), platform="rocm", arch="gfx942", environ={})
    assert "RCCL_WARP_SPEED_AUTO" not in mi300


def test_one_variable_per_platform_keeps_each_platforms_value():
    """JAX_PLATFORMS=cpu on CPU must not erase JAX_PLATFORMS=rocm on ROCm (a backend's entries for
    disjoint platforms both stay; overlapping ones still override core's)."""
    from primus.platform.env import EnvEntry

    entries = [EnvEntry("JAX_PLATFORMS", "rocm", platforms=frozenset({"rocm"})),
               EnvEntry("JAX_PLATFORMS", "cuda", platforms=frozenset({"cuda"})),
               EnvEntry("JAX_PLATFORMS", "cpu", platforms=frozenset({"cpu"}), source="maxtext"),
               EnvEntry("X", "core", platforms=frozenset({"rocm", "cuda"})),
               EnvEntry("X", "backend", platforms=frozenset({"rocm"}), source="b")]
    for platform in ("rocm", "cuda", "cpu"):
        changes, _ = plan_env(entries, platform=platform, arch=None, environ={})
        assert changes["JAX_PLATFORMS"] == platform
    assert plan_env(entries, platform="rocm", arch=None, environ={})[0]["X"] == "backend"
    assert "X" not in plan_env(entries, platform="cuda", arch=None, environ={})[0]  # overridden as before


def test_forced_cuda_counts_the_nvidia_devices(fake_node):
    fake_node("cuda", 8)
    p = detect_platform({"PRIMUS_PLATFORM": "cuda", "CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert (p.kind, p.devices) == ("cuda", 4)


def test_no_gpu_is_quietly_cpu(fake_node):
    fake_node("cpu", 0)
    assert detect_platform({}) .kind == "cpu"


# ------------------------------------------------------------------ 2. target vs submit host


def test_slurm_script_from_a_gpu_less_host_for_a_rocm_target(tmp_path: Path):
    exp, ws = _exp(tmp_path)
    r = _run("run", str(exp), "--launcher", "slurm", "--nnodes", "2", "--platform", "rocm", "--gpus-per-node", "8",
             "--dry-run", **NO_GPU)
    assert_ok(r)
    script = _sbatch_lines(r.stdout)
    assert "#SBATCH --gpus-per-node=8" in script
    assert "--nproc-per-node 8 --nnodes 2" in script and "--platform rocm --gpus-per-node 8" in script
    exports = _script_exports(script)
    assert exports["HSA_NO_SCRATCH_RECLAIM"] == "1" and exports["NCCL_IB_GID_INDEX"] == "3"
    assert "TOY_CPU_SETTING" not in exports  # the CPU-only settings (JAX_PLATFORMS=cpu in MaxText) are not
    assert "HSA_NO_SCRATCH_RECLAIM" in exports[PLANNED_VAR].split(",")
    assert "world size  16 (2 node(s) x 8 process(es))" in r.stdout
    assert "target      rocm, 8 GPU(s) per node (from --platform)" in r.stdout
    assert "this host is cpu (no GPUs), the target is rocm" in r.stdout  # the dry-run says they differ
    assert not ws.exists()


def test_slurm_target_from_the_experiment(tmp_path: Path):
    exp, _ = _exp(tmp_path, "launch: {platform: cuda, slurm: {gpus_per_node: 4}}\n")
    r = _run("run", str(exp), "--launcher", "slurm", "--dry-run", **NO_GPU)
    assert_ok(r)
    script = _sbatch_lines(r.stdout)
    assert "#SBATCH --gpus-per-node=4" in script and "--nproc-per-node 4" in script
    assert "CUDA_DEVICE_MAX_CONNECTIONS" in _script_exports(script) and "HSA_ENABLE_SDMA" not in script
    assert "target      cuda, 4 GPU(s) per node (from launch.platform)" in r.stdout


def test_slurm_gpu_target_needs_a_gpu_count_and_one_gpu_per_process(tmp_path: Path):
    exp, ws = _exp(tmp_path)
    assert_config_error(_run("run", str(exp), "--launcher", "slurm", "--platform", "rocm", "--dry-run", **NO_GPU),
                        "--gpus-per-node")
    assert_config_error(_run("run", str(exp), "--launcher", "slurm", "--platform", "rocm", "--gpus-per-node", "4",
                             "--nproc-per-node", "8", "--dry-run", **NO_GPU), "each process needs its own GPU")
    # an explicit process count sizes the request
    r = _run("run", str(exp), "--launcher", "slurm", "--platform", "cuda", "--nproc-per-node", "2", "--dry-run",
             **NO_GPU)
    assert_ok(r)
    assert "#SBATCH --gpus-per-node=2" in r.stdout
    assert not ws.exists()


def test_slurm_from_a_gpu_less_host_without_a_target_lets_the_nodes_decide(tmp_path: Path):
    exp, _ = _exp(tmp_path)
    r = _run("run", str(exp), "--launcher", "slurm", "--dry-run", **NO_GPU)
    assert_ok(r)
    script = _sbatch_lines(r.stdout)
    assert "TOY_CPU_SETTING" not in script and "--gpus-per-node" not in script and "--platform" not in script
    assert "decided on each compute node" in r.stdout and "pass --platform rocm|cuda" in r.stdout


def test_local_dry_run_says_the_host_differs_and_a_real_run_refuses(tmp_path: Path):
    exp, ws = _exp(tmp_path)
    r = _run("run", str(exp), "--platform", "rocm", "--dry-run", **NO_GPU)
    assert_ok(r)
    assert "the target is rocm but this host is cpu (no GPUs)" in r.stdout
    assert "HSA_ENABLE_SDMA=1" in r.stdout
    assert_config_error(_run("run", str(exp), "--platform", "rocm", **NO_GPU), "the target is rocm")
    assert not ws.exists()


def _submit(tmp_path: Path, *args: str, extra: str = "") -> tuple[Path, str, Path]:
    """`primus run --launcher slurm` for real against a stub sbatch: the run directory, the script, bin dir."""
    exp, ws = _exp(tmp_path, extra)
    bin_dir = tmp_path / "bin"
    stub_tool(bin_dir, "sbatch", "print('4242')")
    r = _run("run", str(exp), "--launcher", "slurm", *args, PATH=f"{bin_dir}:{os.environ['PATH']}", **NO_GPU)
    assert_ok(r)
    assert "submitted Slurm job 4242" in r.stdout
    run_dir = run_dir_for(ws, "gpu-node")
    return run_dir, (run_dir / "slurm" / "job.sbatch").read_text(), bin_dir


def _node_args(script: str) -> Namespace:
    from primus.launch.node import build_parser

    line = next(line for line in script.splitlines() if line.startswith("exec srun"))
    argv = shlex.split(line)
    return build_parser().parse_args(argv[argv.index("primus.launch.node") + 1:])


def test_the_compute_node_plans_again_for_what_it_sees(tmp_path: Path, fake_node, monkeypatch):
    run_dir, script, _ = _submit(tmp_path, "--nnodes", "2", "--platform", "rocm", "--gpus-per-node", "8")
    fake_node("rocm", 8, "gfx950")  # the compute node is an MI355X; the login node knew no arch
    args = _node_args(script)
    environ = {**_script_exports(script), "SLURM_NODEID": "1", "MASTER_ADDR": "x", "USER_OWN": "kept",
               "PATH": os.environ["PATH"]}
    plan = plan_node(args, environ)
    assert plan.platform == "rocm"
    assert plan.env["RCCL_WARP_SPEED_AUTO"] == "0"  # the gfx950 NaN guard, planned on the node
    assert plan.env["HSA_NO_SCRATCH_RECLAIM"] == "1" and plan.env["USER_OWN"] == "kept"
    assert plan.env["NODE_RANK"] == "1" and PLANNED_VAR not in plan.env
    assert plan.argv[plan.argv.index("--nproc-per-node") + 1] == "8"
    # four GPUs allocated on a node of eight: eight processes cannot each have one
    with pytest.raises(ConfigError, match="each process needs its own GPU"):
        plan_node(args, {**environ, "SLURM_GPUS_ON_NODE": "4"})
    # the node's start records what it detected and set, then execs its launcher
    from primus.launch import node

    started = []
    monkeypatch.setattr(node.os, "environ", environ)
    monkeypatch.setattr(node.os, "execvpe", lambda file, argv, env: started.append((argv, env)))
    line = next(line for line in script.splitlines() if line.startswith("exec srun"))
    words = shlex.split(line)
    node.main(words[words.index("primus.launch.node") + 1:])
    assert started and started[0][1]["RCCL_WARP_SPEED_AUTO"] == "0" and "torchrun" in " ".join(started[0][0])
    record = json.loads((run_dir / "logs" / "node-1.json").read_text())
    assert record["detected"] == "rocm (gfx950), 8 device(s)" and record["env_set"]["RCCL_WARP_SPEED_AUTO"] == "0"


def test_the_node_replaces_what_the_submit_host_planned_for_another_platform(tmp_path: Path, fake_node):
    # an old-style script planned on a CPU login node: the CPU settings arrive as if the user set them
    run_dir, script, _ = _submit(tmp_path, "--platform", "cpu")
    exports = _script_exports(script)
    assert exports["TOY_CPU_SETTING"] == "on" and "TOY_CPU_SETTING" in exports[PLANNED_VAR]
    fake_node("cuda", 2)
    args = _node_args(script)
    args.platform = "auto"
    plan = plan_node(args, {**exports, "PATH": os.environ["PATH"]})
    assert plan.platform == "cuda" and "TOY_CPU_SETTING" not in plan.env and "XLA_FLAGS" not in plan.env
    assert plan.env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert any("shows cuda, 2 device(s) but the job starts 1 process(es)" in n for n in plan.notes)
    # what the user exported (not in the planned list) stays
    plan = plan_node(args, {**exports, PLANNED_VAR: "XLA_FLAGS", "PATH": os.environ["PATH"]})
    assert plan.env["TOY_CPU_SETTING"] == "on"


def test_a_gpu_target_on_a_node_without_gpus_is_refused(tmp_path: Path, fake_node):
    run_dir, script, bin_dir = _submit(tmp_path, "--platform", "rocm", "--gpus-per-node", "8")
    fake_node("cpu", 0)
    with pytest.raises(ConfigError, match="shows no GPU"):
        plan_node(_node_args(script), {**_script_exports(script), "PATH": os.environ["PATH"]})
    fake_node("rocm", 8)
    with pytest.raises(ConfigError, match="HIP_VISIBLE_DEVICES=''"):
        plan_node(_node_args(script), {**_script_exports(script), "HIP_VISIBLE_DEVICES": ""})
    # end to end: the batch script through a stub srun, on this machine with every GPU hidden
    stub_tool(bin_dir, "srun", "cmd = sys.argv[sys.argv.index('--kill-on-bad-exit=1') + 1:]\n"
                               "os.environ['SLURM_NODEID'] = '0'\n"
                               "sys.exit(__import__('subprocess').call(cmd))")
    r = subprocess.run(["bash", str(run_dir / "slurm" / "job.sbatch")], capture_output=True, text=True, timeout=120,
                       env=_env(PATH=f"{bin_dir}:{os.environ['PATH']}", **NO_GPU))
    assert_config_error(r, "the job's target is rocm", "shows no GPU")


def test_node_dry_run_from_the_command_line(tmp_path: Path):
    run_dir, script, _ = _submit(tmp_path, "--platform", "cpu")
    args = shlex.split(next(line for line in script.splitlines() if line.startswith("exec srun")))
    node_cmd = args[args.index("--kill-on-bad-exit=1") + 1:]
    r = subprocess.run([*node_cmd, "--dry-run"], capture_output=True, text=True, timeout=120,
                       env=_env(SLURM_NODEID="0", **NO_GPU))
    assert_ok(r)
    assert "platform    cpu" in r.stdout and "TOY_CPU_SETTING=on" in r.stdout


# ------------------------------------------------------------------ 3. containers


def _section(**kw) -> ContainerSection:
    return ContainerSection(image="img:1", **kw)


CALLER = {"NCCL_IB_HCA": "mlx5_0", "RCCL_MSCCL_ENABLE": "0", "GLOO_SOCKET_IFNAME": "ib0", "HSA_X": "1",
          "HIP_VISIBLE_DEVICES": "0,1", "CUDA_VISIBLE_DEVICES": "2,3", "ROCR_VISIBLE_DEVICES": "0",
          "SECRET_TOKEN": "no", "HOME": "/root", "MASTER_ADDR": "n1"}


def test_docker_per_platform(tmp_path: Path):
    kw = dict(mounts=[tmp_path], env={"A": "1"}, inner=["python", "-m", "x"], workdir=tmp_path, environ=CALLER)
    rocm = container_argv(_section(), platform="rocm", **kw)
    assert "--device" in rocm and "/dev/kfd" in rocm and "/dev/dri" in rocm and "video" in rocm
    assert "--gpus" not in rocm
    cuda = container_argv(_section(), platform="cuda", **kw)
    assert cuda[cuda.index("--gpus") + 1] == "all"
    assert "/dev/kfd" not in cuda and "--device" not in cuda and "video" not in cuda
    cpu = container_argv(_section(), platform="cpu", **kw)
    assert "--gpus" not in cpu and "--device" not in cpu
    for argv in (rocm, cuda, cpu):
        passed = {argv[i + 1] for i, a in enumerate(argv) if a == "-e"}
        for name in ("NCCL_IB_HCA", "RCCL_MSCCL_ENABLE", "GLOO_SOCKET_IFNAME", "HSA_X", "HIP_VISIBLE_DEVICES",
                     "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "MASTER_ADDR", "A=1"):
            assert name in passed, (name, argv)
        assert "SECRET_TOKEN" not in passed and "HOME" not in passed
    # explicit devices still win
    assert "/dev/infiniband" in container_argv(_section(devices=["/dev/infiniband"]), platform="cuda", **kw)


def test_apptainer_runtime(tmp_path: Path):
    section = ContainerSection.model_validate({"runtime": "apptainer", "image": "/img/primus.sif",
                                               "mounts": ["/data:/data:ro"]})
    argv = container_argv(section, mounts=[tmp_path], env={"NCCL_X": "1"}, inner=["python", "-m", "x"],
                          workdir=tmp_path, platform="rocm", environ=CALLER)
    assert argv[:3] == ["apptainer", "exec", "--rocm"]
    assert ["--bind", f"{tmp_path.resolve()}:{tmp_path.resolve()}"] == argv[3:5] and "/data:/data:ro" in argv
    assert argv[argv.index("--env") + 1] == "NCCL_X=1" and argv[argv.index("--pwd") + 1] == str(tmp_path.resolve())
    assert argv[-4:] == ["/img/primus.sif", "python", "-m", "x"]
    nv = container_argv(ContainerSection(runtime="singularity", image="x.sif"), mounts=[], env={}, inner=["true"],
                        workdir=tmp_path, platform="cuda")
    assert nv[:3] == ["singularity", "exec", "--nv"]


def test_container_launch_through_a_stub_runtime(tmp_path: Path):
    exp, ws = _exp(tmp_path, "launch: {container: {runtime: apptainer, image: /img/p.sif}}\n")
    bin_dir = tmp_path / "bin"
    stub_tool(bin_dir, "apptainer", "")
    r = _run("run", str(exp), "--launcher", "container", "--platform", "cpu",
             PATH=f"{bin_dir}:{os.environ['PATH']}", NCCL_DEBUG="INFO", **NO_GPU)
    assert_ok(r)
    argv = json.loads((bin_dir / "apptainer.calls.jsonl").read_text().splitlines()[0])
    assert argv[0] == "exec" and "--rocm" not in argv and "--nv" not in argv
    assert "/img/p.sif" in argv and argv[argv.index("/img/p.sif") + 1:][:3] == ["python", "-m", "primus.launch.node"]
    r = _run("run", str(exp), "--launcher", "container", "--platform", "cuda", "--dry-run", **NO_GPU)
    assert_ok(r)
    assert "apptainer exec --nv" in r.stdout


def test_container_dry_run_on_cuda_has_gpus_not_rocm_devices(tmp_path: Path):
    exp, _ = _exp(tmp_path)
    r = _run("run", str(exp), "--launcher", "container", "--image", "img", "--platform", "cuda", "--dry-run",
             NCCL_IB_HCA="mlx5", **NO_GPU)
    assert_ok(r)
    assert "--gpus all" in r.stdout and "/dev/kfd" not in r.stdout and "-e NCCL_IB_HCA" in r.stdout


# ------------------------------------------------------------------ 4. network interface


ROUTES = """Iface	Destination	Gateway 	Flags	RefCnt	Use	Metric	Mask		MTU	Window	IRTT
eth0	00000000	0100000A	0003	0	0	100	00000000	0	0	0
ib0	0000000A	00000000	0001	0	0	0	0000FFFF	0	0	0
ens1	0005000A	00000000	0001	0	0	0	00FFFFFF	0	0	0
down0	0009000A	00000000	0000	0	0	0	00FFFFFF	0	0	0
docker0	000011AC	00000000	0001	0	0	0	0000FFFF	0	0	0
"""


def test_interface_that_routes_to_the_master(tmp_path: Path, monkeypatch):
    from primus.launch import network

    routes = tmp_path / "route"
    routes.write_text(ROUTES)
    monkeypatch.setattr(network, "ROUTE_FILE", routes)
    assert network.route_interface("10.0.5.7") == "ens1"  # the most specific route
    assert network.route_interface("10.0.9.1") == "ib0"  # down0's route is not up
    assert network.route_interface("8.8.8.8") == "eth0"  # the default route
    assert network.route_interface("172.17.0.2") == "docker0"
    assert network.route_interface("127.0.0.1") == "lo"
    assert network.socket_ifname_env("10.0.5.7", {}) == {"NCCL_SOCKET_IFNAME": "ens1", "GLOO_SOCKET_IFNAME": "ens1"}
    assert network.socket_ifname_env("10.0.5.7", {"NCCL_SOCKET_IFNAME": "ib0"}) == {"GLOO_SOCKET_IFNAME": "ens1"}
    assert network.socket_ifname_env("10.0.5.7", {}, {"NCCL_SOCKET_IFNAME": "x", "GLOO_SOCKET_IFNAME": "y"}) == {}
    routes.write_text(ROUTES.splitlines()[0] + "\n")  # no route: the kernel's choice for a UDP socket
    assert network.route_interface("127.0.0.2") == "lo"


def test_udp_fallback_maps_the_local_address_to_an_interface(tmp_path: Path, monkeypatch):
    from primus.launch import network

    monkeypatch.setattr(network, "ROUTE_FILE", tmp_path / "missing")
    # 127.x is answered without looking; an unresolvable name gives nothing, never an error
    assert network.route_interface("no-such-host.invalid") is None
    assert network._interface_of_address("127.0.0.1") == "lo"


def test_interface_in_dry_run_and_on_each_node(tmp_path: Path, fake_node):
    exp, _ = _exp(tmp_path)
    r = _run("run", str(exp), "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1", "--dry-run")
    assert_ok(r)
    assert "network     NCCL_SOCKET_IFNAME=lo (the interface that routes to 127.0.0.1)" in r.stdout
    assert "  GLOO_SOCKET_IFNAME=lo" in r.stdout
    r = _run("run", str(exp), "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1", "--dry-run",
             NCCL_SOCKET_IFNAME="ib7")
    assert "NCCL_SOCKET_IFNAME=ib7 (set by the user)" in r.stdout and "  NCCL_SOCKET_IFNAME=lo" not in r.stdout
    single = _run("run", str(exp), "--dry-run")
    assert "SOCKET_IFNAME" not in single.stdout  # one node talks to nobody
    run_dir, script, _ = _submit(tmp_path / "slurm", "--nnodes", "2", "--platform", "cpu")
    fake_node("cpu", 0)
    plan = plan_node(_node_args(script), {**_script_exports(script), "MASTER_ADDR": "127.0.0.1", "NODE_RANK": "1"})
    assert plan.env["NCCL_SOCKET_IFNAME"] == "lo" and plan.env["GLOO_SOCKET_IFNAME"] == "lo"
    plan = plan_node(_node_args(script), {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "eth3"})
    assert plan.env["GLOO_SOCKET_IFNAME"] == "eth3"


# ------------------------------------------------------------------ 5. bench/gpu_check.sh


def test_gpu_check_dry_run_resolves_every_command(tmp_path: Path):
    assert GPU_CHECK.is_file() and os.access(GPU_CHECK, os.X_OK)
    env = _env(PRIMUS=f"{sys.executable} -m primus", PRIMUS_GPU_CHECK_OUT=str(tmp_path / "out"), **NO_GPU)
    r = subprocess.run(["bash", str(GPU_CHECK), "--dry-run", "--platform", "rocm"], capture_output=True, text=True, timeout=600, env=env,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    checked = [line for line in r.stdout.splitlines() if line.startswith("dry-run ok:")]
    backends = {line.split()[2] for line in checked}
    from primus.backends.discovery import discover

    installed = {"megatron", "torchtitan", "hf"} & set(discover().backends)  # nox's launch session: hf, megatron
    assert installed and installed <= backends, r.stdout[-3000:]
    for name in {"megatron", "torchtitan", "hf"} - installed:
        assert f"{name}     skipped: not installed" in r.stdout
    assert "FAILED" not in r.stdout
    assert r.stdout.count("--nproc-per-node 1 --platform rocm") >= len(installed)  # a ROCm node's plan, from here
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("metrics.jsonl"))
