"""`edgelm export`: quantize if needed, convert, check against PyTorch, and write the artifact atomically.

The check opens the artifact in the runtime its target names, through the RUNTIMES registry (runtimes sit above
export in the pipeline, so export names them rather than importing them)."""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgelm.errors import EdgelmError
from edgelm.artifact.config import ExportConfig

log = logging.getLogger(__name__)
GENERATION_CONFIG = "generation_config.json"  # copied from the source into every artifact


@dataclass(frozen=True)
class ExportResult:
    out: Path  # the artifact folder
    target: str  # gguf | onnx | ...
    preset: str  # preset name
    manifest: dict[str, Any] = field(default_factory=dict)  # what edgelm.json holds


def _existing_quantized(model: str) -> dict[str, Any] | None:
    from edgelm.manifest import read_manifest

    if not os.path.isdir(model):
        return None
    m = read_manifest(model)
    return m if m and m.get("kind") == "quantized" else None


def export(config: ExportConfig | None = None, **kwargs: Any) -> ExportResult:
    """Export a model to a target with a preset. Keyword arguments are :class:`ExportConfig` fields."""
    import tempfile

    from edgelm.artifact.check import EXACT_METHODS, check_artifact
    from edgelm.fsutil import atomic_dir, peak_rss_mib
    from edgelm.manifest import read_manifest, write_manifest
    from edgelm.models.loader import check_arch, resolve
    from edgelm.quant.api import quantize_to_folder
    from edgelm.registry import TARGETS

    c = replace(config, **kwargs) if config is not None else ExportConfig(**kwargs)
    if not c.model or not c.out:
        raise EdgelmError("export needs a model and --out")
    adapter = _adapter_route(c)
    if adapter is not None:
        return adapter
    target = TARGETS.get(c.target)
    preset = c.preset()
    if c.target not in preset.targets:
        ok = [n for n, p in _presets() if c.target in p.targets]
        raise EdgelmError(f"preset {preset.name} cannot be exported to {c.target}; presets for {c.target}: {', '.join(ok)}")
    target.check_preset(preset)
    target.check_options(c)
    if (Path(c.model) / "config.json").is_file():
        from edgelm.models.loader import read_config

        target.check_model(read_config(c.model), str(c.model))
    if Path(c.out).exists() and not c.force:
        raise EdgelmError(f"{c.out} already exists; remove it or pass --force")
    if preset.imatrix:
        from edgelm.converters.gguf import find_llama_quantize

        find_llama_quantize()  # before any work
    t0 = time.perf_counter()
    prior = _existing_quantized(c.model)
    if prior is None and os.path.isdir(c.model):
        _check_disk(Path(c.model), preset, Path(c.out))
    with tempfile.TemporaryDirectory(prefix="edgelm-export-") as work_s, atomic_dir(c.out, overwrite=c.force) as tmp:
        work = Path(work_s)
        ref_spec = c.model
        source: dict[str, Any]
        plan = None  # a mixed preset's per-tensor types
        if prior is not None:  # an `edgelm quantize` folder: export its exact values
            if prior["preset"]["name"] != preset.name:
                raise EdgelmError(f"{c.model} was quantized with {prior['preset']['name']}; export it with --quant "
                                  f"{prior['preset']['name']}, or export the fp32 model with --quant {preset.name}")
            src = Path(c.model)
            ref_spec = prior["source"]["spec"]
            source = {**prior["source"], "quantized_folder": str(Path(c.model).resolve()),
                      "quantized_sha256": resolve(c.model).sha256}  # what an adapter trained on it binds to
            plan = prior.get("plan")
        else:
            if os.path.isdir(c.model):
                own = read_manifest(c.model)  # refuses a folder whose files don't match its manifest
            resolved = resolve(c.model)
            if resolved.kind == "hub":
                resolved = replace(resolved, path=_hub_snapshot(resolved.spec))
            check_arch(resolved.path)
            source = {"spec": resolved.spec, "kind": resolved.kind, "sha256": resolved.sha256}
            if os.path.isdir(c.model) and own and own.get("merged"):  # a LoRA adapter merged into its base
                source["merged"] = own["merged"]
            if preset.weight_only:
                src = work / "quantized"
                src.mkdir()
                fields = quantize_to_folder(c.model, preset, src, data=c.data, text_field=c.text_field,
                                            calib_samples=c.calib_samples, calib_seqlen=c.calib_seqlen, seed=c.seed,
                                            device=c.device or None)
                source.update({k: v for k, v in fields.items() if k == "calibration"})
                plan = fields.get("plan")
            else:
                src = Path(resolved.path)
            if preset.imatrix:
                source["imatrix"] = _write_imatrix(c, src, work)
        log.info("exporting %s -> %s (%s)", c.model, c.target, preset.name)
        fields = target.export(src, preset, tmp, work, c)
        if (src / GENERATION_CONFIG).is_file() and not (tmp / GENERATION_CONFIG).is_file():
            # the model's end-of-generation ids (Llama 3's <|eot_id|>, Gemma's <end_of_turn>...): every runtime stops
            # at them, not only at the tokenizer's eos_token
            shutil.copyfile(src / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
        fields_time = time.perf_counter() - t0
        if c.check:
            rt = target.open(tmp, threads=c.threads, work=work)
            exact = preset.weight_only and preset.method in EXACT_METHODS  # src: the checkpoint it packs
            try:
                parity = check_artifact(rt, preset, ref_spec, logit_atol=target.logit_atol, data=c.data,
                                        text_field=c.text_field, eval_seqs=c.eval_seqs, eval_seqlen=c.eval_seqlen,
                                        prompts=c.prompts, new_tokens=c.new_tokens,
                                        checkpoint=src if exact else None, exact_atol=target.exact_atol,
                                        as_packed=target.packed_transforms(src) if exact else None,
                                        read_back=target.read_back(tmp, src) if exact else None)
            finally:
                close = getattr(rt, "close", None)
                if close:
                    close()
        else:
            log.warning("--no-check: the artifact was not compared with PyTorch; its manifest says so")
            parity = {"skipped": True}
        manifest = write_manifest(tmp, f"export-{c.target}", target=c.target, runtime=target.runtime,
                                  preset=preset.as_dict(), source=source, parity=parity,
                                  export_seconds=round(fields_time, 2), peak_rss_mib=round(peak_rss_mib()),
                                  seconds=round(time.perf_counter() - t0, 2), **({"plan": plan} if plan else {}),
                                  **fields)
    return ExportResult(Path(c.out), c.target, preset.name, manifest)


def _adapter_route(c: ExportConfig) -> ExportResult | None:
    """A LoRA adapter as MODEL: exported for --base's runtime, or merged (--merge); None for a model. --base and
    --merge mean nothing for a model, and an exported adapter is not merged again."""
    from edgelm.artifact.adapter import ADAPTER_KIND, export_adapter, export_merged
    from edgelm.finetune.adapter import is_adapter
    from edgelm.manifest import read_manifest

    m = read_manifest(c.model) if os.path.isdir(c.model) else None
    kind = str((m or {}).get("kind", ""))
    if kind.startswith(ADAPTER_KIND.format(target="")):
        raise EdgelmError(f"{c.model} is an exported {m['target']} adapter, which {m['runtime']} applies unmerged; "
                          "--merge and --base take the adapter folder edgelm finetune wrote "
                          f"({(m.get('adapter') or {}).get('folder')})")
    if not is_adapter(c.model):
        if c.base or c.merge:
            raise EdgelmError(f"--{'base' if c.base else 'merge'} applies to a LoRA adapter folder (edgelm finetune "
                              f"--lora); {c.model} is a model")
        return None
    if c.base and c.merge:
        raise EdgelmError("--base exports the adapter for a runtime that applies it unmerged; --merge bakes it into "
                          "a new artifact: pass one of them")
    if c.merge:
        return export_merged(c.model, c)
    if not c.base:
        raise EdgelmError(f"{c.model} is a LoRA adapter: pass --base ARTIFACT (an exported GGUF or ONNX artifact of "
                          "its base, whose runtime applies it) or --merge (a new full artifact)")
    man = export_adapter(c.model, c.base, c.out, force=c.force, check=c.check, threads=c.threads, data=c.data,
                         text_field=c.text_field, eval_seqs=c.eval_seqs, eval_seqlen=c.eval_seqlen,
                         prompts=c.prompts, new_tokens=c.new_tokens)
    return ExportResult(Path(c.out), man["target"], "adapter", man)


def _check_disk(model: Path, preset, out: Path) -> None:
    """Refuse before any work when the output's filesystem, or the work folder's (a quantized checkpoint on the way),
    can't hold what the export writes: the quantized linears at the preset's bits, the rest at its float width
    (8 bits for a quantized preset's embedding)."""
    import math

    from edgelm.fsutil import check_free_space
    from edgelm.models.qformat import QUANT_LINEARS
    from edgelm.models.weights import LazySafetensors

    files = sorted(model.glob("*.safetensors"))
    if not files:
        return
    t = LazySafetensors(files)
    linear = sum(math.prod(t.shape(n)) for n in t if n.endswith(".weight") and n.rsplit(".", 2)[-2] in QUANT_LINEARS)
    other_bytes = sum(t.nbytes(n) for n in t) - 2 * linear  # as stored (bf16 for the big ones)
    other = sum(math.prod(t.shape(n)) for n in t) - linear
    bpw = preset.bits_per_weight
    width = 4 if preset.method == "none" else 2 if preset.method == "cast" else 1
    out_bytes = int(linear * bpw / 8 + other * width)
    check_free_space(out.parent, out_bytes, f"exporting {model.name} as {preset.name}")
    import tempfile

    if preset.weight_only:
        check_free_space(tempfile.gettempdir(), int(linear * bpw / 8 + other_bytes) + out_bytes,
                         f"exporting {model.name} as {preset.name} (its quantized checkpoint in the work folder)")
    elif preset.method == "llamacpp":  # llama.cpp's quantizer reads an f32 GGUF from the work folder
        check_free_space(tempfile.gettempdir(), 4 * (linear + other) + out_bytes,
                         f"exporting {model.name} as {preset.name} (an f32 GGUF in the work folder)")


def _write_imatrix(c: ExportConfig, src: Path, work: Path) -> dict[str, Any]:
    """llama.cpp's importance matrix of ``src`` from the calibration set (train split), into the work folder."""
    from edgelm.converters.gguf import IMATRIX_FILE, write_imatrix
    from edgelm.models.loader import load_model
    from edgelm.quant.api import calibration_set
    from edgelm.quant.hessian import input_importance

    model, tok, _ = load_model(str(src))
    calib = calibration_set(tok, c.data, c.text_field, c.calib_samples, c.calib_seqlen, c.seed)
    stats, tokens = input_importance(model.float().eval(), calib)
    n = write_imatrix(stats, tokens, src, work / IMATRIX_FILE, dataset="train split", chunk_size=c.calib_seqlen)
    log.info("importance matrix: %d tensors from %d train-split tokens", n, tokens)
    return {"split": "train", "samples": c.calib_samples, "seqlen": c.calib_seqlen, "seed": c.seed, "tensors": n}


def _hub_snapshot(repo_id: str) -> str:
    """Download a hub model's files (config, safetensors, tokenizer) once; converters read local folders."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as e:
        raise EdgelmError(f"could not fetch {repo_id!r} from the hub ({type(e).__name__}); check the id and your network") from None


def _presets():
    from edgelm.registry import QUANTS

    return QUANTS.items()
