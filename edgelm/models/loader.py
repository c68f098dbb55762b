"""Load a causal LM and its tokenizer from any of: an HF folder, a GGUF file, a built-in name, or a hub id.

GGUF models are dequantized by transformers (slow), so the result is cached as a plain HF folder.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import EdgelmError
from edgelm.fsutil import atomic_dir, cache_dir, sha256_file
from edgelm.registry import TEACHERS

log = logging.getLogger(__name__)


@dataclass
class ModelSource:
    spec: str  # what the user passed
    kind: str  # "folder" | "gguf" | "builtin" | "hub"
    path: str  # folder to load from (after GGUF caching), or the hub id
    sha256: str | None = None  # of the GGUF file, or of the safetensors in a folder
    info: dict[str, Any] = field(default_factory=dict)  # license etc. for built-ins


def _builtin_gguf(name: str) -> Path:
    entry = TEACHERS.get(name)
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise EdgelmError(f"built-in model {name!r} needs the package {entry.package}; install it with: {entry.pip}")
    path = Path(list(spec.submodule_search_locations)[0]) / entry.filename
    if not path.is_file():
        raise EdgelmError(f"{entry.package} is installed but has no {entry.filename}; reinstall it with: {entry.pip}")
    return path


def _gguf_to_folder(gguf: Path) -> tuple[Path, str]:
    """Dequantize a GGUF once into the cache as an HF folder; return (folder, sha256 of the GGUF)."""
    digest = sha256_file(gguf)
    folder = cache_dir() / "gguf" / f"{gguf.stem}-{digest[:16]}"
    if (folder / "config.json").is_file():
        return folder, digest
    log.info("dequantizing %s into %s (once, about a minute)", gguf.name, folder)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise EdgelmError(f"could not read GGUF {gguf}: {_one_line(e)}; the file may be truncated or corrupt") from None
    # save_pretrained refuses a GGUF-loaded model, so copy the weights into a fresh one built from the config.
    cfg_dict = model.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg_dict)
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with atomic_dir(folder, overwrite=True) as tmp:
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return folder, digest


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def resolve(spec: str | os.PathLike) -> ModelSource:
    """Work out what ``spec`` names and make it loadable from a folder (or the hub)."""
    s = str(spec)
    p = Path(s).expanduser()
    if s in TEACHERS:
        gguf = _builtin_gguf(s)
        folder, digest = _gguf_to_folder(gguf)
        entry = TEACHERS.get(s)
        return ModelSource(s, "builtin", str(folder), digest, {"gguf": str(gguf), "license": entry.license})
    if p.is_file():
        if p.suffix != ".gguf":
            raise EdgelmError(f"{p} is a file but not a .gguf; pass a model folder, a .gguf file, or a built-in name")
        folder, digest = _gguf_to_folder(p)
        return ModelSource(s, "gguf", str(folder), digest, {"gguf": str(p.resolve())})
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EdgelmError(f"{p} has no config.json; it is not a Hugging Face model folder")
        weights = sorted(p.glob("*.safetensors"))
        digest = sha256_file(weights[0]) if len(weights) == 1 else None
        return ModelSource(s, "folder", str(p), digest)
    looks_like_hub = s.count("/") == 1 and not s.startswith((".", "/", "~")) and " " not in s
    if looks_like_hub:
        return ModelSource(s, "hub", s)
    raise EdgelmError(
        f"model {s!r} not found: not a folder, a .gguf file, a hub id (org/name), or a built-in name "
        f"({', '.join(TEACHERS.names())})"
    )


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path)
    except Exception as e:
        raise EdgelmError(f"could not load the tokenizer of {source.spec}: {_one_line(e)}") from None


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """config.json of an HF folder; a missing or unreadable one is a clear error."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise EdgelmError(f"{folder} has no config.json; it is not a Hugging Face model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgelmError(f"{path} is unreadable ({type(e).__name__}); the checkpoint may be corrupt") from None


def check_arch(folder: str | os.PathLike):
    """The registered architecture (edgelm.models.archs) of an HF folder, refused unless edgelm supports it."""
    from edgelm.models.archs import get_arch

    return get_arch(read_config(folder).get("model_type"), str(folder))


def _is_gptq_folder(folder: Path) -> bool:
    """A GPTQ-format checkpoint: edgelm loads it dequantized to float, with no quantized kernels needed."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (cfg.get("quantization_config") or {}).get("quant_method") == "gptq"


def load_model(spec: str | os.PathLike, *, dtype: str = "float32"):
    """Return (model, tokenizer, source). The model is in eval mode on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # edgelm shows its own progress
    source = resolve(spec)
    if source.kind == "folder" and _is_gptq_folder(Path(source.path)):
        from edgelm.models.qformat import load_quantized_model

        model = load_quantized_model(source.path).to(getattr(torch, dtype))
        return model, load_tokenizer(source), source
    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=getattr(torch, dtype))
    except OSError as e:
        if source.kind == "hub":
            raise EdgelmError(f"could not fetch {source.spec!r} from the hub ({_one_line(e)}); check the id and your network") from None
        raise EdgelmError(f"could not load {source.spec}: {_one_line(e)}; the checkpoint may be corrupt") from None
    except Exception as e:
        raise EdgelmError(f"could not load {source.spec}: {_one_line(e)}; the checkpoint may be corrupt") from None
    from edgelm.models.archs import get_arch

    get_arch(model.config.model_type, source.spec)
    model.eval()
    return model, load_tokenizer(source), source


def model_from_state(config: dict[str, Any], state: dict[str, Any], *, what: str, fix: str,
                     prepare: Callable[[Any], None] | None = None):
    """A causal LM built from a config dict (``config.to_dict()``) and loaded with ``state``, which may leave out a
    tied lm_head; refuses weights that do not fit, naming ``what`` they came from and ``fix``. ``prepare`` changes
    the built model before the state loads (QAT's fake quantizers, whose parameters the state holds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(cfg)
    if prepare is not None:
        prepare(model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()):
        raise EdgelmError(f"{what} does not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]}); {fix}")
    return model


def same_weights(sha256: str | None, spec: Any, other_sha256: str | None, other_spec: Any) -> bool:
    """Two sources hold the same weights: by the weights' sha256 where both have one, else by spec (as given, or as
    the same path)."""
    if sha256 and other_sha256:
        return sha256 == other_sha256
    if not spec or not other_spec:
        return False
    return str(spec) == str(other_spec) or Path(str(spec)).resolve() == Path(str(other_spec)).resolve()


def check_same_tokenizer(teacher_tok, student_tok, student_name: str) -> None:
    """Logit KD needs the same vocabulary in the same order."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        diff = len(set(tv.items()) ^ set(sv.items()))
        raise EdgelmError(
            f"tokenizer mismatch: {student_name} has {len(sv)} tokens, the teacher {len(tv)} "
            f"({diff} entries differ); logit KD needs the teacher's tokenizer, so build the student from the teacher"
        )
