"""The measured quality loss of a quantized model against its fp32 source: perplexity, KL divergence and top-1
agreement on val-split sequences (the figures come from edgelm.metrics). `edgelm quantize` reports it, and every
export check (edgelm.artifact.check) runs it on the artifact in its own runtime."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from edgelm.errors import EdgelmError

if TYPE_CHECKING:
    import torch


def val_sequences(tokenizer, data: tuple[str, ...], text_field: str, n: int, seq_len: int):
    from edgelm.data.corpus import Corpus, CorpusSpec, eval_sequences

    seqs = eval_sequences(Corpus(CorpusSpec(data, text_field=text_field)), tokenizer, "val", seq_len, n)
    if len(seqs) == 0:
        raise EdgelmError(f"the val split has no {seq_len}-token sequence for the check; add data or lower "
                          "--eval-seqlen")
    return seqs


def model_logits(model, seqs) -> Iterator["torch.Tensor"]:
    """Each sequence's logits [T, V] from a PyTorch model, one forward per sequence; a streamed model
    (edgelm.models.streamed) takes them a batch at a time, so that it reads its blocks once per batch."""
    import numpy as np
    import torch

    from edgelm.models.streamed import STREAMED, batch_for

    n = batch_for(model, len(seqs[0]) if len(seqs) else 0) if getattr(model, STREAMED, False) else 1
    for i in range(0, len(seqs), n):
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(np.stack(seqs[i:i + n]))).logits.float()  # [b, T, V]
        yield from out


def quality_vs_reference(ref_spec: str, candidate, *, data: tuple[str, ...] = (), text_field: str = "text",
                         n: int = 16, seq_len: int = 128, ref_model=None, tokenizer=None):
    """QualityDelta of ``candidate`` (a loadable folder, a PyTorch model, or a logits function ids -> [T, V]) against
    ``ref_spec`` (or ``ref_model``)."""
    import torch

    from edgelm.metrics import compare_logits
    from edgelm.models.streamed import load_reference

    if ref_model is None:
        ref_model, tokenizer = load_reference(ref_spec)
    if isinstance(candidate, (str, Path)):
        candidate, _ = load_reference(str(candidate))  # streamed block by block when it is big
    seqs = val_sequences(tokenizer, data, text_field, n, seq_len)
    got = model_logits(candidate, seqs) if isinstance(candidate, torch.nn.Module) else \
        (torch.as_tensor(candidate(s)).float() for s in seqs)

    def pairs():
        for s, ref, cand in zip(seqs, model_logits(ref_model, seqs), got):
            yield torch.as_tensor(s), ref, cand

    return compare_logits(pairs())
