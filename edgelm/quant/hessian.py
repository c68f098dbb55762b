"""Input statistics of every weight matrix over calibration tokens, from one fp32 forward pass: the Hessians GPTQ
needs (edgelm.quant.mixed) and their diagonals, which are llama.cpp's importance matrix (converters.gguf)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

LM_HEAD = "lm_head"  # the output matrix's name (the embedding too, when tied)
# linears that read the same input share one Hessian: the first of each group collects it
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


def collect_hessians(model, calib: "np.ndarray", *, batch_size: int = 4) -> dict[str, "torch.Tensor"]:
    """Module name -> sum of x x^T [in, in] (float64) over every calibration token, from one fp32 forward pass."""
    import torch

    from edgelm.models.qformat import quantized_linears

    hess: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()  # [B*T, in]
            hess[name] = hess.get(name, 0) + x.T @ x
        return fn

    for n in quantized_linears(model):
        if n.rsplit(".", 1)[-1] not in SHARED_INPUT:
            hooks.append(model.get_submodule(n).register_forward_hook(hook(n)))
    hooks.append(model.get_output_embeddings().register_forward_hook(hook(LM_HEAD)))
    try:
        with torch.no_grad():
            for i in range(0, len(calib), batch_size):
                ids = torch.as_tensor(calib[i : i + batch_size])  # [B, T]
                # logits of the last position only: the hook still sees every position's hidden state
                model(input_ids=ids, logits_to_keep=0)
    finally:
        for h in hooks:
            h.remove()
    for n in quantized_linears(model):
        leaf = n.rsplit(".", 1)[-1]
        if leaf in SHARED_INPUT:
            hess[n] = hess[n.rsplit(".", 1)[0] + "." + SHARED_INPUT[leaf]]
    return hess


def input_importance(model, calib: "np.ndarray") -> tuple[dict[str, "np.ndarray"], int]:
    """({module name: sum over tokens of x_i^2, float32 [in]}, tokens): llama.cpp's importance matrix, per matrix."""
    import numpy as np

    hess = collect_hessians(model, calib)
    return {n: np.diag(h.numpy()).astype(np.float32) for n, h in hess.items()}, int(calib.size)
