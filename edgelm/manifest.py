"""edgelm.json: the manifest every artifact folder carries. Loading checks schema and sha256."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from edgelm.errors import EdgelmError
from edgelm.fsutil import atomic_write_json, sha256_file

MANIFEST = "edgelm.json"
SCHEMA_VERSION = 1


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "tokenizers", "gguf", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def write_manifest(folder: str | Path, kind: str, **fields: Any) -> dict[str, Any]:
    """Write ``folder/edgelm.json`` with sizes and sha256 of every file already in ``folder``."""
    from edgelm import __version__

    folder = Path(folder)
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "edgelm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "libraries": library_versions(),
        "files": files,
        "total_bytes": sum(f["size"] for f in files.values()),
        **fields,
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def _safe_name(folder: Path, name: Any, path: Path) -> Path:
    """``folder/name`` for a file name from a manifest, refused when it could leave the folder (absolute, ``..``,
    or a link out of it)."""
    from pathlib import PurePosixPath

    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise EdgelmError(f"{path} lists a file name {name!r} that is not a plain relative path; re-create the "
                          "artifact")
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise EdgelmError(f"{path} lists {name!r}, which leaves the artifact folder; refusing to read it (re-create "
                          "the artifact, and load only artifacts you trust)")
    f = folder / pure
    if f.exists() and not f.resolve().is_relative_to(folder.resolve()):
        raise EdgelmError(f"{path} lists {name!r}, a link out of the artifact folder; refusing to read it")
    return f


def _check_shape(manifest: Any, path: Path) -> None:
    """A one-line error for a manifest that parses but is not one (a KeyError or TypeError later otherwise)."""
    def bad(what: str) -> EdgelmError:
        return EdgelmError(f"{path} is malformed ({what}); re-create the artifact")

    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, not an object")
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise bad("'files' is not an object")
    for name, meta in files.items():
        if (not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str)
                or isinstance(meta.get("size"), bool) or not isinstance(meta.get("size"), int)):
            raise bad(f"the entry of {name!r} needs an integer 'size' and a string 'sha256'")
    if "kind" in manifest and not isinstance(manifest["kind"], str):
        raise bad("'kind' is not a string")


def read_manifest(folder: str | Path, *, verify: bool = True) -> dict[str, Any] | None:
    """Return the manifest, or None if the folder has none. With ``verify``, refuse a mismatch.

    Verifying hashes every file (sha256, about 1-2 GB/s on one core, so seconds for a multi-GB model); a digest is
    kept per file identity and change time (fsutil.sha256_file), so an unchanged file is hashed once, not at every
    load."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgelmError(f"{path} is not valid JSON ({e}); re-create the artifact") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        got = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise EdgelmError(
            f"{path} has schema version {got!r}, this edgelm reads {SCHEMA_VERSION}; "
            "re-create the artifact with this edgelm version"
        )
    _check_shape(manifest, path)
    for name in manifest.get("files", {}):
        _safe_name(folder, name, path)
    if verify:
        for name, meta in manifest.get("files", {}).items():
            f = _safe_name(folder, name, path)
            if not f.is_file():
                raise EdgelmError(f"{folder}: file {name} listed in {MANIFEST} is missing; the artifact is incomplete")
            if f.stat().st_size != meta["size"] or sha256_file(f) != meta["sha256"]:
                raise EdgelmError(f"{folder}: {name} does not match the sha256 in {MANIFEST}; the file was changed or corrupted")
    return manifest
