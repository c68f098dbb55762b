"""All quality and speed figures (perplexity, top-1, KLD, tok/s, MFU) come from here: the trainer, `edgelm eval`,
the benchmarks and the report all use these functions.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

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


def as_numpy(x) -> "np.ndarray":
    """A torch tensor (any device/dtype) or array-like as a numpy array."""
    import numpy as np

    if hasattr(x, "detach"):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return np.asarray(x)


def kl_divergence(ref_logits, logits) -> float:
    """Mean KL(ref || model) per position, in nats. Both [..., V], numpy or torch."""
    import numpy as np

    ref, cur = log_softmax_np(as_numpy(ref_logits)), log_softmax_np(as_numpy(logits))
    return float((np.exp(ref) * (ref - cur)).sum(-1).mean())


def top1_agreement(ref_logits, logits) -> float:
    """Share of positions where both pick the same most likely token."""
    return float((as_numpy(ref_logits).argmax(-1) == as_numpy(logits).argmax(-1)).mean())


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
    """Aggregate over ``pairs`` of (ids [T], ref_logits [T, V], cand_logits [T, V]), numpy or torch, from any runtime."""
    import numpy as np

    nll_r = nll_c = kld = agree = max_diff = 0.0
    preds = positions = 0
    for ids, ref, cand in pairs:
        ids, ref, cand = np.asarray(as_numpy(ids)), as_numpy(ref), as_numpy(cand)
        lr, lc = log_softmax_np(ref), log_softmax_np(cand)  # [T, V] float64
        rows, target = np.arange(len(ids) - 1), ids[1:]  # position t predicts ids[t + 1]
        nll_r -= float(lr[rows, target].sum())
        nll_c -= float(lc[rows, target].sum())
        preds += len(target)
        kld += float((np.exp(lr) * (lr - lc)).sum())
        agree += float((lr.argmax(-1) == lc.argmax(-1)).sum())
        max_diff = max(max_diff, float(np.abs(ref.astype(np.float64) - cand).max()))
        positions += len(ids)
    n = max(positions, 1)
    return QualityDelta(ppl_ref=perplexity(nll_r, preds), ppl=perplexity(nll_c, preds), kld=kld / n,
                        top1_agree=agree / n, max_abs_logit_diff=max_diff, tokens=positions)


def top_entropy(top_logprobs: Sequence[Sequence[float]]) -> float:
    """Mean over steps of -sum(p * log p) over each step's top-n log-probs (nats; the part of the entropy the top n
    carry). Plain float64 in a fixed order, so the mobile app's JavaScript (android_demo/www/router.js) gives the same
    number from wllama's ``top_logprobs``."""
    if not top_logprobs:
        return 0.0
    total = 0.0
    for step in top_logprobs:
        h = 0.0
        for lp in step:
            h -= math.exp(lp) * lp
        total += h
    return total / len(top_logprobs)


def log_softmax_np(logits: "np.ndarray") -> "np.ndarray":
    """log-softmax over the last axis of a numpy array [..., V], in float64."""
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def score_logits(pairs) -> LMScore:
    """LMScore over ``pairs`` of (ids [T], logits [T, V]) from any runtime (numpy; no torch needed)."""
    import numpy as np

    nll = 0.0
    hits = n = 0
    for ids, logits in pairs:
        ids = np.asarray(ids)
        lp = log_softmax_np(logits[:-1])  # [T-1, V]
        target = ids[1:]  # [T-1]
        nll -= float(lp[np.arange(len(target)), target].sum())
        hits += int((lp.argmax(-1) == target).sum())
        n += len(target)
    return LMScore(nll=nll / n if n else float("nan"), ppl=perplexity(nll, n), top1=hits / n if n else float("nan"), tokens=n)


@dataclass(frozen=True)
class MeanStd:
    mean: float
    std: float  # sample standard deviation (0 for one run)
    n: int

    def fmt(self, digits: int = 1) -> str:
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def mean_std(values) -> MeanStd:
    vals = [float(v) for v in values]
    if not vals:
        return MeanStd(float("nan"), float("nan"), 0)
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    return MeanStd(mean, math.sqrt(var), len(vals))


def peak_rss_bytes() -> int:
    """Peak resident set of this process: VmHWM on Linux (ru_maxrss is inherited across fork, so it can report
    the parent's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def decode_roofline_tokens_per_s(bytes_per_token: float, bandwidth_bytes_per_s: float) -> float:
    """Upper bound on decode speed when every weight byte is read once per token."""
    return bandwidth_bytes_per_s / bytes_per_token if bytes_per_token > 0 else float("nan")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, loss) points, both lower-is-better: whether each is on the Pareto front (no other point is at
    least as good on both and better on one)."""
    return [not any((c2 <= c and l2 <= l) and (c2 < c or l2 < l) for c2, l2 in points) for c, l in points]


@dataclass(frozen=True)
class PowerLaw:
    """loss(D) = floor + scale * D ** -exponent, fitted to a loss (nats) against tokens seen D."""

    floor: float  # the loss no budget gets below
    scale: float
    exponent: float

    def __call__(self, tokens: float) -> float:
        return self.floor + self.scale * tokens ** -self.exponent

    def tokens_to_reach(self, loss: float) -> float | None:
        """Tokens at which the curve reaches ``loss``; None when ``loss`` is at or below its floor."""
        if loss <= self.floor:
            return None
        return (self.scale / (loss - self.floor)) ** (1 / self.exponent)


def fit_power_law(tokens: Sequence[float], loss: Sequence[float], grid: int = 400) -> PowerLaw:
    """Least-squares fit of loss = floor + scale * tokens^-exponent: a grid over the floor (0 up to just under the
    lowest loss), a linear fit of log(loss - floor) on log(tokens) at each. Needs three or more points, tokens > 0."""
    import numpy as np

    d, y = np.asarray(tokens, dtype=np.float64), np.asarray(loss, dtype=np.float64)
    if len(d) < 3 or (d <= 0).any():
        raise ValueError("a power-law fit needs three or more points with tokens > 0")
    best = None
    for floor in np.linspace(0.0, y.min() * (1 - 1e-6), grid):
        slope, icpt = np.polyfit(np.log(d), np.log(y - floor), 1)
        if slope >= 0:
            continue  # a loss that does not fall has no power law
        err = float(((floor + np.exp(icpt) * d ** slope - y) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, PowerLaw(float(floor), float(np.exp(icpt)), float(-slope)))
    if best is None:
        raise ValueError("the loss does not fall with tokens; no power law fits")
    return best[1]


# --- chat answers ------------------------------------------------------------------------------------------------
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)


def code_blocks(answer: str) -> list[str]:
    """The fenced code blocks of a markdown answer, in order (an unclosed last fence runs to the end); blocks
    tagged with a language other than python/py are left out."""
    return [body for lang, body in _FENCE.findall(answer) if lang.lower() in ("", "python", "py", "python3")]


def defines_function(answer: str) -> bool:
    """Whether the answer's first code block parses as Python and defines a function (at any depth)."""
    blocks = code_blocks(answer)
    if not blocks:
        return False
    try:
        tree = ast.parse(blocks[0])
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(tree))


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / length of the longer string, over characters: 1 for equal strings, 0 for
    nothing in common (rapidfuzz's C++ Levenshtein)."""
    from rapidfuzz.distance import Levenshtein

    return float(Levenshtein.normalized_similarity(a, b))


@dataclass(frozen=True)
class ChatScore:
    """A model's answers to instructions, against a reference model's (the teacher's) answers."""

    answers: int  # instructions answered
    finished: float  # share of answers that ended (end of turn) before the token limit
    defines_function: float  # share of answers whose first code block parses and defines a function
    edit_similarity: float  # mean edit similarity to the reference answer
    answer_ppl: float  # perplexity of the reference answers' tokens, given their prompts

    def as_dict(self) -> dict:
        return asdict(self)


def score_answers(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], *,
                  device: str | None = None) -> tuple[float, int]:
    """Summed NLL (nats) and count of the ``answers`` tokens, each given its prompt (token ids, one pair at a time)."""
    import torch
    import torch.nn.functional as F

    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            if not a:
                continue
            ids = torch.as_tensor([list(p) + list(a)], device=device)  # [1, P+A]
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float()  # [A, V]: position t predicts t + 1
            nll += float(F.cross_entropy(logits, ids[0, len(p):], reduction="sum"))
            n += len(a)
    model.train(was_training)
    return nll, n
