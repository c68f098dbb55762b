"""ONNX through onnxruntime-genai's model builder (GroupQueryAttention, KV cache, MatMulNBits).

optimum-onnx pins transformers < 4.58, so it is not used. The builder reads GPTQ-format checkpoints and re-exports
their codes and scales into MatMulNBits unchanged; ``-p`` then applies only to what the checkpoint left float.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    import numpy as np

    from edgelm.finetune.adapter import Adapter

    from edgelm.converters.source import SourceWeights

log = logging.getLogger(__name__)


def build_onnx(src: Path, out: Path, precision: str, work: Path, extra: dict[str, Any] | None = None) -> list[str]:
    """Run the builder in a child process (it prints a lot and holds the model twice; edgelm.converters.onnx_builder
    fixes what it gets wrong); raise with its last line.
    Returns notes on where the artifact differs from the HF model (a context capped by its arch)."""
    from edgelm.models.archs import get_arch
    from edgelm.models.loader import read_config

    from edgelm.models.rope import rope_of

    cfg = read_config(src)
    context, note = get_arch(cfg.get("model_type"), str(src)).export_context(cfg, "onnx")
    for layer_type in dict.fromkeys(cfg.get("layer_types") or [None]):
        rope_of(cfg, layer_type)  # a RoPE no target can bake (dynamic) is refused before the builder runs
    if note or any(get_arch(cfg.get("model_type"), str(src)).windows(cfg)):
        extra = {**(extra or {}), "windowed_kv_cache": "false"}  # the cache holds the (capped) context plainly
    log_path = work / "onnx_builder.log"
    args = [sys.executable, "-m", "edgelm.converters.onnx_builder", "-i", str(src), "-o", str(out), "-p", precision,
            "-e", "cpu", "-c", str(work / "builder-cache")]
    if extra:
        args += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w", encoding="utf-8") as logf:
        rc = subprocess.run(args, stdout=logf, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not (out / "model.onnx").is_file():
        lines = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
        if any("No module named 'onnxruntime_genai'" in ln or "No module named 'onnx_ir'" in ln for ln in lines):
            raise EdgelmError("onnxruntime-genai (with onnx_ir) is not installed; pip install 'edgelm[onnx]'")
        from edgelm.fsutil import keep_log

        raise EdgelmError(f"the ONNX builder failed (exit {rc}): {lines[-1][:300] if lines else 'no output'} "
                          f"(full log: {keep_log(log_path, 'onnx-builder')})")
    if (extra or {}).get("shared_embeddings") == "true":
        reshape_shared_gather(out / "model.onnx")
    if note:
        _cap_context(out / "genai_config.json", context)
        log.warning("ONNX: %s", note)
    return [note] if note else []


def reshape_shared_gather(model_path: Path) -> int:
    """Make the builder's shared embedding load: when GatherBlockQuantized reuses a pre-quantized lm_head's
    MatMulNBits scales and zero points (flat, [N * blocks]), onnxruntime wants them [N, blocks]; insert Reshape
    nodes (the initializers stay shared on disk). Rewrites the graph file only; returns the nodes fixed."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(model_path), load_external_data=False)
    rows = _logits_width(m)  # the gathered matrix's rows
    inits = {i.name: i for i in m.graph.initializer}
    fixed = 0
    for node in [n for n in m.graph.node if n.op_type == "GatherBlockQuantized"]:
        for slot in (2, 3):  # scales, zero points
            if slot >= len(node.input) or node.input[slot] not in inits or len(inits[node.input[slot]].dims) != 1:
                continue
            name = node.input[slot]
            shape = numpy_helper.from_array(np.array([rows, -1], dtype=np.int64), f"{name}/shape2d")
            m.graph.initializer.append(shape)
            out = f"{name}/2d"
            m.graph.node.insert(list(m.graph.node).index(node), helper.make_node(
                "Reshape", [name, shape.name], [out], name=f"{node.name}/Reshape_{slot}"))
            node.input[slot] = out
            fixed += 1
    if fixed:
        onnx.save(m, str(model_path))
    return fixed


def _logits_width(m) -> int:
    """The vocabulary size, from the graph's logits output."""
    for o in m.graph.output:
        if o.name == "logits":
            return int(o.type.tensor_type.shape.dim[-1].dim_value)
    raise EdgelmError("the ONNX graph has no logits output; cannot size the shared embedding")


def _cap_context(genai_config: Path, context: int) -> None:
    """Stop onnxruntime-genai (and edgelm's ONNX runtime, which reads the same file) at ``context`` tokens."""
    from edgelm.fsutil import atomic_write_json

    gc = json.loads(genai_config.read_text(encoding="utf-8"))
    gc["model"]["context_length"] = context
    if "search" in gc:
        gc["search"]["max_length"] = min(int(gc["search"].get("max_length", context)), context)
    atomic_write_json(genai_config, gc)


def op_counts(path: Path) -> dict[str, int]:
    """Operator histogram of an ONNX graph; a truncated or corrupt file is a clear error."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise EdgelmError(f"{path} is not a readable ONNX model ({type(e).__name__}); it may be truncated") from None
    out: dict[str, int] = {}
    for n in m.graph.node:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return dict(sorted(out.items()))


def _unpack_low_first(a: "np.ndarray", bits: int) -> "np.ndarray":
    """uint8 [..., n] holding 8 // bits codes per byte, the first in the low bits -> uint8 [..., n * 8 // bits]."""
    import numpy as np

    if bits == 8:
        return a
    per = 8 // bits
    shifts = (np.arange(per, dtype=np.uint8) * bits)
    return ((a[..., None] >> shifts) & (2 ** bits - 1)).astype(np.uint8).reshape(*a.shape[:-1], -1)


def _hf_modules(prefix: str, src: "SourceWeights") -> list[str]:
    """The builder's MatMulNBits module (``model.layers.0.attn.qkv_proj``) -> the HF modules it holds, in row order."""
    mod = prefix.replace(".attn.", ".self_attn.")
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    head, leaf = mod.rsplit(".", 1) if "." in mod else ("", mod)
    if leaf in fused and mod not in src.qlinears:
        return [f"{head}.{p}" for p in fused[leaf]]
    return [mod]


def read_back(folder: Path, src: "SourceWeights"):
    """Each quantized linear of ``src`` as the ONNX model in ``folder`` holds it, decoded from its MatMulNBits
    initializers (one tensor read at a time): yields (HF module, file's dequantized weight [out, in], the
    checkpoint's)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}

    def array(name: str) -> "np.ndarray":
        return numpy_helper.to_array(inits[name], base_dir=str(folder))

    for node in (n for n in m.graph.node if n.op_type == "MatMulNBits"):
        attrs = {a.name: a.i for a in node.attribute}
        k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        prefix = node.input[1].removesuffix(".MatMulNBits.qweight")
        mods = _hf_modules(prefix, src)
        if not all(x in src.qlinears for x in mods):
            continue  # what the builder quantized itself (a float lm_head at int8): not an exact pack
        codes = _unpack_low_first(array(node.input[1]), bits).reshape(n, -1)[:, :k].astype(np.float32)  # [N, K]
        scales = array(node.input[2]).astype(np.float32).reshape(n, -1)  # [N, blocks]
        blocks = scales.shape[1]
        if len(node.input) > 3 and node.input[3]:
            zeros = _unpack_low_first(array(node.input[3]).reshape(n, -1), bits)[:, :blocks].astype(np.float32)
        else:
            zeros = np.full(scales.shape, 2 ** (bits - 1), np.float32)
        s, z = (np.repeat(a, block, axis=1)[:, :k] for a in (scales, zeros))  # [N, K]
        w = s * (codes - z)
        start = 0
        for x in mods:
            ql = src.qlinears[x]
            yield x, w[start:start + ql.shape[0]], ql.dequantize().numpy()
            start += ql.shape[0]


# LoRA (onnxruntime-genai's builder with ``adapter_path``): each adapted linear gets a MatMul through lora_A, one
# through lora_B (already times alpha / r), and an Add. edgelm builds the base with zero adapters and makes those
# weights graph inputs (their zero initializers stay as defaults), so an .onnx_adapter file overrides them per run.
LORA_NAME = "{module}.lora_{ab}.MatMul.weight"  # the builder's initializer name; A [in, r], B [r, out]


def is_lora_input(name: str) -> bool:
    """A LoRA weight of the builder's graph (an adapter-ready base's input)."""
    return ".lora_A." in name or ".lora_B." in name


def onnx_module(hf_module: str) -> str:
    """The builder's name of an HF linear: model.layers.0.self_attn.q_proj -> model.layers.0.attn.q_proj."""
    return hf_module.replace(".self_attn.", ".attn.")


def zero_adapter(adapter_folder: Path, out: Path) -> Path:
    """A copy of a PEFT adapter folder with every weight zero: the builder's LoRA subgraphs, adding nothing."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(adapter_folder / "adapter_config.json", out / "adapter_config.json")
    tensors = load_file(str(adapter_folder / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(out / "adapter_model.safetensors"))
    return out


def expose_lora_inputs(model_path: Path) -> int:
    """Make every LoRA initializer of the graph an input too (an overridable default), in place; returns how many.
    The weights stay where the builder wrote them (external data untouched)."""
    import onnx
    from onnx import helper

    m = onnx.load(str(model_path), load_external_data=False)
    have = {i.name for i in m.graph.input}
    n = 0
    for t in m.graph.initializer:
        if is_lora_input(t.name) and t.name not in have:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            n += 1
    if n:
        onnx.save(m, str(model_path))
    return n


def lora_slots(model_path: Path) -> dict[str, tuple[tuple[int, ...], int]]:
    """The graph's LoRA inputs: name -> (shape, ONNX data type)."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    return {i.name: (tuple(inits[i.name].dims), inits[i.name].data_type) for i in m.graph.input
            if i.name in inits and is_lora_input(i.name)}


def write_onnx_adapter(adapter: "Adapter", model_path: Path, out: Path) -> dict[str, Any]:
    """``adapter`` as an .onnx_adapter file (onnxruntime's AdapterFormat) for the base graph ``model_path``: every
    LoRA input of the graph gets a value, the adapter's (A transposed; B transposed and scaled), zero-padded to the
    slot's rank, or zeros for a slot the adapter does not use. Refuses an adapter the slots can't hold."""
    import numpy as np
    import onnxruntime as ort
    from onnx import helper

    slots = lora_slots(model_path)
    if not slots:
        raise EdgelmError(f"the ONNX base {model_path.parent} has no LoRA inputs; export it with --lora-like "
                          f"{adapter.folder} so that adapters of that rank and those modules can apply")
    values: dict[str, np.ndarray] = {}
    for p in adapter.pairs:
        mod = onnx_module(p.module)
        for ab, w in (("A", p.a.float().numpy().T), ("B", (p.b.float() * p.scaling).numpy().T)):  # [in, r], [r, out]
            name = LORA_NAME.format(module=mod, ab=ab)
            if name not in slots:
                raise EdgelmError(f"the ONNX base {model_path.parent} has no LoRA slot for {p.module}; export the "
                                  f"base with --lora-like {adapter.folder} (its modules and rank)")
            shape, dtype = slots[name]
            r_axis = 1 if ab == "A" else 0
            if w.shape[r_axis] > shape[r_axis] or w.shape[1 - r_axis] != shape[1 - r_axis]:
                raise EdgelmError(f"{p.module}: the adapter's {ab} is {w.shape}, the base's slot {shape}; the slot's "
                                  "rank must be at least the adapter's (export the base with --lora-like this adapter)")
            pad = np.zeros(shape, dtype=helper.tensor_dtype_to_np_dtype(dtype))
            pad[: w.shape[0], : w.shape[1]] = w
            values[name] = pad
    for name, (shape, dtype) in slots.items():
        values.setdefault(name, np.zeros(shape, dtype=helper.tensor_dtype_to_np_dtype(dtype)))
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in values.items()})
    fmt.export_adapter(str(out))
    return {"slots": len(slots), "filled": 2 * len(adapter.pairs)}
