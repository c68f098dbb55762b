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
    """A float HF folder's RTN checkpoint (GPTQ format) for ``preset`` in the empty folder ``tmp``, tensor by tensor:
    each linear that weight-only presets quantize is read, rounded and written before the next is read, the rest
    copied as stored (bf16 stays bf16), into shards (edgelm.models.weights.ShardWriter). Returns the linears
    quantized."""
    import json
    import shutil

    from edgelm.models.loader import read_config
    from edgelm.models.qformat import QUANT_LINEARS, pack_gptq
    from edgelm.models.weights import LazySafetensors, ShardWriter, safetensors_files

    cfg = read_config(src)
    tensors = LazySafetensors(safetensors_files(src))
    linears = [n for n in tensors if n.endswith(".weight") and ".layers." in n
               and n.rsplit(".", 2)[-2] in QUANT_LINEARS]
    gs = preset.group_size
    for name in linears:  # before any work
        if gs > 0 and tensors.shape(name)[1] % gs:
            raise EdgelmError(f"{name[:-7]} has {tensors.shape(name)[1]} input columns, not a multiple of "
                              f"{preset.name}'s group size {gs}; pick a preset with a group size that divides it")
    writer, quantized = ShardWriter(tmp), set(linears)
    for name in tensors:
        if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue  # the embedding's matrix
        if name in quantized:
            ql = rtn_quantize(tensors[name], preset.bits, gs, preset.sym)  # from float32 [out, in]
            for part, t in pack_gptq(ql).items():
                writer.add(f"{name[:-7]}.{part}", t)
        else:
            writer.add(name, tensors.raw(name))
    writer.close()
    cfg["quantization_config"] = {"quant_method": "gptq", "checkpoint_format": "gptq", "lm_head": False,
                                  "bits": preset.bits, "group_size": gs, "sym": preset.sym, "desc_act": False}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    for f in src.iterdir():  # tokenizer and generation config, as they are
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template"))
                            or f.suffix in (".model", ".tiktoken")):
            shutil.copyfile(f, tmp / f.name)
    return len(linears)
