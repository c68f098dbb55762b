"""Supported architectures, one registry (``edgelm.registry.ARCHS``), named by HF ``model_type``.

Every supported architecture has the Llama block layout (RMSNorm, GQA attention with RoPE, gated MLP), so pruning,
quantization and ONNX export treat them alike; RoPE scaling (Llama 3's, linear, YaRN) is read through transformers
(edgelm.models.rope), so it is no arch's concern. What differs is declared here, in the style of llama.cpp's
convert_hf_to_gguf: a few fields and small override hooks that the exporters call. An architecture registered here
is taken through every stage by ``tests/test_archs.py`` (the registry drives that test).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgelm.errors import EdgelmError
from edgelm.registry import ARCHS

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arch:
    name: str  # HF model_type, e.g. "qwen2"
    gguf_arch: str  # llama.cpp's architecture (a gguf.MODEL_ARCH member name, e.g. "LLAMA")
    rope_permute: bool  # GGUF: llama.cpp rotates interleaved pairs here, so q/k rows are permuted from HF's halves
    description: str  # one line for `edgelm list archs`
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each query and key head before RoPE (Qwen3)

    def export_context(self, cfg: dict[str, Any]) -> tuple[int, str | None]:
        """(the longest context an exported artifact computes exactly, why it is below the model's own or None).
        Exporters write it into the artifact, so its runtime refuses longer inputs instead of drifting."""
        return int(cfg.get("max_position_embeddings", 2048)), None

    def rope_layers(self, cfg: dict[str, Any]) -> tuple[bool, ...]:
        """Per decoder layer, whether it applies RoPE (NoPE layers don't)."""
        return (True,) * int(cfg["num_hidden_layers"])

    def gguf_check(self, cfg: dict[str, Any]) -> None:
        """A one-line error for a config llama.cpp's graph for this arch would compute differently; None if it can."""

    def permute_rows(self, rows: "np.ndarray", gguf_name: str, n_head: int, n_kv: int) -> "np.ndarray":
        """HF's half-split rotary layout -> GGUF's interleaved one, on the output rows of q/k (weights, biases, codes
        and scales alike): [out, ...]. Other tensors, and archs that rotate halves in llama.cpp too, pass through."""
        heads = n_head if ".attn_q." in gguf_name else n_kv if ".attn_k." in gguf_name else None
        if not self.rope_permute or heads is None:
            return rows
        shape = rows.shape
        return rows.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


@dataclass(frozen=True)
class SlidingWindowArch(Arch):
    """An arch whose config may set a sliding attention window. Neither llama.cpp's graph for it nor the ONNX
    builder's CPU attention applies one (onnxruntime-genai 0.18 attends to every position in a prefill, and its
    windowed cache fails past the window), so exports stop at the window, where the two attentions are equal."""

    def export_context(self, cfg: dict[str, Any]) -> tuple[int, str | None]:
        ctx, _ = super().export_context(cfg)
        window = cfg.get("sliding_window")
        if window and int(window) < ctx:
            return int(window), (f"context capped at the sliding window {window} (of {ctx}): the runtime attends to "
                                 "every position, which equals sliding-window attention only within the window")
        return ctx, None


@dataclass(frozen=True)
class NoPEArch(Arch):
    """An arch that skips RoPE on some layers: config ``no_rope_layers`` (1 rotates, 0 doesn't), by default every
    ``no_rope_layer_interval``-th layer (SmolLM3: every fourth). llama.cpp's graph hard-codes the period
    (``gguf_nope_step``), so GGUF takes that pattern only; a student pruned out of it goes to ONNX or TVM."""

    gguf_nope_step: int = 4  # llama.cpp: layer il rotates iff (il + 1) % step != 0

    def rope_layers(self, cfg: dict[str, Any]) -> tuple[bool, ...]:
        n, every = int(cfg["num_hidden_layers"]), int(cfg.get("no_rope_layer_interval") or 4)
        flags = cfg.get("no_rope_layers") or [(i + 1) % every != 0 for i in range(n)]
        return tuple(bool(f) for f in flags)

    def gguf_check(self, cfg: dict[str, Any]) -> None:
        have = self.rope_layers(cfg)
        if have != tuple((i + 1) % self.gguf_nope_step != 0 for i in range(len(have))):
            nope = [i for i, r in enumerate(have) if not r]
            raise EdgelmError(f"GGUF export of this {self.name} model is not supported: llama.cpp's graph skips RoPE "
                              f"on every {self.gguf_nope_step}th layer, this model on layers {nope}; export to onnx "
                              "or tvm")


for _arch in (
    Arch("llama", "LLAMA", True, "Llama 2, Llama 3.0-3.3 (llama3 RoPE), SmolLM2, TinyLlama"),
    SlidingWindowArch("mistral", "LLAMA", True,
                      "Mistral 7B and its fine-tunes (a sliding window caps the exported context)"),
    Arch("qwen2", "QWEN2", False, "Qwen2 and Qwen2.5 (q/k/v biases)", qkv_bias=True),
    Arch("qwen3", "QWEN3", False, "Qwen3 dense models (q/k RMSNorm per head)", qk_norm=True),
    NoPEArch("smollm3", "SMOLLM3", True, "SmolLM3 (no RoPE on every fourth layer)"),
):
    ARCHS.register(_arch)


def get_arch(model_type: str | None, where: str = "this model") -> Arch:
    """The registered architecture, or a one-line error naming it and the supported ones."""
    if model_type not in ARCHS:
        raise EdgelmError(f"{where} is a {model_type!r} model; supported architectures: {', '.join(ARCHS.names())}")
    return ARCHS.get(model_type)
