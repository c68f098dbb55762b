from __future__ import annotations

import pytest

from edgelm.errors import EdgelmError, UnknownNameError
from edgelm.registry import KD_LOSSES, STUDENT_ZOO, TEACHERS, Registry


def test_unknown_name_lists_known():
    with pytest.raises(UnknownNameError) as e:
        KD_LOSSES.get("kl_forwards")
    assert "unknown KD loss 'kl_forwards'" in str(e.value)
    for name in KD_LOSSES.names():
        assert name in str(e.value)


def test_builtins_are_imported_on_first_lookup_only():
    """In a fresh interpreter: importing the registries imports no built-in module; the first lookup does."""
    import subprocess
    import sys

    code = """
import sys
from edgelm.registry import ARCHS, DEVICES, KD_LOSSES, QUANTS, ROUTERS, RUNTIMES, STUDENT_ZOO, TARGETS, TEACHERS
regs = (ARCHS, DEVICES, KD_LOSSES, QUANTS, ROUTERS, RUNTIMES, STUDENT_ZOO, TARGETS, TEACHERS)
mods = [m for r in regs for m in r.builtins]
assert mods and not [m for m in mods if m in sys.modules], [m for m in mods if m in sys.modules]
KD_LOSSES.get("jsd")
assert "edgelm.distill.losses" in sys.modules
assert not [m for m in mods if m in sys.modules and m != "edgelm.distill.losses"]
ROUTERS.names()
assert "edgelm.coop.routers" in sys.modules and "edgelm.coop.learn" in sys.modules
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_plugins_register_the_same_way_and_names_are_written_once():
    reg: Registry = Registry("widget")
    reg.register("mine", 42)
    assert reg.get("mine") == 42
    assert "mine" in reg.names()

    @reg.register("decorated")
    def fn():
        return 1

    assert reg.get("decorated") is fn

    @reg.register
    class Named:
        name = "from-the-class"

    assert reg.get("from-the-class") is Named
    reg.register(type("Obj", (), {"name": "from-an-object"})())
    assert "from-an-object" in reg
    with pytest.raises(EdgelmError, match="needs a name"):
        reg.register(object())


def test_builtins_register_under_their_own_names():
    """No registry entry is filed under a name other than its own ``name`` (where it has one)."""
    from edgelm.registry import ARCHS, DEVICES, QUANTS, ROUTERS, RUNTIMES, TARGETS

    for reg in (ARCHS, DEVICES, QUANTS, ROUTERS, RUNTIMES, TARGETS):
        for key, obj in reg.items():
            assert obj.name == key, (reg.kind, key)


def test_duplicate_registration_is_refused():
    reg: Registry = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(EdgelmError, match="already registered"):
        reg.register("a", 2)
    reg.register("a", 3, overwrite=True)
    assert reg.get("a") == 3


def test_builtin_registries_are_populated():
    assert "smollm2-135m-instruct" in TEACHERS
    assert {"nano", "micro", "small"} <= set(STUDENT_ZOO.names())
    assert {"forward_kl", "reverse_kl", "jsd"} <= set(KD_LOSSES.names())
