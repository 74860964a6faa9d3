"""Loading Hugging Face weights into each backend: wall time and peak RSS per rank (issue 12).

Makes a random-weight model with transformers (default: the Llama 3.2 1B shape, fp32, about 5 GB
on disk; `--layers N` keeps the width and cuts the depth for a quick look), then for each target
runs `primus eval EXP --max-blocks 1` (build the model, load the weights, score one block) while
sampling the resident memory of every process of the job every 20 ms. The baseline is transformers'
own `AutoModelForCausalLM.from_pretrained` of the same files in one process, every weight touched
once (transformers 5 maps the files lazily, so without it nothing has been read).

Targets: peak RSS per rank below 0.75x the full model's size for the sharded layouts (each rank
reads only its slices), load time within 1.5x of `from_pretrained`.

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


def sample_tree(proc: subprocess.Popen) -> dict[int, int]:
    """Peak RSS of every process of the tree rooted at `proc`, until it exits."""
    import psutil

    peaks: dict[int, int] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    return peaks


def baseline(model_dir: Path) -> tuple[float, int]:
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
    return float(proc.stdout.read().strip().splitlines()[-1]), max(peaks.values(), default=0)


def run_target(name: str, model_dir: Path, work: Path) -> tuple[float, list[int], int]:
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
        print(f"{'target':<18} {'wall s':>8} {'x from_pretrained':>18} {'peak RSS/rank GiB':>20} {'x model':>8}")
        print(f"{'from_pretrained':<18} {base_time:>8.1f} {1.0:>18.2f} {base_rss / 2**30:>20.2f} "
              f"{base_rss / size:>8.2f}")
        for name in args.targets.split(","):
            wall, ranks, code = run_target(name, model_dir, work)
            worst = max(ranks, default=0)
            status = "" if code == 0 else f"  (exit {code})"
            print(f"{name:<18} {wall:>8.1f} {wall / base_time:>18.2f} "
                  f"{', '.join(f'{r / 2**30:.2f}' for r in ranks):>20} {worst / size:>8.2f}{status}", flush=True)
        print("wall time includes process start, model build and one evaluation block; "
              "RSS includes the framework's own import footprint")
        print(json.dumps({"model_bytes": size, "from_pretrained_s": base_time}))
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
