"""edgelm's CPU kernels for TVM's paged KV cache: decode attention, and the split of q/k/v with RoPE.

Decode attention. TVM 0.27's ``_attention_decode_cpu`` walks the cache one position at a time with scalar loops:
per position and query head it rescales the whole output row, calls exp2 twice and reads K and V element by element
(about 100 µs per layer for 9 heads at 192 positions here, a fifth of a decode step). This kernel keeps its
signature and its online softmax, but works a page (16 positions) at a time for all query heads that share a KV
head:

- q·k in vector lanes over the head dimension, one horizontal sum per position;
- the page's running max, one rescale of the output per page, not per position;
- p·V accumulated in vector lanes over the head dimension.

Only what edgelm's decoder uses is kept: no sliding window, RoPE applied before the cache (``RopeMode.NORMAL``, so
``rotary_mode`` must be 0; the kernel asserts it).

RoPE. TVM's ``llama_rope_with_position_map`` computes a power, a cosine and a sine for every element of every head
(2,300 calls per layer and token for 12 heads of 64), most of what its attention builtin costs per layer outside
the kernel above. Here each position computes its ``rotary_dim / 2`` angles once and all heads share them. The
frequencies are transformers' own (edgelm.models.rope), baked in as constants, so llama3, linear and YaRN scaling
and partial rotary come out as the PyTorch model rotates.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

LOG2E = math.log2(math.e)


def decode_attention(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, page_size: int = 16):
    """A PrimFunc with ``_attention_decode_cpu``'s arguments (the sliding-window-free form)."""
    from tvm.script import tirx as T

    H_kv, D, PS = num_kv_heads, head_dim, page_size
    G = num_qo_heads // num_kv_heads  # query heads per KV head
    L = 16 if D % 16 == 0 else (8 if D % 8 == 0 else 1)  # vector lanes over the head dimension

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "batch_decode_paged_kv_cpu"})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        indptr_off = T.int32()
        values_off = T.int32()
        k_rope_off = T.int32()
        q_rope_off = T.int32()
        length_off = T.int32()

        Q = T.match_buffer(Q_handle, (B, num_qo_heads, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, H_kv, PS, D), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=indptr_off)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=values_off)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_off)  # unused
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_off)  # unused
        output = T.match_buffer(output_handle, (B, num_qo_heads, D), dtype)
        lse = T.match_buffer(lse_handle, (B, num_qo_heads), "float32")
        last_page_len = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_off)

        assert rotary_mode == 0, "edgelm's decode attention expects RoPE applied before the cache (RopeMode.NORMAL)"
        for b in T.serial(B):
            with T.sblock("attn"):
                q = T.sblock_alloc_buffer((G, D), "float32")  # this KV head's query heads, scaled for exp2
                o = T.sblock_alloc_buffer((G, D), "float32")  # unnormalised output
                s = T.sblock_alloc_buffer((G, PS), "float32")  # one page's scores, then weights
                acc = T.sblock_alloc_buffer((L,), "float32")  # q·k partial sums, one per lane
                m = T.sblock_alloc_buffer((G,), "float32")  # running max (log2 units)
                den = T.sblock_alloc_buffer((G,), "float32")  # running sum of weights
                m_new = T.sblock_alloc_buffer((1,), "float32")
                rescale = T.sblock_alloc_buffer((1,), "float32")
                extent = T.sblock_alloc_buffer((2,), "int32")  # pages, positions (buffers: TVM's region check)

                first: T.let[T.int32] = page_table_indptr[b]
                extent[0] = page_table_indptr[b + 1] - first
                extent[1] = T.if_then_else(extent[0] > 0, (extent[0] - 1) * PS + last_page_len[b], 0)
                for hk in T.serial(H_kv):
                    for g, d in T.grid(G, D):
                        q[g, d] = T.cast(Q[b, hk * G + g, d], "float32") * sm_scale * T.float32(LOG2E)
                    for g in T.serial(G):
                        m[g] = T.float32(-5e4)
                        den[g] = T.float32(0)
                        for d in T.vectorized(D):
                            o[g, d] = T.float32(0)
                    for p in T.serial(extent[0]):
                        page: T.let[T.int32] = page_table_values[first + p]
                        rows: T.let[T.int32] = T.min(PS, extent[1] - p * PS)
                        for g in T.serial(G):
                            for r in T.serial(PS):
                                for lane in T.vectorized(L):
                                    acc[lane] = T.float32(0)
                                for d0 in T.serial(D // L):
                                    for lane in T.vectorized(L):
                                        acc[lane] = acc[lane] + q[g, d0 * L + lane] * T.cast(
                                            pages[page, 0, hk, r, d0 * L + lane], "float32")
                                s[g, r] = T.float32(-5e4)
                                if r < rows:
                                    s[g, r] = T.float32(0)
                                    for lane in T.serial(L):
                                        s[g, r] = s[g, r] + acc[lane]
                            m_new[0] = m[g]
                            for r in T.serial(PS):
                                m_new[0] = T.max(m_new[0], s[g, r])
                            rescale[0] = T.exp2(m[g] - m_new[0])
                            m[g] = m_new[0]
                            for r in T.serial(PS):
                                s[g, r] = T.exp2(s[g, r] - m_new[0])  # 0 for the rows past the end
                            den[g] = den[g] * rescale[0]
                            for r in T.serial(PS):
                                den[g] = den[g] + s[g, r]
                            for d in T.vectorized(D):
                                o[g, d] = o[g, d] * rescale[0]
                            for r in T.serial(PS):
                                if r < rows:  # never the rows past the end: they may hold anything
                                    for d in T.vectorized(D):
                                        o[g, d] = o[g, d] + s[g, r] * T.cast(pages[page, 1, hk, r, d], "float32")
                    for g in T.serial(G):
                        for d in T.vectorized(D):
                            output[b, hk * G + g, d] = T.cast(
                                T.if_then_else(den[g] > 0, o[g, d] / den[g], T.float32(0)), dtype)
                        lse[b, hk * G + g] = m[g] + T.log2(den[g])

    return batch_decode_paged_kv


def table(values: "Sequence[float]", j, start: int = 0):
    """values[j - start] for a TIR index ``j`` into a constant float32 table: a balanced tree of selects (a PrimFunc
    that the KV cache calls takes no constant buffer)."""
    from tvm import tirx

    if len(values) == 1:
        return tirx.const(values[0], "float32")
    mid = len(values) // 2
    return tirx.Select(j < start + mid, table(values[:mid], j, start), table(values[mid:], j, start + mid))


def split_rotary(inv_freq: "Sequence[float]", attention_scale: float, head_dim: int, num_q_heads: int,
                 num_kv_heads: int, dtype: str):
    """A PrimFunc with ``llama_rope_with_position_map``'s arguments: qkv [seq, q + 2 kv heads, D] -> q, k (rotated)
    and v. The first ``2 * len(inv_freq)`` dimensions of a head rotate (fewer than D: partial rotary), as
    transformers does: angle pos * inv_freq[j] in float32, cos and sin times ``attention_scale`` (YaRN's), the pair
    (j, j + half) rotated; the other dimensions pass."""
    from tvm.script import tirx as T

    D, half = head_dim, len(inv_freq)
    Hq, Hkv = num_q_heads, num_kv_heads
    freqs = [float(f) for f in inv_freq]
    mscale = float(attention_scale)

    @T.prim_func(s_tir=True)
    def split_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle,
                   var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int32()
        pos_off = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, Hq + 2 * Hkv, D), dtype)
        q = T.match_buffer(var_q, (seq_len, Hq, D), dtype)
        k = T.match_buffer(var_k, (seq_len, Hkv, D), dtype)
        v = T.match_buffer(var_v, (seq_len, Hkv, D), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=pos_off)
        for s in T.serial(seq_len):
            with T.sblock("split_rope"):
                cos = T.sblock_alloc_buffer((half,), "float32")  # this position's angles, shared by every head
                sin = T.sblock_alloc_buffer((half,), "float32")
                out = T.sblock_alloc_buffer((Hq + Hkv, D), "float32")  # q and k heads, rotated
                for j in T.serial(half):
                    freq: T.let[T.float32] = T.cast(position_map[s], "float32") * table(freqs, j)
                    cos[j] = T.cos(freq) * T.float32(mscale)
                    sin[j] = T.sin(freq) * T.float32(mscale)
                for h in T.serial(Hq + Hkv):  # q heads, then k heads
                    for d in T.vectorized(half):
                        x1: T.let[T.float32] = T.cast(qkv[s, h, d], "float32")
                        x2: T.let[T.float32] = T.cast(qkv[s, h, d + half], "float32")
                        if apply_rope > 0:
                            out[h, d] = cos[d] * x1 - sin[d] * x2
                            out[h, d + half] = cos[d] * x2 + sin[d] * x1
                        else:
                            out[h, d] = x1
                            out[h, d + half] = x2
                    for d in T.serial(D - 2 * half):  # partial rotary: the rest of the head as it is
                        out[h, 2 * half + d] = T.cast(qkv[s, h, 2 * half + d], "float32")
                for h in T.serial(Hq):
                    for d in T.vectorized(D):
                        q[s, h, d] = T.cast(out[h, d], dtype)
                for h in T.serial(Hkv):
                    for d in T.vectorized(D):
                        k[s, h, d] = T.cast(out[Hq + h, d], dtype)
                for h in T.serial(Hkv):
                    for d in T.vectorized(D):
                        v[s, h, d] = qkv[s, Hq + Hkv + h, d]

    return split_rope


@contextlib.contextmanager
def cpu_kernels(inv_freq: "Sequence[float]", attention_scale: float = 1.0) -> Iterator[None]:
    """While open, a ``TIRPagedKVCache`` being built gets edgelm's decode attention and RoPE kernels in place of
    TVM's (kv_cache.py takes its kernel builders from module globals): the RoPE of ``inv_freq`` (transformers'
    frequencies, any static scaling) and ``attention_scale``. They are CPU kernels: edgelm's TVM target builds only
    ``llvm`` libraries. A sliding window keeps TVM's decode attention."""
    from tvm.relax.frontend.nn.llm import kv_cache

    stock_decode, stock_rope = kv_cache._attention_decode_cpu, kv_cache.llama_rope_with_position_map

    def decode(num_kv_heads, num_qo_heads, head_dim, dtype, sliding_window, rope_scaling, page_size=16):
        if sliding_window:
            return stock_decode(num_kv_heads, num_qo_heads, head_dim, dtype, sliding_window, rope_scaling, page_size)
        return decode_attention(num_kv_heads, num_qo_heads, head_dim, dtype, page_size)

    def rope(theta, scale, head_dim, num_q_heads, num_kv_heads, dtype, rope_scaling, rotary_dim=None):
        return split_rotary(inv_freq, attention_scale, head_dim, num_q_heads, num_kv_heads, dtype)

    kv_cache._attention_decode_cpu, kv_cache.llama_rope_with_position_map = decode, rope
    try:
        yield
    finally:
        kv_cache._attention_decode_cpu, kv_cache.llama_rope_with_position_map = stock_decode, stock_rope
