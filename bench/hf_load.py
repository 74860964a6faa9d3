"""Loading Hugging Face weights into each backend: wall time and peak RSS per rank (issue 12).

Makes a random-weight model with transformers (default: the Llama 3.2 1B shape, fp32, about 5 GB
on disk; `--layers N` keeps the width and cuts the depth for a quick look), then for each target
runs `primus eval EXP --max-blocks 1` (build the model, load the weights, score one block) while
sampling the resident memory of every process of the job every 20 ms. The baseline is transformers'
own `AutoModelForCausalLM.from_pretrained` of the same files in one process, every weight touched
once (transformers 5 maps the files lazily, so without it nothing has been read).

Targets: peak RSS per rank below 0.75x the full model's size for the sharded layouts (each rank
reads only its slices), load time within 1.5x of `from_pretrained`. Besides RSS it reports each
process's peak anonymous memory (RSS minus shared): safetensors are read through mmap, and the file
pages a rank has touched count in its RSS although the page cache owns them. Megatron and torchtitan
log each rank's bytes read, load time and peak RSS when the weights are in; those lines are printed
under their row.

    python bench/hf_load.py [--layers 16] [--targets hf,megatron-tp2,torchtitan-fsdp2] [--keep DIR]

Needs torch, transformers and psutil, and the backends it measures installed (Python 3.11 venv).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "examples" / "data" / "tokenizer"
CORPUS = ROOT / "examples" / "data" / "corpus.jsonl"

# Llama 3.2 1B's config.json (the public model card), vocab cut to the example tokenizer's when asked
LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192})

TARGETS = {  # name -> (backend, processes, overrides)
    "hf": ("hf", 1, []),
    "hf-ddp2": ("hf", 2, []),
    "hf-fsdp2": ("hf", 2, ["parallel.fsdp=true"]),
    "megatron-tp2": ("megatron", 2, ["parallel.tensor=2"]),
    "torchtitan-fsdp2": ("torchtitan", 2, []),
}


def make_model(directory: Path, layers: int) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {**LLAMA_32_1B, "num_hidden_layers": layers}
    config = AutoConfig.for_model("llama", **values)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(directory), safe_serialization=True)
    for file in TOKENIZER.iterdir():
        shutil.copyfile(file, directory / file.name)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def sample_tree(proc: subprocess.Popen) -> dict[int, tuple[int, int]]:
    """Per process of the tree rooted at `proc`, until it exits: (peak RSS, peak anonymous RSS). RSS
    counts the pages of the safetensors files a process has mapped and touched (file-backed, shared
    with the page cache); the anonymous part (RSS minus shared) is the memory the process owns."""
    import psutil

    peaks: dict[int, tuple[int, int]] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    info = p.memory_info()
                except psutil.Error:
                    continue
                rss, anon = peaks.get(p.pid, (0, 0))
                peaks[p.pid] = (max(rss, info.rss), max(anon, info.rss - info.shared))
        except psutil.Error:
            pass
        time.sleep(0.02)
    return peaks


def baseline(model_dir: Path) -> tuple[float, tuple[int, int]]:
    code = textwrap.dedent(f"""
        import time, torch
        from transformers import AutoModelForCausalLM
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.float32)
        # transformers 5 maps the files lazily: touch every weight, or nothing was read yet
        with torch.no_grad():
            sum(float(p.sum()) for p in model.parameters())
        print(time.perf_counter() - t0)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    peaks = sample_tree(proc)
    return float(proc.stdout.read().strip().splitlines()[-1]), max(peaks.values(), default=(0, 0))


def run_target(name: str, model_dir: Path, work: Path) -> tuple[float, list[tuple[int, int]], int]:
    backend, nproc, overrides = TARGETS[name]
    exp = work / f"{name}.yaml"
    exp.write_text(textwrap.dedent(f"""
        work_group: bench
        user_name: bench
        exp_name: {name}
        workspace: {work / 'ws'}
        modules:
          pre_trainer:
            framework: {backend}
            model: {{hf_path: {model_dir}}}
            train: {{steps: 1, micro_batch_size: 1, global_batch_size: {nproc}, seq_length: 128}}
            data: {{path: {CORPUS}, tokenizer: {TOKENIZER}}}
    """))
    argv = [sys.executable, "-m", "primus", "eval", str(exp), "--max-blocks", str(nproc),
            "--nproc-per-node", str(nproc), *overrides]
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    peaks = sample_tree(proc)
    wall = time.perf_counter() - t0
    proc.communicate()
    ranks = sorted(peaks.values(), reverse=True)[:nproc]  # the workers are the biggest processes
    return wall, ranks, proc.returncode


def load_lines(name: str, work: Path) -> list[str]:
    """What each rank logged when the weights were in (megatron and torchtitan log the bytes it read, the
    load time and its peak RSS; hf logs no such line)."""
    out = []
    for log in sorted((work / "ws" / "bench" / "bench" / name).rglob("rank-*/primus.log")):
        for line in log.read_text().splitlines():
            if "loaded " in line and " read " in line:
                out.append(f"  {log.parent.name}: {line[line.index('loaded '):]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (16: the real 1B)")
    parser.add_argument("--targets", default="hf,hf-fsdp2,megatron-tp2,torchtitan-fsdp2")
    parser.add_argument("--keep", type=Path, help="reuse/keep the model directory here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="primus-hf-load-"))
    model_dir = args.keep or work / "model"
    try:
        if not (model_dir / "config.json").exists():
            model_dir.mkdir(parents=True, exist_ok=True)
            print(f"making a random Llama 3.2 1B-shaped model ({args.layers} layers) in {model_dir} ...", flush=True)
            make_model(model_dir, args.layers)
        size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        base_time, base_rss = baseline(model_dir)
        print(f"model: {size / 2**30:.2f} GiB of safetensors (fp32)")
        print(f"{'target':<18} {'wall s':>8} {'x from_pretrained':>18} {'peak RSS/rank GiB':>20} {'x model':>8} "
              f"{'anon GiB':>12} {'x model':>8}")

        def row(name: str, wall: float, ranks: list[tuple[int, int]], status: str = "") -> str:
            rss, anon = max(r for r, _ in ranks), max(a for _, a in ranks)
            return (f"{name:<18} {wall:>8.1f} {wall / base_time:>18.2f} "
                    f"{', '.join(f'{r / 2**30:.2f}' for r, _ in ranks):>20} {rss / size:>8.2f} "
                    f"{', '.join(f'{a / 2**30:.2f}' for _, a in ranks):>12} {anon / size:>8.2f}{status}")

        print(row("from_pretrained", base_time, [base_rss]))
        for name in args.targets.split(","):
            wall, ranks, code = run_target(name, model_dir, work)
            print(row(name, wall, ranks or [(0, 0)], "" if code == 0 else f"  (exit {code})"), flush=True)
            for line in load_lines(name, work):
                print(line, flush=True)
        print("wall time includes process start, model build and one evaluation block; "
              "RSS includes the framework's own import footprint")
        print(json.dumps({"model_bytes": size, "from_pretrained_s": base_time}))
    finally:  # the runs' workspace (and the model, unless --keep put it elsewhere)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
