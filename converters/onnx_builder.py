"""onnxruntime-genai's model builder as edgelm's ONNX export runs it (``python -m edgelm.converters.onnx_builder ARGS``,
the builder's own arguments), with what it gets wrong for configs that transformers 5 writes fixed:

- SmolLM3's NoPE layers. The builder (0.18) marks one by turning RoPE-inside-attention off, which sends it down the
  path of a separate RotaryEmbedding op (so the layer would still rotate) whose ``position_ids`` input it has already
  removed: the export stops with ``KeyError: 'position_ids'``. Here such a layer gets no RoPE at all, as transformers
  computes it.
- Phi-3's LongRoPE. The builder reads the legacy ``rope_scaling["type"]``, which a transformers 5 config has as
  ``rope_type`` only (``KeyError: 'type'``).
- Gemma 3's RoPE. transformers 5 nests it per layer type (``rope_parameters["full_attention"]``,
  ``["sliding_attention"]``); the builder's Gemma 3 reads the flat form and ``rope_local_base_freq``
  (``KeyError: 'rope_type'``); and it builds the sliding layers' cos/sin with the global layers' linear scaling
  (Gemma 3 4B's factor 8), which transformers applies to the global layers only. Its embedding scale is sqrt(hidden)
  rounded to two decimals; transformers' is not.
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


def patch_longrope_type() -> None:
    import onnxruntime_genai.models  # noqa: F401
    from builders.phi import Phi3MiniLongRoPEModel

    original = Phi3MiniLongRoPEModel.make_rope_init

    def make_rope_init(self, config):
        params = config.rope_parameters
        if isinstance(params, dict) and "rope_type" in params:
            params.setdefault("type", params["rope_type"])  # "longrope": the builder's magnitude-scaling policy
        original(self, config)

    Phi3MiniLongRoPEModel.make_rope_init = make_rope_init


def patch_gemma3() -> None:
    import math

    import numpy as np
    import onnxruntime_genai.models  # noqa: F401
    from builders.gemma import Gemma3Model

    original = Gemma3Model.__init__

    def __init__(self, config, *args, **kwargs):
        params = config.rope_parameters
        if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
            config.rope_local_base_freq = params["sliding_attention"]["rope_theta"]
            config.rope_parameters = dict(params["full_attention"])  # the global layers' (and their scaling)
            config.rope_theta = config.rope_parameters["rope_theta"]
        original(self, config, *args, **kwargs)
        self.embed_attrs["scale"] = float(np.float32(math.sqrt(self.hidden_size)))  # as transformers scales

    def make_rotary_embedding_multi_cache(self):
        # the builder's own two caches (global, then local with the local theta), the local one without the global
        # layers' scaling
        base = super(Gemma3Model, self)
        self.cos_cache_global_name, self.sin_cache_global_name = "cos_cache_global", "sin_cache_global"
        base.make_rotary_embedding_caches(cos_cache_name=self.cos_cache_global_name,
                                          sin_cache_name=self.sin_cache_global_name)
        self.rope_attrs["create_caches"] = True
        self.rope_attrs["theta"] = self.rope_local_theta
        factors, self.rope_attrs["rescale_factors"] = self.rope_attrs["rescale_factors"], 1
        self.cos_cache_local_name, self.sin_cache_local_name = "cos_cache_local", "sin_cache_local"
        try:
            base.make_rotary_embedding_caches(cos_cache_name=self.cos_cache_local_name,
                                              sin_cache_name=self.sin_cache_local_name)
        finally:
            self.rope_attrs["rescale_factors"] = factors

    Gemma3Model.__init__ = __init__
    Gemma3Model.make_rotary_embedding_multi_cache = make_rotary_embedding_multi_cache


if __name__ == "__main__":
    patch_nope_layers()
    patch_longrope_type()
    patch_gemma3()
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
