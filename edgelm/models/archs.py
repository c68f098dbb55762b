"""Supported architectures, one registry (``edgelm.registry.ARCHS``), named by HF ``model_type``.

Every supported architecture is a pre-norm decoder of RMSNorm, GQA attention with RoPE and a gated MLP, so pruning,
quantization and the exporters treat them alike; RoPE scaling (Llama 3's, linear, YaRN, LongRoPE) is read through
transformers (edgelm.models.rope), so it is no arch's concern. What differs is declared here, in the style of
llama.cpp's convert_hf_to_gguf: a few fields (fused projections, Gemma's norms and embedding scale) and small hooks
(per-layer RoPE and attention windows, what llama.cpp's graph can carry) that every stage reads. An architecture
registered here is taken through every stage by ``tests/test_archs.py`` (the registry drives that test).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgelm.errors import EdgelmError
from edgelm.registry import ARCHS

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)


# Phi-3's fused projections: each stacks the rows of the Llama block's projections, in this order
PHI3_FUSED = (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")))
TARGET_NAMES = {"gguf": "llama.cpp's graph", "onnx": "onnxruntime-genai's CPU attention", "tvm": "the TVM decoder"}


@dataclass(frozen=True)
class Arch:
    name: str  # HF model_type, e.g. "qwen2"
    gguf_arch: str  # llama.cpp's architecture (a gguf.MODEL_ARCH member name, e.g. "LLAMA")
    rope_permute: bool  # GGUF: llama.cpp rotates interleaved pairs here, so q/k rows are permuted from HF's halves
    description: str  # one line for `edgelm list archs`
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # an RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3)
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()  # projections stacking the Llama block's by rows (Phi-3)
    norm_offset: float = 0.0  # every RMSNorm scales by norm_offset + weight (Gemma: 1)
    embed_scale: bool = False  # token embeddings are multiplied by sqrt(hidden) (Gemma)
    post_norms: bool = False  # RMSNorms on the attention and MLP outputs before each residual add (Gemma 2/3)
    window_targets: frozenset[str] = frozenset()  # targets whose runtime applies this arch's sliding windows

    def linears(self) -> tuple[str, ...]:
        """The block's weight matrices (module names under a layer) that quantization works on."""
        parts = {p for _, ps in self.fused for p in ps}
        llama = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
        return tuple(f for f, _ in self.fused) + tuple(n for n in llama if n not in parts)

    def layer_types(self, cfg: dict[str, Any]) -> tuple[str | None, ...]:
        """Per decoder layer, its HF ``layer_types`` entry ("full_attention", "sliding_attention"), or None where the
        config has none (then every layer is alike)."""
        n, types = int(cfg["num_hidden_layers"]), cfg.get("layer_types")
        return tuple(types) if isinstance(types, list) and len(types) == n else (None,) * n

    def windows(self, cfg: dict[str, Any]) -> tuple[int, ...]:
        """Per decoder layer, the sliding attention window (0: full attention): the ``sliding_attention`` layers where
        the config names layer types (Gemma 3, Qwen2 with use_sliding_window), else every layer (Mistral, Phi-3)."""
        window = int(cfg.get("sliding_window") or 0)
        types = self.layer_types(cfg)
        if types[0] is None:
            return (window,) * len(types)
        return tuple(window if t == "sliding_attention" else 0 for t in types)

    def applies_windows(self, cfg: dict[str, Any], target: str) -> bool:
        """Whether ``target``'s runtime applies this model's sliding windows (else its context stops at the window).
        TVM's paged KV cache sizes itself by a full-attention layer, so a model of window layers only (a student
        pruned to them) is capped there."""
        if target not in self.window_targets:
            return False
        return target != "tvm" or not all(self.windows(cfg))

    def attention_scale(self, cfg: dict[str, Any]) -> float:
        """The softmax scale of q·k: head_dim ** -0.5, or ``query_pre_attn_scalar ** -0.5`` where set (Gemma)."""
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        return float(cfg.get("query_pre_attn_scalar") or head_dim) ** -0.5

    def embedding_scale(self, cfg: dict[str, Any]) -> float:
        """What the token embeddings are multiplied by, as transformers computes it (sqrt(hidden) in float32)."""
        if not self.embed_scale:
            return 1.0
        import numpy as np

        return float(np.float32(math.sqrt(int(cfg["hidden_size"]))))

    def export_context(self, cfg: dict[str, Any], target: str = "") -> tuple[int, str | None]:
        """(the longest context an artifact for ``target`` computes exactly, why it is below the model's own or
        None). Exporters write it into the artifact, so its runtime refuses longer inputs instead of drifting: a
        LongRoPE stops at its original context (edgelm.models.rope.rope_context), and a sliding window that the
        target's runtime does not apply stops it at the window, where full and windowed attention are equal."""
        from edgelm.models.rope import rope_context

        ctx, note = int(cfg.get("max_position_embeddings", 2048)), None
        cap = rope_context(cfg)
        if cap is not None and cap[0] < ctx:
            ctx, note = cap
        window = min((w for w in self.windows(cfg) if w), default=0)
        if window and window < ctx and not self.applies_windows(cfg, target):
            where = TARGET_NAMES.get(target, "the target")
            ctx, note = window, (f"context capped at the sliding window {window} (of {ctx}): {where} attends to "
                                 "every position, which equals sliding-window attention only within the window")
        return ctx, note

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


@dataclass(frozen=True)
class Phi3Arch(Arch):
    """Phi-3/Phi-4-mini: fused q/k/v and gate/up projections. llama.cpp's phi3 graph sizes the attention output as
    the hidden width, so its heads must fill it (a head-pruned student goes to ONNX or TVM)."""

    def gguf_check(self, cfg: dict[str, Any]) -> None:
        heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        if heads * head_dim != hidden:
            raise EdgelmError(f"GGUF export of this phi3 model is not supported: llama.cpp's phi3 graph needs heads x "
                              f"head_dim = hidden, this model has {heads} x {head_dim} != {hidden}; export to onnx or "
                              "tvm")


for _arch in (
    Arch("llama", "LLAMA", True, "Llama 2, Llama 3.0-3.3 (llama3 RoPE), SmolLM2, TinyLlama"),
    Arch("mistral", "LLAMA", True, "Mistral 7B and its fine-tunes (a sliding window caps the exported context)"),
    Arch("qwen2", "QWEN2", False, "Qwen2 and Qwen2.5 (q/k/v biases)", qkv_bias=True),
    Arch("qwen3", "QWEN3", False, "Qwen3 dense models (q/k RMSNorm per head)", qk_norm=True),
    NoPEArch("smollm3", "SMOLLM3", True, "SmolLM3 (no RoPE on every fourth layer)"),
    Phi3Arch("phi3", "PHI3", False, "Phi-3, Phi-3.5-mini, Phi-4-mini (fused q/k/v and gate/up, partial rotary, "
             "LongRoPE)", fused=PHI3_FUSED),
    Arch("gemma3_text", "GEMMA3", False, "Gemma 3 text models, 270M and 1B (sliding windows, (1 + w) norms)",
         qk_norm=True, norm_offset=1.0, embed_scale=True, post_norms=True,
         window_targets=frozenset({"gguf", "onnx", "tvm"})),
):
    ARCHS.register(_arch)


def get_arch(model_type: str | None, where: str = "this model") -> Arch:
    """The registered architecture, or a one-line error naming it and the supported ones."""
    if model_type not in ARCHS:
        raise EdgelmError(f"{where} is a {model_type!r} model; supported architectures: {', '.join(ARCHS.names())}")
    return ARCHS.get(model_type)
