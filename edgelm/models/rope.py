"""A model's rotary position embedding as transformers computes it, for the exporters that bake it into an artifact
(GGUF's ``rope_freqs`` tensor, the TVM decoder's rotary kernel).

transformers turns a config's ``rope_parameters`` (``rope_scaling`` in older configs) into inverse frequencies and a
cos/sin scale (``ROPE_INIT_FUNCTIONS``); this module asks it for them, so every scaling it knows (linear, Llama 3's
``llama3``, ``yarn``, Phi-3's ``longrope``) reaches a target as the very float32 values the PyTorch model rotates
with. LongRoPE switches to its long factors once a sequence passes the original context, mid-generation, which no
KV cache can replay: an artifact stops at the original context (:func:`rope_context`), where its short factors hold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgelm.errors import EdgelmError

# rope types whose frequencies do not depend on the sequence length, so one table serves every position (LongRoPE's
# within its original context)
STATIC = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class Rope:
    kind: str  # HF rope_type: "default", "linear", "llama3", "yarn", "longrope"
    theta: float  # the frequency base
    dim: int  # rotated dimensions per head: head_dim, or its first partial_rotary_factor share
    inv_freq: tuple[float, ...]  # [dim / 2] inverse frequencies, transformers' float32 values
    attention_scale: float  # transformers multiplies cos and sin by it (YaRN's mscale); 1.0 otherwise

    @property
    def scaled(self) -> bool:
        return self.kind != "default"

    def freq_factors(self) -> list[float]:
        """Each frequency's divisor against the unscaled one, [dim / 2]: llama.cpp's ``rope_freqs`` (it rotates by
        pos * theta ** (-2j / dim) / factor[j])."""
        return [d / f for d, f in zip(default_inv_freq(self.theta, self.dim).tolist(), self.inv_freq)]


def default_inv_freq(theta: float, dim: int):
    """Unscaled inverse frequencies theta ** (-2j / dim) as transformers computes them, float32 tensor [dim / 2]."""
    import torch

    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def hf_config(cfg: dict[str, Any]):
    """The transformers config object of a config.json dict (standardises its RoPE parameters)."""
    from transformers import AutoConfig

    kw = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version", "architectures")}
    return AutoConfig.for_model(cfg["model_type"], **kw)


def _params(config, layer_type: str | None) -> dict[str, Any]:
    """The rope_parameters of one layer type (Gemma 3 gives each its own), else the model's."""
    params = dict(config.rope_parameters or {})
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = dict(params[layer_type])
    return params


def rope_context(cfg: dict[str, Any]) -> tuple[int, str] | None:
    """(the original context, why) for a LongRoPE model, whose exported context stops there; None for the rest."""
    config = hf_config(cfg)
    for layer_type in dict.fromkeys(cfg.get("layer_types") or [None]):
        params = _params(config, layer_type)
        if (params.get("rope_type") or params.get("type")) == "longrope":
            orig = int(params.get("original_max_position_embeddings") or cfg["max_position_embeddings"])
            return orig, (f"context capped at LongRoPE's original {orig}: past it transformers switches to the long "
                          "factors mid-sequence, which a KV cache rotated with the short ones can't follow")
    return None


def rope_of(cfg: dict[str, Any], layer_type: str | None = None) -> Rope:
    """The RoPE of a config.json dict (for one ``layer_type`` where the model gives each its own); a one-line error
    for a scaling that depends on the sequence length."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_config(cfg)
    params = _params(config, layer_type)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in STATIC:
        raise EdgelmError(f"{cfg['model_type']}: rope_type {kind!r} changes its frequencies with the sequence length; "
                          f"edgelm's exporters bake {', '.join(STATIC)} only")
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    partial = params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    dim = int(head_dim * float(partial))
    theta = float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)
    if kind == "default":
        inv, scale = default_inv_freq(theta, dim), 1.0
    else:
        inv, scale = ROPE_INIT_FUNCTIONS[kind](config, None, layer_type=layer_type)
    inv_freq = tuple(float(x) for x in inv.float().tolist())
    if len(inv_freq) != dim // 2 or not all(math.isfinite(x) and x > 0 for x in inv_freq):
        raise EdgelmError(f"{cfg['model_type']}: transformers gave {len(inv_freq)} RoPE frequencies for {dim} "
                          "rotated dimensions; check the config's rope_parameters")
    return Rope(kind, theta, dim, inv_freq, float(scale))
