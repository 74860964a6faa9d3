"""The test matrix (ARCHITECTURE §10). `nox` runs the default sessions; `nox -l` lists them.

Each backend session installs core plus that backend only, torch first from the local CPU wheel
so pip never pulls a CUDA build. Wheels are built once per run and the `wheels` session installs
them (not editable checkouts) to catch missing package data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ROOT / "packages"
TORCH = "torch==2.13.0"  # the CPU wheel on this machine's disk; never let pip choose
TEST_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
# Default sessions: a backend's session joins once its package exists in packages/.
_BACKENDS = [b for b in ("hf", "megatron", "torchtitan", "maxtext") if (PACKAGES / f"primus-{b}").is_dir()]
SESSIONS = ["lint", "core", "wheels", *_BACKENDS, "e2e", "launch"]
# `nox` with no -s runs `ci`: every session above, in two lanes at once (the CI machine has 2 cores
# and most tests are one single-threaded process); `nox -s NAME` runs one session as before.
# The lanes are balanced by measured time (minutes, at 7b8616f, each under the other lane's load):
# megatron 19 + maxtext 16 + wheels 3 + core-3.12 3 | lint + core-3.11 3 + hf 12 + torchtitan 12
# + e2e 9 + launch 6
_LANE_0 = ("megatron", "maxtext", "wheels", "core-3.12")
LANES = ([s for s in _LANE_0 if s.split("-")[0] in SESSIONS],
         [{"core": "core-3.11"}.get(s, s) for s in SESSIONS if s not in _LANE_0])
nox.options.sessions = ["ci"]


def _enable_pyenv_versions() -> None:
    """Let `python3.12` resolve through pyenv shims when 3.11 is the selected version.

    A pyenv shim sets PYENV_VERSION to the one version it ran, so extend it rather than replace it.
    """
    if not shutil.which("pyenv"):
        return
    try:
        out = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return
    installed = [v.strip() for v in out.splitlines() if v.strip() and v.strip()[0].isdigit()]
    current = [v for v in os.environ.get("PYENV_VERSION", "").split(":") if v]
    wanted = current + [v for v in installed if v.startswith(("3.11.", "3.12.")) and v not in current]
    if wanted:
        os.environ["PYENV_VERSION"] = ":".join(wanted)


_enable_pyenv_versions()


def _pytest(session: nox.Session, *paths: str) -> None:
    # the slowest tests are listed at the end of each session: where CI time goes
    session.run("python", "-m", "pytest", "--durations=12", *paths, *session.posargs, env=TEST_ENV)


@nox.session(python=False)
def ci(session: nox.Session) -> None:
    """Every default session in two lanes of `nox -s ...` at once; each line is printed as it comes,
    prefixed with its lane; fails when a lane fails (and names its failed sessions)."""
    import threading

    def lane(index: int, names: list[str], codes: list[int]) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "nox", "--no-color", "-s", *names], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"[lane {index}] {line}", end="", flush=True)
        codes[index] = proc.wait()

    codes = [-1] * len(LANES)
    threads = [threading.Thread(target=lane, args=(i, names, codes)) for i, names in enumerate(LANES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [" ".join(LANES[i]) for i, code in enumerate(codes) if code != 0]
    if failed:
        session.error(f"failed lane(s): {'; '.join(failed)} (see the [lane N] lines above)")


def _install_fixture_backend(session: nox.Session) -> None:
    session.install("--no-deps", "--no-build-isolation", str(ROOT / "tests/core/fixtures/primus-toy-backend"))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session(python=["3.11", "3.12"])
def core(session: nox.Session) -> None:
    session.install("-e", f"{PACKAGES / 'primus-core'}[plot]", "pytest", "hatchling")
    _install_fixture_backend(session)
    _pytest(session, "tests/core")


@nox.session(python="3.11")
def wheels(session: nox.Session) -> None:
    """Build every package's wheel, install the wheels (not checkouts), smoke-test them."""
    dist = ROOT / ".nox" / "_wheels"
    shutil.rmtree(dist, ignore_errors=True)
    session.install("build")
    packages = sorted(p for p in PACKAGES.iterdir() if (p / "pyproject.toml").exists())
    for pkg in packages:
        session.run("python", "-m", "build", "--wheel", "--outdir", str(dist), str(pkg), silent=True)
    session.install(TORCH)
    # primus-maxtext needs Python >= 3.12: its wheel is built here, so a packaging error shows,
    # but not installed into this 3.11 environment
    wheels_311 = [str(w) for w in sorted(dist.glob("*.whl")) if not w.name.startswith("primus_maxtext-")]
    session.install(*wheels_311, "pytest")
    # a reused venv keeps an older build of the same version unless forced
    session.install("--force-reinstall", "--no-deps", *wheels_311)
    session.run("python", "-m", "pytest", "tests/wheels", *session.posargs, env=TEST_ENV)


# the parity tests' reference (issue 12): transformers' own forward on the same weights, and the
# tiny Hugging Face models it makes; test tools, not dependencies of any backend package
WEIGHTS_REFERENCE = ("transformers>=5.0,<6", "safetensors>=0.4", "tokenizers>=0.20")


def _backend_session(session: nox.Session, name: str, *, torch: bool, extras: str = "",
                     also: tuple[str, ...] = ()) -> None:
    if torch:
        session.install(TORCH)
    session.install("-e", str(PACKAGES / "primus-core"), "-e", f"{PACKAGES / f'primus-{name}'}{extras}", "pytest",
                    *WEIGHTS_REFERENCE, *also)
    _pytest(session, f"tests/{name}")


@nox.session(python="3.11")
def hf(session: nox.Session) -> None:
    _backend_session(session, "hf", torch=True, extras="[lora]")


@nox.session(python="3.11")
def megatron(session: nox.Session) -> None:
    # with the optional trackers, so their tests run (tensorboard, wandb offline, an MLflow file store),
    # and primus-hf with peft: `primus generate` and peft's loader check megatron's fine-tuned models
    _backend_session(session, "megatron", torch=True, extras="[trackers]",
                     also=("-e", f"{PACKAGES / 'primus-hf'}[lora]"))


@nox.session(python="3.11")
def torchtitan(session: nox.Session) -> None:
    _backend_session(session, "torchtitan", torch=True)


@nox.session(python="3.12")
def maxtext(session: nox.Session) -> None:
    # the parity references need torch, whose only local wheel is for 3.11 (3.12 would pull a CUDA
    # build): a side venv with torch and transformers, which the maxtext tests call through
    # PRIMUS_TORCH_PYTHON to make the tiny models and transformers' numbers
    reference = Path(session.create_tmp()) / "torch-reference"
    if not (reference / "bin" / "python").exists():
        session.run("python3.11", "-m", "venv", str(reference), external=True)
        session.run(str(reference / "bin" / "pip"), "install", "-q", TORCH, external=True)
        session.run(str(reference / "bin" / "pip"), "install", "-q", *WEIGHTS_REFERENCE,
                    "-e", str(PACKAGES / "primus-core"), external=True)
    session.env["PRIMUS_TORCH_PYTHON"] = str(reference / "bin" / "python")
    _backend_session(session, "maxtext", torch=False)


def _install_all_torch_backends(session: nox.Session) -> None:
    """Core and every backend package that runs on Python 3.11 (maxtext needs 3.12: its own session)."""
    session.install(TORCH)
    args = []
    for p in sorted(PACKAGES.iterdir()):
        if (p / "pyproject.toml").exists() and p.name != "primus-maxtext":
            args += ["-e", str(p)]
    session.install(*args, "pytest")


@nox.session(python="3.11", default=False)
def docs(session: nox.Session) -> None:
    """Generated docs/backends pages match the registries (`nox -s docs -- --update` rewrites them).

    Not a default session: e2e installs the same packages and runs tests/docs with its own."""
    _install_all_torch_backends(session)
    if "--update" in session.posargs:
        session.run("primus", "docs", "--out", "docs/backends")
        return
    _pytest(session, "tests/docs")


@nox.session(python="3.11")
def e2e(session: nox.Session) -> None:
    """Every backend installed together: discovery stays light, every example resolves and dry-runs,
    the documented commands run, and the generated docs/backends pages match the registries."""
    _install_all_torch_backends(session)
    session.install("hatchling")  # test_backend_template builds examples/backend-template without isolation
    _pytest(session, "tests/e2e", "tests/docs")


@nox.session(python="3.11")
def launch(session: nox.Session) -> None:
    """Multi-node torchrun, a real two-node Slurm cluster on this machine, preemption, failures."""
    session.install(TORCH)
    session.install("-e", str(PACKAGES / "primus-core"), "-e", str(PACKAGES / "primus-hf"),
                    "-e", str(PACKAGES / "primus-megatron"), "pytest", "hatchling")
    _install_fixture_backend(session)
    _pytest(session, "tests/launch")


@nox.session(python="3.11", default=False)
def bench(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", str(PACKAGES / "primus-core"), "-e", str(PACKAGES / "primus-hf"))
    session.run("python", "bench/cli_startup.py")
    session.run("python", "bench/overhead.py", "hf", env=TEST_ENV)
