"""TFLOP/s and MFU from one core formula and one peak table (issue 17)."""

from __future__ import annotations

import json
import math

import yaml

from primus.config.resolve import core_preset_dir
from primus.models.spec import ModelSpec
from primus.runs import flops
from tests.support import assert_ok, read_metrics, run_primus


def _preset(name: str) -> ModelSpec:
    return ModelSpec.model_validate(yaml.safe_load((core_preset_dir() / "models" / name).read_text()))


def test_flops_per_token_follows_the_published_parameter_counts():
    llama = _preset("llama3.1_8B.yaml")
    # Llama 3.1 8B: 8.03B parameters, of which the 128256 x 4096 input embedding is a lookup
    assert math.isclose(flops.active_parameters(llama), 8.03e9 - 128256 * 4096, rel_tol=0.01)
    expected = 6 * flops.active_parameters(llama) + 12 * 32 * 8192 * 32 * 128
    assert flops.flops_per_token(llama, 8192) == expected
    # Mixtral 8x7B: 12.9B active of 46.7B (top-2 of 8 experts); its 32000 x 4096 lookup is not a matmul
    mixtral = _preset("mixtral_8x7B.yaml")
    assert math.isclose(flops.active_parameters(mixtral), 12.9e9 - 32000 * 4096, rel_tol=0.015)
    assert flops.active_parameters(mixtral) < mixtral.parameter_count() / 3


def test_peak_is_read_from_the_device_name_never_guessed():
    assert flops.peak_tflops("AMD Instinct MI300X", {}) == 1307.4
    assert flops.peak_tflops("AMD Instinct MI300A", {}) == 980.6
    assert flops.peak_tflops("AMD Instinct MI355X", {}) == 2516.6
    assert flops.peak_tflops("NVIDIA H100 PCIe", {}) == 756.0
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", {}) == 989.4
    # an arch is shared by several products, an unknown name has no figure: no MFU rather than a wrong one
    assert flops.peak_tflops("gfx942", {}) is None
    assert flops.peak_tflops("AMD Instinct MI308X", {}) is None
    assert flops.peak_tflops(None, {}) is None
    assert flops.peak_tflops("AMD Instinct MI308X", {"PRIMUS_PEAK_TFLOPS": "300"}) == 300.0


def test_device_name_from_a_fake_node(tmp_path, monkeypatch):
    nvidia = tmp_path / "nvidia"
    (nvidia / "0000:01:00.0").mkdir(parents=True)
    (nvidia / "0000:01:00.0" / "information").write_text("Model: \t\t NVIDIA H200\nIRQ: 10\n")
    drm = tmp_path / "drm"
    (drm / "card0" / "device").mkdir(parents=True)
    (drm / "card0" / "device" / "product_name").write_text("AMD Instinct MI325X\n")
    monkeypatch.setattr(flops, "NVIDIA_GPUS", tmp_path / "none")
    monkeypatch.setattr(flops, "DRM_CARDS", drm)
    assert flops.device_name({}) == "AMD Instinct MI325X"
    monkeypatch.setattr(flops, "NVIDIA_GPUS", nvidia)
    assert flops.device_name({}) == "NVIDIA H200"
    assert flops.device_name({"PRIMUS_DEVICE_NAME": "AMD Instinct MI300X"}) == "AMD Instinct MI300X"


def test_every_training_line_has_tflops_and_mfu(toy_exp):
    exp, ws = toy_exp
    assert_ok(run_primus("run", str(exp), "train.seq_length=32"))
    cpu = read_metrics(ws / "team/me/toy/metrics.jsonl")
    per_token = flops.flops_per_token(_preset("llama3_tiny.yaml"), 32)
    for line in cpu:
        assert math.isclose(line["tflops"], line["tokens_per_s"] * per_token / 1e12, rel_tol=1e-3, abs_tol=1e-6)
        assert line["mfu"] is None  # a CPU has no peak in the table
    assert_ok(run_primus("run", str(exp), "train.seq_length=32", "exp_name=gpu",
                         env={"PRIMUS_DEVICE_NAME": "AMD Instinct MI300X"}))
    gpu = [json.loads(x) for x in (ws / "team/me/gpu/metrics.jsonl").read_text().splitlines()]
    assert all(math.isclose(x["mfu"], x["tflops"] / 1307.4, rel_tol=1e-3, abs_tol=1e-9) for x in gpu if "loss" in x)
