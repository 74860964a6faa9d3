"""`primus config show --sources`: every value of the resolved config on one line with the layer that
set it (and the file and line, or the command-line item), for the same keys `config show` prints."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from primus.config.yamlfile import flatten
from tests.support import run_primus

LINE = re.compile(r"^(?P<key>\S+)\s+(?P<value>.+?)\s+# (?P<source>.+)$")
FILE_SOURCE = re.compile(r"^(?P<layer>[^(]+) \((?P<file>/[^:()]+\.yaml)(?::(?P<line>\d+))?\)$")


def test_config_show_sources_names_the_layer_of_every_value(toy_exp):
    exp, _ = toy_exp
    r = run_primus("config", "show", str(exp), "--sources", "seed=7", "train.steps=20")
    assert r.returncode == 0, r.stderr
    header, *lines = r.stdout.splitlines()
    assert header == f"# module pre_trainer (backend toy) from {exp}", header
    sources: dict[str, str] = {}
    for line in lines:
        m = LINE.match(line)
        assert m, f"a line without a source: {line!r}"
        assert m["source"].strip() not in ("", "?"), line
        sources[m["key"]] = m["source"]
        f = FILE_SOURCE.match(m["source"])
        if f:  # a file named as the source exists, and the line it names is in it
            text = Path(f["file"]).read_text().splitlines()
            assert not f["line"] or 1 <= int(f["line"]) <= len(text), line
    # the same keys as `config show` prints: none left without a source, none invented
    plain = run_primus("config", "show", str(exp), "seed=7", "train.steps=20")
    assert plain.returncode == 0, plain.stderr
    shown = yaml.safe_load(plain.stdout)["pre_trainer"]
    assert set(sources) == {".".join(k) for k in flatten(shown)}
    # each layer, named: the command line (native and neutral items), the experiment's neutral
    # sections and overrides, the model preset, the backend's module preset and what it extends, and
    # a value derived from others
    exp_file = str(exp)
    assert sources["seed"] == "cli (command line: seed=7)"
    assert sources["iters"].startswith("cli (command line: train.steps=20)"), sources["iters"]
    assert re.fullmatch(rf"neutral train \({re.escape(exp_file)}:\d+\)", sources["lr"]), sources["lr"]
    assert re.fullmatch(rf"overrides \({re.escape(exp_file)}:\d+\)", sources["batch"]), sources["batch"]
    assert re.fullmatch(r"model \(.*/llama3_tiny\.yaml:\d+\)", sources["hidden"]), sources["hidden"]
    assert re.fullmatch(r"module preset \(.*/primus_toy/presets/pre_trainer\.yaml:\d+\)", sources["seq_len"])
    assert re.fullmatch(r"module preset via extends \(.*/module_base\.yaml:\d+\)", sources["file_sink_level"])
    assert sources["samples_per_step"] == "derived from train.micro_batch_size, world_size"
