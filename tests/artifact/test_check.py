"""The export check of exact packs catches a mispacked group: one group's scale flipped in the packed file fails it
(its read-back decodes every packed linear from the file; the runtime's logits then show it on TVM's fp32 math)."""
from __future__ import annotations

import pytest

from edgelm.artifact.api import export
from edgelm.artifact.check import ParityError, check_artifact
from edgelm.quant.presets import get_preset
from edgelm.registry import TARGETS

CHECK = dict(eval_seqs=4, eval_seqlen=64, prompts=2, new_tokens=8)


def _flip_gguf(folder) -> None:
    import gguf

    r = gguf.GGUFReader(str(folder / "model.gguf"), "r+")
    (t,) = [t for t in r.tensors if t.name == "blk.1.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
    t.data.reshape(-1, 18)[7, 1] ^= 0x80  # the sign bit of the 8th block's fp16 scale
    r.data.flush()


def _flip_onnx(folder) -> None:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(folder / "model.onnx"))
    (init,) = [t for t in m.graph.initializer if t.name == "model.layers.1.mlp.down_proj.MatMulNBits.scales"]
    a = numpy_helper.to_array(init).copy()
    a[7] *= -1
    init.CopyFrom(numpy_helper.from_array(a, init.name))
    (folder / "model.onnx.data").unlink()
    onnx.save_model(m, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")


def _flip_tvm(folder) -> None:
    from safetensors.numpy import load_file, save_file

    params = load_file(str(folder / "params.safetensors"))
    (name,) = [n for n in params if n == "layers.1.mlp.down_proj.scales"]
    params[name].reshape(-1)[7] *= -1
    save_file(params, str(folder / "params.safetensors"))


@pytest.mark.parametrize("target, flip", [("gguf", _flip_gguf), ("onnx", _flip_onnx), ("tvm", _flip_tvm)])
def test_one_flipped_group_scale_fails_the_check(target, flip, tmp_path, quantized, tiny_q_model, tiny_corpus):
    preset, data = get_preset("gptq-int4-g32"), (str(tiny_corpus),)
    src = quantized("gptq-int4-g32")[0]
    out = tmp_path / "art"
    export(model=src, target=target, quant=preset.name, out=out, data=data, **CHECK)
    t = TARGETS.get(target)
    flip(out)
    rt = t.open(out)
    try:
        with pytest.raises(ParityError, match="pack check failed: model.layers.1.mlp.down_proj in the artifact is "
                                              "not the checkpoint's codes and scales"):
            check_artifact(rt, preset, str(tiny_q_model), logit_atol=t.logit_atol, data=data, checkpoint=src,
                           exact_atol=t.exact_atol, as_packed=t.packed_transforms(src),
                           read_back=t.read_back(out, src), **CHECK)
        if target == "tvm":  # its fp32 math shows the flip in the logits too
            with pytest.raises(ParityError, match="pack check failed: .* max .logit diff. .*does not run as the"):
                check_artifact(rt, preset, str(tiny_q_model), logit_atol=t.logit_atol, data=data, checkpoint=src,
                               exact_atol=t.exact_atol, as_packed=t.packed_transforms(src), **CHECK)
    finally:
        getattr(rt, "close", lambda: None)()
