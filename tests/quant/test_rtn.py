from __future__ import annotations

import pytest
import torch

from edgelm.quant.rtn import rtn_quantize


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_error_is_within_a_step(bits):
    # the largest magnitude sits exactly on code 0; a value of the other sign near it clips at 2^(b-1)-1 steps
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    ql = rtn_quantize(w, bits, 32, True)
    step = ql.scales.float().abs().repeat_interleave(32, 1)  # symmetric scales carry a sign
    ratio = (ql.dequantize() - w).abs() / step
    assert ratio.max() <= 1.0 and ratio.median() < 0.3
    extreme = w.reshape(32, 4, 32).abs().argmax(-1)  # [32, 4]
    err = (ql.dequantize() - w).reshape(32, 4, 32).gather(-1, extreme[..., None])
    assert err.abs().max() < 1e-3 * w.abs().max()  # exact up to the fp16 scale


def test_more_bits_less_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    errs = [(rtn_quantize(w, b, g, True).dequantize() - w).pow(2).mean() for b, g in ((4, 128), (4, 32), (8, 32))]
    assert errs[0] > errs[1] > errs[2]


def test_group_must_divide_columns():
    from edgelm.errors import EdgelmError

    with pytest.raises(EdgelmError, match="does not split into groups of 128"):
        rtn_quantize(torch.randn(4, 96), 4, 128, True)
