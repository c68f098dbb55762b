"""What every exporter reads: a model's config, float tensors and exact quantized linears, from any loadable source.

Both are read one at a time on access (edgelm.models.weights: plain file reads, no copy of the whole model), so an
exporter's memory stays near one tensor above the Python baseline, whatever the model's size.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm.models.weights import LazySafetensors, safetensors_files

if TYPE_CHECKING:
    import torch

    from edgelm.models.qformat import QLinear


@dataclass
class SourceWeights:
    folder: Path  # an HF folder (float or GPTQ-format)
    config: dict[str, Any]  # config.json, without quantization_config
    tensors: Mapping[str, "torch.Tensor"]  # float tensors by HF name (float32), possibly read lazily
    qlinears: Mapping[str, "QLinear"] = field(default_factory=dict)  # exact codes of quantized linears, read lazily
    quant: dict[str, Any] = field(default_factory=dict)  # the checkpoint's quantization_config, if any

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def shape(self, name: str) -> tuple[int, ...]:
        if hasattr(self.tensors, "shape"):  # a lazy mapping: the shape without the data
            return self.tensors.shape(name)
        return tuple(self.tensors[name].shape)


def read_source(folder: str | Path) -> SourceWeights:
    """Index an HF folder's tensors; a GPTQ-format folder's quantized linears are its exact codes, each unpacked
    when it is read."""
    from edgelm.models.archs import get_arch
    from edgelm.models.loader import read_config

    folder = Path(folder)
    cfg = read_config(folder)
    get_arch(cfg.get("model_type"), str(folder))
    quant = cfg.pop("quantization_config", None) or {}
    if quant:
        from edgelm.models.qformat import read_quantized

        _, tensors, qlinears = read_quantized(folder)
        return SourceWeights(folder, cfg, tensors, qlinears, quant)
    return SourceWeights(folder, cfg, LazySafetensors(safetensors_files(folder)))
