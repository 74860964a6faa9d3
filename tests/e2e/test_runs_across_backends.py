"""One Hugging Face model, every torch backend: each trains it, `primus runs` lists the runs side by
side, `primus compare` reads them as one table, `checkpoint.export: hf` leaves `<run dir>/hf/`
(in-process and under torchrun: hf runs on 2 processes) and `primus export` of each loads in
transformers (issues 12 and 15; the per-backend parity numbers are in tests/<backend>/test_weights.py).

Runs in the e2e session, where hf, megatron and torchtitan are installed together (maxtext needs
Python 3.12 and its own session)."""

from __future__ import annotations

import json
import math
from importlib.util import find_spec

import pytest

from tests.support import CORPUS, TOKENIZER, assert_ok, free_port, read_metrics, run_primus, write_yaml

BACKENDS = [b for b in ("hf", "megatron", "torchtitan") if find_spec(f"primus_{b}") is not None]
STEPS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny llama trained STEPS steps on every installed torch backend, one workspace."""
    from tests.hf_models import tiny_hf

    model = tiny_hf("llama")
    root = tmp_path_factory.mktemp("across")
    ws = root / "ws"
    for backend in BACKENDS:
        exp = write_yaml(root / f"{backend}.yaml", f"""
            work_group: team
            user_name: me
            exp_name: {backend}-llama
            workspace: {ws}
            modules:
              pre_trainer:
                framework: {backend}
                model: {{hf_path: {model}}}
                train: {{steps: {STEPS}, lr: 1.0e-3, warmup_steps: 1, micro_batch_size: 2, global_batch_size: 4,
                         seq_length: 32, seed: 7, log_interval: 1}}
                data: {{path: {CORPUS}, tokenizer: {TOKENIZER}}}
                checkpoint: {{interval: {STEPS}, export: hf}}
            """)
        nproc = "2" if backend == "hf" else "1"
        assert_ok(run_primus("run", str(exp), "--nproc-per-node", nproc, "--master-port", str(free_port()),
                             timeout=600))
    return ws, model


def test_runs_lists_every_backend_of_a_workspace(trained):
    ws, _ = trained
    rows = json.loads(run_primus("runs", str(ws), "--json").stdout)
    assert sorted(r["backend"] for r in rows) == sorted(BACKENDS)
    for row in rows:
        assert row["state"] == "done" and row["step"] == row["steps"] == STEPS, row
        assert row["last_loss"] is not None and math.isfinite(row["last_loss"])


def test_compare_reads_every_backend_as_one_table(trained):
    ws, _ = trained
    runs = [str(ws / "team/me" / f"{b}-llama") for b in BACKENDS]
    rows = json.loads(run_primus("compare", *runs, "--json").stdout)
    assert len(rows) == len(BACKENDS)
    assert all(r["tokens_per_s"] > 0 and r["best_loss"] <= r["last_loss"] for r in rows)
    for b in BACKENDS:  # the throughput keys are core's, the same on every backend
        lines = read_metrics(ws / "team/me" / f"{b}-llama" / "metrics.jsonl")
        assert [x["step"] for x in lines] == list(range(1, STEPS + 1)) and all(x["tflops"] > 0 for x in lines), b


def test_every_backend_exports_a_model_transformers_loads(trained, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    ws, model = trained
    for b in BACKENDS:
        out = tmp_path / f"{b}-export"
        run_dir = ws / "team/me" / f"{b}-llama"
        assert_ok(run_primus("export", str(run_dir), str(out)))
        loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        at_end = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf"), dtype=torch.float32)
        assert all(torch.equal(p, at_end.state_dict()[n]) for n, p in loaded.state_dict().items()), b
        original = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
        # trained: every tensor moved from the init, none replaced by something else entirely
        moved = [n for n, p in original.state_dict().items()
                 if not torch.equal(p, loaded.state_dict()[n])]
        assert moved, f"{b}: the export equals the init after {STEPS} training steps"
        for name, p in original.state_dict().items():
            cos = torch.nn.functional.cosine_similarity(p.flatten(), loaded.state_dict()[name].flatten(), dim=0)
            assert cos > 0.9, f"{b}: {name} is not the trained init (cosine {cos:.3f})"
        assert (out / "tokenizer.json").is_file()
