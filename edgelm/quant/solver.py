"""edgelm's own GPTQ step: one weight matrix onto one block grid, given the Hessian of its inputs.

GPTQModel (edgelm.quant.gptq) runs the fixed-bit presets; this step serves what it cannot produce: a different grid
per tensor (5-bit ones included) and the tied embedding / lm_head, whose inputs are the final norm's outputs.
It follows the GPTQ paper (Frantar et al., 2022): a damped Cholesky factor of the inverse Hessian, columns quantized
left to right, each one's error spread over the columns not yet quantized, lazily in blocks of 128. A group's scale
is chosen when the loop reaches its first column, from the weights as updated so far.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgelm.models.qformat import QLinear
from edgelm.quant.grids import BLOCK, grid_params, round_to_grid

if TYPE_CHECKING:
    import torch


@dataclass
class SolveResult:
    qlinear: QLinear  # the codes, fp16 scales and zeros
    loss: float  # GPTQ's proxy: sum over rows of (w - q)^2 / [H^-1]_ii^2 / 2, the increase of ||W X||^2 it causes


def gptq_solve(w: "torch.Tensor", h: "torch.Tensor", bits: int, sym: bool, *, group_size: int = BLOCK,
               damp: float = 0.05, lazy_block: int = 128) -> SolveResult:
    """Quantize ``w`` [out, in] with the input Hessian ``h`` [in, in] (sum of x x^T over calibration tokens)."""
    import torch

    w = w.detach().float().clone()  # [out, in]
    out_f, in_f = w.shape
    assert in_f % group_size == 0 and lazy_block % group_size == 0
    h = h.detach().double().clone()  # [in, in]
    dead = torch.diag(h) == 0  # inputs never seen: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(in_f, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()  # [in, in]

    n_groups = in_f // group_size
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8)
    scales = torch.zeros(out_f, n_groups)
    zeros = torch.zeros(out_f, n_groups)
    loss = torch.zeros(out_f, dtype=torch.float64)
    for i1 in range(0, in_f, lazy_block):
        i2 = min(i1 + lazy_block, in_f)
        w1 = w[:, i1:i2].clone()  # [out, b], updated in place column by column
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:  # groups lie inside one lazy block: pick the scale from the updated weights
                g = col // group_size
                s, z = grid_params(w1[:, i : i + group_size][:, None, :], bits, sym)  # [out, 1]
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            g = col // group_size
            s, z = scales[:, g], zeros[:, g]
            q = round_to_grid(w1[:, i], s, z, bits)  # [out]
            codes[:, col] = q.to(torch.uint8)
            d = hinv1[i, i]
            e = (w1[:, i] - s * (q - z)) / d  # [out]
            loss += (e.double() ** 2) / 2
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    ql = QLinear(codes, scales.half(), zeros.to(torch.uint8), (torch.arange(in_f) // group_size).to(torch.int32), bits)
    return SolveResult(ql, float(loss.sum()))
