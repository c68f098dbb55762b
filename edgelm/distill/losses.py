"""KD losses, registered by name. Each takes student and teacher logits [N, V] and returns a scalar.

All are scaled by T^2 so gradients keep their size across temperatures (Hinton et al., 2015).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgelm.registry import KD_LOSSES


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities [N, V] -> [N]."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@KD_LOSSES.register("forward_kl")
def forward_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """KL(teacher || student): mode-covering, the classic KD loss."""
    t = temperature
    return _kl(F.log_softmax(teacher / t, -1), F.log_softmax(student / t, -1)).mean() * t * t


@KD_LOSSES.register("reverse_kl")
def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """KL(student || teacher): mode-seeking (MiniLLM)."""
    t = temperature
    return _kl(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1)).mean() * t * t


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
    return (beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)).mean() * t * t
