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


def test_builtins_load_lazily_and_plugins_register_the_same_way():
    reg: Registry = Registry("widget", builtins="edgelm.models.zoo")  # any importable module
    reg.register("mine", 42)
    assert reg.get("mine") == 42
    assert "mine" in reg.names()

    @reg.register("decorated")
    def fn():
        return 1

    assert reg.get("decorated") is fn


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
