"""ONNX converter: GPTQ codes and scales go into MatMulNBits unchanged; a truncated model is a clear error."""
from __future__ import annotations

import numpy as np
import pytest

from edgelm.errors import EdgelmError


def test_matmulnbits_holds_gptq_values(quantized, tmp_path):
    import onnx
    from edgelm.converters.onnx import build_onnx
    from onnx import numpy_helper

    from edgelm.models.qformat import read_quantized

    folder, _ = quantized("gptq-int4-g32")
    out = tmp_path / "onnx"
    build_onnx(folder, out, "int8", tmp_path)
    g = onnx.load(str(out / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i, base_dir=str(out)) for i in g.graph.initializer}
    _, _, qlinears = read_quantized(folder)
    for layer in range(2):
        for proj in ("mlp.down_proj", "mlp.gate_proj", "attn.o_proj"):
            ql = qlinears[f"model.layers.{layer}.{proj.replace('attn.', 'self_attn.')}"]
            b = inits[f"model.layers.{layer}.{proj}.MatMulNBits.qweight"]  # [N, blocks, 16] uint8
            codes = np.stack([b & 0xF, b >> 4], -1).reshape(b.shape[0], -1)  # low nibble first
            scales = inits[f"model.layers.{layer}.{proj}.MatMulNBits.scales"].reshape(ql.scales.shape)
            zp = inits[f"model.layers.{layer}.{proj}.MatMulNBits.qzeros"]
            assert np.array_equal(codes, ql.codes.numpy())
            assert np.array_equal(scales.astype(np.float16), ql.scales.numpy())
            assert (zp == 0x88).all()  # zero point 8 in both nibbles


def test_truncated_onnx_is_a_clear_error(tiny_q_model, tmp_path):
    from edgelm.converters.onnx import build_onnx, op_counts
    from edgelm.runtimes.onnxrt import OnnxRuntime

    out = tmp_path / "onnx"
    build_onnx(tiny_q_model, out, "fp32", tmp_path)
    p = out / "model.onnx"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(EdgelmError, match="truncated"):
        op_counts(p)
    with pytest.raises(EdgelmError, match="corrupt"):
        OnnxRuntime(out).logits([1, 2, 3])

