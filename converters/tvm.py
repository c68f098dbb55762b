"""Apache TVM export: the decoder of converters/tvm_llama.py compiled (Relax) into a shared library for one CPU
architecture, its weights in a params file beside it (so one library serves every checkpoint of the same shapes).

Quantized linears keep the GPTQ checkpoint's codes, fp16 scales and zeros exactly (packed into uint32 words, 16
output rows interleaved, no second rounding). A float tied embedding of a quantized preset becomes Q8_0 (gguf-py's
quantizer, as the GGUF export does), so both artifacts of one GPTQ checkpoint hold the same values.

Schedules: edgelm's matmul and one-token linear schedules (``gemv_schedules``), dlight's CPU GEMV rule for what they
leave, or a meta-schedule tuning database (``--tune N``) applied before them. A database is keyed by the module's
shapes and the target, and kept in the user's cache (~/.cache/edgelm/tvm/<key>/).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from edgelm.errors import EdgelmError, require

if TYPE_CHECKING:
    import numpy as np

    from edgelm.converters.source import SourceWeights
    from edgelm.converters.tvm_llama import DecoderConfig

log = logging.getLogger(__name__)

LIB_FILE = "model.so"  # the compiled library
PARAMS_FILE = "params.safetensors"  # its weights, in the library's parameter order
CONFIG_FILE = "tvm_config.json"  # DecoderConfig, parameter order, architecture, TVM version
HOST_LIB = "host-check.so"  # a cross build's check runs this host build of the same module (in the work folder)
DB_DIR = "tuning"  # a meta-schedule database (workloads + tuning records) and its key
MAX_CONTEXT = 2048  # KV cache tokens an artifact declares at most (fp32 cache: 2 * layers * kv * head_dim * 4 B/token)


@dataclass(frozen=True)
class CpuArch:
    name: str  # what --arch takes
    mtriple: str  # LLVM target triple
    cxx: str  # the C++ compiler that links the library
    deb: str  # the Debian package that installs it
    e_machine: int  # ELF header e_machine of its shared objects (readelf -h: Machine)
    mattr: tuple[str, ...] = ()  # LLVM features assumed on every such CPU


ARCHES: dict[str, CpuArch] = {a.name: a for a in (
    CpuArch("x86-64", "x86_64-linux-gnu", "g++", "g++", 62),
    # ARMv8-A with NEON: every 64-bit Android phone
    CpuArch("aarch64", "aarch64-linux-gnu", "aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu", 183, ("+neon",)),
)}
ARCH_ALIASES = {"x86_64": "x86-64", "amd64": "x86-64", "arm64": "aarch64", "host": ""}


def host_arch() -> str:
    import platform

    m = platform.machine().lower()
    return ARCH_ALIASES.get(m, m) or m


def get_arch(name: str) -> CpuArch:
    """The CPU architecture named (default: this machine's), with its toolchain present."""
    key = ARCH_ALIASES.get(name.lower(), name.lower()) or host_arch()
    arch = ARCHES.get(key)
    if arch is None:
        raise EdgelmError(f"TVM can't compile for {name!r} here; architectures: {', '.join(ARCHES)}")
    if shutil.which(arch.cxx) is None:
        raise EdgelmError(f"compiling for {arch.name} needs {arch.cxx}; install the Debian package {arch.deb} "
                          f"(apt-get install {arch.deb})")
    return arch


# x86 vector features a native build uses when this CPU has them (/proc/cpuinfo flag -> LLVM feature). Not the CPU
# name: with mcpu=emeraldrapids meta-schedule adds its x86 intrinsic rules, whose mutator fails in TVM 0.27.
X86_FEATURES = {"avx2": "+avx2", "fma": "+fma", "f16c": "+f16c", "avx512f": "+avx512f", "avx512bw": "+avx512bw",
                "avx512vl": "+avx512vl", "avx512dq": "+avx512dq",
                "avx512_vnni": "+avx512vnni", "avx512vbmi": "+avx512vbmi"}  # int8 dot products, byte shuffles


def host_features() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(flags.split(":", 1)[1].split())
    return [feat for flag, feat in X86_FEATURES.items() if flag in have]


def tvm_target(arch: CpuArch, threads: int = 0):
    """The LLVM target: this machine's vector features for a native x86-64 build, the architecture's baseline for
    a cross build."""
    tvm = require("tvm", "tvm")

    cfg: dict[str, Any] = {"kind": "llvm", "mtriple": arch.mtriple, "num-cores": threads or os.cpu_count() or 1}
    mattr = list(arch.mattr) + (host_features() if arch.name == host_arch() == "x86-64" else [])
    if mattr:
        cfg["mattr"] = mattr
    return tvm.target.Target(cfg)


def elf_machine(path: Path) -> int:
    """e_machine of an ELF file (what `readelf -h` prints as Machine)."""
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        raise EdgelmError(f"{path} is not an ELF shared library; re-export the artifact")
    return struct.unpack("<H", head[18:20])[0]


# --- the model's config ----------------------------------------------------------------------------------------------
def decoder_config(src: "SourceWeights", *, context: int = 0) -> "DecoderConfig":
    """The compiled decoder's config from an HF config and the checkpoint's quantized modules; a one-line error for
    what this target does not support, naming it."""
    from edgelm.converters.tvm_llama import DecoderConfig
    from edgelm.models.archs import get_arch as get_model_arch
    from edgelm.models.rope import rope_of

    c = src.config
    model_type = c.get("model_type")
    arch = get_model_arch(model_type, str(src.folder))
    act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise EdgelmError(f"the TVM target supports the gated MLP with {', '.join(ACTIVATIONS)}, not {act!r}")
    if c.get("attention_bias") and not arch.qkv_bias or c.get("mlp_bias"):
        raise EdgelmError("the TVM target does not support attention_bias/mlp_bias on every projection; "
                          "export to gguf or onnx")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if c.get(key):
            raise EdgelmError(f"the TVM target does not support {key} ({c[key]}); export to gguf or onnx")
    # each layer's RoPE (any static scaling: its frequencies are baked into the rotary kernel), by layer type; NoPE
    # layers rotate nothing. One table for every layer rotates in the cache, else each layer in the graph
    ropes, layer_rope = [], []
    for rotates, layer_type in zip(arch.rope_layers(c), arch.layer_types(c)):
        r = rope_of(c, layer_type)
        if r not in ropes:
            ropes.append(r)
        layer_rope.append(ropes.index(r) if rotates else -1)
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // heads)
    ctx = min(arch.export_context(c, "tvm")[0], context or MAX_CONTEXT)
    windows = tuple(w if 0 < w < ctx else 0 for w in arch.windows(c)) if arch.applies_windows(c, "tvm") else ()
    bits: dict[str, int] = {}
    groups, head_group = set(), 32  # the lm_head's: its own, or Q8_0's 32 for a float one made Q8_0
    for name, ql in src.qlinears.items():
        gs = ql.contiguous_groups()
        if gs is None or ql.bits not in (4, 8):
            raise EdgelmError(f"{name}: the TVM target takes 4- and 8-bit codes in contiguous groups; this "
                              f"checkpoint has {ql.bits}-bit codes{'' if gs else ' with act-order groups'}")
        if name == "lm_head":
            head_group = gs
        else:
            groups.add(gs)
        for part in unfused(arch, name):  # the decoder's names are the Llama block's (Phi-3's qkv_proj: q, k, v)
            bits[part.removeprefix("model.")] = ql.bits
    if len(groups) > 1:
        raise EdgelmError(f"the TVM target takes one group size per model; this checkpoint has {sorted(groups)}")
    for i in range(int(c["num_hidden_layers"])):
        kinds = {bits.get(f"layers.{i}.self_attn.{p}_proj", 0) for p in "qkv"}
        if len(kinds) > 1:
            raise EdgelmError(f"layer {i}: q/k/v have different bit widths {sorted(kinds)}; the TVM target fuses them")
    if src.quant and "lm_head" not in bits and src.tied:
        bits["lm_head"] = 8  # the float tied embedding becomes Q8_0, as in the GGUF export
    return DecoderConfig(
        hidden_size=int(c["hidden_size"]), intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]), num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads), head_dim=head_dim, vocab_size=int(c["vocab_size"]),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=ropes[0].theta,
        rope_tables=tuple(r.inv_freq for r in ropes), rope_scales=tuple(r.attention_scale for r in ropes),
        layer_rope=tuple(layer_rope), layer_window=windows if any(windows) else (), tie_word_embeddings=src.tied,
        qkv_bias=arch.qkv_bias, qk_norm=arch.qk_norm, context=ctx,
        # TVM's paged attention masks the window on the cached part only, and a prompt chunk attends to all of
        # itself: that is the window while a chunk is shorter than it (a row that sees no cached position at all
        # comes out NaN, so one less)
        prefill_chunk=min(ctx, 512, *(w - 1 for w in windows if w)),
        group_size=groups.pop() if groups else 32, head_group=head_group, bits=bits,
        attn_scale=arch.attention_scale(c), embed_scale=arch.embedding_scale(c), post_norms=arch.post_norms,
        act=ACTIVATIONS[act])


ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # HF activation -> the decoder's


def unfused(arch, module: str) -> list[str]:
    """An HF module as the Llama block's modules it holds (Phi-3's ``...self_attn.qkv_proj``: q, k and v)."""
    for fused, parts in arch.fused:
        if module.endswith("." + fused):
            head = module[: -len(fused)]
            return [head + p for p in parts]
    return [module]


# --- weights ---------------------------------------------------------------------------------------------------------
def pack_codes(codes: "np.ndarray", bits: int) -> "np.ndarray":
    """uint8 codes [out, in] -> uint32 words [out, in * bits / 32], the first code in the lowest bits; 8-bit codes
    stay one byte each."""
    import numpy as np

    if bits == 8:
        return codes.astype(np.uint8)

    per = 32 // bits
    c = codes.astype(np.uint32).reshape(codes.shape[0], -1, per)  # [out, words, per]
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None]
    return np.bitwise_or.reduce(c << shifts, axis=-1).astype(np.uint32)


def interleave_rows(a: "np.ndarray", rb: int) -> "np.ndarray":
    """[out, n] -> [out/rb, n, rb]: the storage of a quantized linear's codes, scales and zeros (see ``QLinear``)."""
    return a.reshape(a.shape[0] // rb, rb, -1).transpose(0, 2, 1)


def q8_0(w: "np.ndarray") -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
    """gguf-py's Q8_0 of a float matrix [out, in], unpacked: (codes uint8 [out, in], scales fp16 [out, in/32],
    zeros uint8 [out, in/32]) with W = scale * (code - 128)."""
    import gguf
    import numpy as np

    out, n_in = w.shape
    codes, scales = np.empty((out, n_in), np.uint8), np.empty((out, n_in // 32), np.float16)
    step = max(1, (16 << 20) // (4 * n_in))  # rows at a time: gguf-py's quantizer makes several copies
    for i in range(0, out, step):
        raw = gguf.quants.quantize(np.ascontiguousarray(w[i:i + step], dtype=np.float32),
                                   gguf.GGMLQuantizationType.Q8_0)
        blocks = raw.reshape(-1, n_in // 32, 34)  # per block: fp16 scale, 32 int8
        scales[i:i + step] = blocks[..., :2].copy().view(np.float16)[..., 0]  # [rows, in/32]
        codes[i:i + step] = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).reshape(-1, n_in)
    return codes, scales, np.full(scales.shape, 128, np.uint8)


def hf_modules(prefix: str, src: "SourceWeights") -> list[str]:
    """A compiled parameter's module (``layers.0.self_attn.qkv``) -> the HF modules it holds, in row order: the
    checkpoint's own fused projection where it has one (Phi-3's ``qkv_proj``, ``gate_up_proj``), else its parts."""
    from edgelm.converters.tvm_llama import FUSED
    from edgelm.models.archs import PHI3_FUSED

    whole = {parts: name for name, parts in PHI3_FUSED}
    for fused, parts in FUSED.items():
        if prefix.endswith("." + fused):
            head = f"model.{prefix[:-len(fused) - 1]}"
            own = f"{head}.{whole[parts]}"
            if own in src.qlinears or f"{own}.weight" in src.tensors:
                return [own]
            return [f"{head}.{p}" for p in parts]
    return [prefix] if prefix == "lm_head" else [f"model.{prefix}"]


def unpack_codes(words: "np.ndarray", bits: int) -> "np.ndarray":
    """The inverse of ``pack_codes``: uint32 words [out, w] -> uint8 codes [out, w * 32 / bits]."""
    import numpy as np

    if bits == 8:
        return words.astype(np.uint8)
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None]
    return ((words[..., None] >> shifts) & (2 ** bits - 1)).astype(np.uint8).reshape(words.shape[0], -1)


def read_back(folder: Path, src: "SourceWeights"):
    """Each quantized linear of ``src`` as the artifact in ``folder`` holds it, decoded from params.safetensors
    independently of the packer: yields (HF module, file's dequantized weight [out, in], the checkpoint's)."""
    import numpy as np
    from safetensors.numpy import load_file

    def rows(a):  # [out/rb, n, rb] -> [out, n]: interleave_rows undone
        return a.transpose(0, 2, 1).reshape(-1, a.shape[1])

    params = load_file(str(folder / PARAMS_FILE))
    for name in sorted(n for n in params if n.endswith(".qweight")):
        prefix = name.rsplit(".", 1)[0]
        mods = hf_modules(prefix, src)
        if not all(m in src.qlinears for m in mods):
            continue  # a float embedding stored as Q8_0: the runtime check covers it
        codes = unpack_codes(rows(params[name]), src.qlinears[mods[0]].bits).astype(np.float32)
        scales = rows(params[prefix + ".scales"]).astype(np.float32)
        zeros = rows(params[prefix + ".zeros"]).astype(np.float32)
        group = codes.shape[1] // scales.shape[1]
        w = np.repeat(scales, group, axis=1) * (codes - np.repeat(zeros, group, axis=1))  # [out, in]
        start = 0
        for m in mods:
            ql = src.qlinears[m]
            yield m, w[start:start + ql.shape[0]], ql.dequantize().numpy()
            start += ql.shape[0]


def model_params(cfg: "DecoderConfig", src: "SourceWeights", names: list[str]) -> Iterator[tuple[str, "np.ndarray"]]:
    """Every compiled parameter (by its name in the Relax module, e.g. ``layers.0.self_attn.qkv.qweight``) from the
    checkpoint, in ``names``' order, one at a time: float tensors as they are, quantized ones as their exact codes,
    fp16 scales and zeros, rows interleaved as ``QLinear`` stores them."""
    import numpy as np

    from edgelm.converters.tvm_llama import row_block
    from edgelm.models.archs import get_arch as get_model_arch

    cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # the modules of the parameter in hand

    def quantized(module: str) -> tuple["np.ndarray", "np.ndarray", "np.ndarray"]:
        if module not in cache:
            if module in src.qlinears:
                ql = src.qlinears[module]
                cache[module] = (ql.codes.numpy(), ql.scales.numpy().astype(np.float16),
                                 ql.zeros.numpy().astype(np.uint8))
            else:  # the float tied embedding of a quantized preset
                cache[module] = q8_0(src.tensors["model.embed_tokens.weight"].numpy())
        return cache[module]

    offset = get_model_arch(src.config.get("model_type")).norm_offset  # Gemma's RMSNorms scale by 1 + w
    for name in names:
        prefix, leaf = name.rsplit(".", 1)
        mods = hf_modules(prefix, src)
        for m in [m for m in cache if m not in mods]:
            del cache[m]  # its qweight, scales and zeros are written
        if leaf in ("qweight", "scales", "zeros"):
            k = ("qweight", "scales", "zeros").index(leaf)
            a = np.concatenate([quantized(m)[k] for m in mods])
            if leaf == "qweight":
                a = pack_codes(a, src.qlinears[mods[0]].bits if mods[0] in src.qlinears else 8)
            a = interleave_rows(a, row_block(a.shape[0]))
        else:
            a = np.concatenate([src.tensors[f"{m}.{leaf}"].numpy().astype(np.float32) for m in mods])
            if offset and prefix.endswith("norm") and leaf == "weight":
                a = a + np.float32(offset)  # as transformers computes it: 1.0 + weight in float32
        yield name, np.ascontiguousarray(a)


# --- compile ---------------------------------------------------------------------------------------------------------
def export_module(cfg: "DecoderConfig", target, *, shapes: bool = False):
    """(Relax IRModule, parameter names in order) of the decoder for ``target``; with ``shapes``, the parameters as
    (name, shape, dtype)."""
    from edgelm.converters.tvm_llama import Decoder

    with target:
        model = Decoder(cfg)
        mod, params, _ = model.export_tvm(spec=model.spec(), allow_extern=True)
    if shapes:
        return mod, [(n, tuple(int(d) for d in p.shape), str(p.dtype)) for n, p in params]
    return mod, [n for n, _ in params]


def workload_key(cfg: "DecoderConfig", target) -> str:
    """What a tuning database is valid for: the module's shapes and quantization, the target, the TVM version."""
    import tvm

    shape = {k: v for k, v in cfg.as_dict().items() if k not in ("context", "prefill_chunk")}
    blob = json.dumps({"cfg": shape, "target": str(target), "tvm": tvm.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lower(mod, target):
    """Relax before scheduling: transposed matmuls fused (else every linear re-transposes its weight per call), ops
    legalized to TIR and fused (a dequantize joins its matmul). Tuning extracts its tasks from this module."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    mod = relax.transform.FuseTransposeMatmul()(mod)
    with target:
        mod = tvm.transform.Sequential(cpu.library_dispatch_passes(target) + [
            relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(), fuse_dequantize_matmul(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    return mod


def fuse_dequantize_matmul():
    """Fuse each dequantize into the matmul that reads it (plus a residual add after it): FuseOps alone keeps an
    injective producer out of a reduction, so every call would write the whole float matrix first. Same idea as
    MLC-LLM's FuseDequantizeMatmulEwise pass."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import GlobalVarPattern, TuplePattern, is_op, wildcard

    def call(args):
        return is_op("relax.call_tir")(GlobalVarPattern(), TuplePattern(args))

    deq = call([wildcard(), wildcard(), wildcard()])
    mm = call([wildcard(), deq])
    patterns = [("dequantize_matmul_add", call([wildcard(), mm])), ("dequantize_matmul_add", call([mm, wildcard()])),
                ("dequantize_matmul", mm)]

    def names(ctx) -> list[str]:
        return [c.args[0].name_hint for c in ctx.matched_bindings.values() if isinstance(c, relax.Call)
                and isinstance(c.args[0], relax.GlobalVar)]

    def check(ctx) -> bool:
        n = names(ctx)
        return any(x.startswith("dequantize") for x in n) and any("matmul" in x for x in n) and all(
            x.startswith(("dequantize", "NT_matmul", "matmul", "add")) for x in n)

    return tvm.transform.Sequential([
        relax.transform.FuseOpsByPattern([relax.transform.FusionPattern(name, pat, check=check)
                                          for name, pat in patterns], bind_constants=False),
        relax.transform.FuseTIR()])


def schedule(mod, target, db_dir: Path | None):
    """Each TIR function scheduled by the tuning database when it has a record, else by edgelm's matmul schedule,
    else by dlight's GEMV rule; then lowered to the VM."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    with target:
        if db_dir is not None:
            with open_db(db_dir):
                mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        mod = gemv_schedules(mod, target)
        mod = dlight_gemv(mod, target)
        return tvm.transform.Sequential(cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))(mod)


def gemv_schedules(mod, target, lanes: int = 16, rows: int = 4):
    """Schedule every matmul and one-token quantized linear. A quantized linear on one token (decode, the prompt's
    last position before the lm_head) is ``QLinear._gemv``, scheduled by :func:`_schedule_qgemv`. A matmul (float
    linears, a prompt's quantized ones with their fused dequantize): ``lanes`` input columns per vector (rfactor: a
    partial sum per lane, summed at the end), ``rows`` output rows per step, row blocks spread over the threads, a
    prompt's tokens inside a row block; a prompt's dequantize runs once per row block into a buffer every token then
    reads (inlined, it ran per token: the int4 prefill took 2.8x the fp32 one). dlight's CPU GEMV rule vectorizes
    across output rows instead (strided loads), does not take a fused dequantize, and its explicit 256-step unroll
    took LLVM ~8 minutes on a 2-layer model."""
    import tvm
    from tvm import s_tir

    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs and func.attrs.get("tirx.is_scheduled"):
            continue
        sch = s_tir.Schedule(func)
        names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
        if "qgemv" in names:
            _schedule_qgemv(sch, names)
            mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
            continue
        if "NT_matmul" not in names:
            continue
        mm = sch.get_sblock("NT_matmul")
        loops = sch.get_loops(mm)
        extents = [sch.get(lp).extent for lp in loops]
        if len(loops) != 4 or not all(isinstance(e, tvm.tirx.IntImm) for e in extents[2:]) \
                or int(extents[2]) % rows or int(extents[3]) % lanes:
            continue
        # a prompt reads each weight once per token: its row block is dequantized once into a buffer that stays in
        # cache across the prompt's tokens
        dq = sch.get_sblock("dequantize") if "dequantize" in names else None
        b, t, n, k = loops  # batch 1, tokens (1 in decode, the prompt's length in prefill), out, in
        n_o, n_i = sch.split(n, [None, rows])
        k_o, k_i = sch.split(k, [None, lanes])
        sch.reorder(n_o, b, t, n_i, k_o, k_i)  # a row block's weights stay in cache across the prompt's tokens
        rf = sch.rfactor(k_i, factor_axis=3)  # partial sums [1, t, n, lanes]
        sch.compute_at(rf, sch.get_loops(mm)[3])  # under the row: one row's [lanes] sums, in the parallel loop
        lane, k_outer = sch.get_loops(rf)[-2:]
        sch.reorder(k_outer, lane)
        sch.parallel(n_o)
        sch.vectorize(lane)
        sch.decompose_reduction(rf, k_outer)
        if dq is not None:
            sch.compute_at(dq, n_o)  # the row block's [rows, K] weights, dequantized once per prompt
            dq_k = sch.get_loops(dq)[-1]
            sch.vectorize(sch.split(dq_k, [None, lanes])[1])
        mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return mod


def _schedule_qgemv(sch, names: list[str]) -> None:
    """One token through a quantized linear (``QLinear._gemv``): blocks of rb output rows (the storage's interleave)
    spread over the threads; per group of columns, the rb rows' sums of x * code as one vector (a column's codes of
    rb rows are one load), then scaled into the rows' totals. What FuseOps put after it (a residual add, a bias)
    runs on each row block right after its totals."""
    from edgelm.converters.tvm_llama import row_block

    y = sch.get_sblock("qgemv")
    b, t, o, c = sch.get_loops(y)
    rb = row_block(int(sch.get(o).extent))
    o_o, o_i = sch.split(o, [None, rb])
    sch.reorder(o_o, b, t, c, o_i)
    sch.parallel(o_o)
    part = sch.get_sblock("qgemv_part")
    sch.compute_at(part, c)
    rows, r = sch.get_loops(part)[-2:]
    sch.reorder(r, rows)
    sch.vectorize(rows)
    sch.unroll(r)
    sch.decompose_reduction(part, r)
    sch.vectorize(o_i)
    sch.decompose_reduction(y, c)
    for name in names[names.index("qgemv") + 1:]:
        block = sch.get_sblock(name)
        sch.reverse_compute_at(block, o_o)  # the rb rows' epilogue, right after their totals
        sch.vectorize(sch.get_loops(block)[-1])


def dlight_gemv(mod, target):
    """dlight's CPU GEMV rule on what :func:`gemv_schedules` left (matrix-vector shapes it does not take), without
    the rule's explicit 256-step unroll."""
    import tvm
    from tvm.s_tir import dlight as dl

    rule = dl.cpu.GEMV()
    for gv, func in list(mod.functions_items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs and func.attrs.get("tirx.is_scheduled"):
            continue
        sch = rule.apply(func, target, False)
        if sch is None:
            continue
        sch = sch[0] if isinstance(sch, list) else sch
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            for loop in sch.get_loops(block):
                for key in [k for k in sch.get(loop).annotations.keys() if k.startswith("pragma")]:
                    sch.unannotate(loop, key)
        mod[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    return mod


def open_db(db_dir: Path):
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(str(db_dir / "database_workload.json"), str(db_dir / "database_tuning_record.json"),
                                    allow_missing=False)


def build_library(mod, target, arch: CpuArch, out: Path, db_dir: Path | None = None) -> float:
    """Compile ``mod`` (from :func:`lower`) and link it into ``out``, a shared library for ``arch``; returns seconds."""
    import tvm
    from tvm.support import cc

    t0 = time.perf_counter()
    ex = tvm.compile(schedule(mod, target, db_dir), target, relax_pipeline=None)
    ex.export_library(str(out), fcompile=cc.cross_compiler(arch.cxx) if arch.name != host_arch() else None)
    return time.perf_counter() - t0


# --- tuning ----------------------------------------------------------------------------------------------------------
def db_key_file(db_dir: Path) -> Path:
    return db_dir / "key.json"


def usable_db(db_dir: Path | None, key: str) -> Path | None:
    """``db_dir`` if it is a tuning database for ``key``; a database for other shapes or targets is ignored, with a
    warning."""
    if db_dir is None:
        return None
    try:
        meta = json.loads(db_key_file(db_dir).read_text(encoding="utf-8"))
        ok = (db_dir / "database_workload.json").is_file() and (db_dir / "database_tuning_record.json").is_file()
    except (OSError, json.JSONDecodeError):
        meta, ok = {}, False
    if not ok:
        log.warning("%s is not a tuning database (key.json and database_*.json expected); ignoring it", db_dir)
        return None
    if meta.get("key") != key:
        log.warning("tuning database %s is for other shapes or another target (key %s, this module %s); ignoring it",
                    db_dir, meta.get("key"), key)
        return None
    return db_dir


def find_db(key: str) -> Path | None:
    """A stored database for ``key`` in the user's cache (~/.cache/edgelm/tvm)."""
    d = cache_root() / key
    return usable_db(d, key) if (d / "key.json").is_file() else None


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgelm" / "tvm"


def tune(mod, target, trials: int, out: Path, key: str, work: Path) -> dict[str, Any]:
    """Meta-schedule ``trials`` measured candidates over the module's static-shape matmuls (decode's GEMVs; the
    dynamic-length prefill tasks fail in meta-schedule's mutators here), with a random cost model (no xgboost), into
    the database folder ``out``. Returns what the manifest records."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks, extracted_tasks_to_tune_contexts

    t0 = time.perf_counter()
    with target:
        tasks = [t for t in extract_tasks(mod, target) if "matmul" in t.task_name and _static(t.dispatched[0])]
        if not tasks:
            raise EdgelmError("nothing to tune: this module has no static-shape float matmul (its one-token "
                              "quantized linears have edgelm's own schedule, and prompts have dynamic shapes); "
                              "export without --tune")
        contexts, weights = extracted_tasks_to_tune_contexts(tasks, str(work / "tune"), seed=0)
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work / "tune"), max_trials_global=trials,
                      num_trials_per_iter=min(32, trials), cost_model="random",
                      runner=ms.runner.LocalRunner(timeout_sec=30))
    out.mkdir(parents=True, exist_ok=True)
    for f in ("database_workload.json", "database_tuning_record.json"):
        shutil.copyfile(work / "tune" / f, out / f)
    info = {"key": key, "trials": trials, "tasks": [t.task_name for t in tasks],
            "seconds": round(time.perf_counter() - t0, 1), "tvm": tvm.__version__, "target": str(target)}
    db_key_file(out).write_text(json.dumps(info, indent=1), encoding="utf-8")
    return info


def _static(mod) -> bool:
    """No symbolic dimension (TVMScript declares those as ``n = TypeVar("n")`` or ``n = T.int64()``)."""
    import re

    return not any(re.search(r"TypeVar\(|= T\.int(32|64)\(\)", f.script()) for _, f in mod.functions_items())


# --- the whole export ------------------------------------------------------------------------------------------------
def compile_artifact(src: Path, tmp: Path, work: Path, *, arch: str = "", tune_trials: int = 0,
                     tuning_db: Path | None = None) -> dict[str, Any]:
    """Write model.so, params.safetensors and tvm_config.json for ``src`` (an HF or GPTQ-format folder) into
    ``tmp``; a cross build also leaves a host build of the same module in ``work`` for the check. Returns the
    manifest fields."""
    import tvm
    from edgelm.models.weights import write_safetensors

    from edgelm.converters.source import read_source
    from edgelm.models.archs import get_arch as get_model_arch

    a = get_arch(arch)
    weights = read_source(src)
    cfg = decoder_config(weights)
    _, why = get_model_arch(weights.config.get("model_type")).export_context(weights.config, "tvm")
    target = tvm_target(a)
    if "+avx512vnni" in target.attrs.get("mattr", []) and cfg.bits:  # a native build on a CPU with VNNI
        cfg = replace(cfg, int8_dot=True)  # one token's quantized linears: int8 activations, VNNI dot products
    mod, specs = export_module(cfg, target, shapes=True)
    names = [n for n, _, _ in specs]
    write_safetensors(tmp / PARAMS_FILE, specs, model_params(cfg, weights, names))  # a tensor at a time
    del weights
    key = workload_key(cfg, target)
    mod = lower(mod, target)
    tuning: dict[str, Any] = {}
    db = usable_db(tuning_db, key) if tuning_db else None
    if tune_trials:
        if a.name != host_arch():
            raise EdgelmError(f"--tune measures candidates on this machine ({host_arch()}); tune an {host_arch()} "
                              f"build, or pass --tuning-db from an {a.name} device")
        tuning = tune(mod, target, tune_trials, tmp / DB_DIR, key, work)
        cache = cache_root() / key
        shutil.rmtree(cache, ignore_errors=True)
        shutil.copytree(tmp / DB_DIR, cache)  # reused by later exports of the same shapes
        db = tmp / DB_DIR
    else:
        db = db or find_db(key)
        if db is not None:
            shutil.copytree(db, tmp / DB_DIR)
            tuning = {**json.loads(db_key_file(db).read_text(encoding="utf-8")), "from": str(db)}
    if not tuning:
        log.info("no tuning database for these shapes (key %s): edgelm's matmul schedules; --tune N tunes", key)
    seconds = build_library(mod, target, a, tmp / LIB_FILE, db)
    log.info("compiled %s for %s in %.1f s", LIB_FILE, a.name, seconds)
    if a.name != host_arch():  # the check runs the same module built for this machine
        h = get_arch(host_arch())
        hmod, _ = export_module(cfg, tvm_target(h))
        build_library(lower(hmod, tvm_target(h)), tvm_target(h), h, work / HOST_LIB, None)
    meta = {"decoder": cfg.as_dict(), "params": names, "arch": a.name, "target": str(target),
            "mattr": [str(f) for f in target.attrs.get("mattr", [])], "tvm": tvm.__version__,
            "tuning": tuning, "key": key}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return {"file": LIB_FILE, "arch": a.name, "target_triple": a.mtriple, "tvm": tvm.__version__,
            "compile_seconds": round(seconds, 1), "tuning": tuning, "context": cfg.context,
            "activations": "int8 in one token's quantized linears (AVX-512 VNNI)" if cfg.int8_dot else "float32",
            "quantized_tensors": dict(sorted(cfg.bits.items())), "notes": [why] if why else [],
            "checked_on": "this build" if a.name == host_arch() else f"the {host_arch()} build of the same module"}
