"""onnxruntime-genai's model builder as edgelm's ONNX export runs it (``python -m edgelm.converters.onnx_builder ARGS``,
the builder's own arguments), with one fix: SmolLM3's NoPE layers.

The builder (0.18) marks a NoPE layer by turning RoPE-inside-attention off, which sends it down the path of a
separate RotaryEmbedding op (so the layer would still rotate) whose ``position_ids`` input it has already removed: the
export stops with ``KeyError: 'position_ids'``. Here such a layer gets no RoPE at all, as transformers computes it.
"""
from __future__ import annotations

import runpy


def patch_nope_layers() -> None:
    import onnxruntime_genai.models  # noqa: F401  (puts its folder on sys.path: the builder imports `builders`)
    from builders.smollm import SmolLM3Model  # the builder's own import path, so its class is the one patched

    original = SmolLM3Model.make_attention

    def make_attention(self, layer_id, attention, root_input, **kwargs):
        rope = self.attention_attrs["rope"]
        if not self.no_rope_layers[layer_id]:
            self.attention_attrs["rope"] = False  # no RotaryEmbedding op, no cos/sin caches, GQA's do_rotary 0
        try:
            original(self, layer_id, attention, root_input, **kwargs)
        finally:
            self.attention_attrs["rope"] = rope

    SmolLM3Model.make_attention = make_attention


if __name__ == "__main__":
    patch_nope_layers()
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
