"""Named, frozen quantization presets in one registry (`edgelm list quants`).

Weight-only presets (RTN, GPTQ) produce a GPTQ-format checkpoint (codes, fp16 scales, zeros) that every target
packs without re-rounding. ``llamacpp-*`` presets hand an f32 GGUF to llama.cpp's own quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from edgelm.errors import EdgelmError
from edgelm.registry import QUANTS


@dataclass(frozen=True)
class QuantPreset:
    name: str  # registry name, e.g. "gptq-int4-g32"
    method: str  # "none" (keep fp32), "cast" (fp16), "rtn", "gptq", "mixed" (a GPTQ grid per tensor) or "llamacpp"
    bits: int = 16  # bits per weight code (32/16 for none/cast)
    group_size: int = -1  # input columns sharing one scale; -1 = one scale per output row
    sym: bool = True  # symmetric (zero point fixed at 2^(bits-1)) or asymmetric (a zero per group)
    act_order: bool = False  # GPTQ: quantize columns by decreasing Hessian diagonal (static groups kept)
    damp: float = 0.05  # GPTQ: dampening added to the Hessian diagonal, as a fraction of its mean (GPTQModel default)
    mse: float = 0.0  # GPTQ: Lp norm of a per-group scale search that shrinks the range; 0 = min/max scales
    gguf_type: str | None = None  # llama.cpp file type for method "llamacpp", e.g. "Q4_K_M"
    types: tuple[str, ...] = ()  # method "mixed": the 32-wide block types a tensor may get (edgelm.quant.grids)
    budget_bpw: float = 0.0  # method "mixed": bits per planned weight (linears and lm_head/embedding), scales included
    max_mib: float = 0.0  # method "mixed": MiB of tensor data instead (the file adds its metadata; 0 = use budget_bpw)
    imatrix: bool = False  # method "llamacpp": llama-quantize with an importance matrix from the calibration set
    targets: tuple[str, ...] = ("gguf", "onnx", "tvm")  # export targets that can hold this preset
    max_kld: float = 0.0  # export check fails above this mean KL(fp32 || artifact), nats (fp32: greedy parity instead)
    summary: str = ""  # one line for `edgelm list quants`

    @property
    def quantized(self) -> bool:
        return self.method in ("rtn", "gptq", "mixed", "llamacpp")

    @property
    def weight_only(self) -> bool:
        """Produces a GPTQ-format checkpoint (codes, scales, zeros) that the exporters pack as it is."""
        return self.method in ("rtn", "gptq", "mixed")

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight of the quantized matrices, scales and zeros included."""
        if self.method == "llamacpp":
            return llamacpp_bpw(self.gguf_type or "")
        if self.method in ("none", "cast"):
            return float(self.bits)
        if self.method == "mixed":
            return self.budget_bpw  # at most; the plan's own figure is in the artifact's manifest
        if self.group_size <= 0:
            return float(self.bits)  # per-row scale: negligible
        return self.bits + 16 / self.group_size + (0 if self.sym else self.bits / self.group_size)

    def with_options(self, **opts: Any) -> "QuantPreset":
        """A variant with GPTQ/RTN options changed (act_order, sym, damp); the name records the change."""
        opts = {k: v for k, v in opts.items() if v is not None and getattr(self, k) != v}
        if not opts:
            return self
        bad = set(opts) - {"act_order", "sym", "damp", "mse", "types", "budget_bpw", "max_mib", "imatrix"}
        if bad:
            raise EdgelmError(f"unknown preset option(s) {sorted(bad)}; known: act_order, sym, damp, mse, types, "
                              "budget_bpw, max_mib, imatrix")
        if "imatrix" in opts:
            if self.method != "llamacpp" or len(opts) > 1:
                raise EdgelmError("--imatrix applies to llamacpp-* presets (llama.cpp's own quantizer) only")
            return replace(self, name=self.name + "+imatrix", imatrix=True)
        mixed_only = {"types", "budget_bpw", "max_mib"} & set(opts)
        if mixed_only and self.method != "mixed":
            raise EdgelmError(f"--{sorted(mixed_only)[0].replace('_', '-').replace('max-mib', 'max-size')} applies to "
                              "mixed presets only (e.g. gptq-mixed)")
        if self.method == "mixed":
            if set(opts) - {"types", "budget_bpw", "max_mib", "damp"}:
                raise EdgelmError(f"{self.name} takes --budget-bpw, --max-size, --types and --damp only")
            if "types" in opts:
                from edgelm.quant.grids import block_type

                opts["types"] = tuple(block_type(t).name for t in opts["types"])
            if "max_mib" in opts:
                opts["budget_bpw"] = 0.0
        elif self.method not in ("rtn", "gptq"):
            raise EdgelmError(f"preset {self.name} takes no options ({', '.join(sorted(opts))}); only rtn/gptq presets do")
        for k in ("act_order", "mse"):
            if k in opts and self.method != "gptq":
                raise EdgelmError(f"--{k.replace('_', '-')} applies to GPTQ presets only")
        if "damp" in opts and not 0 < opts["damp"] < 1:
            raise EdgelmError(f"--damp must be in (0, 1), got {opts['damp']}")
        tag = "".join(f"+{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in sorted(opts.items())
                      if not (k == "budget_bpw" and not v))
        return replace(self, name=self.name + tag, **opts)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "bits": self.bits, "group_size": self.group_size,
                "sym": self.sym, "act_order": self.act_order, "damp": self.damp, "mse": self.mse, "gguf_type": self.gguf_type,
                "bits_per_weight": round(self.bits_per_weight, 4), **({"imatrix": True} if self.imatrix else {}),
                **({"types": list(self.types), "budget_bpw": self.budget_bpw, "max_mib": self.max_mib}
                   if self.method == "mixed" else {})}


# Nominal bits per weight of llama.cpp's mixed file types, which no single block layout gives (approximate).
LLAMACPP_MIX_BPW = {"Q5_K_M": 5.69, "Q4_K_M": 4.89}


def llamacpp_bpw(gguf_type: str) -> float:
    """Bits per weight of a llama.cpp file type: from gguf-py's block sizes, or the nominal figure of a mix."""
    if gguf_type in LLAMACPP_MIX_BPW:
        return LLAMACPP_MIX_BPW[gguf_type]
    import gguf

    elems, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[gguf_type]]
    return 8 * nbytes / elems

_PRESETS = [
    QuantPreset("fp32", "none", 32, max_kld=0.0, summary="unquantized float32"),
    # ONNX fp16 is left out: onnxruntime-genai 0.18 builds it for GPU EPs, and its CPU generation loop fails on it
    # ("Shape mismatch attempting to re-use buffer" in repeat_kv); fp32, int8 and int4 ONNX run on CPU.
    QuantPreset("fp16", "cast", 16, targets=("gguf",), max_kld=1e-3, summary="float16 weights (GGUF F16)"),
    # per-row scales: TVM's dequantizing matmul takes one group size for every linear
    QuantPreset("int8", "rtn", 8, -1, targets=("gguf", "onnx"), max_kld=0.02, summary="8-bit round-to-nearest, one scale per output row"),
    QuantPreset("int8-g32", "rtn", 8, 32, max_kld=0.02, summary="8-bit round-to-nearest, groups of 32 (-> GGUF Q8_0)"),
    QuantPreset("int4-g32", "rtn", 4, 32, max_kld=0.5, summary="4-bit round-to-nearest, groups of 32"),
    QuantPreset("int4-g128", "rtn", 4, 128, max_kld=0.8, summary="4-bit round-to-nearest, groups of 128"),
    QuantPreset("gptq-int4-g32", "gptq", 4, 32, mse=2.4, max_kld=0.5, summary="GPTQ 4-bit, groups of 32 (-> GGUF Q4_0 exactly)"),
    QuantPreset("gptq-int4-g128", "gptq", 4, 128, mse=2.4, max_kld=0.8, summary="GPTQ 4-bit, groups of 128"),
    QuantPreset("gptq-int8", "gptq", 8, 32, mse=2.4, max_kld=0.02, summary="GPTQ 8-bit, groups of 32 (-> GGUF Q8_0 exactly)"),
    # The fast types on CPUs (Q5_x decodes at ~0.6x Q4_0 here); --types adds Q4_1/Q5_0/Q5_1.
    QuantPreset("gptq-mixed", "mixed", 0, 32, types=("Q4_0", "Q8_0"), budget_bpw=6.0,
                max_kld=0.5, summary="a GPTQ grid per tensor, lm_head/embedding included, by measured sensitivity "
                                     "(--budget-bpw, --max-size, --types)"),
    # The lm_head is the largest matrix and is read whole at every token: at Q4_0 the browser app decodes ~15%
    # faster than with gptq-int4-g32's Q8_0 embedding, at some quality (docs/results.md, section app).
    QuantPreset("gptq-int4-g32-all", "mixed", 0, 32, types=("Q4_0",), budget_bpw=4.5, max_kld=0.5,
                summary="GPTQ 4-bit, groups of 32, the tied embedding/lm_head too (-> GGUF Q4_0 throughout: the "
                        "smallest, fastest to decode)"),
] + [
    QuantPreset(f"llamacpp-{t.lower()}", "llamacpp", 0, gguf_type=t, targets=("gguf",),
                max_kld={"Q8_0": 0.02, "Q6_K": 0.05, "Q2_K": 2.0}.get(t, 0.8),
                summary=f"llama.cpp's own {t} quantizer")
    for t in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q2_K")
]
for _p in _PRESETS:
    QUANTS.register(_p)


def get_preset(name: str) -> QuantPreset:
    return QUANTS.get(name)
