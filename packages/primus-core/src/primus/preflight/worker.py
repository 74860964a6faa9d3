"""One preflight process per device, started by the same launchers as training.

Each rank collects its node's facts (accelerators, the env Primus set, framework versions, free
disk in the workspace), runs a collective smoke test over the job's process group (gloo on CPU,
NCCL/RCCL on GPUs) with its bandwidth, and rank 0 writes one report into the run directory:
`preflight.json` and `preflight.md`, naming the failing nodes. Exit 0 when every check passed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

MIN_FREE_GB = float(os.environ.get("PRIMUS_PREFLIGHT_MIN_FREE_GB", "10"))
# all-reduce payload and timed iterations: on GPUs large enough that the fabric, not launch latency,
# sets the figure (nccl-tests' bus bandwidth flattens out from a few hundred MB); on CPUs (gloo) a
# smoke test. PRIMUS_PREFLIGHT_PAYLOAD_MB overrides the size.
GPU_PAYLOAD_MB, GPU_ITERS = 256, 20
CPU_PAYLOAD_MB, CPU_ITERS = 16, 3
NETWORK_VARS = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_IB_HCA", "NCCL_IB_DISABLE")


def payload(device_type: str) -> tuple[int, int]:
    """(MB, timed iterations) of the all-reduce on this device type."""
    gpu = device_type == "cuda"  # torch names ROCm devices cuda too
    raw = os.environ.get("PRIMUS_PREFLIGHT_PAYLOAD_MB", "")
    mb = int(raw) if raw.isdigit() and int(raw) > 0 else (GPU_PAYLOAD_MB if gpu else CPU_PAYLOAD_MB)
    return mb, GPU_ITERS if gpu else CPU_ITERS


def _accelerators() -> dict[str, object]:
    for tool, args in (("rocm-smi", ["--showproductname"]), ("nvidia-smi", ["-L"])):
        exe = shutil.which(tool)
        if exe:
            try:
                out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=30).stdout
            except (OSError, subprocess.SubprocessError) as exc:
                return {"tool": tool, "ok": False, "detail": str(exc)}
            return {"tool": tool, "ok": bool(out.strip()), "detail": out.strip()[:2000]}
    return {"tool": None, "ok": True, "detail": "no GPU tools: CPU node"}


def node_facts(run_dir: Path, frameworks: list[str]) -> dict[str, object]:
    from primus.platform.detect import detect_platform
    from primus.runs.rundir import versions

    env_set = json.loads((run_dir / "env.json").read_text()) if (run_dir / "env.json").exists() else {}
    usage = shutil.disk_usage(run_dir)
    return {
        "host": socket.gethostname(),
        "node_rank": int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", "0"))),
        "platform": detect_platform().describe(),
        "accelerators": _accelerators(),
        "env": {k: os.environ.get(k) for k in env_set},
        "env_ok": all(os.environ.get(k) == v for k, v in env_set.items()),
        "versions": versions(frameworks),
        "free_gb": round(usage.free / 2**30, 1),
        # the interface each node talks to the others through (primus.launch.network chose it)
        "network": {k: os.environ[k] for k in NETWORK_VARS if k in os.environ},
    }


def torch_process_group(torch) -> tuple[object, object, object]:
    """The job's process group for a torch backend's preflight hook, which passes in its torch (core
    imports no framework): NCCL/RCCL on the local GPU, else gloo. Returns (torch, dist, device)."""
    dist = torch.distributed
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return torch, dist, device


def collective_test(torch, dist, device) -> dict[str, object]:
    mb, iters = payload(device.type)
    numel = mb * 2**20 // 4
    t = torch.ones(numel, dtype=torch.float32, device=device)
    dist.all_reduce(t)  # warm-up (and the check: every rank contributed ones)
    world = dist.get_world_size()
    ok = bool(torch.allclose(t[:8].cpu(), torch.full((8,), float(world))))
    if device.type == "cuda":
        # device events time the collectives themselves, not the host's launch of them
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            dist.all_reduce(t)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000 / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        seconds = (time.perf_counter() - t0) / iters
    # bus bandwidth as nccl-tests reports it for all-reduce
    busbw = (numel * 4) * 2 * (world - 1) / world / seconds / 1e9 if world > 1 else 0.0
    return {"ok": ok, "seconds": round(seconds, 5), "busbw_gbps": round(busbw, 3), "payload_mb": mb,
            "iterations": iters}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    run_dir, module = Path(args[0]), args[1]
    import yaml

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    framework = config["modules"][module]["framework"]
    from primus.backends.discovery import discover

    backend = discover().get(framework)
    facts = node_facts(run_dir, [backend.spec.framework])
    rank = int(os.environ.get("RANK", "0"))
    if backend.spec.preflight is None:
        facts["collective"] = {"ok": True, "skipped": f"backend {framework} has no collective test"}
        gathered = [facts]
    else:
        # core never imports a framework: the backend opens the process group and hands over
        # its torch, torch.distributed and device; the test itself is framework-neutral here
        from primus.backends.spec import load_object

        dist = None
        try:
            torch, dist, device = load_object(backend.spec.preflight)()
            facts["collective"] = collective_test(torch, dist, device)
            gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
            dist.all_gather_object(gathered, facts)
        except Exception as exc:  # a broken fabric is what preflight exists to find
            facts["collective"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            gathered = [facts]
            dist = None
    code = _write_report(run_dir, gathered) if rank == 0 else 0
    if backend.spec.preflight is not None and dist is not None:
        # leave together, with the group closed: a rank that exits while another still holds the
        # group (or the launcher's store) makes that one abort at interpreter exit
        dist.barrier()
        dist.destroy_process_group()
    return code


def _write_report(run_dir: Path, gathered: list[dict]) -> int:
    report = _report(gathered)
    (run_dir / "preflight.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (run_dir / "preflight.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0 if not report["failing_nodes"] else 1


def _report(ranks: list[dict]) -> dict[str, object]:
    versions = {json.dumps(r["versions"], sort_keys=True) for r in ranks}
    failing: dict[str, list[str]] = {}
    for r in ranks:
        problems = []
        if not r["accelerators"]["ok"]:
            problems.append("accelerators not visible")
        if not r["env_ok"]:
            problems.append("environment differs from what Primus set")
        if r["free_gb"] < MIN_FREE_GB:
            problems.append(f"only {r['free_gb']} GB free in the workspace")
        if not r.get("collective", {}).get("ok"):
            problems.append("collective test failed")
        if len(versions) > 1:
            problems.append("framework versions differ between nodes")
        if problems:
            failing.setdefault(r["host"], []).extend(p for p in problems if p not in failing.get(r["host"], []))
    return {"ranks": ranks, "failing_nodes": failing, "world_size": len(ranks)}


def _markdown(report: dict) -> str:
    lines = ["# Preflight", "", f"world size {report['world_size']}", "",
             "| rank | host | platform | accelerators | network | free GB | all-reduce s (MB x iters) | bus GB/s "
             "| versions |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(report["ranks"]):
        c = r.get("collective", {})
        v = ", ".join(f"{k} {val}" for k, val in r["versions"].items() if val)
        net = ", ".join(f"{k}={val}" for k, val in (r.get("network") or {}).items()) or "-"
        size = f" ({c['payload_mb']} x {c['iterations']})" if "iterations" in c else ""
        lines.append(f"| {i} | {r['host']} | {r['platform']} | {r['accelerators']['tool'] or 'none'} | {net} | "
                     f"{r['free_gb']} | {c.get('seconds', '-')}{size} | {c.get('busbw_gbps', '-')} | {v} |")
    lines.append("")
    if report["failing_nodes"]:
        lines.append("FAILING NODES:")
        lines += [f"- {host}: {'; '.join(problems)}" for host, problems in report["failing_nodes"].items()]
    else:
        lines.append("all checks passed")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
