"""Checkpoint tensors read one at a time: a model of any size is worked through with about one tensor (or one
block) in memory, as llama.cpp's converter does.

Reads are plain file reads into fresh memory (no mmap), so what a step has read is freed when it is done and the
page cache, not the process, holds the file (a mmap'd read would count every page it touched in the process's RSS).
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    import torch

# safetensors dtype -> (numpy dtype it is read as, bytes per element); BF16 is read as uint16 and viewed
DTYPES = {"F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("uint16", 2), "F64": ("float64", 8),
          "I32": ("int32", 4), "I64": ("int64", 8), "U8": ("uint8", 1), "I8": ("int8", 1), "I16": ("int16", 2),
          "BOOL": ("bool", 1)}
FLOATS = ("F32", "F16", "BF16", "F64")


class LazySafetensors(Mapping):
    """name -> float32 tensor, read from *.safetensors on access (``raw(name)``: as stored); shapes and dtypes known
    without reading data. ``only``: keep the tensors whose names it accepts."""

    def __init__(self, files: list[Path], *, floats_only: bool = True, only=None) -> None:
        self._index: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for f in files:
            try:
                with open(f, "rb") as fh:
                    n = struct.unpack("<Q", fh.read(8))[0]
                    header = json.loads(fh.read(n))
            except (OSError, ValueError, struct.error) as e:
                raise EdgelmError(f"{f} is not a readable safetensors file ({type(e).__name__}); the checkpoint may "
                                  "be corrupt") from None
            size = f.stat().st_size
            for name, meta in header.items():
                if name == "__metadata__" or only is not None and not only(name):
                    continue
                start, end = meta["data_offsets"]
                if meta["dtype"] not in (FLOATS if floats_only else DTYPES):
                    raise EdgelmError(f"{f}: tensor {name} has dtype {meta['dtype']}; float checkpoints expected")
                if 8 + n + end > size:
                    raise EdgelmError(f"{f} is truncated ({size} bytes, tensor {name} ends at {8 + n + end}); "
                                      "the checkpoint may be corrupt")
                self._index[name] = (f, meta["dtype"], tuple(meta["shape"]), 8 + n + start, end - start)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._index[name][2]

    def dtype(self, name: str) -> str:
        """The stored safetensors dtype ("BF16", "I32"...)."""
        return self._index[name][1]

    def nbytes(self, name: str) -> int:
        return self._index[name][4]

    def raw(self, name: str) -> "torch.Tensor":
        """The tensor as stored (bf16 stays bf16, int32 codes stay int32)."""
        import numpy as np
        import torch

        f, dtype, shape, offset, nbytes = self._index[name]
        np_dtype, width = DTYPES[dtype]
        a = np.fromfile(f, dtype=np_dtype, count=nbytes // width, offset=offset).reshape(shape)
        t = torch.from_numpy(a)
        return t.view(torch.bfloat16) if dtype == "BF16" else t

    def rows(self, name: str, start: int, stop: int) -> "torch.Tensor":
        """Rows [start, stop) of a float tensor, as float32 (only those bytes are read)."""
        import numpy as np
        import torch

        f, dtype, shape, offset, _ = self._index[name]
        np_dtype, width = DTYPES[dtype]
        row = int(np.prod(shape[1:], dtype=np.int64))
        a = np.fromfile(f, dtype=np_dtype, count=(stop - start) * row, offset=offset + start * row * width)
        t = torch.from_numpy(a.reshape(stop - start, *shape[1:]))
        return (t.view(torch.bfloat16) if dtype == "BF16" else t).float()

    def __getitem__(self, name: str) -> "torch.Tensor":
        t = self.raw(name)
        return t.float() if self.dtype(name) in FLOATS else t

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise EdgelmError(f"{folder} has no .safetensors weights")
    return files


class ShardWriter:
    """Tensors written into safetensors shards of about ``shard_bytes`` as they come (model-00001-of-00003...
    with the index transformers reads), so a checkpoint of any size is written with one shard in memory."""

    INDEX = "model.safetensors.index.json"

    def __init__(self, folder: Path, shard_bytes: int = 256 << 20) -> None:
        self.folder, self.shard_bytes = Path(folder), shard_bytes
        self._pending: dict[str, "torch.Tensor"] = {}
        self._size = 0
        self._shards: list[list[str]] = []  # tensor names per written shard
        self.bytes = 0  # all written

    def add(self, name: str, tensor: "torch.Tensor") -> None:
        self._pending[name] = tensor.contiguous()
        self._size += tensor.numel() * tensor.element_size()
        if self._size >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        save_file(self._pending, str(self.folder / f"shard-{len(self._shards)}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self.bytes += self._size
        self._pending, self._size = {}, 0

    def close(self) -> list[str]:
        """Name the shards (one file: model.safetensors); returns the file names."""
        self.flush()
        n = len(self._shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.folder / f"shard-{i}.tmp").rename(self.folder / name)
        if n > 1:
            weight_map = {t: name for name, shard in zip(names, self._shards) for t in shard}
            (self.folder / self.INDEX).write_text(json.dumps({"metadata": {"total_size": self.bytes},
                                                              "weight_map": weight_map}, indent=1))
        return names


ST_DTYPES = {"float32": "F32", "float16": "F16", "uint8": "U8", "uint32": "U32", "int32": "I32", "int8": "I8"}


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...], str]], arrays) -> int:
    """One safetensors file written as its tensors come: the header from ``specs`` ([(name, shape, numpy dtype
    name)], in file order) first, then each array of ``arrays`` (an iterator of (name, array) in the same order),
    checked against its spec. One tensor in memory at a time; returns the bytes written."""
    import math

    import numpy as np

    header, offset = {}, 0
    for name, shape, dtype in specs:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), (got, a) in zip(specs, arrays):
            if got != name or tuple(a.shape) != tuple(shape) or a.dtype != np.dtype(dtype):
                raise EdgelmError(f"{path.name}: {got} {a.dtype}{list(a.shape)} where {name} {dtype}{list(shape)} "
                                  "was declared")
            np.ascontiguousarray(a).tofile(f)
    return offset
