from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgelm.registry import KD_LOSSES

# Every registered loss must be named here; a new loss without a test fails test_every_loss_is_tested.
TESTED = {"forward_kl", "reverse_kl", "jsd"}


def test_every_loss_is_tested():
    assert set(KD_LOSSES.names()) == TESTED


def _logits(seed: int, n: int = 6, v: int = 11) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("name", sorted(TESTED))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_zero_iff_equal_and_differentiable(name, temperature):
    fn = KD_LOSSES.get(name)
    t = _logits(0)
    assert fn(t.clone(), t, temperature=temperature).abs() < 1e-6
    s = _logits(1).requires_grad_()
    loss = fn(s, t, temperature=temperature)
    assert loss > 0.01
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_forward_and_reverse_kl_match_torch():
    s, t = _logits(1), _logits(2)
    T = 2.0
    ref_fwd = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T * T
    ref_rev = F.kl_div(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1), log_target=True, reduction="batchmean") * T * T
    assert torch.allclose(KD_LOSSES.get("forward_kl")(s, t, temperature=T), ref_fwd, atol=1e-5)
    assert torch.allclose(KD_LOSSES.get("reverse_kl")(s, t, temperature=T), ref_rev, atol=1e-5)


def test_jsd_matches_its_definition_and_is_bounded():
    s, t = _logits(3), _logits(4)
    beta = 0.3
    p_t, p_s = F.softmax(t, -1), F.softmax(s, -1)
    m = beta * p_t + (1 - beta) * p_s
    ref = (beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)).mean()
    got = KD_LOSSES.get("jsd")(s, t, beta=beta)
    assert torch.allclose(got, ref, atol=1e-5)
    # The generalized JSD is bounded by the binary entropy of beta.
    h = -(beta * torch.log(torch.tensor(beta)) + (1 - beta) * torch.log(torch.tensor(1 - beta)))
    assert got <= h + 1e-6
    with pytest.raises(ValueError):
        KD_LOSSES.get("jsd")(s, t, beta=0.0)
