"""Issue 17 on the megatron backend: the fast path (layer spec, attention, precision, fusions, overlap)
is decided once, per platform, by primus_megatron.fast_path.decide; `--dry-run` prints it for the
target and the trainer builds it (SDPAttention's parity with megatron-core's local attention is
asserted on test_training.py's one-process run). TransformerEngine's presence is faked at the
decision's own seam (`te=` / `fast_path.transformer_engine_installed`); nothing of megatron is mocked."""

from __future__ import annotations

import re
from typing import Any

import pytest
from mg_helpers import EXAMPLE, run_primus

from primus.cli.main import main
from primus.errors import ConfigError
from primus_megatron import fast_path
from primus_megatron.fast_path import decide
from tests.support import assert_config_error

# the module preset's values that the decision reads
PRESET = {"bf16": True, "fp16": False, "use_flash_attn": True, "use_distributed_optimizer": True,
          "use_torch_fsdp2": False, "overlap_grad_reduce": None, "overlap_param_gather": None}


@pytest.mark.parametrize(("platform", "arch", "te", "spec", "why"), [
    ("cpu", None, False, "local", "TransformerEngine is not installed"),
    ("cpu", None, True, "local", "TransformerEngine needs a GPU (cpu)"),
    ("rocm", "gfx942", False, "local", "TransformerEngine is not installed"),
    ("rocm", "gfx942", True, "transformer_engine", "TransformerEngine installed on rocm"),
    ("cuda", "sm90", False, "local", "TransformerEngine is not installed"),
    ("cuda", "sm90", True, "transformer_engine", "TransformerEngine installed on cuda"),
])
def test_the_decision_per_platform(platform: str, arch: str | None, te: bool, spec: str, why: str) -> None:
    path = decide(PRESET, platform, arch, te=te)
    gpu = platform != "cpu"
    assert (path.spec, path.attention) == (spec, "te" if spec == "transformer_engine" else "sdpa")
    assert path.why == why
    assert path.precision == ("bf16" if gpu else "fp32 (CPU)")
    # fusions and both overlaps on with a GPU (the param gather: with the distributed optimizer)
    assert (path.fusions, path.overlap_grad_reduce, path.overlap_param_gather) == (gpu, gpu, gpu)
    if gpu and te:  # fp8 through TE on an arch that runs the recipe
        fp8 = decide({**PRESET, "fp8": "hybrid"}, platform, arch, te=True)
        assert fp8.precision == "bf16 + fp8 hybrid (delayed recipe)" and fp8.spec == "transformer_engine"
    else:
        with pytest.raises(ConfigError, match=re.escape("fp8 runs through TransformerEngine's layers: " + why)):
            decide({**PRESET, "fp8": "hybrid"}, platform, arch, te=te)


@pytest.mark.parametrize(("native", "platform", "arch", "te", "message"), [
    ({"fp8": "hybrid"}, "rocm", "gfx90a", True, "fp8_recipe delayed does not run on rocm gfx90a"),
    ({"fp8": "e4m3", "fp8_recipe": "mxfp8"}, "cuda", "sm90", True, "fp8_recipe mxfp8 does not run on cuda sm90"),
    ({"fp8": "e4m3", "fp8_recipe": "nvfp4"}, "cuda", "sm90", True, "fp8_recipe 'nvfp4' is not one"),
    ({"fp8": True}, "cuda", "sm90", True, "fp8 True is not an fp8 format"),
    ({"fp8": "hybrid", "transformer_impl": "local"}, "cuda", "sm90", True, "transformer_impl is local"),
    ({"fp8": "hybrid", "attention_chunk_size": 8}, "cuda", "sm90", True,
     "attention_chunk_size is built on SDPAttention only"),
    ({"transformer_impl": "transformer_engine"}, "cuda", "sm90", False, "TransformerEngine is not installed"),
    ({"transformer_impl": "transformer_engine"}, "cpu", None, True, "TransformerEngine needs a GPU"),
])
def test_what_cannot_work_is_refused(native: dict[str, Any], platform: str, arch: str | None, te: bool,
                                     message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        decide({**PRESET, **native}, platform, arch, te=te)


def test_what_is_written_wins() -> None:
    # transformer_impl: local keeps the local spec where TE is installed; the attention stays SDPA
    local = decide({**PRESET, "transformer_impl": "local"}, "rocm", "gfx950", te=True)
    assert (local.spec, local.attention, local.why) == ("local", "sdpa", "transformer_impl: local")
    # use_flash_attn: false is megatron-core's own attention, except where only SDPAttention works (MLA)
    assert decide({**PRESET, "use_flash_attn": False}, "cuda", "sm90", te=False).attention == "local"
    assert decide({**PRESET, "use_flash_attn": False, "multi_latent_attention": True}, "cuda", None,
                  te=False).attention == "sdpa"
    # Llama 4's chunked attention stays on SDPAttention with TE installed
    assert decide({**PRESET, "attention_chunk_size": 8}, "cuda", "sm90", te=True).spec == "local"
    # an fp8 recipe for the arch (MI355X's mxfp8); an unknown CUDA arch at dry-run is TE's to judge
    assert decide({**PRESET, "fp8": "e4m3", "fp8_recipe": "mxfp8"}, "rocm", "gfx950", te=True).fp8_recipe == "mxfp8"
    assert decide({**PRESET, "fp8": "e4m3", "fp8_recipe": "mxfp8"}, "cuda", None, te=True).fp8 == "e4m3"
    # overlap as written; the param gather needs the distributed optimizer
    written = decide({**PRESET, "overlap_grad_reduce": False, "use_distributed_optimizer": False}, "rocm", "gfx942",
                     te=False)
    assert (written.overlap_grad_reduce, written.overlap_param_gather) == (False, False)
    assert "param gather needs the distributed optimizer" in written.lines()["overlap"]


def test_dry_run_says_what_the_target_gets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # this host's CPU view, then a ROCm target with TransformerEngine installed (faked at the seam)
    assert main(["run", str(EXAMPLE), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "attention SDPA (torch scaled_dot_product_attention); TransformerEngine is not installed" in out
    assert "precision fp32 (CPU)" in out and "overlap   grad reduce off, param gather off (CPU)" in out
    # a login node without TransformerEngine submitting an fp8 job for ROCm nodes: said, not refused
    assert main(["config", "validate", str(EXAMPLE), "fp8=hybrid"]) == 0
    assert main(["run", str(EXAMPLE), "--dry-run", "--platform", "rocm", "fp8=hybrid"]) == 0
    out = capsys.readouterr().out
    assert ("attention TransformerEngine fused attention; TransformerEngine installed on rocm (if installed on the "
            "nodes: it is not on this host)") in out and "precision bf16 + fp8 hybrid (delayed recipe)" in out
    monkeypatch.setattr(fast_path, "transformer_engine_installed", lambda: True)
    assert main(["run", str(EXAMPLE), "--dry-run", "--platform", "rocm", "fp8=hybrid"]) == 0
    out = capsys.readouterr().out
    assert "attention TransformerEngine fused attention; TransformerEngine installed on rocm" in out
    assert "spec      transformer_engine layer spec" in out
    assert "precision bf16 + fp8 hybrid (delayed recipe)" in out
    assert "fusions   bias+activation, bias+dropout, RoPE on (GPU)" in out
    assert "overlap   grad reduce on, param gather on (GPU default)" in out


def test_fp8_without_transformer_engine_is_one_line() -> None:
    assert_config_error(run_primus("run", str(EXAMPLE), "--dry-run", "fp8=hybrid"),
                        "fp8=hybrid: fp8 runs through TransformerEngine's layers: TransformerEngine is not installed")


# train.compile on megatron: refused (hf and torchtitan set their switch: tests/e2e/test_all_backends.py)
def test_train_compile_on_megatron_is_one_line() -> None:
    assert_config_error(run_primus("run", str(EXAMPLE), "--dry-run", "modules.pre_trainer.train.compile=true"),
                        "train.compile", "megatron-core 0.16 compiles only its fused kernels")


def test_the_train_loader_reads_what_the_inline_batches_read() -> None:
    # on a GPU the training batches come from train_loader's workers (pinned, one batch ahead); they
    # must be data.microbatches' samples: global batch b is samples [b * gbs, (b + 1) * gbs), each
    # data-parallel rank a contiguous share of it, micro_batch_size at a time, wrapping the dataset
    from types import SimpleNamespace

    import torch

    from primus_megatron.loader import train_loader

    dataset = [{"tokens": torch.full((3,), i), "attention_mask": None} for i in range(10)]
    args = SimpleNamespace(global_batch_size=4, micro_batch_size=1, train_iters=5)
    streamed = [b["tokens"][:, 0].tolist() for b in train_loader(dataset, 2, args, dp_rank=1, dp_size=2, workers=1)]
    assert streamed == [[0], [1], [4], [5], [8], [9]]  # batches 2, 3, 4: samples 10-11, 14-15, 18-19
    assert all(set(b) == {"tokens"} for b in train_loader(dataset, 4, args, dp_rank=0, dp_size=2, workers=1))
    assert decide({**PRESET, "num_workers": 8}, "rocm", "gfx942", te=False).lines()["data"] == (
        "8 workers, pinned memory, 1 batch of prefetch per worker")
    assert decide({**PRESET, "num_workers": 8}, "cpu", te=False).data_workers == 0
