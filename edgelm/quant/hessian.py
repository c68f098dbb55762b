"""Input statistics of every weight matrix over calibration tokens, from one fp32 forward pass: the Hessians GPTQ
needs (edgelm.quant.mixed) and their diagonals, which are llama.cpp's importance matrix (converters.gguf)."""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)
_kept: dict[str, dict] | None = None  # inside reuse_hessians(): the last calibration set's Hessians, by fingerprint

LM_HEAD = "lm_head"  # the output matrix's name (the embedding too, when tied)
# linears that read the same input share one Hessian: the first of each group collects it
SHARED_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


@contextlib.contextmanager
def reuse_hessians() -> Iterator[None]:
    """Within the block, collect_hessians keeps its last result and returns it again for the same weights and
    calibration tokens: several presets of one model (mixed plans, an importance matrix) make one forward pass."""
    global _kept
    outer, _kept = _kept, {} if _kept is None else _kept
    try:
        yield
    finally:
        _kept = outer


def _fingerprint(model, calib: "np.ndarray", batch_size: int) -> str:
    """A digest of every weight's bytes and the calibration tokens (a second or so per GB of weights)."""
    import hashlib

    import numpy as np
    import torch

    h = hashlib.blake2b(np.ascontiguousarray(calib).tobytes(), digest_size=16)
    h.update(f"{calib.shape} {batch_size}".encode())
    for name, t in model.state_dict().items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def collect_hessians(model, calib: "np.ndarray", *, batch_size: int = 4) -> dict[str, "torch.Tensor"]:
    """Module name -> sum of x x^T [in, in] (float64) over every calibration token, from one fp32 forward pass
    (or, inside reuse_hessians(), the same model's on the same tokens from an earlier call)."""
    key = _fingerprint(model, calib, batch_size) if _kept is not None else ""
    if _kept is not None and key in _kept:
        log.info("Hessians: reused (same weights, same %d x %d calibration tokens)", *calib.shape)
        return _kept[key]
    hess = _collect(model, calib, batch_size)
    if _kept is not None:
        _kept.clear()
        _kept[key] = hess
    return hess


def _collect(model, calib: "np.ndarray", batch_size: int) -> dict[str, "torch.Tensor"]:
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
