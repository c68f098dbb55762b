"""The teacher cache (`--teacher-cache DIR`): the teacher's top-k log-probabilities at every position of every
training sequence, written the first time a sequence is trained on and read by every later run over the same data
(another student shape, an ablation, a benchmark variant, a second epoch), which then skips the teacher's forward.

Rows follow the training stream: row i holds the i-th sequence the trainer drew. Each row keeps its token ids, and a
row is used only when they equal the sequence drawn now, so a cache never feeds a sequence the wrong teacher (other
data, seed or chat mix simply recompute and overwrite it).

Folder layout (all rows x the same shapes, grown as runs get longer):
    meta.json    teacher, top k, temperature, sequence length, vocabulary size, rows
    ids.bin      int32   [rows, T]         the sequence
    idx.bin      uint16  [rows, T-1, k]    the teacher's top-k word ids (int32 for vocabularies over 65,536)
    logp.bin     float16 [rows, T-1, k]    their log-probabilities at the run's temperature
    ok.bin       uint8   [rows]            1 once the row is whole
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgelm.errors import EdgelmError
from edgelm.fsutil import atomic_write_text

log = logging.getLogger(__name__)

META = "meta.json"
FORMAT = 1


class TeacherCache:
    """Rows of teacher top-k log-probs on disk (numpy memmaps), looked up by stream position and checked by ids."""

    def __init__(self, folder: str | Path, *, teacher: str, topk: int, temperature: float, seq_len: int,
                 vocab: int, rows: int) -> None:
        self.folder = Path(folder)
        self.key = {"format": FORMAT, "teacher": teacher, "topk": topk, "temperature": temperature,
                    "seq_len": seq_len, "vocab": vocab}
        self.topk, self.seq_len = topk, seq_len
        self.idx_dtype = np.uint16 if vocab <= 2**16 else np.int32
        meta_path = self.folder / META
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise EdgelmError(f"{meta_path} is not valid JSON ({e}); delete {self.folder} to rebuild the "
                                  "teacher cache") from None
            theirs = {k: meta.get(k) for k in self.key}
            if theirs != self.key:
                diff = ", ".join(f"{k} {theirs[k]!r} (this run: {self.key[k]!r})" for k in self.key
                                 if theirs[k] != self.key[k])
                raise EdgelmError(f"teacher cache {self.folder} was written with {diff}; pass another "
                                  "--teacher-cache folder, or delete this one")
            have = int(meta.get("rows", 0))
        else:
            if self.folder.exists() and any(self.folder.iterdir()):
                raise EdgelmError(f"--teacher-cache {self.folder} is a folder with other files in it; pass an empty "
                                  "or new folder")
            have = 0
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows = max(rows, have)
        self._open()
        if self.rows > have:
            self._write_meta()
        self.hits = self.misses = 0

    def _specs(self) -> dict[str, tuple[Any, tuple[int, ...]]]:
        T, k = self.seq_len, self.topk
        return {"ids": (np.int32, (T,)), "idx": (self.idx_dtype, (T - 1, k)), "logp": (np.float16, (T - 1, k)),
                "ok": (np.uint8, ())}

    def _open(self) -> None:
        """Memory-map every file at ``self.rows`` rows, growing a shorter one (new rows read as not ok)."""
        self.maps: dict[str, np.memmap] = {}
        for name, (dtype, shape) in self._specs().items():
            path = self.folder / f"{name}.bin"
            size = self.rows * int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            with open(path, "ab") as f:
                if f.tell() < size:
                    f.truncate(size)
            self.maps[name] = np.memmap(path, dtype=dtype, mode="r+", shape=(self.rows, *shape))

    def _write_meta(self) -> None:
        atomic_write_text(self.folder / META, json.dumps({**self.key, "rows": self.rows}, indent=1))

    def lookup(self, first: int, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached (top-k ids [B, T-1, k] int64, log-probs [B, T-1, k] fp32) of rows first.. for ids [B, T], or
        None unless every one of them is whole and holds exactly these ids."""
        end = first + len(ids)
        m = self.maps
        if end > self.rows or not m["ok"][first:end].all() or not np.array_equal(m["ids"][first:end], ids):
            self.misses += len(ids)
            return None
        self.hits += len(ids)
        return (torch.from_numpy(m["idx"][first:end].astype(np.int64)),
                torch.from_numpy(m["logp"][first:end].astype(np.float32)))

    def store(self, first: int, ids: np.ndarray, idx: torch.Tensor, logp: torch.Tensor) -> None:
        """Write rows first.. (ids [B, T], top-k ids and log-probs [B, T-1, k]); rows past the end are not kept."""
        n = min(len(ids), self.rows - first)
        if n <= 0:
            return
        m, sl = self.maps, slice(first, first + n)
        m["ok"][sl] = 0
        m["ids"][sl] = ids[:n]
        m["idx"][sl] = idx[:n].cpu().numpy().astype(self.idx_dtype)
        m["logp"][sl] = logp[:n].float().cpu().numpy().astype(np.float16)
        m["ok"][sl] = 1  # last: a row cut off mid-write stays not ok

    def flush(self) -> None:
        for mm in self.maps.values():
            mm.flush()

    def close(self) -> None:
        self.flush()
        self.maps = {}

    def nbytes(self) -> int:
        return sum(mm.nbytes for mm in self.maps.values())


@torch.no_grad()
def teacher_topk(teacher, ids: torch.Tensor, k: int, temperature: float, chunk: int = 256,
                 autocast: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k (word ids [B, T-1, k], log-probs [B, T-1, k] fp32) at every position but the last of
    ids [B, T], the lm_head and softmax run ``chunk`` positions at a time (no whole [B, T, V] logits)."""
    import contextlib

    with autocast or contextlib.nullcontext():
        h = teacher.base_model(input_ids=ids).last_hidden_state[:, :-1]  # [B, T-1, H]
    B, T1, H = h.shape
    h = h.reshape(-1, H)  # [N, H]
    w = teacher.get_output_embeddings().weight  # [V, H]
    vals, idxs = [], []
    for s in range(0, h.shape[0], chunk):
        logp = F.log_softmax(F.linear(h[s:s + chunk], w).float() / temperature, -1)  # [c, V]
        v, i = logp.topk(k, -1)  # [c, k]
        vals.append(v)
        idxs.append(i)
    return torch.cat(idxs).reshape(B, T1, k), torch.cat(vals).reshape(B, T1, k)
