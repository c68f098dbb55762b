"""Round-to-nearest quantization into the GPTQ checkpoint's parametrisation (edgelm.models.qformat)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgelm.errors import EdgelmError
from edgelm.models.qformat import QLinear
from edgelm.quant.grids import grid_params, round_to_grid

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
    wg = w.float().reshape(out_f, in_f // gs, gs)  # [out, G, gs]
    # the plain min/max (or, symmetric, ggml's largest-magnitude-on-the-grid) range, no shrink search
    scale, zero = grid_params(wg, bits, sym, shrink=(1.0,))  # [out, G] each
    q = round_to_grid(wg, scale[..., None], zero[..., None], bits)  # [out, G, gs]
    return QLinear(q.reshape(out_f, in_f).to(torch.uint8), scale.half(), zero.to(torch.uint8),
                   (torch.arange(in_f) // gs).to(torch.int32), bits)


def rtn_folder(src: Path, tmp: Path, preset) -> int:
    """A float HF folder's RTN checkpoint (GPTQ format) for ``preset`` in the empty folder ``tmp``, a tensor at a
    time (edgelm.models.qformat.write_quantized): each linear is read and rounded when it is written. Returns the
    linears quantized."""
    from edgelm.models.qformat import linear_weights, write_quantized
    from edgelm.models.weights import LazySafetensors, safetensors_files

    tensors = LazySafetensors(safetensors_files(src))
    linears = linear_weights(tensors)
    gs = preset.group_size
    write_quantized(src, tmp, {n[: -len(".weight")] for n in linears},
                    lambda m: rtn_quantize(tensors[m + ".weight"], preset.bits, gs, preset.sym),
                    {"bits": preset.bits, "group_size": gs, "sym": preset.sym}, desc=f"RTN {preset.name}")
    return len(linears)
