"""edgelm's CPU kernels for TVM's paged KV cache: decode attention gives a plain softmax attention's outputs (and
TVM's kernel's) for contexts that end inside a page, on a page boundary and over scattered pages; RoPE gives
transformers' (every static scaling, partial rotary)."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from edgelm.converters import tvm as T  # noqa: E402
from edgelm.converters.tvm_kvcache import decode_attention, split_rotary  # noqa: E402

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


ROPES = {  # config extras: each a RoPE the kernel must rotate as transformers does
    "default": {},
    "llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}},
    "partial": {"partial_rotary_factor": 0.5},
}


@pytest.mark.parametrize("apply_rope", [1, 0])
@pytest.mark.parametrize("rope", list(ROPES))
def test_split_rotary_rotates_as_transformers(rope, apply_rope):
    """q/k rotated (or not) and v split as transformers' apply_rotary_pos_emb does with its own cos/sin: scaled
    frequencies, YaRN's cos/sin scale, a partial rotary's passed-through dimensions; default RoPE also as TVM's own
    kernel does."""
    import importlib

    import torch
    from transformers import AutoConfig
    from tvm.relax.frontend.nn.llm.position_embedding import llama_rope_with_position_map

    from edgelm.models.rope import rope_of

    model_type = "phi3" if rope == "partial" else "llama"  # Phi-3's rotary and apply_rotary_pos_emb rotate partially
    hf = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    cfg = AutoConfig.for_model(model_type, hidden_size=H_QO * D, num_attention_heads=H_QO, num_key_value_heads=H_KV,
                               max_position_embeddings=8192, **ROPES[rope])
    r = rope_of(cfg.to_dict())
    target = T.tvm_target(T.get_arch(""), threads=1)
    rng = np.random.default_rng(apply_rope)
    seq = 5
    qkv = rng.standard_normal((seq, H_QO + 2 * H_KV, D)).astype("float32")
    pos = np.array([0, 1, 17, 300, 4000], "int32")
    a = lambda x: tvm.runtime.tensor(x, tvm.cpu())  # noqa: E731
    kernels = [("edgelm", split_rotary(r.inv_freq, r.attention_scale, D, H_QO, H_KV, "float32"))]
    if rope == "default":
        kernels.append(("tvm", llama_rope_with_position_map(10000.0, 1.0, D, H_QO, H_KV, "float32", {}, D)))
    got = {}
    for name, f in kernels:
        fn = tvm.compile(tvm.IRModule({"main": f}), target=target)["main"]
        q, k, v = (a(np.zeros((seq, h, D), "float32")) for h in (H_QO, H_KV, H_KV))
        fn(a(qkv), a(pos), q, k, v, apply_rope)
        got[name] = [t.numpy() for t in (q, k, v)]
    x = torch.from_numpy(qkv[None, :, :H_QO + H_KV]).transpose(1, 2)  # [1, heads, seq, D]
    if apply_rope:
        rotary = getattr(hf, f"{'Phi3' if model_type == 'phi3' else 'Llama'}RotaryEmbedding")(cfg)
        cos, sin = rotary(x, torch.from_numpy(pos.astype(np.int64))[None])
        qx, kx = hf.apply_rotary_pos_emb(x[:, :H_QO], x[:, H_QO:], cos, sin)
        x = torch.cat([qx, kx], 1)
    want = x.transpose(1, 2)[0].numpy()  # [seq, heads, D]
    np.testing.assert_allclose(got["edgelm"][0], want[:, :H_QO], atol=1e-5)
    np.testing.assert_allclose(got["edgelm"][1], want[:, H_QO:], atol=1e-5)
    np.testing.assert_array_equal(got["edgelm"][2], qkv[:, H_QO + H_KV:])
    if "tvm" in got:  # TVM divides by theta ** (2j / D) where transformers multiplies: float32 angles at 4000 differ
        for want_t, have in zip(got["tvm"], got["edgelm"]):
            np.testing.assert_allclose(have, want_t, rtol=0, atol=2e-3)
