"""`edgelm export ADAPTER --base ARTIFACT`: a LoRA adapter as the base artifact's runtime applies it (GGUF LoRA for
llama.cpp, .onnx_adapter for ONNX Runtime), checked against PyTorch like every export; or, with --merge, baked into
a new full artifact for any target (TVM, which has no run-time adapters).

An adapter is bound to the weights it was trained on: an artifact exported from those weights (any preset: an
adapter trained on the float base applied to its quantized artifact) or packed from that quantized folder."""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)

ADAPTER_KIND = "adapter-{target}"  # the adapter artifact's manifest kind
CHECK_KLD_RATIO, CHECK_KLD_SLACK = 2.0, 1e-3  # the adapted artifact may differ from PyTorch twice as the base does


def base_artifact(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an exported base artifact; refused in one line when ``path`` is not one."""
    from edgelm.manifest import read_manifest

    p = Path(path)
    m = read_manifest(p) if p.is_dir() else None
    if not m or not str(m.get("kind", "")).startswith("export-"):
        raise EdgelmError(f"--base {path} is not an `edgelm export` artifact folder; export the base first")
    return m


def bound_to(adapter, base_manifest: dict[str, Any], where: str) -> None:
    """Refuse an adapter whose base weights are not the ones the artifact holds (by sha256)."""
    from edgelm.models.loader import same_weights

    src = base_manifest.get("source") or {}
    theirs = adapter.base.get("sha256")
    qsha = src.get("quantized_sha256")
    if qsha is None and src.get("quantized_folder") and os.path.isdir(src["quantized_folder"]):
        from edgelm.models.loader import resolve  # an artifact exported before the manifest kept its digest

        qsha = resolve(src["quantized_folder"]).sha256
    mine = {src.get("sha256"), qsha} - {None}
    if theirs and mine:
        if theirs in mine:
            return
    elif any(same_weights(None, adapter.base.get("spec"), None, s)
             for s in (src.get("spec"), src.get("quantized_folder"))):
        return
    raise EdgelmError(f"adapter {adapter.folder} was trained on {adapter.base.get('spec')} (sha256 "
                      f"{str(theirs)[:12]}), but {where} was exported from "
                      f"{src.get('quantized_folder') or src.get('spec')}"
                      f" (sha256 {str(src.get('quantized_sha256') or src.get('sha256'))[:12]}); export the adapter "
                      "against an artifact of its own base")


def export_adapter(adapter_dir: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *,
                   force: bool = False, check: bool = True, threads: int = 1, data: tuple[str, ...] = (),
                   text_field: str = "text", eval_seqs: int = 16, eval_seqlen: int = 128, prompts: int = 4,
                   new_tokens: int = 16) -> dict[str, Any]:
    """Write the adapter for the base artifact's runtime into ``out`` (atomically) and check it; returns the
    manifest."""
    from edgelm.finetune.adapter import read_adapter
    from edgelm.fsutil import atomic_dir, sha256_file
    from edgelm.manifest import write_manifest
    from edgelm.registry import TARGETS

    ad = read_adapter(adapter_dir)
    bm = base_artifact(base)
    target = TARGETS.get(bm["target"])
    bound_to(ad, bm, str(base))
    if Path(out).exists() and not force:
        raise EdgelmError(f"{out} already exists; remove it or pass --force")
    t0 = time.perf_counter()
    base = Path(base)
    base_file = base / bm.get("file", "")
    with atomic_dir(out, overwrite=force) as tmp:
        fields = target.export_adapter(ad, base, tmp)
        parity: dict[str, Any] = {"skipped": True}
        if check:
            parity = check_adapter(target, base, bm, ad, tmp / fields["file"], threads=threads, data=data, text_field=text_field,
                                   eval_seqs=eval_seqs, eval_seqlen=eval_seqlen, prompts=prompts,
                                   new_tokens=new_tokens)
        else:
            log.warning("--no-check: the adapter was not compared with PyTorch; its manifest says so")
        adapter_bytes = (tmp / fields["file"]).stat().st_size
        # the model's files (ONNX keeps its weights in model.onnx.data), not the tokenizer beside them
        base_bytes = sum(f["size"] for n, f in (bm.get("files") or {}).items() if n.startswith(bm.get("file") or "\0"))
        base_bytes = base_bytes or bm.get("total_bytes")
        return write_manifest(
            tmp, ADAPTER_KIND.format(target=target.name), target=target.name, runtime=target.runtime,
            base={"artifact": str(base.resolve()), "file": bm.get("file"),
                  "sha256": sha256_file(base_file) if base_file.is_file() else None, "source": bm.get("source"),
                  "preset": (bm.get("preset") or {}).get("name"), "bytes": base_bytes},
            adapter={"folder": str(Path(adapter_dir).resolve()), "base": ad.base, "rank": ad.rank,
                     "finetune": ad.manifest.get("finetune")},
            share_of_base_bytes=round(adapter_bytes / base_bytes, 6) if base_bytes else None,
            parity=parity, seconds=round(time.perf_counter() - t0, 2), **fields)


def check_adapter(target, base: Path, bm: dict[str, Any], ad, file: Path, *, threads: int, data, text_field,
                  eval_seqs, eval_seqlen, prompts, new_tokens) -> dict[str, Any]:
    """The adapted artifact against PyTorch's base + adapter: greedy tokens (up to ties) and a KL divergence no more
    than twice the base artifact's own from its PyTorch reference (plus a slack). The adapter's own effect (its
    KL divergence from the base, in PyTorch) is recorded: a check that passes with no effect checks nothing."""
    from edgelm.artifact.check import TIE_SHARE, ParityError, _greedy_same
    import copy

    from edgelm.finetune.adapter import merge_into
    from edgelm.models.loader import load_model
    from edgelm.quant.quality import quality_vs_reference, val_sequences

    src = bm.get("source") or {}
    ref_spec = src.get("quantized_folder") or src.get("spec")  # what the base artifact runs, in PyTorch
    ref_base, tok, _ = load_model(ref_spec)  # a quantized folder loads dequantized: the grid the artifact holds
    merged = copy.deepcopy(ref_base)
    merge_into(merged, ad)
    rt = target.open(base, threads=threads, adapters={"adapter": file})
    try:
        n_ctx = min(eval_seqlen, rt.context)
        evals = dict(data=data, text_field=text_field, n=eval_seqs, seq_len=n_ctx, tokenizer=tok)
        q_base = quality_vs_reference(ref_spec, rt.logits, ref_model=ref_base, **evals)
        effect = quality_vs_reference(ref_spec, merged, ref_model=ref_base, **evals)
        rt.set_adapter("adapter")
        q_ad = quality_vs_reference(ref_spec, rt.logits, ref_model=merged, **evals)
        seqs = val_sequences(tok, data, text_field, prompts, min(32, rt.context - new_tokens))
        tie = 2 * q_ad.max_abs_logit_diff
        same, ties = _greedy_same(merged, rt, seqs, new_tokens, tie=tie)
    finally:
        rt.close()
    bound = q_base.kld * CHECK_KLD_RATIO + CHECK_KLD_SLACK
    result = {"reference": f"{ref_spec} + adapter", "seqs": eval_seqs, "seq_len": n_ctx,
              "kld": round(q_ad.kld, 8), "max_kld": round(bound, 8), "base_kld": round(q_base.kld, 8),
              "adapter_effect_kld": round(effect.kld, 6), "max_abs_logit_diff": round(q_ad.max_abs_logit_diff, 6),
              "top1_agree": round(q_ad.top1_agree, 6), "greedy_prompts": len(seqs), "greedy_identical": same,
              "greedy_ties": ties, "tie_share": TIE_SHARE}
    log.info("adapter check: %s", result)
    if same + ties < len(seqs) or q_ad.kld > bound:
        raise ParityError(f"adapter check failed: {same}/{len(seqs)} prompts greedy-identical to PyTorch's base + "
                          f"adapter ({ties} more up to a tie), KL divergence {q_ad.kld:.3g} nats (allowed {bound:.3g}, "
                          f"twice the base's {q_base.kld:.3g}); the runtime does not apply the adapter as PyTorch does")
    result["passed"] = True
    return result


def export_merged(adapter_dir: str | os.PathLike, config) -> Any:
    """--merge: the adapter's base with the adapter merged in, exported as a new full artifact with ``config``'s
    target and preset (its manifest names the adapter)."""
    from edgelm.artifact.api import export
    from edgelm.finetune.adapter import read_adapter, write_merged

    ad = read_adapter(adapter_dir)
    with tempfile.TemporaryDirectory(prefix="edgelm-merge-") as work:
        merged = Path(work) / "merged"
        merged.mkdir()
        write_merged(ad, merged)
        return export(replace(config, model=str(merged), merge=False))
