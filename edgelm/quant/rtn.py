"""Round-to-nearest quantization into the GPTQ checkpoint's parametrisation (edgelm.models.qformat)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from edgelm.errors import EdgelmError
from edgelm.models.qformat import QLinear

if TYPE_CHECKING:
    import torch


def rtn_quantize(w: "torch.Tensor", bits: int, group_size: int, sym: bool) -> QLinear:
    """Round-to-nearest with the stored (fp16) scale, in GPTQ's parametrisation. w: [out, in]."""
    import torch

    out_f, in_f = w.shape
    gs = in_f if group_size <= 0 else group_size
    if in_f % gs:
        raise EdgelmError(f"a weight with {in_f} input columns does not split into groups of {gs}; "
                          "pick a preset whose group size divides the hidden sizes")
    maxq = 2**bits - 1
    wg = w.float().reshape(out_f, in_f // gs, gs)  # [out, G, gs]
    if sym:
        # as ggml's Q4_0/Q8_0 reference: the largest-magnitude value lands exactly on code 0 (-2^(b-1) steps), so
        # the scale carries its sign; 6% finer steps and a smaller error than GPTQ's amax*2/maxq grid
        idx = wg.abs().argmax(-1, keepdim=True)
        scale = -torch.gather(wg, -1, idx).squeeze(-1) / (2 ** (bits - 1))  # [out, G], signed
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / maxq
        zero = None
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).half().float()  # round the scale first
    if zero is None:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    q = torch.clamp(torch.round(wg / scale[..., None]) + zero[..., None], 0, maxq)  # [out, G, gs]
    return QLinear(q.reshape(out_f, in_f).to(torch.uint8), scale.half(), zero.to(torch.uint8),
                   (torch.arange(in_f) // gs).to(torch.int32), bits)
