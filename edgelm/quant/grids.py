"""The 32-wide block grids a weight can be quantized onto, one per ggml type, and the scale search they share.

Every type here has blocks of 32 columns, so any row width that is a multiple of 32 takes it without the fallback
llama.cpp's 256-wide K-quants suffer on widths such as 576. Symmetric types store ``w = d * (q - 2^(b-1))`` with a
signed fp16 ``d``; asymmetric ones ``w = d * q + m``, which edgelm holds as ``s * (q - z)`` (``m = -s * z``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    import torch

    from edgelm.models.qformat import QLinear

BLOCK = 32  # columns per block in every type below (ggml's QK4_0 = QK5_0 = QK8_0 = 32)


@dataclass(frozen=True)
class BlockType:
    name: str  # ggml type name, as gguf-py spells it
    bits: int  # bits per code
    sym: bool  # zero point fixed at 2^(bits-1) (one fp16 per block) or a per-block minimum (two fp16 per block)
    block_bytes: int  # bytes per 32-weight block (gguf-py's GGML_QUANT_SIZES; a test checks they agree)

    @property
    def bpw(self) -> float:
        return 8 * self.block_bytes / BLOCK


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q4_0", 4, True, 18),
    BlockType("Q4_1", 4, False, 20),
    BlockType("Q5_0", 5, True, 22),
    BlockType("Q5_1", 5, False, 24),
    BlockType("Q8_0", 8, True, 34),
)}
# (bits, symmetric) -> the type that holds such codes exactly
BY_CODES: dict[tuple[int, bool], BlockType] = {(t.bits, t.sym): t for t in BLOCK_TYPES.values()}


def block_type(name: str) -> BlockType:
    t = BLOCK_TYPES.get(name.upper())
    if t is None:
        raise EdgelmError(f"unknown block type {name!r}; 32-wide block types: {', '.join(BLOCK_TYPES)}")
    return t


def grid_params(wg: "torch.Tensor", bits: int, sym: bool, *, norm: float = 2.4,
                shrink: tuple[float, ...] = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8, 0.76)) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Scales (fp16-representable float32) and integer zeros for groups ``wg`` [R, G, gs]: of the ranges shrunk by
    each factor in ``shrink``, the one with the smallest Lp (``norm``) rounding error per group. Returns ([R, G], [R, G])."""
    import torch

    maxq = 2**bits - 1
    if sym:
        idx = wg.abs().argmax(-1, keepdim=True)
        base = -torch.gather(wg, -1, idx).squeeze(-1) / 2 ** (bits - 1)  # signed: the extreme lands on code 0
        lo = None
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        base = (hi - lo) / maxq
    best_s = best_z = best_err = None
    for p in shrink:
        s = base * p
        s = torch.where(s == 0, torch.ones_like(s), s).half().float()  # the stored scale, rounded first
        if sym:
            z = torch.full_like(s, 2 ** (bits - 1))
        else:
            z = torch.round(-lo * p / s).clamp(0, maxq)
        if len(shrink) == 1:  # nothing to choose between (round-to-nearest)
            return s, z
        q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, maxq)
        err = ((s[..., None] * (q - z[..., None]) - wg).abs() ** norm).sum(-1)  # [R, G]
        if best_err is None:
            best_s, best_z, best_err = s, z, err
        else:
            better = err < best_err
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
            best_err = torch.minimum(err, best_err)
    return best_s, best_z


def round_to_grid(w: "torch.Tensor", s: "torch.Tensor", z: "torch.Tensor", bits: int) -> "torch.Tensor":
    """Integer codes of ``w`` on the grid (s, z), all broadcastable."""
    import torch

    return torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1)


def type_of(ql: "QLinear") -> BlockType:
    """The block type that holds a QLinear's codes exactly: symmetric when every zero is the midpoint."""
    sym = bool((ql.zeros == 2 ** (ql.bits - 1)).all())
    t = BY_CODES.get((ql.bits, sym))
    if t is None:
        known = ", ".join(f"{b.name} ({b.bits}-bit {'sym' if b.sym else 'asym'})" for b in BLOCK_TYPES.values())
        raise EdgelmError(f"no 32-wide block type holds {ql.bits}-bit {'symmetric' if sym else 'asymmetric'} codes; "
                          f"types: {known}")
    return t


def q8_0_roundtrip(w: "torch.Tensor") -> "torch.Tensor":
    """A float matrix [out, in] through gguf-py's Q8_0 and back: what a target holds for a float matrix it stores
    at 8 bits (the embedding of a quantized GGUF, say). A float32 matrix is overwritten (the transforms of
    edgelm.models.streamed read it fresh; a 128k-word embedding is a GB), a slice of rows at a time."""
    import gguf
    import numpy as np
    import torch

    t = gguf.GGMLQuantizationType.Q8_0
    out = w.detach().cpu().float().contiguous()
    a = out.numpy()  # [out, in], shares out's memory
    step = max(1, (16 << 20) // (4 * a.shape[1]))  # rows at a time: gguf-py's quantizer makes several copies
    for i in range(0, a.shape[0], step):
        raw = gguf.quants.quantize(np.ascontiguousarray(a[i:i + step]), t)
        a[i:i + step] = gguf.quants.dequantize(raw, t).reshape(-1, a.shape[1])
    return out.to(w.dtype) if w.dtype != torch.float32 else out
