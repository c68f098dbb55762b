"""Atomic writes: everything goes to a temp path beside the target, then one rename."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from edgelm.errors import EdgelmError


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temp folder; on success it replaces ``target`` in one rename, on error it is removed."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise EdgelmError(f"{target} already exists; remove it or pass --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)  # the old target back under its own name, never left hidden
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


# (real path, device, inode, size, mtime, ctime in ns) -> sha256: a file is hashed once until it changes
_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}
DIGEST_CACHE_MIN = 64 << 20  # files at least this big keep their digest on disk too, across processes


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, cached by its identity, size, mtime and ctime (as make and git do): loading an artifact
    checks every file against its manifest, and opening it again should not read it all again. Within a process
    in memory; for big files also on disk under the cache folder (``digests/``), so a multi-GB model is hashed
    once per change, not at every load. The ctime is in the key because no user can set it: a file rewritten with
    its old mtime still changes it."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    name = hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()  # the identity, not the content
    disk = cache_dir() / "digests" / name if st.st_size >= DIGEST_CACHE_MIN else None
    if disk is not None:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            got = disk.read_text(encoding="ascii").strip()
            if len(got) == 64:
                _DIGESTS[key] = got
                return got
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    _DIGESTS[key] = h.hexdigest()
    if disk is not None:
        with contextlib.suppress(OSError):  # a read-only cache only costs the next load a re-hash
            atomic_write_text(disk, _DIGESTS[key])
    return _DIGESTS[key]


def cache_dir() -> Path:
    """Where derived files (the dequantized teacher, corpus stats) are kept: $EDGELM_CACHE or ~/.cache/edgelm."""
    root = os.environ.get("EDGELM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgelm"
    )
    return Path(root)


def keep_log(log_path: str | os.PathLike, step: str) -> Path:
    """A copy of a failed step's log under the cache's ``logs/`` (the step's temporary folder, where it was written,
    is removed with the failure); the error names this path."""
    import time

    dst = cache_dir() / "logs" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(log_path, dst)
    except OSError:
        return Path(log_path)
    return dst


@contextlib.contextmanager
def capture_fds(log_path: str | os.PathLike) -> Iterator[None]:
    """Send this process's C-level stdout/stderr (e.g. llama.cpp's logging) to ``log_path`` for the block."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def quiet_fds(prefix: str = "edgelm-") -> Iterator[None]:
    """capture_fds into a throwaway log: a library's C-level chatter kept off the user's terminal."""
    import tempfile

    with tempfile.NamedTemporaryFile(prefix=prefix, suffix=".log") as f, capture_fds(f.name):
        yield


def peak_rss_mib() -> float:
    """The largest resident set this process, or a child it waited for (GPTQ, the ONNX builder), has had: MiB."""
    import resource

    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """A one-line error, before anything is written, when the filesystem holding ``folder`` has fewer than
    ``needed`` bytes free."""
    p = Path(folder).resolve()
    while not p.exists():
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < needed:
        raise EdgelmError(f"{what} needs about {needed / 2**30:.2f} GiB on {p}, which has {free / 2**30:.2f} GiB free; "
                          "free some space or write elsewhere")
