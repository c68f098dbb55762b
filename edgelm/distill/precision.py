"""Training precision: bf16 autocast (fp32 master weights) where the hardware computes bf16 natively and fast.

On a CPU without native bf16, autocast still runs but emulates it, slower than fp32; and a CPU with the bf16
instructions may still run them slower than fp32. So ``auto`` checks the flags, then times one matmul.
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Precision:
    bf16: bool  # train under bf16 autocast (fp32 master weights) with a bf16 teacher
    reason: str  # why, in a few words (logged and kept in the student's manifest)
    bf16_speedup: float | None = None  # measured bf16 / fp32 matmul speed on this CPU, where it was measured


AUTO_MIN_SPEEDUP = 1.15  # auto takes bf16 on a CPU only when its matmuls are at least this much faster


def bf16_speedup(rows: int, inner: int, outer: int, reps: int = 9) -> float:
    """How much faster a bf16 matmul [rows, inner] x [inner, outer] runs than fp32 on this CPU (best of ``reps``
    each, the two alternating, so a burst of noise on a shared machine slows both rather than one).

    A CPU can have the bf16 instructions and still run bf16 slower than fp32 (measured here on a Xeon with
    avx512_bf16 but no AMX: 0.55x), so auto measures instead of trusting the flag."""
    dtypes = (torch.float32, torch.bfloat16)
    args = {dt: (torch.randn(rows, inner, dtype=dt), torch.randn(outer, inner, dtype=dt)) for dt in dtypes}
    best = {dt: float("inf") for dt in dtypes}
    for dt in dtypes:
        torch.nn.functional.linear(*args[dt])  # warm-up (oneDNN picks and packs its kernel)
    for _ in range(reps):
        for dt in dtypes:
            t0 = time.perf_counter()
            torch.nn.functional.linear(*args[dt])
            best[dt] = min(best[dt], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


def resolve_bf16(mode: str, device: torch.device, shape: tuple[int, int, int] = (1024, 576, 1536)) -> Precision:
    """The precision to train in under ``mode`` (auto / on / require / off) on ``device``; logs the choice.

    ``shape`` is a matmul typical of the run ([tokens per micro-batch, hidden] x [hidden, MLP width]), which auto
    times on a CPU before choosing bf16."""
    if mode not in BF16_MODES:
        raise EdgelmError(f"--bf16 must be one of {', '.join(BF16_MODES)}, got {mode!r}")
    if mode == "off":
        log.info("precision: fp32 (--bf16 off)")
        return Precision(False, "--bf16 off")
    ok, why = native_bf16(device)
    if not ok:
        if mode == "require":
            raise EdgelmError(f"--bf16 require: no native bf16 on this {device.type} ({why}); use --bf16 auto or off")
        (log.warning if mode == "on" else log.info)("precision: fp32, since the %s has no native bf16 (%s)%s",
                                                     device.type, why, "; --bf16 on falls back" if mode == "on" else "")
        return Precision(False, why)
    speedup = bf16_speedup(*shape) if device.type == "cpu" else None
    if speedup is not None:
        why += f"; bf16 matmuls run at {speedup:.2f}x fp32 here"
    if mode == "auto" and speedup is not None and speedup < AUTO_MIN_SPEEDUP:
        log.info("precision: fp32, since bf16 is no faster on this CPU (%s); --bf16 on forces it", why)
        return Precision(False, why, speedup)
    if speedup is not None and speedup < 1:
        log.warning("precision: bf16 as asked (--bf16 %s), though it is slower than fp32 on this CPU (%s)", mode, why)
    else:
        log.info("precision: bf16 autocast with fp32 master weights, bf16 teacher (%s)", why)
    return Precision(True, why, speedup)
