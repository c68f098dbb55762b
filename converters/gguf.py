"""GGUF for every supported architecture (edgelm.models.archs), written with gguf-py, streamed tensor by tensor.

Tensor names, architecture names, file types and block sizes come from gguf-py's tables (llama.cpp's own); what
differs per architecture (RoPE row layout, context) is a hook of its ``Arch``.

Quantized linears from a GPTQ-format checkpoint are packed, each into the 32-wide block type that holds its codes
(edgelm.quant.grids: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), exactly the codes and fp16 scales GPTQ chose; a mixed plan's
tied lm_head becomes the token embedding. ``llamacpp-*`` presets write an
f32 GGUF and hand it to llama.cpp's own quantizer (``llama_model_quantize``), then list any tensor it fell back on.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgelm.converters.source import SourceWeights
from edgelm.errors import EdgelmError, require_llama_cpp
from edgelm.quant.grids import type_of
from edgelm.report import progress

if TYPE_CHECKING:
    import numpy as np

    from edgelm.finetune.adapter import Adapter

    from edgelm.models.archs import Arch
    from edgelm.models.qformat import QLinear
    from edgelm.models.rope import Rope

log = logging.getLogger(__name__)

# HF pre-tokenizer -> llama.cpp's tokenizer.ggml.pre (llama.cpp hard-codes each one's split rules). A byte-level BPE
# either splits with ByteLevel's own regex (GPT-2's), or with a Split regex first and then a ByteLevel without one;
# the regex says which llama.cpp pre-tokenizer reproduces it. "gpt-2" reproduces HF's split of whitespace runs
# ("x  +  1"); llama.cpp's "smollm", which the shipped SmolLM2 GGUF uses, does not.
BYTELEVEL_PRE = "gpt-2"
SPLIT_REGEX_PRE: dict[str, str] = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",  # Llama 3.x (tiktoken's cl100k split)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",  # Qwen2, Qwen2.5, Qwen3 (digits one at a time)
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "gpt-4o",  # Phi-4-mini (GPT-4o's o200k split; llama.cpp rewrites its Unicode classes with lookaheads)
}



def block_size(qtype: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a GGML type, from gguf-py's table."""
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]


def tensor_bytes(shape: tuple[int, ...], qtype: str) -> int:
    """Bytes of a tensor [rows, cols] (numpy order) stored as ``qtype``."""
    import math

    elems, nbytes = block_size(qtype)
    return math.prod(shape) // elems * nbytes


class NameMap:
    """HF tensor name -> GGUF name for one architecture, from gguf-py's TensorNameMap (llama.cpp's own table)."""

    def __init__(self, arch: "Arch", n_blocks: int) -> None:
        import gguf

        self.arch = arch
        self.model_arch = gguf.MODEL_ARCH[arch.gguf_arch]
        self._map = gguf.get_tensor_name_map(self.model_arch, n_blocks)
        self._known = set(gguf.MODEL_TENSORS[self.model_arch])  # tensors llama.cpp's graph for this arch reads

    @property
    def gguf_arch_name(self) -> str:
        import gguf

        return gguf.MODEL_ARCH_NAMES[self.model_arch]

    def __call__(self, hf_name: str) -> str | None:
        found = self._map.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in self._known:
            return None
        return found[1]


def _pre_tokenizer(tj: dict[str, Any]) -> str:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer (tokenizer.json as a dict), or a one-line error saying
    which ones GGUF export takes."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in steps]
    name = None
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        name = BYTELEVEL_PRE
    elif kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_REGEX_PRE.get((steps[0].get("pattern") or {}).get("Regex", ""))
    if tj.get("model", {}).get("type") != "BPE" or name is None:
        raise EdgelmError(f"GGUF export takes byte-level BPE tokenizers that llama.cpp splits the same way (GPT-2's "
                          f"ByteLevel, or the Split regexes of {', '.join(sorted(SPLIT_REGEX_PRE.values()))}) and "
                          f"SentencePiece BPE ones; this one is {tj.get('model', {}).get('type')} with pre-tokenizers "
                          f"{kinds}")
    return name


def is_sentencepiece_bpe(tj: dict[str, Any]) -> bool:
    """A SentencePiece BPE converted to HF (Llama 2, Mistral 7B, TinyLlama): byte fallback, spaces as "▁"."""
    import json

    model = tj.get("model") or {}
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback"))
            and "\u2581" in json.dumps([tj.get("normalizer"), tj.get("pre_tokenizer")], ensure_ascii=False))


def add_tokenizer(writer, tokenizer, folder: Path, n_vocab: int) -> None:
    """The HF tokenizer as llama.cpp's "gpt2" (byte-level BPE: tokens, merges, pre-tokenizer) or "llama"
    (SentencePiece BPE: tokens, scores, byte tokens) vocabulary, with special ids and the chat template. The token
    list has the model's vocab size; rows past the tokenizer's (padding) become UNUSED [PADi] tokens."""
    import json
    import re

    import gguf

    if n_vocab < len(tokenizer):
        raise EdgelmError(f"the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embedding rows")
    tj = json.loads(tokenizer.backend_tokenizer.to_str())
    spm = is_sentencepiece_bpe(tj)
    vocab = tokenizer.get_vocab()
    rev = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(n_vocab):
        t = rev.get(i, f"[PAD{i}]")
        tokens.append(t)
        if spm and t == tokenizer.unk_token:
            types.append(T.UNKNOWN)
        elif t in added:
            types.append(T.CONTROL if added[t].special else T.USER_DEFINED)
        elif i not in rev:
            types.append(T.UNUSED)
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    if spm:
        # llama.cpp merges the adjacent pair whose result scores highest; a converted SentencePiece vocab is sorted by
        # score, so the negated id orders merges as the original scores did
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([-float(i) if ty == T.NORMAL else 0.0 for i, ty in enumerate(types)])
        first = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))[:1]
        writer.add_add_space_prefix(bool(first) and first[0].startswith("\u2581"))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(tj))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=not spm, n_vocab=n_vocab)
    if not spm and not special.merges:
        raise EdgelmError(f"{folder}: the tokenizer has no BPE merges; GGUF needs them")
    bos = tokenizer.bos_token_id
    special.add_special_token["bos"] = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]  # what HF does
    special.add_to_gguf(writer, quiet=True)  # merges, special ids, add_bos/eos, the chat template


def add_hparams(writer, cfg: dict[str, Any], arch: "Arch", name: str, file_type: int, rope: "Rope") -> list[str]:
    """Model hyperparameters under the arch's keys; returns notes on what differs from the HF model."""
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    context, note = arch.export_context(cfg, "gguf")
    writer.add_name(name)
    writer.add_context_length(context)
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(cfg.get("num_key_value_heads", n_head))
    if head_dim != cfg["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope.theta)
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    writer.add_rope_dimension_count(rope.dim)
    windows = arch.windows(cfg)
    if arch.applies_windows(cfg, "gguf") and any(windows):  # llama.cpp applies them (Gemma 3): the window, and its layers
        writer.add_sliding_window(max(windows))
        writer.add_sliding_window_pattern([bool(w) for w in windows])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(file_type)
    return [note] if note else []


def layer_ropes(cfg: dict[str, Any], arch: "Arch") -> tuple["Rope", "Rope | None"]:
    """(the RoPE of the full-attention layers, that of the sliding-window layers where they have their own (Gemma 3's
    local theta) or None): llama.cpp keeps one scaled RoPE, and a base frequency for the window layers."""
    from edgelm.models.rope import rope_of

    kinds = set(arch.layer_types(cfg))
    main = rope_of(cfg, "full_attention" if None not in kinds else None)
    local = rope_of(cfg, "sliding_attention") if "sliding_attention" in kinds else None
    return main, (local if local is not None and local != main else None)


def add_rope(writer, rope: "Rope", local: "Rope | None", names: NameMap) -> list[tuple[str, "np.ndarray"]]:
    """A scaled RoPE as llama.cpp carries it, before any work; returns the frequency tables to write as tensors.

    - where the arch's graph reads a frequency table (``rope_freqs``, or Phi-3's ``rope_factors_long/short``): each
      frequency's divisor, transformers' own values (so llama3, YaRN and LongRoPE alike reach llama.cpp exactly),
      and the cos/sin scale (YaRN's and LongRoPE's attention factor) as ``rope.scaling.attn_factor``;
    - else linear scaling as llama.cpp's own keys (Gemma 3's global layers);
    - the sliding-window layers' own base frequency (llama.cpp scales them by nothing).
    Anything else is a one-line error."""
    import gguf
    import numpy as np

    arch, tensors = names.arch.name, gguf.MODEL_TENSORS[names.model_arch]
    if local is not None:
        if local.scaled or local.dim != rope.dim:
            raise EdgelmError(f"GGUF export does not support this {arch} model's sliding-window RoPE "
                              f"({local.kind}, {local.dim} dims): llama.cpp gives those layers a base frequency only; "
                              "export to onnx or tvm")
        writer.add_rope_freq_base_swa(local.theta)
    if not rope.scaled:
        return []
    factors = np.asarray(rope.freq_factors(), dtype=np.float32)  # [dim / 2]
    if gguf.MODEL_TENSOR.ROPE_FREQS in tensors:
        tables = [gguf.MODEL_TENSOR.ROPE_FREQS]
    elif gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT in tensors:  # both the same: the artifact stops at the short context
        tables = [gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT]
    elif rope.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(factors[0]))
        return []
    else:
        raise EdgelmError(f"GGUF export does not support rope_type {rope.kind!r} for {arch}: llama.cpp's "
                          f"{names.gguf_arch_name} graph reads no frequency table; export to onnx or tvm")
    if rope.attention_scale != 1.0:
        writer.add_rope_scaling_attn_factors(rope.attention_scale)
    return [(gguf.TENSOR_NAMES[t] + ".weight", factors) for t in tables]


def pack_exact(ql: "QLinear", qtype: str, permute: Callable[["np.ndarray"], "np.ndarray"]) -> "np.ndarray":
    """A QLinear as GGUF blocks of a 32-wide type (edgelm.quant.grids), uint8 [out, bytes per row], holding its exact
    codes and fp16 scales. ``permute`` reorders output rows (the arch's RoPE layout) and is applied to codes, scales
    and zeros alike."""
    import numpy as np

    from edgelm.quant.grids import block_type

    bt = block_type(qtype)
    gs = ql.contiguous_groups()
    out_f, in_f = ql.shape
    block = block_size(qtype)[0]
    if gs is None or gs % block or in_f % block:
        raise EdgelmError(f"a {out_f}x{in_f} weight with group size {gs} does not map onto {block}-element {qtype} "
                          "blocks "
                          "(act-order without static groups, or a group size not a multiple of 32); "
                          "re-quantize with --act-order off, or export ONNX")
    if ql.bits != bt.bits:
        raise EdgelmError(f"{qtype} holds {bt.bits}-bit codes; this weight has {ql.bits}-bit codes")
    codes = ql.codes.numpy().astype(np.int16)  # [out, in]
    rep = gs // block
    scales = np.repeat(ql.scales.numpy(), rep, axis=1)  # fp16 [out, in/32]
    zeros = np.repeat(ql.zeros.numpy().astype(np.int16), rep, axis=1)  # [out, in/32]
    codes, scales, zeros = (permute(a) for a in (codes, scales, zeros))
    nb = in_f // block
    q = codes.reshape(out_f, nb, block)
    d = scales.astype(np.float16).reshape(out_f, nb, 1).view(np.uint8)  # [out, nb, 2]
    mid = 2 ** (bt.bits - 1)
    if bt.sym and not (zeros == mid).all():
        raise EdgelmError(f"{qtype} needs symmetric {bt.bits}-bit codes (zero point {mid}); asymmetric codes go to "
                          f"Q{bt.bits}_1")
    parts = [d]
    if not bt.sym:  # w = d*q + m with m = -d*z (the fp16 rounding of m is the one difference from the checkpoint)
        parts.append((-(scales.astype(np.float32) * zeros)).astype(np.float16).reshape(out_f, nb, 1).view(np.uint8))
    if bt.bits == 8:
        parts.append((q - 128).astype(np.int8).view(np.uint8))  # [out, nb, 32]
    else:
        half = block // 2
        low = q & 0x0F
        if bt.bits == 5:  # bit 4 of element j is bit j of a little-endian uint32
            high = ((q >> 4) & 1).astype(np.uint32) << np.arange(block, dtype=np.uint32)  # [out, nb, 32]
            parts.append(high.sum(-1, dtype=np.uint32).astype("<u4").reshape(out_f, nb, 1).view(np.uint8))
        parts.append((low[..., :half] | (low[..., half:] << 4)).astype(np.uint8))  # j low nibble, j+16 high
    blocks = np.concatenate(parts, axis=-1)
    return np.ascontiguousarray(blocks.reshape(out_f, -1))


CHUNK_BYTES = 64 << 20  # float32 bytes of rows read at a time from a big matrix


def _encode(a: "np.ndarray", qtype: str) -> "np.ndarray":
    """float rows as a GGML type: F32, F16, or gguf-py's quantizer (Q8_0 for a quantized preset's embedding)."""
    import gguf
    import numpy as np

    if qtype == "F32":
        return np.ascontiguousarray(a, dtype=np.float32)
    if qtype == "F16":
        return a.astype(np.float16)
    return gguf.quants.quantize(a, gguf.GGMLQuantizationType[qtype])


class ChunkedRows:
    """A tensor gguf-py's writer writes in slices of rows (it asks only ``nbytes`` and ``tofile``), each made when
    it is written: ``encode(start, stop)`` -> the rows' bytes in the tensor's type."""

    def __init__(self, rows: int, row_bytes: int, encode) -> None:
        self.rows, self.row_bytes, self.encode = rows, row_bytes, encode
        self.nbytes = rows * row_bytes
        self.step = max(1, CHUNK_BYTES // max(1, row_bytes * 4))

    def tofile(self, f) -> None:
        for a in range(0, self.rows, self.step):
            part = self.encode(a, min(self.rows, a + self.step))
            assert part.nbytes == (min(self.rows, a + self.step) - a) * self.row_bytes
            part.tofile(f)


@dataclass
class _Planned:
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: str  # GGML type name
    nbytes: int
    make: Callable[[], "np.ndarray"]


@dataclass
class GgufResult:
    types: dict[str, str]  # GGUF tensor name -> GGML type
    notes: list[str]  # where the GGUF differs from the HF model (e.g. a context capped at a sliding window)


def gguf_header(cfg: dict[str, Any], where: str, path: Path | None):
    """What llama.cpp can carry of a model, decided from its config alone (``path`` None: a dry run, the export's
    check before any work): (arch, NameMap, a GGUFWriter for ``path`` with the RoPE keys, the full-attention
    layers' RoPE, the frequency tables to write, the factor the query norm carries). A RoPE, a shape or an attention scale llama.cpp can't take is one
    line."""
    import gguf

    from edgelm.models.archs import get_arch

    arch = get_arch(cfg.get("model_type"), where)
    names_of = NameMap(arch, int(cfg["num_hidden_layers"]))
    writer = gguf.GGUFWriter(str(path) if path is not None else None, names_of.gguf_arch_name)
    rope, local = layer_ropes(cfg, arch)
    tables = add_rope(writer, rope, local, names_of)
    arch.gguf_check(cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    q_scale = arch.attention_scale(cfg) * head_dim ** 0.5  # llama.cpp scales q·k by head_dim ** -0.5
    if math.isclose(q_scale, 1.0, rel_tol=1e-9):
        q_scale = 1.0  # 128 ** -0.5 * 128 ** 0.5 is 1.0000000000000002 in floats
    if q_scale != 1.0 and not arch.qk_norm:
        raise EdgelmError(f"GGUF export of this {arch.name} model is not supported: its attention scale "
                          f"{arch.attention_scale(cfg):.4g} is not llama.cpp's head_dim ** -0.5; export to onnx or tvm")
    return arch, names_of, writer, rope, tables, q_scale


def write_gguf(src: SourceWeights, tokenizer, path: Path, *, float_type: str, name: str = "edgelm") -> GgufResult:
    """Write ``src`` as GGUF. ``float_type`` (F32/F16) is used for float matrices."""
    import gguf
    import numpy as np

    cfg = src.config
    arch, names_of, writer, rope, tables, q_scale = gguf_header(cfg, str(src.folder), path)
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    exact, qshape = {}, {}  # module -> the type holding its codes, [out, in] (one linear read at a time)
    for n, ql in src.qlinears.items():
        exact[n], qshape[n] = type_of(ql).name, ql.shape
    tied_q = "lm_head" in src.qlinears and src.tied  # a mixed plan's tied embedding: one exact matrix
    plan: list[_Planned] = []
    names = list(src.tensors) + [f"{n}.weight" for n in src.qlinears]
    if src.tied:
        names = [n for n in names if n != "lm_head.weight"]
    for hf in names:
        gname = names_of(hf)
        if gname is None:
            if hf.endswith("rotary_emb.inv_freq"):
                continue
            raise EdgelmError(f"tensor {hf!r} has no name in llama.cpp's {names_of.gguf_arch_name} architecture "
                              f"(gguf-py's tensor map); this {arch.name} checkpoint has a tensor llama.cpp would "
                              "not read")

        def permute(a, gname=gname):
            return arch.permute_rows(a, gname, n_head, n_kv)

        module = hf.rsplit(".", 1)[0]
        if tied_q and gname == "token_embd.weight":
            module = "lm_head"
        if hf.endswith(".weight") and module in src.qlinears:
            qtype, (out_f, in_f) = exact[module], qshape[module]
            shape = (out_f, tensor_bytes((1, in_f), qtype))
            plan.append(_Planned(gname, shape, qtype, shape[0] * shape[1],  # the codes read when written
                                 lambda m=module, qtype=qtype, permute=permute: pack_exact(src.qlinears[m], qtype,
                                                                                          permute)))
            continue
        shape = src.shape(hf)
        qtype = "F32" if len(shape) == 1 else float_type
        if exact and gname in ("token_embd.weight", "output.weight") and shape[1] % block_size("Q8_0")[0] == 0:
            qtype = "Q8_0"  # quantized presets keep embedding/output at 8 bits, as llama.cpp keeps its output tensor
        stored = shape if qtype in ("F32", "F16") else (shape[0], tensor_bytes((1, shape[1]), qtype))
        # an RMSNorm's scale as llama.cpp multiplies by it: Gemma's offset + weight (as llama.cpp's converter
        # writes it), the query norm's also times the attention scale llama.cpp does not apply (Gemma's
        # query_pre_attn_scalar): q·k is linear in q, and RoPE too
        scale = (arch.norm_offset, q_scale if gname.endswith("attn_q_norm.weight") else 1.0) \
            if hf.endswith("norm.weight") else (0.0, 1.0)

        rows_of = getattr(src.tensors, "rows", None)
        if rows_of is not None and len(shape) == 2 and shape[0] * shape[1] * 4 > CHUNK_BYTES \
                and ".attn_q." not in gname and ".attn_k." not in gname:  # (q/k rows are permuted per head)
            # a big matrix (the embedding, the lm_head) is read, converted and written a slice of rows at a time
            def chunked(hf=hf, qtype=qtype, shape=shape):
                return ChunkedRows(shape[0], tensor_bytes((1, shape[1]), qtype),
                                   lambda a, b: _encode(rows_of(hf, a, b).numpy(), qtype))

            plan.append(_Planned(gname, stored, qtype, tensor_bytes(shape, qtype), chunked))
            continue

        def make(hf=hf, permute=permute, qtype=qtype, scale=scale):
            a = permute(src.tensors[hf].numpy())  # read now: one tensor in memory at a time
            if scale != (0.0, 1.0):
                a = (a.astype(np.float32) + np.float32(scale[0])) * np.float32(scale[1])
            return _encode(a, qtype)

        plan.append(_Planned(gname, stored, qtype, tensor_bytes(shape, qtype), make))

    # the frequency tables first, as llama.cpp's converter writes them: ggml's RoPE reads a table entry for every
    # pair of a head, rotated or not, so with partial rotary it reads past the table (values it does not use), and
    # past the end of the file (a segfault) when the table is the file's last tensor
    plan[:0] = [_Planned(tname, table.shape, "F32", table.nbytes, lambda table=table: table)
                for tname, table in tables]
    common = max(set(exact.values()), key=list(exact.values()).count) if exact else None  # the file's main type
    file_type = gguf.LlamaFileType[f"MOSTLY_{common}" if common else {"F32": "ALL_F32", "F16": "MOSTLY_F16"}[float_type]]
    notes = add_hparams(writer, cfg, arch, name, int(file_type), rope)
    add_tokenizer(writer, tokenizer, src.folder, int(cfg["vocab_size"]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for p in plan:
        raw = None if p.qtype in ("F32", "F16") else gguf.GGMLQuantizationType[p.qtype]
        dtype = {"F32": np.float32, "F16": np.float16}.get(p.qtype, np.uint8)
        writer.add_tensor_info(p.name, p.shape, np.dtype(dtype), p.nbytes, raw_dtype=raw)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in progress(plan, desc=f"GGUF {path.name}", unit="tensor"):  # one tensor in memory at a time
        writer.write_tensor_data(p.make())
    writer.close()
    for note in notes:
        log.warning("GGUF: %s", note)
    return GgufResult({p.name: p.qtype for p in plan}, notes)


def read_back(path: Path, src: SourceWeights):
    """Each quantized linear of ``src`` as the GGUF at ``path`` holds it, decoded by gguf-py (not by the packer):
    yields (HF module, file's dequantized weight [out, in], the checkpoint's), both in the file's row order."""
    import gguf

    from edgelm.models.archs import get_arch

    cfg = src.config
    arch = get_arch(cfg.get("model_type"), str(src.folder))
    names_of = NameMap(arch, int(cfg["num_hidden_layers"]))
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    for module, ql in src.qlinears.items():
        gname = "token_embd.weight" if module == "lm_head" and src.tied else names_of(f"{module}.weight")
        t = tensors.get(gname or "")
        if t is None:
            raise EdgelmError(f"the GGUF has no {gname or module} tensor for the checkpoint's {module}")
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ql.shape)  # [out, in]
        yield module, w, arch.permute_rows(ql.dequantize().numpy(), gname, n_head, n_kv)


def llamacpp_quantize(src_gguf: Path, dst: Path, gguf_type: str, *, threads: int = 0) -> None:
    """Run llama.cpp's quantizer (through llama-cpp-python's ctypes binding) on an f32/f16 GGUF."""
    import gguf

    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{gguf_type}"])
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src_gguf).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise EdgelmError(f"llama.cpp's quantizer failed on {src_gguf.name} for {gguf_type} (return code {rc})")


# Block types that a llama.cpp file type intends for its 2-D weights; anything else in the output is a fallback.
INTENDED = {
    "Q8_0": {"Q8_0"}, "Q4_0": {"Q4_0", "Q6_K", "Q8_0"}, "Q4_1": {"Q4_1", "Q6_K", "Q8_0"},
    "Q6_K": {"Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}, "Q4_K_M": {"Q4_K", "Q6_K"},
    "Q2_K": {"Q2_K", "Q3_K", "Q4_K", "Q6_K"},  # its mix raises attn_v, ffn_down and the output
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


IMATRIX_FILE = "imatrix.gguf"  # where export leaves the importance matrix for a target (in its work folder)


def write_imatrix(stats: dict[str, "np.ndarray"], tokens: int, folder: Path, path: Path, *, dataset: str,
                  chunk_size: int) -> int:
    """llama.cpp's importance matrix (GGUF format, as its `llama-imatrix` tool writes it): per weight, ``.in_sum2``
    (sum over tokens of each input column squared) and ``.counts`` (tokens), under the GGUF tensor names. ``stats``
    is keyed by HF module name (edgelm.quant.hessian); the lm_head's goes to token_embd when tied. Returns entries."""
    import gguf
    import numpy as np

    from edgelm.models.archs import get_arch
    from edgelm.models.loader import read_config

    cfg = read_config(folder)
    names = NameMap(get_arch(cfg.get("model_type"), str(folder)), int(cfg["num_hidden_layers"]))
    w = gguf.GGUFWriter(str(path), arch="imatrix")  # the arch key is ignored by the loader
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, max(1, tokens // chunk_size))
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, chunk_size)
    n = 0
    for module in sorted(stats):
        gname = ("token_embd.weight" if cfg.get("tie_word_embeddings") else "output.weight") if module == "lm_head" \
            else names(module + ".weight")
        if gname is None:
            raise EdgelmError(f"{module} has no name in llama.cpp's tensor map; cannot write its importance")
        w.add_tensor(f"{gname}.in_sum2", np.asarray(stats[module], dtype=np.float32)[None, :])  # [1, in]
        w.add_tensor(f"{gname}.counts", np.array([[float(tokens)]], dtype=np.float32))  # [1, 1]
        n += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n


def find_llama_quantize() -> str:
    """llama.cpp's `llama-quantize` tool: on PATH, or beside this Python (where `make llama-quantize` puts it)."""
    import shutil
    import sys

    found = shutil.which("llama-quantize") or shutil.which("llama-quantize", path=str(Path(sys.executable).parent))
    if not found:
        raise EdgelmError("--imatrix needs llama.cpp's llama-quantize tool (llama-cpp-python's API can't take an "
                          "importance matrix): run `make llama-quantize`, which builds it from the llama.cpp "
                          "llama-cpp-python vendors, or put one on PATH")
    return found


def llamacpp_quantize_tool(src_gguf: Path, dst: Path, gguf_type: str, *, imatrix: Path, threads: int,
                           log_path: Path) -> int:
    """Run `llama-quantize --imatrix` on an f32 GGUF (its output goes to ``log_path``); returns how many importance
    entries the tool says it loaded."""
    import re
    import subprocess

    from edgelm.fsutil import keep_log

    args = [find_llama_quantize(), "--imatrix", str(imatrix), str(src_gguf), str(dst), gguf_type, str(max(1, threads))]
    with open(log_path, "w", encoding="utf-8") as logf:
        rc = subprocess.run(args, stdout=logf, stderr=subprocess.STDOUT).returncode
    if rc != 0 or not dst.is_file():
        lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        raise EdgelmError(f"llama-quantize failed for {gguf_type} (exit {rc}): {lines[-1][:300] if lines else ''} "
                          f"(full log: {keep_log(log_path, 'llama-quantize')})")
    found = re.search(r"loaded (\d+) importance matrix entries", log_path.read_text(encoding="utf-8", errors="replace"))
    if not found:
        raise EdgelmError("llama-quantize did not report loading the importance matrix "
                          f"(log: {keep_log(log_path, 'llama-quantize')})")
    return int(found.group(1))


def write_gguf_lora(adapter: "Adapter", cfg: dict[str, Any], path: Path, *, float_type: str = "F16") -> dict[str, Any]:
    """A LoRA adapter as llama.cpp reads one (its convert_lora_to_gguf's layout): ``general.type`` adapter,
    ``adapter.type`` lora and ``adapter.lora.alpha``; per adapted linear ``<gguf name>.lora_a`` [r, in] and
    ``.lora_b`` [out, r], with B's rows in the arch's RoPE order as the base's q/k rows are. llama.cpp scales the
    update by alpha / r, so the file's alpha is the adapter's scaling times r (rsLoRA included)."""
    import gguf
    import numpy as np

    from edgelm.models.archs import get_arch

    arch = get_arch(cfg.get("model_type"), str(adapter.folder))
    names_of = NameMap(arch, int(cfg["num_hidden_layers"]))
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    dtype = {"F32": np.float32, "F16": np.float16}[float_type]
    writer = gguf.GGUFWriter(str(path), names_of.gguf_arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    scalings = {p.scaling for p in adapter.pairs}
    if len(scalings) != 1:
        raise EdgelmError(f"{adapter.folder} scales its modules differently (rank or alpha patterns); llama.cpp "
                          "takes one alpha per adapter: merge it instead (--merge)")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scalings.pop() * adapter.rank))
    tensors = {}
    for p in adapter.pairs:
        gname = names_of(f"{p.module}.weight")
        if gname is None:
            raise EdgelmError(f"adapter {adapter.folder} adapts {p.module}, which has no tensor in llama.cpp's "
                              f"{names_of.gguf_arch_name} graph; merge it instead (--merge)")
        b = arch.permute_rows(p.b.float().numpy(), gname, n_head, n_kv)  # [out, r]
        tensors[gname + ".lora_a"] = p.a.float().numpy().astype(dtype)  # [r, in]
        tensors[gname + ".lora_b"] = np.ascontiguousarray(b).astype(dtype)
    for name, a in tensors.items():
        writer.add_tensor(name, a)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": len(tensors), "alpha": float(adapter.pairs[0].scaling * adapter.rank), "type": float_type}
