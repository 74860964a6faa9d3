"""Patch and env registries: decisions, apply with undo, loud failures, flag merging."""

import types

import pytest

from primus.patches.registry import (
    Patch,
    PatchContext,
    PatchSet,
    PatchTargetMissing,
    flags_markdown,
    patches_markdown,
    replace_attr,
)
from primus.platform.detect import detect_platform
from primus.platform.env import EnvEntry, core_entries, plan_env

TARGET = types.SimpleNamespace(value=1)


def _patch(**kw) -> Patch:
    def apply(ctx):
        return replace_attr(TARGET, "value", 2)

    base = dict(id="t.p", backend="toy", target="os.sep", phase="setup", description="d", apply=apply)
    base.update(kw)
    return Patch(**base)


def _ctx(**kw) -> PatchContext:
    base = dict(backend="toy", platform="cpu", framework_version="1.5", config={})
    base.update(kw)
    return PatchContext(**base)


def test_apply_and_undo():
    ps = PatchSet([_patch()], environ={})
    assert ps.apply_phase("before_train", _ctx()) == []
    assert ps.apply_phase("setup", _ctx()) == ["t.p"] and TARGET.value == 2
    ps.undo_all()
    assert TARGET.value == 1


@pytest.mark.parametrize(("patch_kw", "ctx_kw", "env", "reason"), [
    ({"platforms": frozenset({"rocm"})}, {}, {}, "platform cpu"),
    ({"versions": ">=2"}, {}, {}, "outside >=2"),
    ({"versions": ">=1"}, {"framework_version": None}, {}, "not installed"),
    ({"enabled_by": "use_it"}, {"config": {"use_it": False}}, {}, "use_it is off"),
    ({"enabled_by": "use_it", "enabled_by_default": False}, {}, {}, "use_it is off"),
    ({"disabled_by": "disable_it"}, {}, {}, "disable_it is on"),
    ({"disabled_by": "disable_it"}, {"config": {"disable_it": True}}, {}, "disable_it is on"),
    ({"predicate": lambda c: False, "predicate_doc": "never"}, {}, {}, "never"),
    ({}, {}, {"PRIMUS_PATCHES": "none"}, "PRIMUS_PATCHES=none"),
    ({}, {}, {"PRIMUS_PATCHES": "a,b"}, "not selected"),
])
def test_decisions_say_why_not(patch_kw, ctx_kw, env, reason):
    dec = PatchSet([_patch(**patch_kw)], environ=env).explain(_ctx(**ctx_kw))[0]
    assert not dec.applies and reason in dec.reason


def test_selected_by_id_and_enabled_by_default():
    assert PatchSet([_patch()], environ={"PRIMUS_PATCHES": "t.p"}).explain(_ctx())[0].applies
    assert PatchSet([_patch(enabled_by="k")], environ={}).explain(_ctx())[0].applies


def test_disable_flag_turns_a_patch_on_when_false():
    dec = PatchSet([_patch(disabled_by="disable_it")], environ={}).explain(_ctx(config={"disable_it": False}))[0]
    assert dec.applies and dec.reason == "disable_it is off"


def test_missing_target_fails_loudly_unless_optional():
    ps = PatchSet([_patch(target="os.no_such_attribute_here")], environ={})
    with pytest.raises(PatchTargetMissing, match=r"patch t.p: target os.no_such_attribute_here .* 1.5"):
        ps.apply_phase("setup", _ctx())
    ps = PatchSet([_patch(target="os.no_such_attribute_here", optional=True)], environ={})
    assert ps.apply_phase("setup", _ctx()) == []


def test_duplicate_ids_rejected():
    with pytest.raises(ValueError, match="duplicate patch ids"):
        PatchSet([_patch(), _patch()])


def test_markdown_table():
    md = patches_markdown("toy", [_patch(enabled_by="k", versions=">=1")])
    assert "| `t.p` | platform | setup | `os.sep` | >=1 | cpu, cuda, rocm | `k` (default on) | d |" in md


def test_flags_table_in_upstream_layout():
    patches = [_patch(id="a", kind="feature", enabled_by="use_x", enabled_by_default=False, notes="writes x/"),
               _patch(id="b", kind="feature", disabled_by="disable_y", platforms=frozenset({"rocm"})),
               _patch(id="c", kind="platform")]
    md = flags_markdown(patches, {"use_x": False})
    assert md.splitlines()[0] == "| argument | default | description | patched targets | notes |"
    assert "| `use_x` | `false` | d | `os.sep` | `a`: writes x/ |" in md
    assert "| `disable_y` | `true` | d | `os.sep` | `b`: on rocm |" in md
    assert "`c`" not in md  # platform patches have no flag row


def test_env_defaults_user_wins_merge_arch_and_conditions():
    entries = [
        EnvEntry("A", "1", platforms=frozenset({"cpu"})),
        EnvEntry("B", "1", platforms=frozenset({"cpu"})),
        EnvEntry("F", "--x=1 --y=2", platforms=frozenset({"cpu"}), mode="merge"),
        EnvEntry("G", "g", platforms=frozenset({"cpu"}), arch="gfx950"),
        EnvEntry("H", "on", platforms=frozenset({"cpu"}), when="FLAG"),
        EnvEntry("R", "rocm", platforms=frozenset({"rocm"})),
    ]
    changes, decisions = plan_env(entries, platform="cpu", arch=None, environ={"B": "user", "F": "--y=9"},
                                  experiment_env={"A": "exp", "Z": True})
    assert changes == {"A": "exp", "F": "--y=9 --x=1", "Z": "1"}
    reasons = {d.entry.name: d.reason for d in decisions}
    assert reasons["B"] == "already set by the user" and "gfx950" in reasons["G"] and "FLAG=1" in reasons["H"]
    assert reasons["R"] == "not on cpu"
    changes, _ = plan_env(entries, platform="cpu", arch="gfx950", environ={"FLAG": "1"})
    assert changes["G"] == "g" and changes["H"] == "on"


def test_conditional_entry_overrides_base_value():
    changes, _ = plan_env(core_entries("torch"), platform="rocm", arch="gfx942", environ={})
    assert changes["NCCL_IB_GID_INDEX"] == "3" and "NCCL_ALGO" not in changes
    changes, _ = plan_env(core_entries("torch"), platform="rocm", arch="gfx942",
                          environ={"USING_AINIC": "1", "PRIMUS_DETERMINISTIC": "1"})
    assert changes["NCCL_IB_GID_INDEX"] == "1" and changes["NCCL_ALGO"] == "Ring"
    assert "HSA_ENABLE_SDMA" not in plan_env(core_entries("jax"), platform="rocm", arch=None, environ={})[0]


def test_config_conditional_entry():
    entries = [EnvEntry("C", "1", platforms=frozenset({"cpu"})),
               EnvEntry("C", "8", platforms=frozenset({"cpu"}), when_config="use_fsdp")]
    assert plan_env(entries, platform="cpu", arch=None, environ={})[0] == {"C": "1"}
    assert plan_env(entries, platform="cpu", arch=None, environ={}, config={"use_fsdp": False})[0] == {"C": "1"}
    changes, decisions = plan_env(entries, platform="cpu", arch=None, environ={}, config={"use_fsdp": True})
    assert changes == {"C": "8"}
    changes, decisions = plan_env(entries, platform="cpu", arch=None, environ={"C": "2"}, config={"use_fsdp": True})
    assert changes == {} and all(d.value == "2" for d in decisions)


def test_platform_detection_is_quiet_on_this_machine(monkeypatch):
    monkeypatch.delenv("PRIMUS_PLATFORM", raising=False)
    p = detect_platform()
    assert p.kind in ("cpu", "cuda", "rocm")
    assert detect_platform({"PRIMUS_PLATFORM": "rocm", "PRIMUS_GFX_ARCH": "gfx950"}).arch == "gfx950"


def test_enabled_by_walks_nested_keys():
    patch = _patch(enabled_by="primus_turbo.enable_x", enabled_by_default=False)
    on = _ctx(config={"primus_turbo": {"enable_x": True}})
    off = _ctx(config={"primus_turbo": {"enable_x": False}})
    assert PatchSet([patch], environ={}).explain(on)[0].applies
    assert not PatchSet([patch], environ={}).explain(off)[0].applies
    assert not PatchSet([patch], environ={}).explain(_ctx())[0].applies
