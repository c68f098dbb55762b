"""What an exporter reads: a model's config, float tensors and exact quantized linears, from any loadable source."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    import torch

    from edgelm.quant.qformat import QLinear


@dataclass
class SourceWeights:
    folder: Path  # an HF folder (float or GPTQ-format)
    config: dict[str, Any]  # config.json, without quantization_config
    tensors: dict[str, "torch.Tensor"]  # float tensors by HF name (float32)
    qlinears: dict[str, "QLinear"] = field(default_factory=dict)  # exact codes of quantized linears
    quant: dict[str, Any] = field(default_factory=dict)  # the checkpoint's quantization_config, if any

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))


def read_source(folder: str | Path) -> SourceWeights:
    """Read an HF folder's tensors; a GPTQ-format folder keeps its codes."""
    from edgelm.models.loader import SUPPORTED_ARCHS

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise EdgelmError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    arch = cfg.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise EdgelmError(f"{folder} is a {arch!r} model; supported architectures: {', '.join(SUPPORTED_ARCHS)}")
    quant = cfg.pop("quantization_config", None) or {}
    if quant:
        from edgelm.quant.qformat import read_quantized

        _, tensors, qlinears = read_quantized(folder)
    else:
        from safetensors import safe_open

        tensors, qlinears = {}, {}
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise EdgelmError(f"{folder} has no .safetensors weights")
        try:
            for f in files:
                with safe_open(str(f), "pt") as sf:
                    for k in sf.keys():
                        tensors[k] = sf.get_tensor(k)
        except Exception as e:
            raise EdgelmError(f"{folder}: could not read the weights ({type(e).__name__}: {e}); the checkpoint may be corrupt") from None
    tensors = {k: v.float() for k, v in tensors.items()}
    return SourceWeights(folder, cfg, tensors, qlinears, quant)
