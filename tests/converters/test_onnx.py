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



def _graph_signature(folder):
    """Every initializer's bytes and every node's op, name, inputs, outputs and attributes."""
    import onnx_ir as ir

    m = ir.load(str(folder / "model.onnx"))
    inits = {k: v.const_value.tobytes() for k, v in m.graph.initializers.items()}
    nodes = sorted((n.op_type, n.name, tuple(v.name if v is not None else "" for v in n.inputs),
                    tuple(o.name for o in n.outputs), tuple(sorted((k, str(a.value)) for k, a in n.attributes.items())))
                   for n in m.graph)
    return inits, nodes, [o.name for o in m.graph.outputs]


@pytest.mark.parametrize("preset, precision", [("gptq-int4-g32", "int8"), ("int8", "int4")])
def test_the_float_rest_is_quantized_apart_with_the_same_result(quantized, tmp_path, preset, precision):
    """edgelm's builder quantizes what a checkpoint left float on a model of those nodes alone (not a copy of the
    whole graph); the ONNX it writes equals the builder's own, tensor for tensor and node for node."""
    import subprocess
    import sys

    from edgelm.converters.onnx import build_onnx

    folder, _ = quantized(preset)
    build_onnx(folder, tmp_path / "ours", precision, tmp_path)
    own = ("import runpy, sys\nimport edgelm.converters.onnx_builder as b\n"
           "b.patch_nope_layers(); b.patch_longrope_type(); b.patch_gemma3()\n"
           "runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__', alter_sys=True)\n")
    r = subprocess.run([sys.executable, "-c", own, "-i", str(folder), "-o", str(tmp_path / "theirs"), "-p", precision,
                        "-e", "cpu", "-c", str(tmp_path / "cache")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert _graph_signature(tmp_path / "ours") == _graph_signature(tmp_path / "theirs")
