"""edgelm's CPU decode-attention kernel: the same outputs as a plain softmax attention over the paged cache, and as
TVM's own kernel, for contexts that end inside a page, on a page boundary, and over scattered pages."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from edgelm.converters import tvm as T  # noqa: E402
from edgelm.converters.tvm_attention import decode_attention  # noqa: E402

H_KV, H_QO, D, PS = 3, 9, 64, 16


def reference(q: np.ndarray, pages: np.ndarray, order: np.ndarray, ctx: int) -> np.ndarray:
    k = pages[order, 0].transpose(1, 0, 2, 3).reshape(H_KV, -1, D)[:, :ctx]  # [h_kv, ctx, D]
    v = pages[order, 1].transpose(1, 0, 2, 3).reshape(H_KV, -1, D)[:, :ctx]
    out = np.zeros((H_QO, D), np.float64)
    for h in range(H_QO):
        s = k[h // (H_QO // H_KV)] @ q[h] / np.sqrt(D)  # [ctx]
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v[h // (H_QO // H_KV)]
    return out


@pytest.fixture(scope="module")
def kernels():
    from tvm.relax.frontend.nn.llm._decode_kernels import _attention_decode_cpu

    target = T.tvm_target(T.get_arch(""), threads=1)
    build = lambda f: tvm.compile(tvm.IRModule({"main": f}), target=target)["batch_decode_paged_kv_cpu"]  # noqa: E731
    return {"edgelm": build(decode_attention(H_KV, H_QO, D, "float32", PS)),
            "tvm": build(_attention_decode_cpu(H_KV, H_QO, D, "float32", False, {}))}


@pytest.mark.parametrize("ctx", [1, 15, 16, 17, 100, 300])
def test_decode_attention_matches_softmax_attention(kernels, ctx):
    rng = np.random.default_rng(ctx)
    n_pages = -(-ctx // PS)
    order = rng.permutation(n_pages + 3)[:n_pages].astype("int32")  # the sequence's pages, scattered
    pages = rng.standard_normal((n_pages + 3, 2, H_KV, PS, D)).astype("float32")
    last = ctx - (n_pages - 1) * PS
    pages[order[-1], :, :, last:] = np.nan  # slots past the end may hold anything
    q = rng.standard_normal((1, H_QO, D)).astype("float32")
    want = reference(q[0], np.nan_to_num(pages), order, ctx)
    got = {}
    for name, fn in kernels.items():
        a = lambda x: tvm.runtime.tensor(x, tvm.cpu())  # noqa: E731
        out, lse = a(np.zeros((1, H_QO, D), "float32")), a(np.zeros((1, H_QO), "float32"))
        fn(a(q), a(pages), a(np.array([0, n_pages], "int32")), a(order), a(np.array([last], "int32")),
           a(np.zeros(1, "int32")), a(np.array([ctx - 1], "int32")), out, lse, 0, 1.0, 10000.0, 1 / np.sqrt(D))
        got[name] = out.numpy()[0]
    np.testing.assert_allclose(got["edgelm"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["edgelm"], got["tvm"], rtol=1e-5, atol=1e-5)
