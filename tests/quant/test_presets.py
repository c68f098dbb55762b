from __future__ import annotations

import pytest

from edgelm.errors import EdgelmError, UnknownNameError
from edgelm.quant.presets import QuantPreset, get_preset
from edgelm.registry import QUANTS

REQUIRED = {"fp32", "fp16", "int8", "int4-g32", "int4-g128", "gptq-int4-g32", "gptq-int4-g128", "gptq-int8"}


def test_required_presets_are_registered_and_frozen():
    assert REQUIRED <= set(QUANTS.names())
    p = get_preset("gptq-int4-g32")
    with pytest.raises(Exception):
        p.bits = 8  # type: ignore[misc]


def test_bits_per_weight():
    assert get_preset("int4-g32").bits_per_weight == 4.5  # 4 + fp16 scale / 32
    assert get_preset("int4-g128").bits_per_weight == 4.125
    assert get_preset("int8").bits_per_weight == 8.0
    assert get_preset("int4-g32").with_options(sym=False).bits_per_weight == 4.625  # + a 4-bit zero per group


def test_unknown_preset_lists_known():
    with pytest.raises(UnknownNameError, match="known: .*gptq-int4-g32"):
        get_preset("int3")


def test_options_make_a_named_variant():
    p = get_preset("gptq-int4-g128").with_options(act_order=True, damp=0.02)
    assert p.act_order and p.damp == 0.02 and p.name == "gptq-int4-g128+act_order=True+damp=0.02"
    assert get_preset("fp32").with_options() is get_preset("fp32")


@pytest.mark.parametrize("name, opts, msg", [
    ("int4-g32", {"act_order": True}, "GPTQ presets only"),
    ("fp16", {"sym": False}, "takes no options"),
    ("gptq-int8", {"damp": 1.5}, "must be in"),
])
def test_bad_options(name, opts, msg):
    with pytest.raises(EdgelmError, match=msg):
        get_preset(name).with_options(**opts)


def test_plugin_preset_registers_like_builtins():
    p = QuantPreset("test-int4-g64", "rtn", 4, 64, summary="plugin")
    QUANTS.register(p.name, p)
    try:
        assert get_preset("test-int4-g64").bits_per_weight == 4.25
    finally:
        QUANTS._items.pop(p.name)
