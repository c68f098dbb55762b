"""The fake quantizer of QAT: a weight on its exact 32-wide block grid in the forward, straight through in the
backward.

It is a ``torch.nn.utils.parametrize`` parametrization, so every read of ``module.weight`` (the linears, the fused
lm_head loss, the tied embedding's lookup) sees the grid's values. The arithmetic is torchao's affine fake quantizer
(``_fake_quantize_affine``: ``clamp(round(w * (1 / s)) + z, 0, maxq)``, then ``(q - z) * s``, with its STE round), and
the exported codes come from torchao's ``quantize_affine`` on the same inputs, so the artifact holds exactly what
the forward computed. What edgelm adds, because torchao does not do it: the scale is stored in fp16 (ggml's block
scale), rounded in the forward with a straight-through cast, and it starts from edgelm's grids (the signed
largest-magnitude rule of Q4_0/Q8_0, or a GPTQ checkpoint's own scales), not from torchao's ``max / 7.5``.
"""
from __future__ import annotations

import torch
from torch import nn

from edgelm.models.qformat import QLinear
from edgelm.quant.grids import BLOCK, BlockType, grid_params

SCALE_MODES = ("weights", "learned")  # QatConfig.scales: recomputed from the weights, or trained per-group scales
TINY = 2.0**-24  # the smallest fp16 magnitude (a subnormal): a scale never rounds to zero
# Learned scales are s0 * exp(SCALE_RATE * t), t trained from 0: Adam moves every parameter by about lr per step, which
# on a raw scale (~1e-3, a tenth of the weights it scales) changed it by 2% a step and wrecked the grid within 20 steps
# on SmolLM2-135M at lr 5e-5; in log space each step changes a scale by about SCALE_RATE * lr of itself.
SCALE_RATE = 10.0


def _fp16(s: torch.Tensor) -> torch.Tensor:
    """``s`` rounded to fp16 (as stored) in the forward, the identity in the backward; never zero."""
    sign = torch.where(s < 0, -1.0, 1.0)
    s = sign * s.abs().clamp_min(TINY)
    return s + (s.half().float() - s).detach()


class GridFakeQuant(nn.Module):
    """One matrix [out, in] on one block type's grid: ``W = s[o, g] * (q - z[o, g])``, groups of 32 columns.

    ``mode`` "learned": the scales [out, G] are trained with the weights (LSQ: the gradient reaches them through the
    straight-through round), in log space; the zeros stay where they started. "weights": scales and zeros are
    recomputed from the current weights at every forward (ggml's rule, no search) and not trained."""

    def __init__(self, btype: BlockType, scale: torch.Tensor, zero: torch.Tensor, mode: str = "weights") -> None:
        super().__init__()
        self.btype, self.mode = btype, mode
        self.maxq = 2**btype.bits - 1
        if mode == "learned":  # recomputed scales need neither: the weights give them
            self.register_buffer("scale0", scale.detach().float().clone())  # [out, G], the starting scales
            self.log_scale = nn.Parameter(torch.zeros_like(self.scale0))  # [out, G], in units of 1 / SCALE_RATE
            self.register_buffer("zero", zero.detach().float().clone())  # [out, G], integers

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale as stored, zero), each [out, G], for the weight ``w`` [out, in]."""
        if self.mode == "learned":
            return _fp16(self.scale0 * torch.exp(SCALE_RATE * self.log_scale)), self.zero
        with torch.no_grad():
            out_f, in_f = w.shape
            s, z = grid_params(w.detach().float().reshape(out_f, in_f // BLOCK, BLOCK), self.btype.bits,
                               self.btype.sym, shrink=(1.0,))
        return _fp16(s), z

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        from torchao.quantization.quant_primitives import _fake_quantize_affine

        s, z = self.qparams(w)
        return _fake_quantize_affine(w, (1, BLOCK), s, z, torch.uint8, 0, self.maxq)  # [out, in]

    @torch.no_grad()
    def qlinear(self, w: torch.Tensor) -> QLinear:
        """The exact codes, fp16 scales and zeros the forward used, as every exporter packs them."""
        from torchao.quantization.quant_primitives import quantize_affine

        s, z = self.qparams(w)
        w = w.detach().float()
        codes = quantize_affine(w, (1, BLOCK), s, z, torch.uint8, 0, self.maxq)  # [out, in]
        return QLinear(codes, s.half(), z.to(torch.uint8), (torch.arange(w.shape[1]) // BLOCK).to(torch.int32),
                       self.btype.bits)

    @classmethod
    def from_weight(cls, w: torch.Tensor, btype: BlockType, mode: str) -> "GridFakeQuant":
        """Round-to-nearest's start: per group, the scale of ``grid_params``'s range search (the fp16 value)."""
        out_f, in_f = w.shape
        s, z = grid_params(w.detach().float().reshape(out_f, in_f // BLOCK, BLOCK), btype.bits, btype.sym)
        return cls(btype, s, z, mode)

    @classmethod
    def from_qlinear(cls, ql: QLinear, btype: BlockType, mode: str) -> "GridFakeQuant":
        """A quantized checkpoint's start (GPTQ's codes): its own scales and zeros."""
        return cls(btype, ql.scales.float(), ql.zeros.float(), mode)

    def extra_repr(self) -> str:
        return f"{self.btype.name}, scales {self.mode}"
