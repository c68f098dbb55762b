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
- Memory. To quantize what a GPTQ checkpoint left float (the lm_head), the builder's ``to_nbits`` serialized the
  whole graph with ``ir.to_proto`` and ran onnxruntime's quantizer on that copy: +4.6 GB at 1B parameters, most of
  the export's 6.2 GB peak. Here the same quantizer, with the same settings, runs on a model of only the nodes it
  may quantize, and its nodes and tensors are put back into the graph.
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


def _weight_index(node) -> int:
    return 0 if node.op_type == "Gather" else 1


def patch_nbits_subgraph() -> None:
    import onnx_ir as ir
    import onnxruntime_genai.models  # noqa: F401
    from builders.base import Model

    original = Model.to_nbits

    def to_nbits(self) -> ir.Model:
        graph = self.model.graph
        ops = set(self.quant_attrs["op_types_to_quantize"])
        nodes = [n for n in graph if n.op_type in ops and len(n.inputs) > _weight_index(n)
                 and n.inputs[_weight_index(n)] is not None and n.inputs[_weight_index(n)].const_value is not None
                 and not (n.op_type == "Gather" and self.quant_attrs["bits"] != 4)]  # the quantizer skips those
        if (not nodes or getattr(self, "exact_quant_override_names", None)
                or getattr(self, "tied_quantized_embeddings", False)):
            return original(self)  # names resolved across the whole graph: the builder's own way
        # a model of the candidate nodes alone; the tensors are shared, not copied
        values: dict[str, ir.Value] = {}  # name -> its twin in the small model
        sub_nodes, inputs, inits = [], [], []
        for n in nodes:
            ins = []
            for i, v in enumerate(n.inputs):
                if v.name not in values:
                    is_weight = i == _weight_index(n) or v.const_value is not None
                    values[v.name] = ir.Value(name=v.name, type=v.type, shape=v.shape,
                                              const_value=v.const_value if is_weight else None)
                    (inits if is_weight else inputs).append(values[v.name])
                ins.append(values[v.name])
            outs = [ir.Value(name=o.name, type=o.type, shape=o.shape) for o in n.outputs]
            sub_nodes.append(ir.Node(n.domain, n.op_type, ins, attributes=[ir.Attr(a.name, a.type, a.value)
                                                                            for a in n.attributes.values()],
                                     outputs=outs, name=n.name))
        sub = ir.Graph(inputs, [o for sn in sub_nodes for o in sn.outputs], nodes=sub_nodes, initializers=inits,
                       opset_imports=dict(graph.opset_imports), name="nbits")
        whole, self.model = self.model, ir.Model(sub, ir_version=self.model.ir_version)
        try:
            quantized = original(self)
        finally:
            self.model = whole
        made = {o.name: q for q in quantized.graph for o in q.outputs}
        for n in nodes:
            q = made[n.outputs[0].name]
            if q.op_type == n.op_type and q.domain == n.domain:
                continue  # left as it was (e.g. an 8-bit Gather, which MatMulNBits' quantizer skips)
            ins = []
            for v in q.inputs:
                if v is None:
                    ins.append(None)
                elif v.const_value is not None and v.name not in {x.name for x in n.inputs}:
                    new = ir.Value(name=v.name, type=v.type, shape=v.shape, const_value=v.const_value)
                    graph.register_initializer(new)
                    ins.append(new)
                else:  # an input the node already had (the activation)
                    ins.append(next(x for x in n.inputs if x is not None and x.name == v.name))
            new_node = ir.Node(q.domain, q.op_type, ins, attributes=[ir.Attr(a.name, a.type, a.value)
                                                                     for a in q.attributes.values()],
                               num_outputs=len(q.outputs), name=q.name)
            weight = n.inputs[_weight_index(n)]
            ir.convenience.replace_nodes_and_values(graph, n, [n], [new_node], list(n.outputs),
                                                    list(new_node.outputs))
            if not weight.uses() and weight.name in graph.initializers:
                graph.initializers.pop(weight.name)  # the float matrix, now held as codes
        return self.model

    Model.to_nbits = to_nbits


if __name__ == "__main__":
    patch_nbits_subgraph()
    patch_nope_layers()
    patch_longrope_type()
    patch_gemma3()
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
