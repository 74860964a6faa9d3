"""The patch layer: records are complete, CPU patches stay on CPU, feature patches do what they say."""

from __future__ import annotations

import subprocess
import sys

from primus.patches.registry import PatchContext, PatchSet
from primus_torchtitan.patches import PATCHES, amd_peak_flops


def test_records_are_complete_and_cpu_patches_are_cpu_only() -> None:
    ids = [p.id for p in PATCHES]
    assert len(ids) == len(set(ids))
    for patch in PATCHES:
        assert patch.id.startswith("torchtitan.") and patch.backend == "torchtitan"
        assert patch.target and patch.description and patch.versions
        if ".cpu." in patch.id:
            assert patch.platforms == frozenset({"cpu"})


def test_cpu_patches_do_not_apply_on_gpus() -> None:
    ctx = PatchContext(backend="torchtitan", platform="rocm", framework_version="0.3.0", arch="gfx942")
    applying = {d.patch.id for d in PatchSet(PATCHES, environ={}).explain(ctx) if d.applies}
    assert not any(".cpu." in i for i in applying)
    assert {"torchtitan.amd_peak_flops", "torchtitan.embedding_autocast", "torchtitan.route_logging"} <= applying


def test_embedding_autocast_can_be_switched_off() -> None:
    config = {"primus_turbo": {"enable_embedding_autocast": False}}
    ctx = PatchContext(backend="torchtitan", platform="cpu", framework_version="0.3.0", config=config)
    decisions = {d.patch.id: d for d in PatchSet(PATCHES, environ={}).explain(ctx)}
    assert not decisions["torchtitan.embedding_autocast"].applies


def test_amd_peak_flops_table() -> None:
    assert amd_peak_flops("AMD Instinct MI300X") == 1307e12
    assert amd_peak_flops("AMD Instinct MI355X") == 2500e12
    assert amd_peak_flops("NVIDIA H100") is None


EMBEDDING_SCRIPT = """
import torch
from primus.patches.registry import PatchContext, PatchSet
from primus_torchtitan.patches import PATCHES
ctx = PatchContext(backend="torchtitan", platform="cpu", framework_version="0.3.0")
patches = PatchSet(PATCHES, environ={"PRIMUS_PATCHES": "all"})
patches.apply_phase("before_import", ctx)
patches.apply_phase("setup", ctx)
from torchtitan.models.common import Embedding
emb = Embedding.Config(num_embeddings=16, embedding_dim=8).build()
torch.nn.init.normal_(emb.weight)
tokens = torch.arange(4).unsqueeze(0)
with torch.autocast("cpu", dtype=torch.bfloat16):
    patched = emb(tokens).dtype
patches.undo_all()
plain = Embedding.Config(num_embeddings=16, embedding_dim=8).build()
with torch.autocast("cpu", dtype=torch.bfloat16):
    unpatched = plain(tokens).dtype
print(patched, unpatched)
"""


def test_embedding_output_takes_the_autocast_dtype() -> None:
    out = subprocess.run([sys.executable, "-c", EMBEDDING_SCRIPT], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["torch.bfloat16", "torch.float32"], out.stdout + out.stderr
