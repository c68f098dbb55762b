"""Digests are computed once per file version (identity, size, mtime) within a process."""
from __future__ import annotations

import hashlib
import os

from edgelm import fsutil


REAL = hashlib.sha256


def count_hashing(monkeypatch) -> list[int]:
    """A list that grows by one for every file fsutil hashes from here on."""
    reads: list[int] = []

    def counting(*a):
        reads.append(1)
        return REAL(*a)

    monkeypatch.setattr(fsutil.hashlib, "sha256", counting)
    return reads


def test_a_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    reads = count_hashing(monkeypatch)
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 10_000)
    first = fsutil.sha256_file(f)
    assert fsutil.sha256_file(f) == first == REAL(b"a" * 10_000).hexdigest()
    assert len(reads) == 1
    mtime = f.stat().st_mtime_ns
    f.write_bytes(b"b" * 10_000)  # same size, new content
    os.utime(f, ns=(mtime, mtime + 10**7))  # and a later mtime (file clocks tick in ms: set it, don't race it)
    assert fsutil.sha256_file(f) == REAL(b"b" * 10_000).hexdigest() and len(reads) == 2


def test_loading_a_folder_twice_hashes_its_weights_once(tiny_q_model, monkeypatch):
    """resolve() and read_manifest() check every file; a second open in the same process reads nothing again."""
    from edgelm.manifest import read_manifest
    from edgelm.models.loader import resolve

    resolve(tiny_q_model)
    read_manifest(tiny_q_model)  # warm: whatever this process hashed before
    reads = count_hashing(monkeypatch)
    for _ in range(3):
        resolve(tiny_q_model)
        read_manifest(tiny_q_model)
    assert reads == []
    weights = next(tiny_q_model.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # a touched file is hashed again
    read_manifest(tiny_q_model)
    assert len(reads) == 1
