"""Parity is part of export: every artifact is checked against PyTorch and the result goes into its manifest.

fp32 artifacts: greedy tokens identical to PyTorch on N prompts, and max |logit diff| within the target's atol.
Quantized artifacts: perplexity, KL divergence and top-1 agreement against the fp32 model on the val split, with a
fail threshold per preset.
"""
from __future__ import annotations

import logging
from typing import Any

from edgelm.errors import EdgelmError

log = logging.getLogger(__name__)


class ParityError(EdgelmError):
    exit_code = 4


def torch_greedy(model, ids, n: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.as_tensor(ids)[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             num_beams=1, pad_token_id=0)
    return out[0, len(ids):].tolist()


def check_artifact(runtime, preset, ref_spec: str, *, logit_atol: float, data: tuple[str, ...] = (),
                   text_field: str = "text", eval_seqs: int = 16, eval_seqlen: int = 128, prompts: int = 4,
                   new_tokens: int = 16) -> dict[str, Any]:
    """Run the parity check of an opened artifact; raise ParityError when it fails. Returns the manifest entry."""
    from edgelm.models.loader import load_model
    from edgelm.quant.quality import quality_vs_reference, val_sequences

    ref_model, tok, _ = load_model(ref_spec)
    if runtime.context < eval_seqlen:  # e.g. a GGUF whose context stops at a sliding window
        log.warning("check: sequences of %d tokens, the artifact's context (asked %d)", runtime.context, eval_seqlen)
        eval_seqlen = runtime.context
    prompt_len = min(32, runtime.context - new_tokens)
    q = quality_vs_reference(ref_spec, runtime.logits, data=data, text_field=text_field, n=eval_seqs,
                             seq_len=eval_seqlen, ref_model=ref_model, tokenizer=tok)
    result: dict[str, Any] = {"reference": ref_spec, "split": "val", "seqs": eval_seqs, "seq_len": eval_seqlen,
                              **{k: round(v, 6) if isinstance(v, float) else v for k, v in q.as_dict().items()}}
    if preset.method == "none":
        seqs = val_sequences(tok, data, text_field, prompts, prompt_len)
        same = 0
        for s in seqs:
            ids = [int(x) for x in s]
            if torch_greedy(ref_model, ids, new_tokens) == [int(t) for t in runtime.greedy(ids, new_tokens)]:
                same += 1
        result.update(greedy_prompts=len(seqs), greedy_identical=same, logit_atol=logit_atol)
        result["passed"] = same == len(seqs) and q.max_abs_logit_diff <= logit_atol
        if not result["passed"]:
            raise ParityError(f"fp32 parity failed: {same}/{len(seqs)} prompts greedy-identical, max |logit diff| "
                              f"{q.max_abs_logit_diff:.3g} (allowed {logit_atol:g})")
    else:
        result["max_kld"] = preset.max_kld
        result["passed"] = q.kld <= preset.max_kld
        if not result["passed"]:
            raise ParityError(f"{preset.name} quality check failed: KL divergence {q.kld:.4f} nats > {preset.max_kld} "
                              f"(ppl {q.ppl:.3f} vs fp32 {q.ppl_ref:.3f}); try a larger group or GPTQ")
    log.info("check: ppl %.3f (fp32 %.3f), KLD %.4f, top-1 agreement %.3f, max |dlogit| %.3g", q.ppl, q.ppl_ref,
             q.kld, q.top1_agree, q.max_abs_logit_diff)
    return result
