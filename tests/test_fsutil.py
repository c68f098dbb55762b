"""Digests are computed once per file version (identity, size, mtime) within a process."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

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


def test_a_big_file_is_hashed_once_across_processes(tmp_path, monkeypatch):
    """Big files keep their digest on disk, keyed by identity, size, mtime and ctime: a new process (here, an
    emptied memory cache) reads it back instead of hashing again; a rewrite is hashed again, even with its old
    mtime restored (the ctime still moves)."""
    monkeypatch.setenv("EDGELM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fsutil, "DIGEST_CACHE_MIN", 1000)
    f = tmp_path / "big.bin"
    f.write_bytes(b"a" * 5000)
    reads = count_hashing(monkeypatch)
    first = fsutil.sha256_file(f)
    monkeypatch.setattr(fsutil, "_DIGESTS", {})
    assert fsutil.sha256_file(f) == first == REAL(b"a" * 5000).hexdigest() and len(reads) == 1
    assert len(list((tmp_path / "cache" / "digests").iterdir())) == 1
    st = f.stat()
    time.sleep(0.02)
    f.write_bytes(b"b" * 5000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: only the ctime tells
    monkeypatch.setattr(fsutil, "_DIGESTS", {})
    assert fsutil.sha256_file(f) == REAL(b"b" * 5000).hexdigest() and len(reads) == 2


def test_atomic_dir_restores_the_old_target_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "art"
    target.mkdir()
    (target / "old.txt").write_text("keep me")
    real, calls = os.rename, []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the new folder's rename into place
            raise OSError("disk went away")
        return real(a, b)

    monkeypatch.setattr(fsutil.os, "rename", rename)
    with pytest.raises(OSError, match="disk went away"):
        with fsutil.atomic_dir(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (target / "old.txt").read_text() == "keep me" and not (target / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no hidden old copy, no temp folder
