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


def read_manifest(folder: str | Path, *, verify: bool = True) -> dict[str, Any] | None:
    """Return the manifest, or None if the folder has none. With ``verify``, refuse a mismatch."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise EdgelmError(f"{path} is not valid JSON ({e}); re-create the artifact") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise EdgelmError(
            f"{path} has schema version {manifest.get('schema_version')!r}, this edgelm reads {SCHEMA_VERSION}; "
            "re-create the artifact with this edgelm version"
        )
    if verify:
        for name, meta in manifest.get("files", {}).items():
            f = Path(folder) / name
            if not f.is_file():
                raise EdgelmError(f"{folder}: file {name} listed in {MANIFEST} is missing; the artifact is incomplete")
            if f.stat().st_size != meta["size"] or sha256_file(f) != meta["sha256"]:
                raise EdgelmError(f"{folder}: {name} does not match the sha256 in {MANIFEST}; the file was changed or corrupted")
    return manifest
