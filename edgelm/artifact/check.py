"""Parity is part of export: every artifact is checked against PyTorch and the result goes into its manifest.

- fp32 artifacts: greedy tokens identical to PyTorch on N prompts, and max |logit diff| within the target's atol.
- Exact packs (rtn, gptq and mixed presets: the codes and scales of a GPTQ-format checkpoint, packed without a second
  rounding): every packed linear, decoded from the artifact's files without the packer (``Target.read_back``), is
  the checkpoint's dequantized weight; the runtime then matches the *dequantized checkpoint*: greedy tokens identical
  (or parting only at a tie), and max |logit diff| within the target's ``exact_atol`` where it computes in fp32
  (TVM), or, where it rounds activations to 8 bits (llama.cpp, MatMulNBits), a KL divergence from the checkpoint
  small beside the checkpoint's own from fp32. Their KL divergence from the fp32 model may exceed the checkpoint's
  (measured here, on the same sequences) by little.
- Other quantized artifacts (fp16, llama.cpp's own quantizer): perplexity, KL divergence and top-1 agreement against
  the fp32 model on the val split, with a fail threshold per preset.
"""
from __future__ import annotations

import logging
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Iterable

from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)

EXACT_METHODS = ("rtn", "gptq", "mixed")  # presets whose artifacts pack a checkpoint's codes exactly
# an exact pack's KLD from fp32 may exceed its checkpoint's by this share, plus EXACT_KLD_SLACK nats (the runtime's
# own rounding: llama.cpp's 8-bit activations, f16 KV cache)
EXACT_KLD_RATIO, EXACT_KLD_SLACK = 1.25, 2e-3
# a runtime that rounds activations to 8 bits may part from the dequantized checkpoint by this share of the
# checkpoint's own KL divergence from fp32, plus EXACT_KLD_SLACK (SmolLM2-135M at gptq-int4-g32: 2.4% on llama.cpp)
EXACT_NOISE_SHARE = 0.1
# greedy decoding parts at a tie when the reference's two tokens lie within this share of the step's logit standard
# deviation: every runtime's one-token steps round activations to 8 bits (TVM's too: VNNI dots), which the
# teacher-forced logits compared here do not show (an untrained student, flat logits: 0.094 apart at its first step)
TIE_SHARE = 0.1
# a packed linear decoded from the file may differ from the checkpoint's by this share of its largest weight: the
# fp16 rounding of Q4_1/Q5_1's offset (-scale * zero); a wrong code or scale is far above it
READ_BACK_RTOL = 2.0 ** -10


class ParityError(EdgelmError):
    exit_code = 4


def _greedy_same(ref_model, runtime, seqs, new_tokens: int, tie: float = 0.0) -> tuple[int, int]:
    """(prompts giving the reference's greedy tokens, prompts that part from them only at a tie: where the
    reference's logits for its token and the runtime's lie within ``tie``, or TIE_SHARE of that step's logit spread,
    of each other).

    The reference runs once, teacher-forced on each prompt and the runtime's tokens: its greedy tokens are the
    runtime's exactly when, at every step, its argmax (end-of-sequence masked, as ``min_new_tokens`` does) is the
    runtime's token; where they first part, that step's logits decide the tie. One forward per prompt (a streamed
    reference: per batch of prompts) instead of one per generated token."""
    import numpy as np
    import torch

    from edgelm.quant.quality import model_logits

    prompts = [[int(x) for x in s] for s in seqs]
    gots = [[int(t) for t in runtime.greedy(ids, new_tokens)] for ids in prompts]
    eos = ref_model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    forced = [np.asarray(ids + got[:-1]) for ids, got in zip(prompts, gots)]
    same = ties = 0
    for ids, got, logits in zip(prompts, gots, model_logits(ref_model, forced)):
        steps = logits[len(ids) - 1:]  # [n, V]: the logits each generated token was picked from
        masked = steps.clone()
        masked[:, eos] = -torch.inf
        ref = masked.argmax(-1).tolist()
        if ref == got:
            same += 1
            continue
        k = next(i for i, (a, b) in enumerate(zip(ref, got)) if a != b)
        if tie > 0:
            row = steps[k]  # [V]
            ties += float(row[ref[k]] - row[got[k]]) <= max(tie, TIE_SHARE * float(row.std()))
    return same, ties


def _read_back(pairs, name: str) -> dict[str, Any]:
    """Compare each packed linear, decoded from the artifact's files, with the checkpoint's dequantized weight."""
    import numpy as np

    worst, where, n = 0.0, "", 0
    for module, w, ref in pairs:
        n += 1
        d = float(np.abs(np.asarray(w, np.float32) - ref).max()) / (float(np.abs(ref).max()) or 1.0)
        if d > worst:
            worst, where = d, module
    if worst > READ_BACK_RTOL:
        raise ParityError(f"{name} pack check failed: {where} in the artifact is not the checkpoint's codes and "
                          f"scales (max |weight diff| {worst:.3g} of its largest weight, allowed {READ_BACK_RTOL:.3g})"
                          "; the artifact does not hold the checkpoint's codes and scales")
    return {"tensors": n, "max_rel_weight_diff": float(f"{worst:.3g}")}


def check_artifact(runtime, preset, ref_spec: str, *, logit_atol: float, data: tuple[str, ...] = (),
                   text_field: str = "text", eval_seqs: int = 16, eval_seqlen: int = 128, prompts: int = 4,
                   new_tokens: int = 16, checkpoint: str | Path | None = None, exact_atol: float | None = 0.0,
                   as_packed: Mapping[str, Callable] | None = None, read_back: Iterable | None = None
                   ) -> dict[str, Any]:
    """Run the parity check of an opened artifact; raise ParityError when it fails. Returns the manifest entry.

    ``checkpoint``: the GPTQ-format folder an exact pack was made from; ``as_packed`` (parameter name -> function,
    ``Target.packed_transforms``) turns its dequantized model into what the target holds (the target's Q8_0 of a
    float embedding, say); ``read_back`` yields each packed linear decoded from the artifact's files with the
    checkpoint's (``Target.read_back``). A reference too big to hold in float32 runs block by block
    (edgelm.models.streamed)."""
    from edgelm.models.streamed import load_reference
    from edgelm.quant.quality import quality_vs_reference, val_sequences

    ref_model, tok = load_reference(ref_spec)
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
        same, _ = _greedy_same(ref_model, runtime, seqs, new_tokens)
        result.update(greedy_prompts=len(seqs), greedy_identical=same, logit_atol=logit_atol)
        result["passed"] = same == len(seqs) and q.max_abs_logit_diff <= logit_atol
        if not result["passed"]:
            raise ParityError(f"fp32 parity failed: {same}/{len(seqs)} prompts greedy-identical, max |logit diff| "
                              f"{q.max_abs_logit_diff:.3g} (allowed {logit_atol:g})")
    elif preset.method in EXACT_METHODS and checkpoint is not None:
        if read_back is not None:  # the file's codes and scales, decoded without the packer
            result["read_back"] = _read_back(read_back, preset.name)
        packed, _ = load_reference(checkpoint, as_packed)  # the checkpoint's codes and scales, dequantized
        ck = quality_vs_reference(ref_spec, packed, ref_model=ref_model, **evals)
        vs = quality_vs_reference(str(checkpoint), runtime.logits, ref_model=packed, **evals)
        seqs = val_sequences(tok, data, text_field, prompts, prompt_len)
        # a runtime that rounds activations to 8 bits (exact_atol None) is bounded by KL divergence instead, and a
        # tie is then anything within twice the largest logit difference it showed
        tie = 2 * (vs.max_abs_logit_diff if exact_atol is None else exact_atol)
        same, ties = _greedy_same(packed, runtime, seqs, new_tokens, tie=tie)
        bound = ck.kld * EXACT_KLD_RATIO + EXACT_KLD_SLACK
        noise = ck.kld * EXACT_NOISE_SHARE + EXACT_KLD_SLACK
        result["exact"] = {"checkpoint": str(checkpoint), "greedy_prompts": len(seqs), "greedy_identical": same,
                           "greedy_ties": ties, "tie_margin": round(tie, 6),
                           "max_abs_logit_diff": round(vs.max_abs_logit_diff, 6), "logit_atol": exact_atol,
                           "kld": round(vs.kld, 8), "max_kld_vs_checkpoint": round(noise, 6),
                           "top1_agree": round(vs.top1_agree, 6), "checkpoint_kld": round(ck.kld, 6),
                           "max_kld": round(bound, 6)}
        result["max_kld"] = preset.max_kld
        log.info("check: against the dequantized checkpoint %s", result["exact"])
        within = vs.max_abs_logit_diff <= exact_atol if exact_atol is not None else vs.kld <= noise
        if same + ties < len(seqs) or not within:
            allowed = (f"max |logit diff| {vs.max_abs_logit_diff:.3g} (allowed {exact_atol:g})" if exact_atol is not None
                       else f"KL divergence {vs.kld:.3g} nats (allowed {noise:.3g})")
            raise ParityError(f"{preset.name} pack check failed: {same}/{len(seqs)} prompts greedy-identical to the "
                              f"dequantized checkpoint ({ties} more up to a tie), {allowed}; the artifact does not "
                              "run as the checkpoint's codes and scales")
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
