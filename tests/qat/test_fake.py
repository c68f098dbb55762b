"""The fake quantizer: its forward is exactly what its exported codes decode to, on every block type."""
from __future__ import annotations

import pytest
import torch

from edgelm.qat.fake import SCALE_MODES, GridFakeQuant
from edgelm.quant.grids import BLOCK_TYPES


@pytest.mark.parametrize("mode", SCALE_MODES)
@pytest.mark.parametrize("btype", sorted(BLOCK_TYPES))
def test_the_forward_is_the_exported_grid(btype, mode):
    torch.manual_seed(0)
    w = torch.randn(48, 96) * 0.02
    w[3, :32] = 0.0  # an all-zero block keeps a finite scale
    bt = BLOCK_TYPES[btype]
    fq = GridFakeQuant.from_weight(w, bt, mode)
    latent = w.clone().requires_grad_()
    out = fq(latent)  # [48, 96]
    ql = fq.qlinear(w)
    assert torch.equal(out.detach(), ql.dequantize()), "the forward is the codes and fp16 scales the export packs"
    assert int(ql.codes.max()) <= 2**bt.bits - 1 and ql.scales.dtype == torch.float16
    assert (ql.zeros == 2 ** (bt.bits - 1)).all() == bt.sym
    out.pow(2).sum().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0, "the round is straight-through"
    if mode == "learned":
        assert fq.log_scale.grad is not None and fq.log_scale.grad.abs().sum() > 0, "LSQ: the scales get a gradient"
    else:
        assert not list(fq.parameters()), "recomputed scales are not trained"


def test_learned_scales_are_stored_in_fp16_and_never_zero():
    w = torch.randn(4, 32)
    fq = GridFakeQuant.from_weight(w, BLOCK_TYPES["Q4_0"], "learned")
    with torch.no_grad():
        fq.scale0[0, 0] = 1e-9  # below fp16's smallest magnitude
        fq.scale0[1, 0] = 0.1234567  # not an fp16 value
    ql = fq.qlinear(w)
    assert float(ql.scales[0, 0]) != 0.0 and torch.isfinite(fq(w)).all()
    assert float(ql.scales[1, 0]) == float(torch.tensor(0.1234567).half())


def test_a_gptq_start_is_its_own_codes(quantized):
    from edgelm.models.qformat import read_quantized
    from edgelm.quant.grids import type_of

    folder, _ = quantized("gptq-int4-g32")
    _, _, qlinears = read_quantized(folder)
    for name in list(qlinears)[:4]:
        ql = qlinears[name]
        fq = GridFakeQuant.from_qlinear(ql, type_of(ql), "learned")
        w = ql.dequantize()
        assert torch.equal(fq(w), w), f"{name}: QAT from a GPTQ checkpoint starts at exactly its values"
        assert torch.equal(fq.qlinear(w).codes, ql.codes)
