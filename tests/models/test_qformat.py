from __future__ import annotations

import pytest
import torch

from edgelm.models.qformat import pack_gptq, unpack_gptq
from edgelm.quant.rtn import rtn_quantize


@pytest.mark.parametrize("bits, group, sym", [(4, 32, True), (4, 128, False), (8, -1, True), (8, 32, False)])
def test_pack_unpack_roundtrip(bits, group, sym):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits + group))
    ql = rtn_quantize(w, bits, group, sym)
    back = unpack_gptq(pack_gptq(ql), bits)
    assert torch.equal(back.codes, ql.codes) and torch.equal(back.zeros, ql.zeros) and torch.equal(back.scales, ql.scales)
    assert torch.equal(back.dequantize(), ql.dequantize())


def test_pack_layout_is_gptq_v1():
    # qweight packs 8 input rows per int32 (row 0 in the low nibble); qzeros store zero - 1
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    ql = rtn_quantize(w, 4, 32, True)
    t = pack_gptq(ql)
    assert t["qweight"].shape == (4, 8) and t["qzeros"].shape == (1, 1) and t["scales"].shape == (1, 8)
    assert int(t["qweight"][0, 0]) & 0xF == int(ql.codes[0, 0])
    assert (int(t["qzeros"][0, 0]) & 0xFFFFFFFF) == 0x77777777  # symmetric zero 8, stored as 7
