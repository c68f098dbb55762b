"""Parity is part of export: every artifact is checked against PyTorch and the result goes into its manifest.

- fp32 artifacts: greedy tokens identical to PyTorch on N prompts, and max |logit diff| within the target's atol.
- Exact packs (rtn, gptq and mixed presets: the codes and scales of a GPTQ-format checkpoint, packed without a second
  rounding): greedy tokens identical to the *dequantized checkpoint* they claim to reproduce, and max |logit diff|
  against it within the target's ``exact_atol``; a mispacked group shows there long before it shows in quality. Their
  KL divergence from the fp32 model may exceed the checkpoint's own (measured here, on the same sequences) by little.
- Other quantized artifacts (fp16, llama.cpp's own quantizer): perplexity, KL divergence and top-1 agreement against
  the fp32 model on the val split, with a fail threshold per preset.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)

EXACT_METHODS = ("rtn", "gptq", "mixed")  # presets whose artifacts pack a checkpoint's codes exactly
# an exact pack's KLD from fp32 may exceed its checkpoint's by this share, plus EXACT_KLD_SLACK nats (the runtime's
# own rounding: llama.cpp's 8-bit activations, f16 KV cache)
EXACT_KLD_RATIO, EXACT_KLD_SLACK = 1.25, 2e-3


class ParityError(EdgelmError):
    exit_code = 4


def torch_greedy(model, ids, n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.as_tensor(ids)[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             num_beams=1, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _greedy_same(ref_model, runtime, seqs, new_tokens: int) -> int:
    """How many prompts give the reference's greedy tokens."""
    same = 0
    for s in seqs:
        ids = [int(x) for x in s]
        if torch_greedy(ref_model, ids, new_tokens) == [int(t) for t in runtime.greedy(ids, new_tokens)]:
            same += 1
    return same


def check_artifact(runtime, preset, ref_spec: str, *, logit_atol: float, data: tuple[str, ...] = (),
                   text_field: str = "text", eval_seqs: int = 16, eval_seqlen: int = 128, prompts: int = 4,
                   new_tokens: int = 16, checkpoint: str | Path | None = None, exact_atol: float = 0.0,
                   as_packed: Callable | None = None) -> dict[str, Any]:
    """Run the parity check of an opened artifact; raise ParityError when it fails. Returns the manifest entry.

    ``checkpoint``: the GPTQ-format folder an exact pack was made from; ``as_packed(model)`` turns its dequantized
    model into what the target holds (the target's Q8_0 of a float embedding, say)."""
    from edgelm.models.loader import load_model
    from edgelm.quant.quality import quality_vs_reference, torch_logits_fn, val_sequences

    ref_model, tok, _ = load_model(ref_spec)
    if runtime.context < eval_seqlen:  # e.g. a GGUF whose context stops at a sliding window
        log.warning("check: sequences of %d tokens, the artifact's context (asked %d)", runtime.context, eval_seqlen)
        eval_seqlen = runtime.context
    prompt_len = min(32, runtime.context - new_tokens)
    evals = dict(data=data, text_field=text_field, n=eval_seqs, seq_len=eval_seqlen, tokenizer=tok)
    q = quality_vs_reference(ref_spec, runtime.logits, ref_model=ref_model, **evals)
    result: dict[str, Any] = {"reference": ref_spec, "split": "val", "seqs": eval_seqs, "seq_len": eval_seqlen,
                              **_rounded(q.as_dict())}
    if preset.method == "none":
        seqs = val_sequences(tok, data, text_field, prompts, prompt_len)
        same = _greedy_same(ref_model, runtime, seqs, new_tokens)
        result.update(greedy_prompts=len(seqs), greedy_identical=same, logit_atol=logit_atol)
        result["passed"] = same == len(seqs) and q.max_abs_logit_diff <= logit_atol
        if not result["passed"]:
            raise ParityError(f"fp32 parity failed: {same}/{len(seqs)} prompts greedy-identical, max |logit diff| "
                              f"{q.max_abs_logit_diff:.3g} (allowed {logit_atol:g})")
    elif preset.method in EXACT_METHODS and checkpoint is not None:
        packed, _, _ = load_model(str(checkpoint))  # the checkpoint's codes and scales, dequantized
        if as_packed is not None:
            as_packed(packed)
        ck = quality_vs_reference(ref_spec, torch_logits_fn(packed), ref_model=ref_model, **evals)
        vs = quality_vs_reference(str(checkpoint), runtime.logits, ref_model=packed, **evals)
        seqs = val_sequences(tok, data, text_field, prompts, prompt_len)
        same = _greedy_same(packed, runtime, seqs, new_tokens)
        bound = ck.kld * EXACT_KLD_RATIO + EXACT_KLD_SLACK
        result["exact"] = {"checkpoint": str(checkpoint), "greedy_prompts": len(seqs), "greedy_identical": same,
                           "max_abs_logit_diff": round(vs.max_abs_logit_diff, 6), "logit_atol": exact_atol,
                           "kld": round(vs.kld, 8), "checkpoint_kld": round(ck.kld, 6), "max_kld": round(bound, 6)}
        result["max_kld"] = preset.max_kld
        if same < len(seqs) or vs.max_abs_logit_diff > exact_atol:
            raise ParityError(f"{preset.name} pack check failed: {same}/{len(seqs)} prompts greedy-identical to the "
                              f"dequantized checkpoint, max |logit diff| {vs.max_abs_logit_diff:.3g} (allowed "
                              f"{exact_atol:g}); the artifact does not hold the checkpoint's codes and scales")
        if q.kld > bound:
            raise ParityError(f"{preset.name} check failed: KL divergence from fp32 {q.kld:.4f} nats, above the "
                              f"checkpoint's own {ck.kld:.4f} (allowed {bound:.4f})")
        _quality_gate(preset, q)
        result["passed"] = True
    else:
        result["max_kld"] = preset.max_kld
        _quality_gate(preset, q)
        result["passed"] = True
    log.info("check: ppl %.3f (fp32 %.3f), KLD %.4f, top-1 agreement %.3f, max |dlogit| %.3g", q.ppl, q.ppl_ref,
             q.kld, q.top1_agree, q.max_abs_logit_diff)
    return result


def _quality_gate(preset, q) -> None:
    if q.kld > preset.max_kld:
        raise ParityError(f"{preset.name} quality check failed: KL divergence {q.kld:.4f} nats > {preset.max_kld} "
                          f"(ppl {q.ppl:.3f} vs fp32 {q.ppl_ref:.3f}); try a larger group or GPTQ")


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in d.items()}
