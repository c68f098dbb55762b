"""What every exporter reads: a model's config, float tensors and exact quantized linears, from any loadable source.

Float tensors are read one at a time with plain file reads (no mmap, no copy of the whole model), so an exporter's
memory stays near one tensor above the Python baseline.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    import torch

    from edgelm.models.qformat import QLinear

# safetensors dtype -> (numpy dtype name, bytes per element)
_DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("uint16", 2), "F64": ("float64", 8)}


class LazySafetensors(Mapping):
    """name -> float32 tensor, read from *.safetensors on access; shapes known without reading data."""

    def __init__(self, files: list[Path]) -> None:
        self._index: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for f in files:
            try:
                with open(f, "rb") as fh:
                    n = struct.unpack("<Q", fh.read(8))[0]
                    header = json.loads(fh.read(n))
            except (OSError, ValueError, struct.error) as e:
                raise EdgelmError(f"{f} is not a readable safetensors file ({type(e).__name__}); the checkpoint may be corrupt") from None
            size = f.stat().st_size
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                start, end = meta["data_offsets"]
                if meta["dtype"] not in _DTYPES:
                    raise EdgelmError(f"{f}: tensor {name} has dtype {meta['dtype']}; float checkpoints expected")
                if 8 + n + end > size:
                    raise EdgelmError(f"{f} is truncated ({size} bytes, tensor {name} ends at {8 + n + end}); "
                                      "the checkpoint may be corrupt")
                self._index[name] = (f, meta["dtype"], tuple(meta["shape"]), 8 + n + start, end - start)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._index[name][2]

    def __getitem__(self, name: str) -> "torch.Tensor":
        import numpy as np
        import torch

        f, dtype, shape, offset, nbytes = self._index[name]
        np_dtype, width = _DTYPES[dtype]
        a = np.fromfile(f, dtype=np_dtype, count=nbytes // width, offset=offset).reshape(shape)
        t = torch.from_numpy(a)
        return (t.view(torch.bfloat16) if dtype == "BF16" else t).float()

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


@dataclass
class SourceWeights:
    folder: Path  # an HF folder (float or GPTQ-format)
    config: dict[str, Any]  # config.json, without quantization_config
    tensors: Mapping[str, "torch.Tensor"]  # float tensors by HF name (float32), possibly read lazily
    qlinears: dict[str, "QLinear"] = field(default_factory=dict)  # exact codes of quantized linears
    quant: dict[str, Any] = field(default_factory=dict)  # the checkpoint's quantization_config, if any

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def shape(self, name: str) -> tuple[int, ...]:
        if isinstance(self.tensors, LazySafetensors):
            return self.tensors.shape(name)
        return tuple(self.tensors[name].shape)


def read_source(folder: str | Path) -> SourceWeights:
    """Index an HF folder's tensors; a GPTQ-format folder keeps its codes (loaded, at 1 byte per weight)."""
    from edgelm.models.archs import get_arch
    from edgelm.models.loader import read_config

    folder = Path(folder)
    cfg = read_config(folder)
    get_arch(cfg.get("model_type"), str(folder))
    quant = cfg.pop("quantization_config", None) or {}
    if quant:
        from edgelm.models.qformat import read_quantized

        _, tensors, qlinears = read_quantized(folder)
        return SourceWeights(folder, cfg, {k: v.float() for k, v in tensors.items()}, qlinears, quant)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EdgelmError(f"{folder} has no .safetensors weights")
    return SourceWeights(folder, cfg, LazySafetensors(files))
