"""KD losses, registered by name, and the fused lm_head + loss that the trainer runs in chunks.

Each registered loss takes student and teacher logits [N, V] and returns the loss per row [N] (callers average), so
a loss over many positions can be summed chunk by chunk. All are scaled by T^2 so gradients keep their size across
temperatures (Hinton et al., 2015).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from edgelm.registry import KD_LOSSES

KDLoss = Callable[..., torch.Tensor]  # (student [N, V], teacher [N, V], *, temperature, beta) -> [N]


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities [N, V] -> [N]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@KD_LOSSES.register("forward_kl")
def forward_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """KL(teacher || student): mode-covering, the classic KD loss."""
    t = temperature
    return _kl(F.log_softmax(teacher / t, -1), F.log_softmax(student / t, -1)) * t * t


@KD_LOSSES.register("reverse_kl")
def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """KL(student || teacher): mode-seeking (MiniLLM)."""
    t = temperature
    return _kl(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1)) * t * t


@KD_LOSSES.register("jsd")
def jsd(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalized JSD(beta) (GKD, Agarwal et al. 2024): beta*KL(T||M) + (1-beta)*KL(S||M), M = beta*T + (1-beta)*S.

    Bounded, and symmetric at beta = 0.5; beta trades the mode-covering and mode-seeking behaviours.
    """
    t = temperature
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1, got {beta}")
    log_s = F.log_softmax(student / t, -1)
    log_t = F.log_softmax(teacher / t, -1)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)  # [N, V]
    return (beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)) * t * t


def topk_forward_kl(student: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor], *, temperature: float = 1.0,
                    beta: float = 0.5) -> torch.Tensor:
    """forward_kl against the teacher's top-k words only, as a teacher cache keeps them: ``teacher`` is (ids [N, k],
    log-probs at this temperature [N, k]). The rest of the vocabulary is one bucket on both sides, so this is the exact
    KL of the two (k + 1)-outcome distributions, a lower bound of the full KL that meets it as k grows."""
    idx, t_logp = teacher
    t = temperature
    s_logp = F.log_softmax(student / t, -1).gather(-1, idx)  # [N, k]
    t_p = t_logp.float().exp()  # [N, k]
    top = (t_p * (t_logp.float() - s_logp)).sum(-1)  # [N]
    rest_t = (1 - t_p.sum(-1)).clamp_min(1e-8)  # [N]: the teacher's mass outside its top k
    rest_s = (1 - s_logp.exp().sum(-1)).clamp_min(1e-8)
    return (top + rest_t * (rest_t.log() - rest_s.log())) * t * t


def kd_objective(s_logits: torch.Tensor, t_logits: Any, targets: torch.Tensor, kd: KDLoss,
                 alpha: float, temperature: float, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed (alpha * KD + (1 - alpha) * CE, KD, CE) over the rows of logits [n, V] (fp32) and targets [n].
    ``t_logits``: the teacher's logits [n, V], or what ``kd`` reads instead (topk_forward_kl: its top k).

    KD is zero without a teacher (alpha 0); CE is computed either way, for the log.
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and alpha < 1):
        ce = F.cross_entropy(s_logits, targets, reduction="sum")
    if t_logits is None or alpha == 0:
        kd_sum = torch.zeros((), device=s_logits.device)
    else:
        kd_sum = kd(s_logits, t_logits, temperature=temperature, beta=beta).sum()
    total = (alpha * kd_sum if alpha > 0 else 0.0) + ((1 - alpha) * ce if alpha < 1 else 0.0)
    return total, kd_sum, ce


class _ChunkedHeadLoss(torch.autograd.Function):
    """The lm_head and the loss, fused and chunked over positions: each chunk's logits [c, V] are made, scored and
    differentiated at once, so no [N, V] tensor (student's, teacher's or a gradient) is ever whole. The gradients for
    the hidden states and the head are computed in forward and scaled in backward (as Liger's fused linear loss)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, h_t: torch.Tensor | None, w_t: torch.Tensor | None,
                targets: torch.Tensor, kd: KDLoss, alpha: float, temperature: float, beta: float, chunk: int,
                t_top: tuple[torch.Tensor, torch.Tensor] | None):
        n = h.shape[0]  # h [N, H], w [V, H], h_t [N, Ht], w_t [V, Ht], targets [N]; t_top ([N, k], [N, k])
        grad_h = torch.zeros_like(h)
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        sums = torch.zeros(3, dtype=torch.float64, device=h.device)  # total, kd, ce; summed where computed
        for s in range(0, n, chunk):
            hc = h[s:s + chunk].detach().requires_grad_()  # [c, H]
            wl = w.detach().requires_grad_(grad_w is not None)
            t_logits: Any = None
            if h_t is not None:
                t_logits = F.linear(h_t[s:s + chunk], w_t).float()  # [c, V], no grad
            elif t_top is not None:
                t_logits = (t_top[0][s:s + chunk], t_top[1][s:s + chunk])  # the teacher's top k, for topk_forward_kl
            with torch.enable_grad():
                s_logits = F.linear(hc, wl).float()  # [c, V]
                total, kd_c, ce_c = kd_objective(s_logits, t_logits, targets[s:s + chunk], kd, alpha, temperature,
                                                 beta)
                leaves = [hc, wl] if grad_w is not None else [hc]
                grads = torch.autograd.grad(total / n, leaves) if total.requires_grad else [None] * len(leaves)
            if grads[0] is not None:
                grad_h[s:s + chunk] = grads[0]
                if grad_w is not None:
                    grad_w += grads[1]
            sums += torch.stack([total.detach(), kd_c.detach(), ce_c.detach()]).double()  # no sync per chunk
        ctx.grads = (grad_h, grad_w)  # not inputs or outputs: kept on ctx, freed after backward
        total, kd_mean, ce_mean = (sums / n).to(torch.float32).unbind()
        ctx.mark_non_differentiable(kd_mean, ce_mean)
        return total, kd_mean, ce_mean

    @staticmethod
    def backward(ctx, g_total, g_kd, g_ce):
        grad_h, grad_w = ctx.grads
        del ctx.grads
        return (grad_h * g_total.to(grad_h.dtype), grad_w * g_total if grad_w is not None else None,
                None, None, None, None, None, None, None, None, None)


def chunked_head_loss(h: torch.Tensor, w: torch.Tensor, h_t: torch.Tensor | None, w_t: torch.Tensor | None,
                      targets: torch.Tensor, kd: KDLoss, *, alpha: float, temperature: float = 1.0, beta: float = 0.5,
                      chunk: int = 256, t_top: tuple[torch.Tensor, torch.Tensor] | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean (alpha * KD + (1 - alpha) * CE, KD, CE) over N positions, from the student's final hidden states h [N, H]
    and head w [V, H] and the teacher's h_t [N, Ht] and w_t [V, Ht] (None for CE only), ``chunk`` rows at a time.
    ``t_top``: instead of h_t and w_t, the teacher's top-k (ids [N, k], log-probs [N, k]) from a teacher cache, scored
    by ``kd`` = topk_forward_kl. Only the first value carries gradients (to h and w)."""
    return _ChunkedHeadLoss.apply(h, w, h_t, w_t, targets, kd, alpha, temperature, beta, chunk, t_top)
