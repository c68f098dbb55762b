"""The decoder of every supported architecture (edgelm.models.archs) in TVM's ``relax.frontend.nn``, with TVM's
paged KV cache: one module, whose per-architecture differences are fields of :class:`DecoderConfig` read from the
arch's hooks (as MLC-LLM builds each model from shared blocks): q/k norms (Qwen3, Gemma 3), Gemma's norms around
each sublayer, embedding scale, GELU and attention scale, per-layer RoPE tables (Gemma 3's local and global theta,
SmolLM3's NoPE layers) and per-layer sliding windows.

The route MLC-LLM proved, written for edgelm's checkpoints: q/k/v are one fused projection, RoPE and attention run
in the KV cache's CPU TIR kernels, and a quantized linear keeps its GPTQ codes packed in uint32 words: one token
runs its own kernel on the codes (``QLinear._gemv``), a prompt dequantizes inside the matmul's kernel (FuseOps puts
the dequantize and the matmul in one TIR function). RMSNorm weights arrive as the scales they multiply by (Gemma's
1 + w folded in at export).

Compiled functions (params are passed packed, as the last argument):
  prefill(input_ids [1, s] int32, kv) -> (logits [1, 1, V], kv)   the last position's logits
  prefill_all(input_ids [1, s] int32, kv) -> (logits [1, s, V], kv)   every position's (perplexity, KLD)
  decode(input_ids [1, 1] int32, kv) -> (logits [1, 1, V], kv)
  create_kv_cache(max_batch, max_total, prefill_chunk, page_size, sliding) -> kv
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache

# fused projection (its name in this module) -> the HF modules whose rows it stacks, in order
FUSED = {"self_attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up": ("mlp.gate_proj", "mlp.up_proj")}


@dataclass(frozen=True)
class DecoderConfig:
    """Everything the compiled library's shapes depend on (so a library serves every checkpoint with this config)."""

    hidden_size: int  # residual width
    intermediate_size: int  # MLP width
    num_layers: int  # decoder layers
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when fewer than num_heads)
    head_dim: int  # width of one head
    vocab_size: int  # rows of the embedding and the lm_head
    rms_norm_eps: float  # RMSNorm epsilon
    rope_theta: float  # RoPE base of the first table (what the KV cache is told)
    rope_tables: tuple[tuple[float, ...], ...]  # distinct RoPE frequency tables [rotated dims / 2] (transformers')
    rope_scales: tuple[float, ...]  # each table's cos/sin scale (YaRN's and LongRoPE's attention factor; 1.0 else)
    tie_word_embeddings: bool  # the lm_head is the embedding matrix
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3)
    context: int  # compiled maximum context: prompt + generated tokens
    prefill_chunk: int  # most tokens one prefill call takes
    group_size: int = 32  # quantized linears: columns per scale
    head_group: int = 32  # a quantized lm_head's columns per scale (Q8_0's 32 when a float one was made Q8_0)
    bits: dict[str, int] = field(default_factory=dict)  # "layers.0.mlp.up_proj", "lm_head"... -> 4 or 8; absent: float
    int8_dot: bool = False  # one token through a quantized linear: activations rounded to int8 per group, AVX-512 VNNI
    layer_rope: tuple[int, ...] = ()  # per layer, its rope_tables entry (-1: no RoPE); () = table 0 everywhere
    layer_window: tuple[int, ...] = ()  # per layer, its sliding attention window (0: full attention); () = none
    attn_scale: float = 0.0  # softmax scale of q·k; 0 = head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    embed_scale: float = 1.0  # token embeddings are multiplied by it (Gemma: sqrt(hidden) in float32)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs before each residual add (Gemma 3)
    act: str = "silu"  # the gated MLP's activation: "silu" or "gelu_tanh"

    @property
    def cache_rotates(self) -> bool:
        """Every layer rotates with table 0, so the KV cache's kernel does it; else each layer rotates in the graph."""
        return all(r == 0 for r in self.layer_rope)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def bits_of(self, name: str) -> int:
        return int(self.bits.get(name, 0))


def row_block(out_features: int) -> int:
    """Output rows interleaved in a quantized weight's storage: 16 (one AVX-512 vector of fp32 sums), or the largest
    power of two that divides the rows."""
    return next(r for r in (16, 8, 4, 2, 1) if out_features % r == 0)


class QLinear(nn.Module):
    """y = x W^T (+ b), W [out, in] stored as ``bits``-bit codes with an fp16 scale and a uint8 zero point per group of
    columns: W = scale * (code - zero). Storage interleaves ``rb`` output rows (:func:`row_block`), so one vector load
    reads the same column of rb rows: codes [out/rb, in/per_word, rb] (4-bit: uint32 words, the first of a row's 8
    codes in the low bits; 8-bit: one byte each), scales and zeros [out/rb, in/group, rb].

    One token (decode, and the prompt's last position before the lm_head) runs :meth:`_gemv`: a vector of rb rows'
    sums per column, each group's sum scaled once and its zero point taken out through the group's sum of x (with
    ``int8_dot``, x rounded to int8 and VNNI's integer dot products: :func:`int8_qgemv`). A prompt runs a matmul on
    the dequantized matrix (:meth:`weight`)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group: int, bias: bool = False,
                 int8_dot: bool = False) -> None:
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        self.rb = rb = row_block(out_features)
        self.int8_dot = int8_dot and rb == 16 and group % 8 == 0
        if bits == 8:  # one byte per code: a plain load vectorizes (shift-and-mask of 8-bit lanes ran ~4x slower)
            self.qweight = nn.Parameter((out_features // rb, in_features, rb), "uint8")  # [out/rb, in, rb]
        else:
            self.qweight = nn.Parameter((out_features // rb, in_features // (32 // bits), rb), "uint32")
        self.scales = nn.Parameter((out_features // rb, in_features // group, rb), "float16")  # [out/rb, in/g, rb]
        self.zeros = nn.Parameter((out_features // rb, in_features // group, rb), "uint8")  # [out/rb, in/g, rb]
        self.bias = nn.Parameter((out_features,), "float32") if bias else None

    def _deq(self, q: te.Tensor, s: te.Tensor, z: te.Tensor, o, i):
        """W[o, i] in fp32."""
        rb, g = self.rb, self.group
        code = _code(q, o, i, self.bits, rb).astype("float32")
        return s[o // rb, i // g, o % rb].astype("float32") * (code - z[o // rb, i // g, o % rb].astype("float32"))

    def weight(self) -> Tensor:
        """The float32 matrix [out, in] (a TE op that FuseOps folds into the consuming matmul)."""
        def dequantize(q: te.Tensor, s: te.Tensor, z: te.Tensor) -> te.Tensor:
            return te.compute((self.out_features, self.in_features), lambda o, i: self._deq(q, s, z, o, i),
                              name="dequantize")

        return op.tensor_expr_op(dequantize, "dequantize", [self.qweight, self.scales, self.zeros])

    def rows(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` [s] of the float matrix, [s, in]: a quantized embedding shared with the lm_head."""
        def gather(q: te.Tensor, s: te.Tensor, z: te.Tensor, idx: te.Tensor) -> te.Tensor:
            return te.compute((idx.shape[0], self.in_features), lambda t, i: self._deq(q, s, z, idx[t], i),
                              name="dequantize_rows")

        return op.tensor_expr_op(gather, "dequantize_rows", [self.qweight, self.scales, self.zeros, ids])

    def _gemv(self, x: Tensor) -> Tensor:
        """x [b, 1, in] -> [b, 1, out]: :func:`int8_qgemv` where the target has VNNI, else :meth:`_gemv_f32`."""
        if self.int8_dot and isinstance(x.shape[0], (int, tirx.IntImm)) and int(x.shape[0]) == 1:
            func = int8_qgemv(self.in_features, self.out_features, self.group, self.bits)
            return op.tensor_ir_op(func, "qgemv_int8", [x, self.qweight, self.scales, self.zeros],
                                   Tensor.placeholder((1, 1, self.out_features), "float32"))
        return self._gemv_f32(x)

    def _gemv_f32(self, x: Tensor) -> Tensor:
        """x [b, 1, in] -> [b, 1, out]: y[o] = sum_g s[o, g] (sum_r x[gG + r] code[o, gG + r] - z[o, g] xsum[g])."""
        rb, g, bits, n_in, n_out = self.rb, self.group, self.bits, self.in_features, self.out_features

        def qgemv(x: te.Tensor, q: te.Tensor, s: te.Tensor, z: te.Tensor) -> te.Tensor:
            b, t = x.shape[0], x.shape[1]
            j = te.reduce_axis((0, g), "j")
            xsum = te.compute((b, t, n_in // g), lambda i, k, c: te.sum(x[i, k, c * g + j], axis=j),
                              name="qgemv_xsum")  # [b, 1, in/g]
            r = te.reduce_axis((0, g), "r")
            part = te.compute((b, t, n_in // g, n_out), lambda i, k, c, o: te.sum(
                x[i, k, c * g + r] * _code(q, o, c * g + r, bits, rb).astype("float32"), axis=r),
                name="qgemv_part")  # [b, 1, in/g, out]: one group's sum of x * code
            c = te.reduce_axis((0, n_in // g), "c")
            return te.compute((b, t, n_out), lambda i, k, o: te.sum(
                s[o // rb, c, o % rb].astype("float32")
                * (part[i, k, c, o] - z[o // rb, c, o % rb].astype("float32") * xsum[i, k, c]), axis=c),
                name="qgemv")

        return op.tensor_expr_op(qgemv, "qgemv", [x, self.qweight, self.scales, self.zeros])

    def forward(self, x: Tensor) -> Tensor:
        one_token = isinstance(x.shape[1], (int, tirx.IntImm)) and int(x.shape[1]) == 1
        y = self._gemv(x) if one_token else op.matmul(x, op.permute_dims(self.weight()))  # [b, s, out]
        return y + self.bias if self.bias is not None else y


def _code(q: te.Tensor, o, i, bits: int, rb: int):
    """Code (o, i) of a packed weight [out/rb, in/per_word, rb]: a byte (8-bit), or a field of a uint32 word, the
    row's first code in the low bits."""
    if bits == 8:
        return q[o // rb, i, o % rb]
    per_word = 32 // bits
    shift = tirx.Cast("uint32", (i % per_word) * bits)
    return (q[o // rb, i // per_word, o % rb] >> shift) & tirx.const((1 << bits) - 1, "uint32")


def int8_qgemv(n_in: int, n_out: int, group: int, bits: int):
    """One token through a 4- or 8-bit linear with int8 activations and AVX-512 VNNI, as llama.cpp's Q4_0 x Q8_0 and
    Q8_0 x Q8_0 dot products: x [1, 1, in] fp32, codes/scales/zeros as ``QLinear`` stores them (16 interleaved rows)
    -> y [1, 1, out] fp32.

    x is rounded per group of columns to int8 (scale d = max|x| / 127, as Q8_0). ``vpdpbusd`` multiplies 4 unsigned
    codes by 4 int8 activations in each of 16 int32 lanes (one lane per row) and adds them up. Per group:
    y += scale * d * (sum code * xq - zero * sum xq).
    - 4-bit: a uint32 word holds 8 columns of one row, column j in nibble j, so its low nibbles are the even columns
      and its high nibbles the odd ones; x is stored in that order (per 8 columns: 0 2 4 6 1 3 5 7), and 16 rows'
      words (one load) give two ``vpdpbusd`` (low nibbles, high nibbles).
    - 8-bit: 4 columns of 16 rows are 64 stored bytes, column-major; one byte shuffle (``vpermb`` with AVX-512 VBMI)
      makes each row's 4 codes one lane."""
    from tvm.script import tirx as T

    rb, groups = 16, n_in // group
    blk = 8 if bits == 4 else 1  # columns per stored unit whose activations are reordered (a uint32 word)
    q_shape = (n_out // rb, n_in // 8, rb) if bits == 4 else (n_out // rb, n_in, rb)
    q_dtype = "uint32" if bits == 4 else "uint8"
    perm = [(j % 4) * rb + j // 4 for j in range(64)]  # 8-bit: lane r, byte k <- column k of row r

    def xb(xq, col: int):
        """4 int8 activations from ``col`` on, broadcast to 16 lanes as 64 bytes."""
        return T.reinterpret("int8x64", T.Broadcast(T.reinterpret("int32", xq.vload([col], "int8x4")), rb))

    def vnni(acc, codes, acts):
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, codes, acts)

    @T.macro
    def dot4(dot, q, xq, ob, c):
        for w in T.unroll(group // 8):  # (no let-bindings here: each became a workspace allocation per block)
            dot[T.ramp(0, 1, rb)] = vnni(dot[T.ramp(0, 1, rb)], T.reinterpret("int8x64", T.bitwise_and(
                T.reinterpret("int32x16", q.vload([ob, c * (group // 8) + w, 0], "uint32x16")),
                T.Broadcast(0x0F0F0F0F, rb))), xb(xq, c * group + w * 8))
            dot[T.ramp(0, 1, rb)] = vnni(dot[T.ramp(0, 1, rb)], T.reinterpret("int8x64", T.bitwise_and(T.shift_right(
                T.reinterpret("int32x16", q.vload([ob, c * (group // 8) + w, 0], "uint32x16")), T.Broadcast(4, rb)),
                T.Broadcast(0x0F0F0F0F, rb))), xb(xq, c * group + w * 8 + 4))

    @T.macro
    def dot8(dot, q, xq, ob, c):
        qf = T.decl_buffer((n_out * n_in,), "uint8", data=q.data)
        for w in T.unroll(group // 4):
            dot[T.ramp(0, 1, rb)] = vnni(dot[T.ramp(0, 1, rb)], T.reinterpret("int8x64", T.Shuffle(
                [qf[T.ramp((ob * n_in + c * group + w * 4) * rb, 1, 64)]], perm)), xb(xq, c * group + w * 4))

    dot_group = dot4 if bits == 4 else dot8

    @T.prim_func(private=True)
    def qgemv_int8(x: T.Buffer((1, 1, n_in), "float32"), q: T.Buffer(q_shape, q_dtype),
                   s: T.Buffer((n_out // rb, groups, rb), "float16"), z: T.Buffer((n_out // rb, groups, rb), "uint8"),
                   y: T.Buffer((1, 1, n_out), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xq = T.alloc_buffer((n_in,), "int8")  # x rounded (4-bit: in nibble order)
        xd = T.alloc_buffer((groups,), "float32")  # each group's scale
        xsum = T.alloc_buffer((groups,), "float32")  # each group's sum of xq (for the zero points)
        amax = T.alloc_buffer((1,), "float32")
        isum = T.alloc_buffer((1,), "int32")
        for c in range(groups):
            amax[0] = T.float32(0)
            for j in range(group):
                amax[0] = T.max(amax[0], T.fabs(x[0, 0, c * group + j]))
            xd[c] = amax[0] / T.float32(127)
            isum[0] = 0
            for w, j in T.grid(group // blk, blk):  # column w * blk + j goes to w * blk + (j % 2) * blk / 2 + j / 2
                xq[c * group + w * blk + (j % 2) * (blk // 2) + j // 2] = T.Cast("int8", T.if_then_else(
                    amax[0] > T.float32(0), T.Cast("int32", T.nearbyint(x[0, 0, c * group + w * blk + j]
                                                                        * (T.float32(127) / amax[0]))), 0))
                isum[0] = isum[0] + T.Cast("int32", xq[c * group + w * blk + (j % 2) * (blk // 2) + j // 2])
            xsum[c] = T.Cast("float32", isum[0])
        for ob in T.parallel(n_out // rb):  # a block of 16 rows
            acc = T.alloc_buffer((rb,), "float32", scope="local")
            dot = T.alloc_buffer((rb,), "int32", scope="local")
            acc[T.ramp(0, 1, rb)] = T.Broadcast(T.float32(0), rb)
            for c in range(groups):
                dot[T.ramp(0, 1, rb)] = T.Broadcast(0, rb)
                dot_group(dot, q, xq, ob, c)
                acc[T.ramp(0, 1, rb)] = acc[T.ramp(0, 1, rb)] + (
                    T.Cast("float32x16", s.vload([ob, c, 0], "float16x16")) * T.Broadcast(xd[c], rb)
                    * (T.Cast("float32x16", dot[T.ramp(0, 1, rb)])
                       - T.Cast("float32x16", z.vload([ob, c, 0], "uint8x16")) * T.Broadcast(xsum[c], rb)))
            y[0, 0, T.ramp(ob * rb, 1, rb)] = acc[T.ramp(0, 1, rb)]

    return qgemv_int8


def linear(cfg: DecoderConfig, name: str, in_f: int, out_f: int, bias: bool = False) -> nn.Module:
    bits = cfg.bits_of(name)
    if bits:
        return QLinear(in_f, out_f, bits, cfg.group_size, bias, cfg.int8_dot)
    return nn.Linear(in_f, out_f, bias=bias)


def rotary(cfg: DecoderConfig, table: int, qkv: Tensor, positions: Tensor) -> Tensor:
    """RoPE in the graph, for decoders whose layers rotate differently (Gemma 3's two thetas, SmolLM3's NoPE layers)
    while the cache rotates none: qkv [b, s, hq + 2 hkv, d] and each token's position [b * s] -> qkv, q and k heads
    rotated with ``rope_tables[table]`` as the cache's kernel would (edgelm.converters.tvm_kvcache.split_rotary:
    transformers' frequencies, the pair (j, j + half))."""
    from edgelm.converters.tvm_kvcache import table as const_table

    freqs, half = [float(f) for f in cfg.rope_tables[table]], len(cfg.rope_tables[table])
    heads, mscale = cfg.num_heads + cfg.num_kv_heads, tirx.const(cfg.rope_scales[table], "float32")

    def rope(x: te.Tensor, pos: te.Tensor) -> te.Tensor:
        s = x.shape[1]

        def value(i, t, h, d):
            j = tirx.Select(d < half, d, d - half)  # the pair's first dimension
            angle = pos[i * s + t].astype("float32") * const_table(freqs, j)
            c, sn = tirx.cos(angle) * mscale, tirx.sin(angle) * mscale
            x1, x2 = x[i, t, h, j], x[i, t, h, j + half]
            rotated = tirx.Select(d < half, c * x1 - sn * x2, c * x2 + sn * x1)
            return tirx.Select(tirx.all(h < heads, d < 2 * half), rotated, x[i, t, h, d])

        return te.compute(x.shape, value, name="rope")

    return op.tensor_expr_op(rope, "rope", [qkv, positions])


def rms_norm(cfg: DecoderConfig, width: int) -> nn.Module:
    return nn.RMSNorm(width, -1, cfg.rms_norm_eps, bias=False)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, i: int) -> None:
        self.cfg = cfg
        # RoPE in the graph, not in the cache: this layer's table, or None (the cache rotates, or a NoPE layer)
        self.table = None if cfg.cache_rotates or cfg.layer_rope[i] < 0 else cfg.layer_rope[i]
        self.h_q, self.h_kv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        width = (self.h_q + 2 * self.h_kv) * self.d
        self.qkv = linear(cfg, f"layers.{i}.self_attn.q_proj", cfg.hidden_size, width, cfg.qkv_bias)  # q, k, v rows
        self.o_proj = linear(cfg, f"layers.{i}.self_attn.o_proj", self.h_q * self.d, cfg.hidden_size)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # over each head's d channels, before q and k rotate
            self.q_norm = rms_norm(cfg, self.d)
            self.k_norm = rms_norm(cfg, self.d)

    def forward(self, x: Tensor, kv: PagedKVCache, layer: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv(x), (b, s, self.h_q + 2 * self.h_kv, self.d))  # [b, s, hq + 2 hkv, d]
        if self.qk_norm:
            q, k, v = op.split(qkv, [self.h_q, self.h_q + self.h_kv], axis=2)  # [b, s, hq | hkv | hkv, d]
            qkv = op.concat([self.q_norm(q), self.k_norm(k), v], dim=2)
        if self.table is not None:
            qkv = rotary(self.cfg, self.table, qkv, kv.get_query_positions(b * s))
        out = kv.attention_with_fused_qkv(layer, qkv, self.h_q, sm_scale=self.cfg.attn_scale or self.d**-0.5)
        return self.o_proj(op.reshape(out, (b, s, self.h_q * self.d)))  # out: [b, s, hq, d]


class MLP(nn.Module):
    """Gated MLP (SiLU, or Gemma's tanh-approximated GELU); gate and up are one fused projection unless a mixed plan
    gave them different widths."""

    def __init__(self, cfg: DecoderConfig, i: int) -> None:
        inter, hid, pre = cfg.intermediate_size, cfg.hidden_size, f"layers.{i}.mlp."
        self.act = cfg.act
        self.fused = cfg.bits_of(pre + "gate_proj") == cfg.bits_of(pre + "up_proj")
        if self.fused:
            self.gate_up = linear(cfg, pre + "gate_proj", hid, 2 * inter)  # gate rows, then up rows
        else:
            self.gate_proj = linear(cfg, pre + "gate_proj", hid, inter)
            self.up_proj = linear(cfg, pre + "up_proj", hid, inter)
        self.down_proj = linear(cfg, pre + "down_proj", inter, hid)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:
            gate, up = op.split(self.gate_up(x), 2, axis=-1)  # 2 x [b, s, inter]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        act = op.gelu(gate, approximate="tanh") if self.act == "gelu_tanh" else op.silu(gate)
        return self.down_proj(act * up)


class Layer(nn.Module):
    """A pre-norm block; with ``post_norms`` (Gemma 3) each sublayer's output is normed again before its residual
    add."""

    def __init__(self, cfg: DecoderConfig, i: int) -> None:
        self.input_layernorm = rms_norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg, i)
        self.post_attention_layernorm = rms_norm(cfg, cfg.hidden_size)  # the MLP's input norm, unless post_norms
        self.mlp = MLP(cfg, i)
        self.post_norms = cfg.post_norms
        if cfg.post_norms:
            self.pre_feedforward_layernorm = rms_norm(cfg, cfg.hidden_size)
            self.post_feedforward_layernorm = rms_norm(cfg, cfg.hidden_size)

    def forward(self, x: Tensor, kv: PagedKVCache, layer: int) -> Tensor:
        if self.post_norms:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), kv, layer))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), kv, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """A causal LM: embedding, decoder layers, final norm, lm_head (tied or not, float or quantized)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        self.cfg = cfg
        head_bits = cfg.bits_of("lm_head")
        if head_bits and not cfg.tie_word_embeddings:
            raise ValueError("a quantized lm_head is only supported shared with the embedding (tied)")
        if head_bits:  # one quantized matrix: the lm_head's matmul and the embedding's row gather
            self.lm_head = QLinear(cfg.hidden_size, cfg.vocab_size, head_bits, cfg.head_group, int8_dot=cfg.int8_dot)
        else:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
            if not cfg.tie_word_embeddings:
                self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.layers = nn.ModuleList([Layer(cfg, i) for i in range(cfg.num_layers)])
        self.norm = rms_norm(cfg, cfg.hidden_size)

    def _embed(self, ids: Tensor) -> Tensor:
        b, s = ids.shape
        flat = op.reshape(ids, (b * s,))  # [b*s]
        if self.cfg.bits_of("lm_head"):
            x = self.lm_head.rows(flat)
        else:
            x = self.embed_tokens(flat)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        return op.reshape(x, (b, s, self.cfg.hidden_size))  # [b, s, hidden]

    def _logits(self, h: Tensor) -> Tensor:
        if self.cfg.bits_of("lm_head") or not self.cfg.tie_word_embeddings:
            return self.lm_head(h)  # [b, s, V]
        return op.matmul(h, op.permute_dims(self.embed_tokens.weight))  # [b, s, V]

    def _body(self, ids: Tensor, kv: PagedKVCache) -> Tensor:
        x = self._embed(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, kv, i)
        return self.norm(x)  # [b, s, hidden]

    def prefill(self, input_ids: Tensor, kv: PagedKVCache):
        h = self._body(input_ids, kv)

        def last(x: te.Tensor) -> te.Tensor:
            b, s, d = x.shape
            return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="last_token")

        return self._logits(op.tensor_expr_op(last, "last_token", [h])), kv

    def prefill_all(self, input_ids: Tensor, kv: PagedKVCache):
        return self._logits(self._body(input_ids, kv)), kv

    def decode(self, input_ids: Tensor, kv: PagedKVCache):
        return self._logits(self._body(input_ids, kv)), kv

    def create_kv_cache(self, max_batch_size: tirx.Var, max_total_seq_len: tirx.Var, prefill_chunk_size: tirx.Var,
                        page_size: tirx.Var, support_sliding_window: tirx.Var) -> PagedKVCache:
        import tvm

        from edgelm.converters.tvm_kvcache import cpu_kernels

        c = self.cfg
        windows = c.layer_window or (0,) * c.num_layers
        # edgelm's RoPE (transformers' frequencies) and decode attention: TVM's are scalar and several times slower
        with cpu_kernels(c.rope_tables[0], c.rope_scales[0]):
            kv = TIRPagedKVCache(
                attn_kind=["mha_sliding" if w else "mha" for w in windows], max_batch_size=max_batch_size,
                max_total_seq_len=max_total_seq_len, prefill_chunk_size=prefill_chunk_size, page_size=page_size,
                support_sliding_window=support_sliding_window, layer_sliding_window_size=max(windows) or 1024,
                layer_partition=rx.ShapeExpr([0, c.num_layers]), num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads, qk_head_dim=c.head_dim,
                v_head_dim=c.head_dim, mla_original_qk_head_dim=0, mla_original_v_head_dim=0,
                rope_mode=RopeMode.NORMAL if c.cache_rotates else RopeMode.NONE,  # else RoPE in the graph, per layer
                rope_scale=1, rope_theta=c.rope_theta, rope_scaling={}, rope_ext_factors=rx.prim_value(0),
                rotary_dim=c.head_dim, enable_disaggregation=False, dtype="float32", target=tvm.target.Target.current(),
            )
        return kv

    def spec(self) -> nn.spec.ModuleSpec:
        ids = {"input_ids": nn.spec.Tensor([1, "seq_len"], "int32"), "kv": nn.spec.Object(object_type=PagedKVCache),
               "$": {"param_mode": "packed", "effect_mode": "none"}}
        one = {**ids, "input_ids": nn.spec.Tensor([1, 1], "int32")}
        return {
            "prefill": ids, "prefill_all": dict(ids), "decode": one,
            "create_kv_cache": {"max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                                "page_size": int, "support_sliding_window": int,
                                "$": {"param_mode": "none", "effect_mode": "none"}},
        }
