"""Quantize once per preset, export to each target, and collect one row per artifact. Used by `edgelm demo` and
benchmarks/quant_quality.py, so the report and docs/results.md come from the same code."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)


@dataclass
class ArtifactRow:
    model: str  # what was quantized
    preset: str  # quant preset
    target: str  # gguf | onnx | reference
    path: str  # artifact folder or file
    model_mib: float  # size of the model file(s): what a device downloads
    bpw: float  # nominal bits per quantized weight
    ppl: float  # val perplexity, measured in the artifact's own runtime
    ppl_ref: float  # val perplexity of the fp32 PyTorch model on the same sequences
    kld: float  # mean KL(fp32 || artifact), nats
    top1_agree: float  # share of positions with the same argmax as fp32
    fallbacks: int  # tensors llama.cpp stored in another type than asked
    seconds: float  # quantize + export + check wall time
    error: str = ""  # why the row has no figures, if it failed

    @property
    def dppl(self) -> float:
        return self.ppl - self.ppl_ref

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dppl": self.dppl}


def _model_bytes(folder: Path, manifest: dict[str, Any]) -> int:
    return sum(f["size"] for name, f in manifest["files"].items()
               if name.endswith((".gguf", ".onnx", ".onnx.data", ".safetensors")))


def _row(label: str, preset, target: str, out: Path, m: dict[str, Any], seconds: float) -> ArtifactRow:
    par = m["parity"]
    return ArtifactRow(label, preset.name, target, str(out), _model_bytes(out, m) / 2**20, preset.bits_per_weight,
                       par["ppl"], par["ppl_ref"], par["kld"], par["top1_agree"], len(m.get("fallback_tensors") or []),
                       seconds)


def export_suite(model: str, plan: Sequence[tuple[str, str]], out_root: str | Path, *, data: tuple[str, ...] = (),
                 calib_samples: int = 128, calib_seqlen: int = 512, eval_seqs: int = 32, eval_seqlen: int = 256,
                 threads: int = 1, label: str | None = None, reuse: bool = False,
                 prefix: str = "") -> list[ArtifactRow]:
    """Export ``model`` for every (preset, target) in ``plan`` under ``out_root``; a failed pair becomes an error row.

    ``reuse``: keep an artifact already in ``out_root`` whose manifest (sha256 checked) has this preset and a
    passed check, instead of exporting it again; and a quantized checkpoint already there instead of quantizing
    (a QAT run's, say). ``prefix``: of the folder names (``{prefix}{target}-{preset}``, ``quantized-{prefix}{preset}``),
    for another checkpoint of the same preset beside the first.
    """
    from edgelm.quant.hessian import reuse_hessians

    with reuse_hessians():  # the mixed plans (and an importance matrix) of one model: one calibration pass
        return _export_all(model, plan, Path(out_root), data=data, calib_samples=calib_samples,
                           calib_seqlen=calib_seqlen, eval_seqs=eval_seqs, eval_seqlen=eval_seqlen, threads=threads,
                           label=label, reuse=reuse, prefix=prefix)


def _export_all(model: str, plan: Sequence[tuple[str, str]], out_root: Path, *, data: tuple[str, ...],
                calib_samples: int, calib_seqlen: int, eval_seqs: int, eval_seqlen: int, threads: int,
                label: str | None, reuse: bool, prefix: str = "") -> list[ArtifactRow]:
    from edgelm.artifact.api import export
    from edgelm.errors import EdgelmError
    from edgelm.manifest import read_manifest
    from edgelm.quant.api import quantize
    from edgelm.quant.presets import get_preset

    rows: list[ArtifactRow] = []
    quantized: dict[str, tuple[Path, float]] = {}
    for preset_name, target in plan:
        preset = get_preset(preset_name)
        t0 = time.perf_counter()
        src, q_seconds = model, 0.0
        done = out_root / f"{prefix}{target}-{preset_name}"
        if reuse and (done / "edgelm.json").is_file():
            m = read_manifest(done)
            if m and m["preset"]["name"] == preset_name and m["parity"].get("passed"):
                log.info("== %s: %s -> %s (reused)", label or model, preset_name, target)
                rows.append(_row(label or model, preset, target, done, m, float(m.get("export_seconds", 0))))
                continue
        try:
            if preset.weight_only:
                folder = out_root / f"quantized-{prefix}{preset_name}"
                prior = read_manifest(folder) if reuse and (folder / "edgelm.json").is_file() else None
                if prior and prior["preset"]["name"] == preset_name and preset_name not in quantized:
                    quantized[preset_name] = (folder, float(prior.get("quantize_seconds", 0)))
                if preset_name not in quantized:
                    res = quantize(model=model, quant=preset_name, out=folder, data=data, calib_samples=calib_samples,
                                   calib_seqlen=calib_seqlen, eval_seqs=0, force=True)
                    quantized[preset_name] = (folder, res.seconds)
                src, q_seconds = str(quantized[preset_name][0]), quantized[preset_name][1]
            out = out_root / f"{prefix}{target}-{preset_name}"
            log.info("== %s: %s -> %s", label or model, preset_name, target)
            r = export(model=src, target=target, quant=preset_name, out=out, force=True, data=data,
                       calib_samples=calib_samples, calib_seqlen=calib_seqlen, eval_seqs=eval_seqs,
                       eval_seqlen=eval_seqlen, threads=threads)
            rows.append(_row(label or model, preset, target, out, r.manifest, time.perf_counter() - t0 + q_seconds))
        except EdgelmError as e:
            log.warning("%s -> %s failed: %s", preset_name, target, e)
            nan = float("nan")
            rows.append(ArtifactRow(label or model, preset_name, target, "", nan, preset.bits_per_weight, nan, nan, nan,
                                    nan, 0, time.perf_counter() - t0, error=str(e)))
    return rows


def gguf_file_row(path: str | Path, ref_model: str, label: str, preset: str, *, data: tuple[str, ...] = (),
                  eval_seqs: int = 32, eval_seqlen: int = 256, threads: int = 1) -> ArtifactRow:
    """A row for a GGUF file made elsewhere (e.g. the teacher's GGUF as shipped), measured like our artifacts."""
    from edgelm.converters.gguf import read_types
    from edgelm.quant.presets import llamacpp_bpw
    from edgelm.quant.quality import quality_vs_reference
    from edgelm.registry import RUNTIMES, TARGETS

    t0 = time.perf_counter()
    path = Path(path)
    types = [v["type"] for v in read_types(path).values() if len(v["shape"]) > 1]
    rt = RUNTIMES.get(TARGETS.get("gguf").runtime)(path, threads=threads)
    q = quality_vs_reference(ref_model, rt.logits, data=data, n=eval_seqs, seq_len=eval_seqlen)
    rt.close()
    main = max(set(types), key=types.count)
    return ArtifactRow(label, preset, "gguf (shipped)", str(path), path.stat().st_size / 2**20,
                       llamacpp_bpw(main), q.ppl, q.ppl_ref, q.kld,
                       q.top1_agree, 0, time.perf_counter() - t0)
