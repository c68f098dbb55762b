"""The decoder's int8-activation kernel for one token through a quantized linear (``int8_qgemv``): it computes
llama.cpp's Q4 x Q8 and Q8 x Q8 dot products exactly, for the codes, scales and zero points ``QLinear`` stores."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from edgelm.converters import tvm as T  # noqa: E402
from edgelm.converters.tvm_llama import int8_qgemv  # noqa: E402

G = 32


def q8_reference(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """x [K] rounded to int8 per group of G (Q8_0's d = max|x| / 127, round half to even, in float32), then
    y[o] = sum_g scale * d * (sum code * xq - zero * sum xq), in float64."""
    xg = x.reshape(-1, G)  # [K/G, G]
    amax = np.abs(xg).max(1)  # [K/G]
    inv = np.float32(127) / np.where(amax > 0, amax, np.float32(1))
    xq = np.where(amax[:, None] > 0, np.rint(xg * inv[:, None]), 0).astype(np.int64)  # [K/G, G]
    dot = np.einsum("ngj,gj->ng", codes.reshape(codes.shape[0], -1, G).astype(np.int64), xq)  # [N, K/G]
    d = (amax / np.float32(127)).astype(np.float64)
    return (scales.astype(np.float64) * d * (dot - zeros.astype(np.float64) * xq.sum(1))).sum(1)


@pytest.mark.skipif("+avx512vnni" not in T.host_features(), reason="needs an x86-64 CPU with AVX-512 VNNI")
@pytest.mark.parametrize("bits, n_in, n_out", [(4, 96, 48), (4, 576, 960), (8, 96, 48), (8, 576, 960)])
def test_int8_qgemv_is_the_q8_dot_product(bits, n_in, n_out):
    rng = np.random.default_rng(n_in + bits)
    codes = rng.integers(0, 1 << bits, (n_out, n_in)).astype(np.uint8)
    scales = (rng.random((n_out, n_in // G)) * 0.05).astype(np.float16)
    zeros = rng.integers(0, 1 << bits, (n_out, n_in // G)).astype(np.uint8)  # asymmetric: the zero point matters
    x = rng.standard_normal(n_in).astype(np.float32) * rng.choice([0.01, 1.0, 30.0], n_in).astype(np.float32)
    x[G:2 * G] = 0  # a group of zeros: scale 0, no division by it
    f = int8_qgemv(n_in, n_out, G, bits).with_attr("global_symbol", "main")
    fn = tvm.compile(tvm.IRModule({"main": f}), target=T.tvm_target(T.get_arch(""), threads=1))["main"]
    a = [tvm.runtime.tensor(v, tvm.cpu()) for v in (
        x.reshape(1, 1, n_in), T.interleave_rows(T.pack_codes(codes, bits), 16).copy(),
        T.interleave_rows(scales, 16).copy(), T.interleave_rows(zeros, 16).copy())]
    y = tvm.runtime.tensor(np.full((1, 1, n_out), np.nan, np.float32), tvm.cpu())
    fn(*a, y)
    got = y.numpy().ravel()
    want = q8_reference(x, codes, scales, zeros)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    exact = (scales.astype(np.float64).repeat(G, 1) * (codes.astype(np.float64) - zeros.repeat(G, 1))) @ x
    assert np.abs(got - exact).max() > 1e-4 * np.abs(exact).max()  # it did round x (else the reference is moot)
