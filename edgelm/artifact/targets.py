"""Export targets, one registry: built-ins and plugins register an instance the same way,
``TARGETS.register("name", MyTarget())``.

A target turns a source folder (float HF or GPTQ-format) into artifact files, and opens an artifact for the check.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from edgelm.artifact.config import ExportConfig
from edgelm.errors import EdgelmError
from edgelm.quant.presets import QuantPreset
from edgelm.registry import TARGETS

log = logging.getLogger(__name__)


class Target:
    name = ""  # registry name
    runtime = ""  # the runtime that runs its artifacts
    logit_atol = 0.0  # fp32 artifacts: max |logit - PyTorch logit| allowed

    def export(self, src: Path, preset: QuantPreset, tmp: Path, work: Path, config: ExportConfig) -> dict[str, Any]:
        """Write the artifact into ``tmp``; return manifest fields. ``work`` is scratch space."""
        raise NotImplementedError

    code_bits: tuple[int, ...] = ()  # the code widths it holds, where it limits them (a mixed preset's --types)
    code_holder = ""  # what holds them, for the error

    def check_preset(self, preset: QuantPreset) -> None:
        """Refuse, before any work, a preset whose output this target can't hold (beyond ``preset.targets``)."""
        from edgelm.quant.grids import BLOCK_TYPES

        bad = [t for t in preset.types if self.code_bits and BLOCK_TYPES[t].bits not in self.code_bits]
        if bad:
            ok = [t for t, b in BLOCK_TYPES.items() if b.bits in self.code_bits]
            widths = "- and ".join(str(b) for b in self.code_bits) + "-bit"  # "4- and 8-bit"
            raise EdgelmError(f"{self.code_holder} takes {widths} codes; {preset.name} may choose {', '.join(bad)}; "
                              f"pass --types from {', '.join(ok)}")

    def check_options(self, config: ExportConfig) -> None:
        """Refuse, before any work, options this target can't honour (a missing toolchain, say)."""
        if config.lora_like and self.name != "onnx":
            raise EdgelmError(f"--lora-like gives an ONNX base LoRA inputs; {self.name} artifacts "
                              + ("take GGUF LoRA adapters as they are (drop --lora-like)" if self.name == "gguf"
                                 else "can't apply adapters at run time (merge them: --merge)"))

    def check_model(self, cfg: dict[str, Any], where: str) -> None:
        """Refuse, before any work (a quantization can take minutes), a model this target can't carry, from its
        config alone: an architecture edgelm doesn't know, a RoPE no target bakes (dynamic)."""
        from edgelm.models.archs import get_arch
        from edgelm.models.rope import rope_of

        for layer_type in dict.fromkeys(get_arch(cfg.get("model_type"), where).layer_types(cfg)):
            rope_of(cfg, layer_type)

    # exact packs: max |logit - the dequantized checkpoint's logit| allowed, for a runtime computing in fp32; None for
    # one that rounds activations to 8 bits, which is bounded by KL divergence instead (edgelm.artifact.check)
    exact_atol: float | None = 0.0
    # what a quantized export stores at 8 bits (gguf-py's Q8_0) when the checkpoint leaves it float: "embed"
    # (the token embedding) and/or "lm_head"; a tied pair is one matrix
    q8_float: tuple[str, ...] = ()

    def packed_transforms(self, src: Path) -> dict[str, Any]:
        """What this target stores of the dequantized checkpoint ``src`` other than as it is: parameter name ->
        function of its float32 value (gguf-py's Q8_0 of a float embedding or lm_head stored at 8 bits). A tied pair
        is one matrix, unless only the lm_head is stored at 8 bits."""
        from edgelm.models.loader import read_config
        from edgelm.quant.grids import q8_0_roundtrip

        cfg = read_config(src)
        if (cfg.get("quantization_config") or {}).get("lm_head"):  # the plan quantized the head: exact already
            return {}
        parts = {"embed": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}
        chosen = set(self.q8_float)
        if cfg.get("tie_word_embeddings") and chosen and chosen != {"lm_head"}:
            chosen = {"embed", "lm_head"}  # one matrix
        return {parts[p]: q8_0_roundtrip for p in sorted(chosen)}

    def read_back(self, folder: Path, src: Path):
        """Exact packs: each quantized linear as the artifact holds it, decoded from its files independently of the
        packer: an iterator of (HF module, the file's dequantized weight [out, in], the checkpoint's), or None where
        the target has no decoder (the runtime check then stands alone)."""
        return None

    def export_adapter(self, adapter, base: Path, tmp: Path) -> dict[str, Any]:
        """Write ``adapter`` (edgelm.finetune.adapter.Adapter) as this target's run-time adapter for the base artifact
        ``base`` into ``tmp``; returns manifest fields. Targets whose runtime can't apply one refuse."""
        raise EdgelmError(f"{self.name} artifacts can't apply a LoRA adapter at run time; bake it into a new "
                          f"artifact: edgelm export ADAPTER --merge --target {self.name} --quant PRESET --out DIR")

    def open(self, folder: Path, *, threads: int = 1, work: Path | None = None,
             adapters: dict[str, Path] | None = None):
        """The artifact in its runtime (edgelm.runtimes), without the manifest check (export calls it on tmp, with
        its work folder); ``adapters``: LoRA adapters to load over it, by name."""
        from edgelm.registry import RUNTIMES

        return RUNTIMES.get(self.runtime)(folder, threads=threads, **({"adapters": adapters} if adapters else {}))


class GgufTarget(Target):
    """llama.cpp GGUF: exact 32-wide blocks (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0) from rtn/gptq/mixed presets, or llama.cpp's
    own quantizer (its `llama-quantize` tool when the preset takes an importance matrix)."""

    # llama.cpp keeps the KV cache in f16: fp32 GGUF logits differ from PyTorch by ~0.03-0.1 on real models
    name, runtime, logit_atol = "gguf", "llamacpp", 0.25
    exact_atol, q8_float = None, ("embed", "lm_head")  # llama.cpp rounds activations to 8 bits in its dots
    FILE = "model.gguf"

    def check_model(self, cfg: dict[str, Any], where: str) -> None:
        from edgelm.converters.gguf import gguf_header

        super().check_model(cfg, where)
        gguf_header(cfg, where, None)  # llama.cpp's RoPE keys, its shapes and attention scale, on no file

    def export(self, src: Path, preset: QuantPreset, tmp: Path, work: Path, config: ExportConfig) -> dict[str, Any]:
        from transformers import AutoTokenizer

        from edgelm.converters.gguf import (
            IMATRIX_FILE,
            find_fallbacks,
            llamacpp_quantize,
            llamacpp_quantize_tool,
            read_types,
            write_gguf,
        )
        from edgelm.converters.source import read_source
        from edgelm.fsutil import capture_fds

        weights = read_source(src)
        tok = AutoTokenizer.from_pretrained(src)
        out = tmp / self.FILE
        fields: dict[str, Any] = {"file": self.FILE}
        if preset.method == "llamacpp":
            base = work / "f32.gguf"
            notes = write_gguf(weights, tok, base, float_type="F32").notes
            del weights
            if preset.imatrix:  # export left the importance matrix in the work folder
                fields["imatrix_entries_loaded"] = llamacpp_quantize_tool(
                    base, out, preset.gguf_type or "", imatrix=work / IMATRIX_FILE, threads=os.cpu_count() or 1,
                    log_path=work / "llama_quantize.log")
            else:
                with capture_fds(work / "llama_quantize.log"):
                    llamacpp_quantize(base, out, preset.gguf_type or "", threads=os.cpu_count() or 1)
            fallbacks = find_fallbacks(out, preset.gguf_type or "")
            if fallbacks:
                log.warning("llama.cpp fell back from %s on %d tensors (rows not a multiple of its block), e.g. %s -> %s",
                            preset.gguf_type, len(fallbacks), fallbacks[0]["tensor"], fallbacks[0]["type"])
            fields["fallback_tensors"] = fallbacks
            types = [v["type"] for v in read_types(out).values()]
        else:
            written = write_gguf(weights, tok, out, float_type="F16" if preset.method == "cast" else "F32")
            notes, types = written.notes, list(written.types.values())
            fields["fallback_tensors"] = []
        fields["notes"] = notes
        fields["tensor_types"] = _count(types)
        tok.save_pretrained(tmp)  # runtimes detokenize with the HF tokenizer
        return fields

    def read_back(self, folder: Path, src: Path):
        from edgelm.converters.gguf import read_back
        from edgelm.converters.source import read_source

        return read_back(folder / self.FILE, read_source(src))

    ADAPTER_FILE = "adapter.gguf"

    def export_adapter(self, adapter, base: Path, tmp: Path) -> dict[str, Any]:
        """A GGUF LoRA adapter (llama.cpp's --lora format) for the base artifact ``base``."""
        from edgelm.converters.gguf import write_gguf_lora

        return {"file": self.ADAPTER_FILE, **write_gguf_lora(adapter, adapter.manifest["base_config"],
                                                             tmp / self.ADAPTER_FILE)}



class OnnxTarget(Target):
    """ONNX Runtime through onnxruntime-genai's model builder: GQA + KV cache, MatMulNBits for int4/int8."""

    name, runtime, logit_atol = "onnx", "onnx", 1e-3
    # the builder's own 8-bit lm_head, the embedding float; MatMulNBits (accuracy_level 4) rounds activations to 8 bits
    exact_atol, q8_float = None, ("lm_head",)

    def check_options(self, config: ExportConfig) -> None:
        super().check_options(config)
        preset = config.preset()
        if config.lora_like and preset.method not in ("none", "cast"):
            raise EdgelmError(f"--lora-like needs a float ONNX base (--quant fp32): onnxruntime-genai's builder puts "
                              f"LoRA over float linears only, not {preset.name}'s quantized ones; for adapters over a "
                              "quantized base, export the base to gguf")

    def precision(self, preset: QuantPreset) -> str:
        if preset.method == "none":
            return "fp32"
        if preset.method == "cast":
            return "fp16"
        # A GPTQ-format source keeps its linears as they are; "int8" applies to what the checkpoint left float (lm_head).
        return "int8"

    # what edgelm packs into MatMulNBits (and the builder's GatherBlockQuantized shares)
    code_bits, code_holder = (4, 8), "ONNX MatMulNBits"

    def export(self, src: Path, preset: QuantPreset, tmp: Path, work: Path, config: ExportConfig) -> dict[str, Any]:
        from edgelm.converters.onnx import build_onnx, op_counts

        precision, extra = self.precision(preset), None
        if preset.weight_only:
            _check_matmulnbits_blocks(src, preset)
        if preset.method == "mixed" and _shared_4bit_head(src):
            # one GPTQ-calibrated 4-bit matrix for the lm_head (MatMulNBits) and the embedding (GatherBlockQuantized)
            precision, extra = "int4", {"shared_embeddings": "true"}
        lora: dict[str, Any] = {}
        if config.lora_like:  # the builder's LoRA subgraphs, from a zero copy of the adapter, as graph inputs
            from edgelm.converters.onnx import expose_lora_inputs, zero_adapter
            from edgelm.finetune.adapter import read_adapter

            like = read_adapter(config.lora_like)
            extra = {**(extra or {}), "adapter_path": str(zero_adapter(like.folder, work / "zero-adapter"))}
            lora = {"rank": like.rank, "modules": len(like.pairs), "like": str(like.folder)}
        notes = build_onnx(src, tmp, precision, work, extra)
        if lora:
            lora["inputs"] = expose_lora_inputs(tmp / "model.onnx")
        return {"file": "model.onnx", "builder": "onnxruntime-genai", "precision": precision, "notes": notes,
                "shared_embeddings": bool((extra or {}).get("shared_embeddings")), "ops": op_counts(tmp / "model.onnx"),
                **({"lora_slots": lora} if lora else {})}

    ADAPTER_FILE = "adapter.onnx_adapter"

    def export_adapter(self, adapter, base: Path, tmp: Path) -> dict[str, Any]:
        """An .onnx_adapter (onnxruntime's AdapterFormat) filling the base's LoRA inputs."""
        from edgelm.converters.onnx import write_onnx_adapter

        return {"file": self.ADAPTER_FILE, **write_onnx_adapter(adapter, base / "model.onnx", tmp / self.ADAPTER_FILE)}

    def read_back(self, folder: Path, src: Path):
        from edgelm.converters.onnx import read_back
        from edgelm.converters.source import read_source

        return read_back(folder, read_source(src))



class TvmTarget(Target):
    """Apache TVM: the decoder compiled (Relax, dlight or tuned schedules) into a shared library for x86-64 or
    aarch64, weights in a params file beside it, TVM's paged KV cache."""

    # fp32 math as PyTorch's, another summation order: max |logit diff| 1.4e-4 on the demo student
    name, runtime, logit_atol = "tvm", "tvm", 1e-3
    # a tied float embedding becomes Q8_0 (lm_head with it); fp32 math, another summation order: 1.3e-4 on SmolLM2
    exact_atol, q8_float = 1e-3, ("embed",)
    code_bits, code_holder = (4, 8), "the TVM target"  # code widths its dequantizing matmul takes

    def check_options(self, config: ExportConfig) -> None:
        from edgelm.converters.tvm import get_arch
        from edgelm.errors import require

        super().check_options(config)
        require("tvm", "tvm")
        get_arch(config.arch)
        if config.tune < 0:
            raise EdgelmError(f"--tune takes a number of trials >= 0, got {config.tune}")

    def export(self, src: Path, preset: QuantPreset, tmp: Path, work: Path, config: ExportConfig) -> dict[str, Any]:
        from transformers import AutoTokenizer

        from edgelm.converters.tvm import compile_artifact

        fields = compile_artifact(src, tmp, work, arch=config.arch, tune_trials=config.tune,
                                  tuning_db=Path(config.tuning_db) if config.tuning_db else None)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        return fields

    def read_back(self, folder: Path, src: Path):
        from edgelm.converters.source import read_source
        from edgelm.converters.tvm import read_back

        return read_back(folder, read_source(src))

    def open(self, folder: Path, *, threads: int = 1, work: Path | None = None):
        from edgelm.converters.tvm import HOST_LIB
        from edgelm.registry import RUNTIMES

        host = work / HOST_LIB if work is not None else None  # a cross build is checked through its host build
        return RUNTIMES.get(self.runtime)(folder, threads=threads,
                                          library=host if host is not None and host.is_file() else None)


TARGETS.register(GgufTarget())
TARGETS.register(OnnxTarget())
TARGETS.register(TvmTarget())


def _check_matmulnbits_blocks(src: Path, preset: QuantPreset) -> None:
    """MatMulNBits takes power-of-two blocks of 16+ columns; a per-row scale over, say, 576 columns is not one."""
    import json

    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    for cols in {cfg["hidden_size"], cfg["intermediate_size"]}:
        block = preset.group_size if preset.group_size > 0 else cols
        if block < 16 or block & (block - 1):
            raise EdgelmError(f"ONNX MatMulNBits needs power-of-two blocks of at least 16 columns; {preset.name} gives "
                              f"blocks of {block} on rows of {cols}; use a grouped preset (e.g. gptq-int8, groups of 32)")


def _shared_4bit_head(src: Path) -> bool:
    """A tied model whose checkpoint holds a 4-bit lm_head: the builder can share it with the embedding (its 8-bit
    GatherBlockQuantized does not load in onnxruntime 1.32: "scales must have the same rank as data")."""
    import json

    from edgelm.models.qformat import module_bits

    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    q = cfg.get("quantization_config") or {}
    return bool(cfg.get("tie_word_embeddings") and q.get("lm_head") and module_bits(q, "lm_head") == 4)


def _count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return dict(sorted(out.items()))
