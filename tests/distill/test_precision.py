from __future__ import annotations

import pytest
import torch

import edgelm.distill.precision as precision
from edgelm.distill.precision import Precision, bf16_speedup, resolve_bf16
from edgelm.errors import EdgelmError

CPU = torch.device("cpu")


def _machine(monkeypatch, native: bool, speedup: float) -> None:
    monkeypatch.setattr(precision, "native_bf16", lambda d: (native, "CPU has avx512_bf16" if native else "CPU lacks"))
    monkeypatch.setattr(precision, "bf16_speedup", lambda *shape: speedup)


@pytest.mark.parametrize("mode, native, speedup, want", [
    ("auto", True, 2.0, True),  # native and faster: bf16
    ("auto", True, 0.52, False),  # native but slower (measured on a Xeon): fp32
    ("auto", False, 2.0, False),
    ("on", True, 0.52, True),  # asked for: bf16, with a warning
    ("on", False, 2.0, False),  # not native: fp32, with a warning
    ("require", True, 0.52, True),
    ("off", True, 2.0, False),
])
def test_auto_on_require_off(monkeypatch, mode, native, speedup, want):
    _machine(monkeypatch, native, speedup)
    p = resolve_bf16(mode, CPU)
    assert isinstance(p, Precision) and p.bf16 is want
    if native and mode != "off":
        assert p.bf16_speedup == speedup and f"{speedup:.2f}x fp32" in p.reason


def test_require_without_native_bf16_is_refused(monkeypatch):
    _machine(monkeypatch, False, 2.0)
    with pytest.raises(EdgelmError, match="--bf16 require: no native bf16 on this cpu"):
        resolve_bf16("require", CPU)
    with pytest.raises(EdgelmError, match="--bf16 must be one of auto, on, require, off"):
        resolve_bf16("fast", CPU)


def test_speedup_is_a_positive_ratio():
    assert bf16_speedup(64, 64, 64, reps=2) > 0


def test_native_bf16_reads_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert precision.native_bf16(CPU) == (True, "CPU has avx512_bf16")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    ok, why = precision.native_bf16(CPU)
    assert not ok and "lacks amx_bf16 and avx512_bf16" in why
