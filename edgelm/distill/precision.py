"""Training precision: bf16 autocast (fp32 master weights) where the hardware computes bf16 natively.

On a CPU without native bf16, autocast still runs but emulates it, slower than fp32; so ``auto`` keeps fp32 there.
"""
from __future__ import annotations

import logging
import platform
from functools import lru_cache
from pathlib import Path

import torch

from edgelm.distill.config import BF16_MODES
from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 /proc/cpuinfo flags; aarch64 says "bf16" in Features


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether ``device`` computes bf16 natively, the reason in a few words)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    flags = cpu_flags()
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if platform.machine() in ("aarch64", "arm64") and "bf16" in flags:
        found.append("bf16")
    if found:
        return True, f"CPU has {', '.join(found)}"
    return False, f"CPU lacks {' and '.join(CPU_BF16_FLAGS)}"


def resolve_bf16(mode: str, device: torch.device) -> bool:
    """Whether to train in bf16 under ``mode`` (auto / on / require / off) on ``device``; logs the choice."""
    if mode not in BF16_MODES:
        raise EdgelmError(f"--bf16 must be one of {', '.join(BF16_MODES)}, got {mode!r}")
    if mode == "off":
        log.info("precision: fp32 (--bf16 off)")
        return False
    ok, why = native_bf16(device)
    if ok:
        log.info("precision: bf16 autocast with fp32 master weights, bf16 teacher (%s)", why)
        return True
    if mode == "require":
        raise EdgelmError(f"--bf16 require: no native bf16 on this {device.type} ({why}); use --bf16 auto or off")
    (log.warning if mode == "on" else log.info)("precision: fp32, since the %s has no native bf16 (%s)%s",
                                                 device.type, why, "; --bf16 on falls back" if mode == "on" else "")
    return False
