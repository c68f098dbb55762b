"""All quality and speed figures (perplexity, top-1, KLD, tok/s, MFU) come from here: the trainer, `edgelm eval`,
the benchmarks and the report all use these functions.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # keep `import edgelm` free of torch
    import numpy as np
    import torch


@dataclass(frozen=True)
class LMScore:
    nll: float  # mean negative log-likelihood per predicted token (nats)
    ppl: float  # exp(nll)
    top1: float  # next-token top-1 accuracy
    tokens: int  # predicted tokens scored

    def as_dict(self) -> dict:
        return asdict(self)


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count) if count else float("nan")


def next_token_stats(logits: "torch.Tensor", ids: "torch.Tensor") -> tuple[float, int, int]:
    """Sum of NLL, number of top-1 hits and number of predictions for next-token prediction.

    logits: [B, T, V] for ids: [B, T]; position t predicts ids[:, t + 1].
    """
    import torch.nn.functional as F

    pred = logits[:, :-1].float()  # [B, T-1, V]
    target = ids[:, 1:]  # [B, T-1]
    nll = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")
    hits = (pred.argmax(-1) == target).sum()
    return float(nll), int(hits), target.numel()


def kl_divergence(ref_logits: "torch.Tensor", logits: "torch.Tensor") -> float:
    """Mean KL(ref || model) per token, in nats. Both [..., V]."""
    import torch.nn.functional as F

    ref = F.log_softmax(ref_logits.float(), -1)
    cur = F.log_softmax(logits.float(), -1)
    return float((ref.exp() * (ref - cur)).sum(-1).mean())


def top1_agreement(ref_logits: "torch.Tensor", logits: "torch.Tensor") -> float:
    return float((ref_logits.argmax(-1) == logits.argmax(-1)).float().mean())


def score_lm(model, seqs: "np.ndarray", *, batch_size: int = 4, device: str | None = None) -> LMScore:
    """Perplexity and top-1 accuracy of ``model`` on packed sequences [N, T]."""
    import torch

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = hits = n = 0
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids = torch.as_tensor(seqs[i : i + batch_size], device=device)  # [B, T]
            logits = model(input_ids=ids).logits  # [B, T, V]
            a, b, c = next_token_stats(logits, ids)
            nll, hits, n = nll + a, hits + b, n + c
    model.train(was_training)
    return LMScore(nll=nll / n if n else float("nan"), ppl=perplexity(nll, n), top1=hits / n if n else float("nan"), tokens=n)


def tokens_per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("nan")


def train_flops_per_token(student_params: int, teacher_params: int = 0) -> float:
    """6N for the student's forward+backward, plus 2N for the teacher's forward (PaLM-style MFU accounting)."""
    return 6.0 * student_params + 2.0 * teacher_params


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    return tokens_per_s * flops_per_token / peak_flops


@dataclass(frozen=True)
class QualityDelta:
    """A candidate model (quantized or exported) against its fp32 reference on the same sequences."""

    ppl_ref: float  # perplexity of the reference
    ppl: float  # perplexity of the candidate
    kld: float  # mean KL(reference || candidate) per token, nats
    top1_agree: float  # share of positions where both pick the same next token
    max_abs_logit_diff: float  # largest |logit difference| seen
    tokens: int  # positions scored

    @property
    def dppl(self) -> float:
        return self.ppl - self.ppl_ref

    def as_dict(self) -> dict:
        return {**asdict(self), "dppl": self.dppl}


def compare_logits(pairs) -> QualityDelta:
    """Aggregate over ``pairs`` of (ids [T], ref_logits [T, V], cand_logits [T, V]) tensors."""
    nll_r = nll_c = kld = agree = max_diff = 0.0
    preds = positions = 0
    for ids, ref, cand in pairs:
        ids, ref, cand = ids[None], ref[None].float(), cand[None].float()  # [1, T], [1, T, V]
        a, _, k = next_token_stats(ref, ids)
        b, _, _ = next_token_stats(cand, ids)
        nll_r, nll_c, preds = nll_r + a, nll_c + b, preds + k
        t = ref.shape[1]
        kld += kl_divergence(ref, cand) * t
        agree += top1_agreement(ref, cand) * t
        max_diff = max(max_diff, float((ref - cand).abs().max()))
        positions += t
    n = max(positions, 1)
    return QualityDelta(ppl_ref=perplexity(nll_r, preds), ppl=perplexity(nll_c, preds), kld=kld / n,
                        top1_agree=agree / n, max_abs_logit_diff=max_diff, tokens=positions)
