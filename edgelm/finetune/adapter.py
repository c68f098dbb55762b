"""A LoRA adapter folder: PEFT's files (adapter_config.json, adapter_model.safetensors) plus edgelm.json, which binds
it to its base model's sha256. Reading, applying (unmerged, through PEFT) and merging live here once."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix for a PeftModel-wrapped causal LM


@dataclass
class LoraPair:
    module: str  # HF module name, e.g. model.layers.0.self_attn.q_proj
    a: "torch.Tensor"  # [r, in]
    b: "torch.Tensor"  # [out, r]
    scaling: float  # alpha / r

    def delta(self) -> "torch.Tensor":
        """The update to the module's weight, [out, in]."""
        return (self.b.float() @ self.a.float()) * self.scaling


@dataclass
class Adapter:
    folder: Path  # the adapter folder
    manifest: dict[str, Any]  # edgelm.json
    config: dict[str, Any]  # adapter_config.json
    pairs: list[LoraPair]  # one per adapted module, in file order

    @property
    def base(self) -> dict[str, Any]:
        """The base it was trained on: spec, kind, sha256."""
        return self.manifest["base"]

    @property
    def rank(self) -> int:
        return int(self.config["r"])


def is_adapter(folder: str | os.PathLike) -> bool:
    """A folder holding a PEFT LoRA adapter (edgelm's or anyone's)."""
    return (Path(folder) / CONFIG).is_file()


def read_adapter(folder: str | os.PathLike) -> Adapter:
    """The adapter in ``folder``, its files checked against its manifest; refused in one line when it is not one."""
    import json

    from safetensors.torch import load_file

    from edgelm.manifest import read_manifest

    folder = Path(folder)
    if not is_adapter(folder):
        raise EdgelmError(f"{folder} is not a LoRA adapter folder (no {CONFIG}); make one with edgelm finetune")
    m = read_manifest(folder)
    if not m or m.get("kind") != "adapter":
        raise EdgelmError(f"{folder} has no edgelm adapter manifest, so its base model is unknown; train it with "
                          "edgelm finetune (which records the base's sha256)")
    cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise EdgelmError(f"{folder} holds a {cfg.get('peft_type')} adapter; edgelm exports LoRA adapters only")
    tensors = load_file(str(folder / WEIGHTS))
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    pairs = []
    for key in tensors:
        if ".lora_A." not in key:
            continue
        mod = key.removeprefix(PEFT_PREFIX).split(".lora_A.")[0]
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise EdgelmError(f"{folder}: {key} has no lora_B; the adapter file is incomplete")
        pairs.append(LoraPair(mod, tensors[key], b, scaling))
    return Adapter(folder, m, cfg, pairs)


def check_base(adapter: Adapter, sha256: str | None, spec: str) -> None:
    """Refuse an adapter on a base it was not trained on (by the weights' sha256, else by spec)."""
    from edgelm.models.loader import same_weights

    theirs = adapter.base
    if not same_weights(sha256, spec, theirs.get("sha256"), theirs.get("spec")):
        raise EdgelmError(f"adapter {adapter.folder} was trained on {theirs.get('spec')} (sha256 "
                          f"{str(theirs.get('sha256'))[:12]}), not on base {spec} (sha256 {str(sha256)[:12]}); "
                          "pass the base it was trained on, or train an adapter for this one")


def merge_into(model, adapter: Adapter) -> None:
    """Add each pair's B @ A * scaling to the model's weight, in place (float math, cast back)."""
    import torch

    with torch.no_grad():
        for p in adapter.pairs:
            try:
                lin = model.get_submodule(p.module)
            except AttributeError:
                raise EdgelmError(f"adapter {adapter.folder} adapts {p.module}, which the model does not have; it "
                                  "belongs to another architecture") from None
            w = lin.weight
            if tuple(w.shape) != (p.b.shape[0], p.a.shape[1]):
                raise EdgelmError(f"adapter {adapter.folder}: {p.module} is {tuple(w.shape)} in the model but "
                                  f"{(p.b.shape[0], p.a.shape[1])} in the adapter; it belongs to another model")
            w.copy_((w.float() + p.delta()).to(w.dtype))


def merged_model(adapter: Adapter, base: str | None = None):
    """(model, tokenizer, source): the adapter's base (or ``base``, checked to be it) with the adapter merged in."""
    from edgelm.models.loader import load_model, resolve

    spec = base or str(adapter.base["spec"])
    src = resolve(spec)
    check_base(adapter, src.sha256, src.spec)
    model, tok, _ = load_model(spec)  # a quantized base loads dequantized
    merge_into(model, adapter)
    return model, tok, src


def write_merged(adapter: Adapter, out: Path, base: str | None = None) -> dict[str, Any]:
    """A float HF folder of the base with the adapter merged in (for TVM, or any runtime that can't apply it)."""
    from edgelm.manifest import write_manifest

    import shutil

    model, tok, src = merged_model(adapter, base)
    if getattr(model.config, "quantization_config", None) is not None:  # a quantized base, merged: plain float now
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)
    gen = Path(src.path) / "generation_config.json"
    if gen.is_file() and not (out / "generation_config.json").is_file():
        shutil.copyfile(gen, out / "generation_config.json")
    return write_manifest(out, "student", merged={"adapter": str(adapter.folder), "base": adapter.base,
                                                  "adapter_files": adapter.manifest.get("files", {})})
