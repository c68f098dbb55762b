"""A PyTorch model whose big modules hold their weights only while they run: each decoder block, the embedding and
the lm_head are read from the checkpoint (float safetensors, or a GPTQ folder's codes dequantized) when their
forward starts and dropped when it ends. The export check's reference for models too big to hold in float32: the
same transformers modules compute the same values, with one block's weights in memory.

A batch of sequences goes through in one forward (a block is read once per forward, not once per sequence), so the
check feeds its sequences together to a streamed model (``STREAMED``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
STREAMED = "_edgelm_streamed"  # attribute set on a streamed model
# a model whose float32 weights take more bytes than this is streamed by the check (EDGELM_STREAM_BYTES overrides)
STREAM_BYTES = 4 << 30


def float32_bytes(folder: str | Path) -> int:
    """The float32 bytes of a checkpoint's weights (4 per parameter), from its safetensors headers."""
    import math

    from edgelm.models.weights import LazySafetensors, safetensors_files

    t = LazySafetensors(safetensors_files(Path(folder)), floats_only=False)
    n = sum(math.prod(t.shape(k)) * (8 if t.dtype(k) == "I32" and k.endswith(".qweight") else 1) for k in t)
    return 4 * n


def should_stream(folder: str | Path) -> bool:
    import os

    limit = int(os.environ.get("EDGELM_STREAM_BYTES", STREAM_BYTES))
    return float32_bytes(folder) > limit


def _values(folder: Path) -> tuple[dict, Callable[[str], "torch.Tensor"], set[str]]:
    """(config dict, name -> float32 tensor read now, every name it has) of a float or GPTQ-format folder."""
    import json

    from edgelm.models.weights import LazySafetensors, safetensors_files

    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if (cfg.get("quantization_config") or {}).get("quant_method") == "gptq":
        from edgelm.models.qformat import read_quantized

        cfg, tensors, qlinears = read_quantized(folder)
        names = set(tensors) | {f"{m}.weight" for m in qlinears}

        def value(name: str) -> "torch.Tensor":
            module = name[: -len(".weight")]
            return qlinears[module].dequantize() if name.endswith(".weight") and module in qlinears \
                else tensors[name].float()

        return cfg, value, names
    tensors = LazySafetensors(safetensors_files(folder))
    return cfg, (lambda name: tensors[name]), set(tensors)


def load_streamed(folder: str | Path, transforms: Mapping[str, Callable] | None = None):
    """The float32 model of ``folder`` (float or GPTQ-format) with its blocks, embedding and lm_head streamed;
    ``transforms``: parameter name -> function applied to the value when it is read (a target's Q8_0 of the
    embedding, say). Small tensors (norms) stay loaded."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    cfg, value, names = _values(folder)
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("transformers_version",)})
    with init_empty_weights(include_buffers=False):  # parameters on the meta device, buffers (RoPE) real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    tied = bool(config.tie_word_embeddings)
    transforms = dict(transforms or {})
    layers = model.model.layers
    streamed = {f"model.layers.{i}": layer for i, layer in enumerate(layers)}
    streamed["model.embed_tokens"] = model.get_input_embeddings()
    streamed["lm_head"] = model.get_output_embeddings()

    def source(name: str) -> str:
        return "model.embed_tokens.weight" if tied and name == "lm_head.weight" else name

    def read(name: str) -> "torch.Tensor":
        if source(name) not in names:
            raise EdgelmError(f"{folder}: no weight {source(name)!r} for the model's {name}; the checkpoint does not "
                              "fit its config")
        v = value(source(name))
        return transforms[name](v) if name in transforms else v

    def load(prefix: str, module) -> None:
        for n, _ in list(module.named_parameters(recurse=True)):
            set_module_tensor_to_device(module, n, "cpu", value=read(f"{prefix}.{n}"))

    def drop(prefix: str, module) -> None:
        for n, _ in list(module.named_parameters(recurse=True)):
            set_module_tensor_to_device(module, n, "meta")

    for prefix, module in streamed.items():
        module.register_forward_pre_hook(lambda m, args, prefix=prefix: load(prefix, m))
        module.register_forward_hook(lambda m, args, out, prefix=prefix: drop(prefix, m))
    # what no hook loads: the final norm and anything else outside the streamed modules, loaded once
    inside = tuple(p + "." for p in streamed)
    for n, p in list(model.named_parameters(remove_duplicate=False)):
        if not n.startswith(inside) and p.device.type == "meta":
            set_module_tensor_to_device(model, n, "cpu", value=read(n))
    if tied:  # the lm_head loads its own copy of the embedding's matrix (a target may store it otherwise)
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(torch.empty(head.weight.shape, device="meta"), requires_grad=False)
        model.config.tie_word_embeddings = False
    setattr(model, STREAMED, True)
    log.info("%s: streamed block by block (%d blocks)", folder, len(layers))
    return model


def apply_transforms(model, transforms: Mapping[str, Callable]) -> None:
    """``load_streamed``'s transforms on a model held in memory; a tied lm_head with a transform of its own (its
    embedding's without one) is untied first."""
    import torch

    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    with torch.no_grad():
        if head.weight is emb.weight and ("lm_head.weight" in transforms) != ("model.embed_tokens.weight" in transforms):
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
            model.config.tie_word_embeddings = False
        done = set()
        for name, fn in transforms.items():
            p = model.get_parameter(name)
            if id(p) not in done:  # a tied pair once
                p.copy_(fn(p))
                done.add(id(p))


def batch_for(model, seq_len: int, budget: int = 256 << 20) -> int:
    """Sequences per forward of a streamed model: as many as keep its float32 logits within ``budget`` bytes."""
    vocab = int(model.config.vocab_size)
    return max(1, budget // max(1, 4 * vocab * max(1, seq_len)))


def load_reference(spec: str | Path, transforms: Mapping[str, Callable] | None = None):
    """(model, tokenizer) for the export check: held in memory as load_model gives it, or streamed
    (``load_streamed``) when its float32 weights pass the budget (``should_stream``); ``transforms`` as
    ``load_streamed``'s, applied either way."""
    from edgelm.models.loader import load_model, load_tokenizer, resolve

    source = resolve(spec)
    if source.kind != "hub" and should_stream(source.path):
        return load_streamed(source.path, transforms), load_tokenizer(source)
    model, tok, _ = load_model(spec)
    if transforms:
        apply_transforms(model, transforms)
    return model, tok
