"""GGUF for the Llama family, written with gguf-py, streamed tensor by tensor.

Quantized linears from a GPTQ-format checkpoint are packed into Q4_0 (symmetric 4-bit), Q4_1 (asymmetric 4-bit) or
Q8_0 (symmetric 8-bit) blocks holding exactly the codes and fp16 scales GPTQ chose. ``llamacpp-*`` presets write an
f32 GGUF and hand it to llama.cpp's own quantizer (``llama_model_quantize``), then list any tensor it fell back on.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgelm.errors import EdgelmError
from edgelm.artifact.weights import SourceWeights

if TYPE_CHECKING:
    import numpy as np

    from edgelm.quant.qformat import QLinear

log = logging.getLogger(__name__)

# HF tensor name -> GGUF name (llama.cpp's LLM_ARCH_LLAMA names). "{i}" is the block index.
TENSOR_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
_NAME_RE = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in TENSOR_NAMES.items()]

# HF pre-tokenizer -> llama.cpp's tokenizer.ggml.pre. Key: (pre_tokenizer type, use_regex). "gpt-2" reproduces HF's
# split of whitespace runs ("x  +  1"); llama.cpp's "smollm", which the shipped SmolLM2 GGUF uses, does not.
PRE_TOKENIZERS: dict[tuple[str, bool], str] = {
    ("ByteLevel", True): "gpt-2",
}

# Weight-only checkpoint (bits, symmetric) -> the GGUF block type that holds its values exactly.
EXACT_BLOCKS: dict[tuple[int, bool], str] = {(4, True): "Q4_0", (4, False): "Q4_1", (8, True): "Q8_0"}
_SYM = {True: "sym", False: "asym"}
BLOCK = 32  # elements per Q4_0/Q4_1/Q8_0 block


def gguf_name(hf_name: str) -> str | None:
    for rx, tmpl in _NAME_RE:
        m = rx.match(hf_name)
        if m:
            return tmpl.replace("{i}", m.group(1)) if m.groups() else tmpl
    return None


def _rope_permute(rows: "np.ndarray", n_head: int) -> "np.ndarray":
    """HF's half-split rotary layout -> GGUF's interleaved one, on the output rows of q/k: [out, ...]."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _pre_tokenizer(tokenizer) -> str:
    import json

    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = tj.get("pre_tokenizer") or {}
    key = (pre.get("type", "none"), bool(pre.get("use_regex", False)))
    if tj.get("model", {}).get("type") != "BPE" or key not in PRE_TOKENIZERS:
        raise EdgelmError(f"GGUF export supports byte-level BPE tokenizers with pre-tokenizers {sorted(PRE_TOKENIZERS)}; "
                          f"this one is {tj.get('model', {}).get('type')} with {key}")
    return PRE_TOKENIZERS[key]


def add_tokenizer(writer, tokenizer, folder: Path, n_vocab: int) -> None:
    """Token list of the model's vocab size; rows past the tokenizer's (padding) become UNUSED [PADi] tokens."""
    import gguf

    if n_vocab < len(tokenizer):
        raise EdgelmError(f"the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embedding rows")
    vocab = tokenizer.get_vocab()
    rev = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(n_vocab):
        t = rev.get(i, f"[PAD{i}]")
        tokens.append(t)
        if t in added:
            types.append(gguf.TokenType.CONTROL if added[t].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL if i in rev else gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise EdgelmError(f"{folder}: the tokenizer has no BPE merges; GGUF needs them")
    special.add_to_gguf(writer, quiet=True)
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    writer.add_add_bos_token(adds_bos)  # SpecialVocab has added merges, special ids and the chat template


def add_hparams(writer, cfg: dict[str, Any], name: str, file_type: int) -> None:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise EdgelmError(f"GGUF export supports default RoPE only; this model uses rope_type {rope.get('rope_type')!r}")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg.get("num_key_value_heads", cfg["num_attention_heads"]))
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(file_type)


def pack_exact(ql: "QLinear", qtype: str, perm_heads: int | None) -> "np.ndarray":
    """A QLinear as GGUF blocks, uint8 [out, bytes per row], holding its exact codes and fp16 scales."""
    import numpy as np

    gs = ql.contiguous_groups()
    out_f, in_f = ql.shape
    if gs is None or gs % BLOCK or in_f % BLOCK:
        raise EdgelmError(f"a {out_f}x{in_f} weight with group size {gs} does not map onto {BLOCK}-element {qtype} blocks "
                          "(act-order without static groups, or a group size not a multiple of 32); "
                          "re-quantize with --act-order off, or export ONNX")
    codes = ql.codes.numpy().astype(np.int16)  # [out, in]
    rep = gs // BLOCK
    scales = np.repeat(ql.scales.numpy(), rep, axis=1)  # fp16 [out, in/32]
    zeros = np.repeat(ql.zeros.numpy().astype(np.int16), rep, axis=1)  # [out, in/32]
    if perm_heads:
        codes, scales, zeros = (_rope_permute(a, perm_heads) for a in (codes, scales, zeros))
    nb = in_f // BLOCK
    q = codes.reshape(out_f, nb, BLOCK)
    d = scales.astype(np.float16).reshape(out_f, nb, 1).view(np.uint8)  # [out, nb, 2]
    if qtype == "Q8_0":
        if not (zeros == 128).all():
            raise EdgelmError("Q8_0 needs symmetric 8-bit codes (zero point 128)")
        qs = (q - 128).astype(np.int8).view(np.uint8)  # [out, nb, 32]
        blocks = np.concatenate([d, qs], axis=-1)
    else:
        nib = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)  # element j low nibble, j+16 high nibble
        if qtype == "Q4_0":
            if not (zeros == 8).all():
                raise EdgelmError("Q4_0 needs symmetric 4-bit codes (zero point 8); asymmetric codes go to Q4_1")
            blocks = np.concatenate([d, nib], axis=-1)
        else:  # Q4_1: w = d*q + m with m = -d*z
            m = (-(scales.astype(np.float32) * zeros)).astype(np.float16).reshape(out_f, nb, 1).view(np.uint8)
            blocks = np.concatenate([d, m, nib], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out_f, -1))


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: str  # GGML type name
    nbytes: int
    make: Callable[[], "np.ndarray"]


def write_gguf(src: SourceWeights, tokenizer, path: Path, *, float_type: str, name: str = "edgelm") -> dict[str, str]:
    """Write ``src`` as GGUF. ``float_type`` (F32/F16) is used for float matrices; returns {gguf name: type}."""
    import gguf
    import numpy as np

    cfg = src.config
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    bits, sym = int(src.quant.get("bits", 16)), bool(src.quant.get("sym", True))
    exact = EXACT_BLOCKS.get((bits, sym)) if src.qlinears else None
    if src.qlinears and exact is None:
        raise EdgelmError(f"no GGUF block type holds {bits}-bit {'symmetric' if sym else 'asymmetric'} codes exactly; "
                          f"supported: {', '.join(f'{b}-bit {_SYM[s]} -> {t}' for (b, s), t in EXACT_BLOCKS.items())}")
    plan: list[_Planned] = []
    names = list(src.tensors) + [f"{n}.weight" for n in src.qlinears]
    if src.tied:
        names = [n for n in names if n != "lm_head.weight"]
    for hf in names:
        gname = gguf_name(hf)
        if gname is None:
            if hf.endswith("rotary_emb.inv_freq"):
                continue
            raise EdgelmError(f"tensor {hf!r} has no GGUF name; known patterns: {', '.join(TENSOR_NAMES)}")
        perm = n_head if ".attn_q." in gname else n_kv if ".attn_k." in gname else None
        module = hf[: -len(".weight")]
        if module in src.qlinears:
            ql = src.qlinears[module]
            nbytes_row = ql.shape[1] // BLOCK * {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[exact]
            plan.append(_Planned(gname, (ql.shape[0], nbytes_row), exact, ql.shape[0] * nbytes_row,
                                 lambda ql=ql, perm=perm: pack_exact(ql, exact, perm)))
            continue
        shape = src.shape(hf)
        if len(shape) == 1:
            plan.append(_Planned(gname, shape, "F32", shape[0] * 4,
                                 lambda hf=hf: src.tensors[hf].numpy().astype(np.float32, copy=False)))
            continue
        qtype = float_type
        if exact and gname in ("token_embd.weight", "output.weight") and shape[1] % BLOCK == 0:
            qtype = "Q8_0"  # quantized presets keep embedding/output at 8 bits, as llama.cpp keeps its output tensor

        def make(hf=hf, perm=perm, qtype=qtype):
            a = src.tensors[hf].numpy()  # read now: one tensor in memory at a time
            if perm:
                a = _rope_permute(a, perm)
            if qtype == "F32":
                return np.ascontiguousarray(a, dtype=np.float32)
            if qtype == "F16":
                return a.astype(np.float16)
            return gguf.quants.quantize(a, gguf.GGMLQuantizationType[qtype])

        numel = shape[0] * shape[1]
        nbytes = {"F32": 4 * numel, "F16": 2 * numel, "Q8_0": numel // BLOCK * 34}[qtype]
        pshape = shape if qtype in ("F32", "F16") else (shape[0], shape[1] // BLOCK * 34)
        plan.append(_Planned(gname, pshape, qtype, nbytes, make))

    file_type = {"F32": 0, "F16": 1}[float_type] if not exact else {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7}[exact]
    writer = gguf.GGUFWriter(str(path), "llama")
    add_hparams(writer, cfg, name, file_type)
    add_tokenizer(writer, tokenizer, src.folder, int(cfg["vocab_size"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for p in plan:
        raw = None if p.qtype in ("F32", "F16") else gguf.GGMLQuantizationType[p.qtype]
        dtype = {"F32": np.float32, "F16": np.float16}.get(p.qtype, np.uint8)
        writer.add_tensor_info(p.name, p.shape, np.dtype(dtype), p.nbytes, raw_dtype=raw)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in plan:  # one tensor in memory at a time
        writer.write_tensor_data(p.make())
    writer.close()
    return {p.name: p.qtype for p in plan}


def llamacpp_quantize(src_gguf: Path, dst: Path, gguf_type: str, *, threads: int = 0) -> None:
    """Run llama.cpp's quantizer (through llama-cpp-python's ctypes binding) on an f32/f16 GGUF."""
    from edgelm.quant.presets import LLAMACPP_FTYPE

    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMACPP_FTYPE[gguf_type]
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise EdgelmError(f"llama.cpp's quantizer failed on {src_gguf.name} for {gguf_type} (return code {rc})")


def require_llama_cpp():
    from edgelm.errors import require

    return require("llama_cpp", "llamacpp", " (llama-cpp-python builds llama.cpp from source, about 16 minutes)")


# Block types that a llama.cpp file type intends for its 2-D weights; anything else in the output is a fallback.
INTENDED = {
    "Q8_0": {"Q8_0"}, "Q4_0": {"Q4_0", "Q6_K", "Q8_0"}, "Q4_1": {"Q4_1", "Q6_K", "Q8_0"},
    "Q6_K": {"Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}, "Q4_K_M": {"Q4_K", "Q6_K"},
}


def read_types(path: Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {type, shape}} of a GGUF file, with gguf-py; a corrupt file is a clear error."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:
        raise EdgelmError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated") from None
    return {t.name: {"type": t.tensor_type.name, "shape": [int(s) for s in t.shape]} for t in r.tensors}


def find_fallbacks(path: Path, gguf_type: str) -> list[dict[str, Any]]:
    """2-D tensors that llama.cpp stored in another type than ``gguf_type`` intends (its silent fallback)."""
    out = []
    for name, info in read_types(path).items():
        if len(info["shape"]) < 2:
            continue
        if info["type"] not in INTENDED[gguf_type]:
            out.append({"tensor": name, "type": info["type"], "row": info["shape"][0]})
    return out
