"""The measured quality loss of a quantized model against its fp32 source: perplexity, KL divergence and top-1
agreement on val-split sequences (the figures come from edgelm.metrics). `edgelm quantize` reports it, and every
export check (edgelm.artifact.check) runs it on the artifact in its own runtime."""
from __future__ import annotations

from typing import Callable

from edgelm.errors import EdgelmError


def val_sequences(tokenizer, data: tuple[str, ...], text_field: str, n: int, seq_len: int):
    from edgelm.data.corpus import Corpus, CorpusSpec, eval_sequences

    seqs = eval_sequences(Corpus(CorpusSpec(data, text_field=text_field)), tokenizer, "val", seq_len, n)
    if len(seqs) == 0:
        raise EdgelmError(f"the val split has no {seq_len}-token sequence for the check; add data or lower "
                          "--eval-seqlen")
    return seqs


def torch_logits_fn(model) -> Callable:
    import torch

    def run(ids) -> "torch.Tensor":
        with torch.no_grad():
            return model(input_ids=torch.as_tensor(ids)[None]).logits[0].float()  # [T, V]

    return run


def quality_vs_reference(ref_spec: str, candidate, *, data: tuple[str, ...] = (), text_field: str = "text",
                         n: int = 16, seq_len: int = 128, ref_model=None, tokenizer=None):
    """QualityDelta of ``candidate`` (a loadable folder, or a logits function ids -> [T, V]) against ``ref_spec``."""
    import torch

    from edgelm.metrics import compare_logits
    from edgelm.models.loader import load_model

    if ref_model is None:
        ref_model, tokenizer, _ = load_model(ref_spec)
    if not callable(candidate):
        cand_model, _, _ = load_model(str(candidate))
        candidate = torch_logits_fn(cand_model)
    ref = torch_logits_fn(ref_model)
    seqs = val_sequences(tokenizer, data, text_field, n, seq_len)

    def pairs():
        for s in seqs:
            yield torch.as_tensor(s), ref(s), torch.as_tensor(candidate(s)).float()

    return compare_logits(pairs())
