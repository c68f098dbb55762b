"""`edgelm quantize`: turn a model into a quantized checkpoint folder with its measured quality loss."""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm.errors import EdgelmError
from edgelm.quant.config import QuantizeConfig
from edgelm.quant.presets import QuantPreset

if TYPE_CHECKING:
    from edgelm.models.qformat import QLinear

log = logging.getLogger(__name__)
MIN_CALIB_SAMPLES = 4


@dataclass(frozen=True)
class QuantizeResult:
    out: Path  # the quantized checkpoint folder
    preset: QuantPreset  # what was applied
    quality: dict[str, Any] = field(default_factory=dict)  # ppl/KLD/top-1 against the fp32 source on val
    seconds: float = 0.0  # wall time of quantization itself
    plan: dict[str, Any] = field(default_factory=dict)  # mixed presets: the per-tensor types (MixedPlan.as_dict)


def calibration_set(source_tok, data: tuple[str, ...], text_field: str, samples: int, seqlen: int, seed: int):
    """[samples, seqlen] token ids from the *train* split, never val/test."""
    from edgelm.data.corpus import Corpus, CorpusSpec, TokenStream

    if samples < MIN_CALIB_SAMPLES:
        raise EdgelmError(f"--calib-samples must be at least {MIN_CALIB_SAMPLES}, got {samples}")
    if seqlen < 16:
        raise EdgelmError(f"--calib-seqlen must be at least 16, got {seqlen}")
    corpus = Corpus(CorpusSpec(data, text_field=text_field))
    seqs = TokenStream(corpus, source_tok, "train", seqlen, seed=seed, loop=False).take(samples)
    if len(seqs) < samples:
        raise EdgelmError(f"the calibration set (train split of {corpus.spec.describe()}) gives {len(seqs)} sequences of "
                          f"{seqlen} tokens, {samples} asked; add data or lower --calib-samples/--calib-seqlen")
    return seqs


def quantize_to_folder(model_spec: str, preset: QuantPreset, tmp: Path, *, data: tuple[str, ...] = (),
                       text_field: str = "text", calib_samples: int = 128, calib_seqlen: int = 512, seed: int = 0,
                       device: str | None = None) -> dict[str, Any]:
    """Write the quantized checkpoint of ``model_spec`` into the (empty) folder ``tmp``; return manifest fields.
    RTN and GPTQ of a local model work a tensor at a time (GPTQ's child block by block); the rest hold the model."""
    import torch

    from edgelm.models.loader import load_model, load_tokenizer, resolve
    from edgelm.models.qformat import quantized_linears, save_quantized
    from edgelm.quant.rtn import rtn_quantize

    if preset.method == "llamacpp":
        raise EdgelmError(f"{preset.name} is llama.cpp's own quantizer and applies at export: "
                          f"edgelm export MODEL --target gguf --quant {preset.name}")
    source = resolve(model_spec)
    fields: dict[str, Any] = {"source": {"spec": source.spec, "kind": source.kind, "sha256": source.sha256},
                              "preset": preset.as_dict()}
    calibration = {"split": "train", "samples": calib_samples, "seqlen": calib_seqlen, "seed": seed}
    streams = source.kind != "hub" and any(Path(source.path).glob("*.safetensors"))
    if preset.method in ("rtn", "gptq") and streams:
        _check_groups(Path(source.path), preset)  # before any work
    if preset.method == "rtn" and streams:
        from edgelm.quant.rtn import rtn_folder

        n = rtn_folder(Path(source.path), tmp, preset)
        log.info("RTN %s: %d linears, tensor by tensor", preset.name, n)
        return fields
    if preset.method == "gptq" and streams:
        _gptq(source, load_tokenizer(source), preset, tmp, data=data, text_field=text_field, samples=calib_samples,
              seqlen=calib_seqlen, seed=seed, device=device)
        return {**fields, "calibration": calibration}
    model, tok, source = load_model(model_spec)
    if preset.method in ("none", "cast"):
        model.to(torch.float16 if preset.method == "cast" else torch.float32).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return fields
    if preset.method == "mixed":
        return _mixed(model, tok, preset, tmp, fields, data=data, text_field=text_field, samples=calib_samples,
                      seqlen=calib_seqlen, seed=seed)
    names = quantized_linears(model)
    gs = preset.group_size
    for n in names:
        in_f = model.get_submodule(n).weight.shape[1]
        if gs > 0 and in_f % gs:
            raise EdgelmError(f"{n} has {in_f} input columns, not a multiple of {preset.name}'s group size {gs}; "
                              "pick a preset with a group size that divides it")
    if preset.method == "gptq":  # a hub model: GPTQModel reads it from there, this process holds it
        _gptq(source, tok, preset, tmp, data=data, text_field=text_field, samples=calib_samples, seqlen=calib_seqlen,
              seed=seed, device=device, model=model)
        return {**fields, "calibration": calibration}
    qcfg = {"bits": preset.bits, "group_size": gs, "sym": preset.sym, "desc_act": preset.act_order}
    qlinears = {n: rtn_quantize(model.get_submodule(n).weight.data, preset.bits, gs, preset.sym) for n in names}
    save_quantized(tmp, model, tok, qlinears, qcfg)
    return fields


def _check_groups(folder: Path, preset: QuantPreset) -> None:
    """Every linear's input columns split into the preset's groups, or a one-line error naming the first that
    doesn't (read from the safetensors headers)."""
    from edgelm.models.qformat import linear_weights
    from edgelm.models.weights import LazySafetensors, safetensors_files

    tensors, gs = LazySafetensors(safetensors_files(folder)), preset.group_size
    for name in linear_weights(tensors):
        if gs > 0 and tensors.shape(name)[1] % gs:
            raise EdgelmError(f"{name[: -len('.weight')]} has {tensors.shape(name)[1]} input columns, not a multiple "
                              f"of {preset.name}'s group size {gs}; pick a preset with a group size that divides it")


def _mixed(model, tok, preset: QuantPreset, tmp: Path, fields: dict[str, Any], *, data, text_field, samples, seqlen,
           seed) -> dict[str, Any]:
    """A block type per tensor (edgelm.quant.mixed), written as a GPTQ-format folder with per-module bits."""
    from edgelm.quant.mixed import check_plannable, measure_sensitivity, save_mixed

    model = model.float().eval()
    check_plannable(model, preset.types, budget_bpw=preset.budget_bpw, max_mib=preset.max_mib)  # before any work
    calib = calibration_set(tok, data, text_field, samples, seqlen, seed)
    sens = measure_sensitivity(model, calib, preset.types, damp=preset.damp)
    plan, qlinears = sens.choose(budget_bpw=preset.budget_bpw, max_mib=preset.max_mib)
    log.info("mixed plan: %s, predicted KLD %s", plan.summary(), plan.as_dict()["predicted_kld"])
    save_mixed(tmp, model, tok, plan, qlinears, preset.group_size)
    fields["calibration"] = {"split": "train", "samples": samples, "seqlen": seqlen, "seed": seed}
    fields["plan"] = plan.as_dict()
    return fields


def quantize_mixed_sweep(model_spec: str, presets: list[QuantPreset], out_root: str | Path, *, data: tuple[str, ...] = (),
                         text_field: str = "text", calib_samples: int = 128, calib_seqlen: int = 512,
                         seed: int = 0, force: bool = False) -> list[QuantizeResult]:
    """Several mixed presets (budgets, type sets) of one model from one sensitivity measurement, the costly part:
    one GPTQ-format folder per preset under ``out_root`` (``quantized-PRESET``). Quality is left to the export check."""
    from edgelm.fsutil import atomic_dir
    from edgelm.manifest import write_manifest
    from edgelm.models.loader import load_model
    from edgelm.quant.mixed import check_plannable, measure_sensitivity, save_mixed

    if not presets or any(p.method != "mixed" for p in presets):
        raise EdgelmError("quantize_mixed_sweep takes mixed presets only (e.g. gptq-mixed with options)")
    model, tok, source = load_model(model_spec)
    model = model.float().eval()
    types = tuple(dict.fromkeys(t for p in presets for t in p.types))
    for p in presets:
        check_plannable(model, p.types, budget_bpw=p.budget_bpw, max_mib=p.max_mib)
    t0 = time.perf_counter()
    calib = calibration_set(tok, data, text_field, calib_samples, calib_seqlen, seed)
    sens = measure_sensitivity(model, calib, types, damp=presets[0].damp)
    measured = time.perf_counter() - t0
    results = []
    for p in presets:
        plan, qlinears = sens.choose(budget_bpw=p.budget_bpw, max_mib=p.max_mib, types=p.types)
        out = Path(out_root) / f"quantized-{p.name}"  # edgelm.artifact.suite's name for a preset's checkpoint
        with atomic_dir(out, overwrite=force) as tmp:
            save_mixed(tmp, model, tok, plan, qlinears, p.group_size)
            write_manifest(tmp, "quantized", source={"spec": source.spec, "kind": source.kind, "sha256": source.sha256},
                           preset=p.as_dict(), quality={}, quantize_seconds=round(measured, 2), plan=plan.as_dict(),
                           calibration={"split": "train", "samples": calib_samples, "seqlen": calib_seqlen, "seed": seed})
        log.info("%s: %s", p.name, plan.summary())
        results.append(QuantizeResult(out, p, {}, measured, plan.as_dict()))
    return results


def _gptq(source, tok, preset: QuantPreset, tmp: Path, *, data, text_field, samples, seqlen, seed, device,
          model=None) -> None:
    """GPTQModel on ``source`` in a child process, then its codes written into ``tmp`` as the checkpoint, read a
    linear at a time from the child's output while it is still there: beside the source's own float tensors, or
    ``model``'s (a hub model, held)."""
    import numpy as np
    import torch

    from edgelm.models.archs import get_arch
    from edgelm.models.qformat import StackedParts, linear_weights, read_quantized, save_quantized, write_quantized
    from edgelm.models.weights import LazySafetensors, safetensors_files
    from edgelm.quant.gptq import run_gptq

    calib = calibration_set(tok, data, text_field, samples, seqlen, seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    qcfg = {"bits": preset.bits, "group_size": preset.group_size, "sym": preset.sym, "desc_act": preset.act_order}
    if model is None:
        modules = {n[: -len(".weight")] for n in linear_weights(LazySafetensors(safetensors_files(source.path)))}
    else:
        from edgelm.models.qformat import quantized_linears

        modules = set(quantized_linears(model))
    with tempfile.TemporaryDirectory(prefix="edgelm-gptq-") as work:
        work_p = Path(work)
        np.save(work_p / "calib.npy", calib)
        log_path = tmp / "gptq.log"
        log.info("GPTQ %s on %s: %d x %d calibration tokens (log: %s)", preset.name, device, samples, seqlen, log_path)
        run_gptq(source.path, work_p / "calib.npy", work_p / "out", bits=preset.bits, group_size=preset.group_size,
                 sym=preset.sym, act_order=preset.act_order, damp=preset.damp, mse=preset.mse, device=device,
                 log_path=log_path)
        cfg, _, done = read_quantized(work_p / "out")
        qlinears = StackedParts(done, get_arch(cfg.get("model_type")).fused)
        missing = modules - set(qlinears)
        if missing:
            raise EdgelmError(f"GPTQ left {len(missing)} linear layers unquantized (e.g. {sorted(missing)[0]})")
        if model is None:
            write_quantized(Path(source.path), tmp, modules, qlinears.__getitem__, qcfg, desc=f"write {preset.name}")
        else:
            save_quantized(tmp, model, tok, dict(qlinears.items()), qcfg)


def quantize(config: QuantizeConfig | None = None, /, **kwargs: Any) -> QuantizeResult:
    """Quantize a model with a preset into a GPTQ-format HF folder, measuring its quality loss on val. Keyword
    arguments are :class:`QuantizeConfig` fields (or override those of ``config``)."""
    from edgelm.fsutil import atomic_dir
    from edgelm.manifest import write_manifest
    from edgelm.quant.quality import quality_vs_reference

    c = replace(config, **kwargs) if config is not None else QuantizeConfig(**kwargs)
    if not c.model or not c.out:
        raise EdgelmError("quantize needs a model and --out")
    preset = c.preset()
    t0 = time.perf_counter()
    with atomic_dir(c.out, overwrite=c.force) as tmp:
        fields = quantize_to_folder(c.model, preset, tmp, data=c.data, text_field=c.text_field,
                                    calib_samples=c.calib_samples, calib_seqlen=c.calib_seqlen, seed=c.seed,
                                    device=c.device or None)
        seconds = time.perf_counter() - t0
        quality = {}
        if c.eval_seqs > 0:
            quality = quality_vs_reference(c.model, tmp, data=c.data, text_field=c.text_field, n=c.eval_seqs,
                                           seq_len=c.eval_seqlen).as_dict()
        write_manifest(tmp, "quantized", **fields, quality=quality, quantize_seconds=round(seconds, 2))
    return QuantizeResult(Path(c.out), preset, quality, seconds, fields.get("plan") or {})
