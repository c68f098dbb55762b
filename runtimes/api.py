"""The run stage's API: ``edgelm.load`` opens any model or artifact with the right runtime, after checking its
manifest; ``open_artifact`` does the same for exported artifacts only."""
from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)

# Manifest kind -> artifact format. Folders without an export manifest are HF folders.
FORMAT_OF_KIND = {"export-gguf": "gguf", "export-onnx": "onnx", "export-tvm": "tvm"}
# The backend each format opens with unless --runtime says otherwise.
DEFAULT_RUNTIME = {"gguf": "llamacpp", "onnx": "onnx", "tvm": "tvm", "hf": "torch"}


def artifact_format(path: str | os.PathLike) -> tuple[str, dict | None]:
    """("gguf" | "onnx" | "tvm" | "hf", manifest or None). Verifies the manifest's sha256 and schema when there is one."""
    from edgelm.manifest import read_manifest

    p = Path(path)
    if p.is_file():
        if p.suffix != ".gguf":
            raise EdgelmError(f"{p} is not a model: pass an artifact folder, an HF folder or a .gguf file")
        return "gguf", None
    if p.is_dir():
        m = read_manifest(p)
        if m is not None and m.get("kind") in FORMAT_OF_KIND:
            return FORMAT_OF_KIND[m["kind"]], m
        if (p / "model.onnx").is_file():
            return "onnx", m
        if (p / "model.gguf").is_file():
            return "gguf", m
        if (p / "tvm_config.json").is_file():
            return "tvm", m
        if (p / "config.json").is_file():
            return "hf", m
        raise EdgelmError(f"{p} holds no model (edgelm.json, model.gguf, model.onnx or config.json expected)")
    if str(path).startswith((".", "/", "~")) or os.sep in str(path) and not _looks_like_hub_id(str(path)):
        raise EdgelmError(f"{path} does not exist; pass an artifact folder, an HF folder, a .gguf file or a hub id")
    return "hf", None  # a built-in name or hub id: PyTorch


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts)


def load(path: str | os.PathLike, *, runtime: str | None = None, threads: int | None = None,
         context: int | None = None, keep_cache: bool = False, adapters: dict[str, str | os.PathLike] | None = None):
    """Open ``path`` (artifact folder, HF folder, .gguf, built-in name or hub id) with its runtime.

    ``runtime`` forces a backend (edgelm list runtimes); ``threads`` None picks per backend and logs the choice.
    ``keep_cache``: a prompt that starts with the last call's tokens prefills only the rest (a chat's next turn).
    ``adapters``: name -> adapter artifact (`edgelm export ADAPTER --base path`), loaded over the base unmerged;
    ``set_adapter(name)`` picks the one the next calls run with (none at first). Each is checked to be for this base.
    """
    from edgelm.registry import RUNTIMES

    fmt, manifest = artifact_format(path)
    name = runtime or DEFAULT_RUNTIME[fmt]
    cls = RUNTIMES.get(name)
    if fmt not in cls.formats:
        able = [n for n, c in RUNTIMES.items() if fmt in c.formats]
        raise EdgelmError(f"runtime {name!r} cannot open a {fmt} model ({path}); runtimes that can: {', '.join(able)}")
    target = Path(path)
    if fmt == "gguf" and name == "torch" and target.is_dir():
        target = target / "model.gguf"
    kw = {}
    if adapters:
        if "adapters" not in inspect.signature(cls.__init__).parameters:
            raise EdgelmError(f"the {name} runtime applies no LoRA adapters at run time; open the base with "
                              "llamacpp (GGUF) or onnx, or merge the adapter (edgelm export ADAPTER --merge)")
        kw["adapters"] = {n: _adapter_for(Path(a), fmt, target) for n, a in adapters.items()}
    rt = cls(target if target.exists() else str(path), threads=threads, context=context, **kw)
    rt.keep_cache = keep_cache
    return rt


def _adapter_for(adapter: Path, fmt: str, base: Path) -> Path:
    """An adapter artifact's adapter file, refused in one line unless it was exported for the base file ``base``
    opens."""
    from edgelm.fsutil import sha256_file
    from edgelm.manifest import read_manifest

    m = read_manifest(adapter) if adapter.is_dir() else None
    if not m or m.get("kind") != f"adapter-{fmt}":
        raise EdgelmError(f"{adapter} is not a {fmt} adapter artifact; make one with edgelm export ADAPTER --base "
                          f"{base}")
    file = base / m["base"]["file"] if base.is_dir() else base
    want = m["base"]["sha256"]
    if not file.is_file() or sha256_file(file) != want:
        raise EdgelmError(f"adapter {adapter} was exported for the base {m['base']['artifact']} (sha256 "
                          f"{str(want)[:12]}), not for {base}; export it against this base, or load its own")
    return adapter / m["file"]


def open_artifact(folder: str | os.PathLike, *, threads: int | None = None, runtime: str | None = None):
    """Open an exported artifact with its target's runtime, after checking its manifest (sha256, schema)."""
    from edgelm.manifest import read_manifest

    folder = Path(folder)
    if not folder.is_dir():
        raise EdgelmError(f"{folder} is not an artifact folder")
    m = read_manifest(folder, verify=False)
    if m is None or not str(m.get("kind", "")).startswith("export-"):
        raise EdgelmError(f"{folder} has no export manifest (edgelm.json); export it with `edgelm export`")
    return load(folder, runtime=runtime, threads=threads)
