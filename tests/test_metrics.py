from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgelm.metrics import (kl_divergence, mfu, next_token_stats, perplexity, score_lm, top1_agreement,
                            train_flops_per_token)


def test_next_token_stats_by_hand():
    ids = torch.tensor([[0, 1, 2]])
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 1] = 5.0  # predicts id 1 at position 0: a hit
    logits[0, 1, 3] = 5.0  # predicts id 3, target 2: a miss
    nll, hits, n = next_token_stats(logits, ids)
    expected = F.cross_entropy(logits[0, :2], ids[0, 1:], reduction="sum")
    assert (hits, n) == (1, 2) and nll == pytest.approx(float(expected))
    assert perplexity(nll, n) == pytest.approx(math.exp(float(expected) / 2))


def test_kl_and_agreement():
    a = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert kl_divergence(a, a) == pytest.approx(0.0, abs=1e-6)
    b = a.clone()
    b[0] = -b[0]
    assert kl_divergence(a, b) > 0
    assert top1_agreement(a, a) == 1.0 and top1_agreement(a, b) == pytest.approx(0.8)


class _Uniform(torch.nn.Module):
    """Predicts a uniform distribution over V tokens: perplexity is exactly V."""

    def __init__(self, v: int) -> None:
        super().__init__()
        self.v = v
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.v) + self.w})()


def test_score_lm_on_a_uniform_model():
    s = score_lm(_Uniform(50), np.random.default_rng(0).integers(0, 50, (5, 9)), batch_size=2)
    assert s.ppl == pytest.approx(50.0) and s.tokens == 5 * 8


def test_mfu_accounting():
    assert train_flops_per_token(10, 100) == 6 * 10 + 2 * 100
    assert mfu(1000.0, 260.0, 1e6) == pytest.approx(0.26)
