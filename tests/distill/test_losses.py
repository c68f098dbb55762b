from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgelm.distill.losses import chunked_head_loss, kd_objective
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
    assert fn(t.clone(), t, temperature=temperature).abs().max() < 1e-6
    s = _logits(1).requires_grad_()
    loss = fn(s, t, temperature=temperature).mean()
    assert loss > 0.01
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_forward_and_reverse_kl_match_torch():
    s, t = _logits(1), _logits(2)
    T = 2.0
    ref_fwd = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean") * T * T
    ref_rev = F.kl_div(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1), log_target=True, reduction="batchmean") * T * T
    assert torch.allclose(KD_LOSSES.get("forward_kl")(s, t, temperature=T).mean(), ref_fwd, atol=1e-5)
    assert torch.allclose(KD_LOSSES.get("reverse_kl")(s, t, temperature=T).mean(), ref_rev, atol=1e-5)


def test_jsd_matches_its_definition_and_is_bounded():
    s, t = _logits(3), _logits(4)
    beta = 0.3
    p_t, p_s = F.softmax(t, -1), F.softmax(s, -1)
    m = beta * p_t + (1 - beta) * p_s
    ref = (beta * (p_t * (p_t / m).log()).sum(-1) + (1 - beta) * (p_s * (p_s / m).log()).sum(-1)).mean()
    got = KD_LOSSES.get("jsd")(s, t, beta=beta).mean()
    assert torch.allclose(got, ref, atol=1e-5)
    # The generalized JSD is bounded by the binary entropy of beta.
    h = -(beta * torch.log(torch.tensor(beta)) + (1 - beta) * torch.log(torch.tensor(1 - beta)))
    assert got <= h + 1e-6
    with pytest.raises(ValueError):
        KD_LOSSES.get("jsd")(s, t, beta=0.0)


@pytest.mark.parametrize("name", sorted(TESTED))
@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.0])
def test_chunked_head_loss_equals_the_whole_logits_loss(name, alpha):
    """The fused, chunked lm_head + loss gives the unchunked loss and the same gradients, for every KD loss."""
    g = torch.Generator().manual_seed(5)
    n, h, v = 37, 16, 50  # 37 rows: the last chunk is partial
    hid = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    hid_t, w_t = torch.randn(n, 24, generator=g), torch.randn(v, 24, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    kd = KD_LOSSES.get(name)
    teacher = (hid_t, w_t) if alpha > 0 else (None, None)
    total, kd_mean, ce_mean = chunked_head_loss(hid, w, *teacher, targets, kd, alpha=alpha, temperature=2.0, chunk=8)
    (total * 3).backward()  # a scaled upstream gradient must scale the result
    grads = hid.grad.clone(), w.grad.clone()
    hid.grad = w.grad = None

    ref_total, ref_kd, ref_ce = kd_objective(hid @ w.T, hid_t @ w_t.T if alpha > 0 else None, targets, kd, alpha,
                                             2.0, 0.5)
    (ref_total / n * 3).backward()
    torch.testing.assert_close(total, ref_total.detach() / n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd_mean, ref_kd / n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce_mean, ref_ce / n, rtol=1e-5, atol=1e-6)
    assert not kd_mean.requires_grad and not ce_mean.requires_grad
    torch.testing.assert_close(grads[0], hid.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-4, atol=1e-6)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_forward_kl_is_a_lower_bound_that_meets_forward_kl(temperature):
    """A teacher cache's KD: exact with every word kept, below the full KL with fewer, and zero when equal."""
    from edgelm.distill.losses import topk_forward_kl

    s, t = _logits(1), _logits(2)
    full = KD_LOSSES.get("forward_kl")(s, t, temperature=temperature)  # [N]

    def top(k):
        v, i = F.log_softmax(t / temperature, -1).topk(k, -1)
        return i, v

    torch.testing.assert_close(topk_forward_kl(s, top(11), temperature=temperature), full, rtol=1e-4, atol=1e-5)
    for k in (1, 3, 6):
        part = topk_forward_kl(s, top(k), temperature=temperature)
        assert (part <= full + 1e-5).all() and (part >= -1e-6).all()
    assert topk_forward_kl(t.clone(), top(3), temperature=temperature).abs().max() < 1e-5


def test_chunked_head_loss_takes_a_teacher_cache_top_k():
    """Fed the teacher's top k (as --teacher-cache does), the fused loss equals topk_forward_kl on whole logits,
    gradients included."""
    from edgelm.distill.losses import topk_forward_kl

    g = torch.Generator().manual_seed(6)
    n, h, v, k = 37, 16, 50, 5
    hid = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    t_logp, t_idx = F.log_softmax(torch.randn(n, v, generator=g) * 3, -1).topk(k, -1)
    targets = torch.randint(0, v, (n,), generator=g)
    total, kd_mean, _ = chunked_head_loss(hid, w, None, None, targets, topk_forward_kl, alpha=0.7, chunk=8,
                                          t_top=(t_idx, t_logp))
    total.backward()
    grads = hid.grad.clone(), w.grad.clone()
    hid.grad = w.grad = None
    ref_total, ref_kd, _ = kd_objective(hid @ w.T, (t_idx, t_logp), targets, topk_forward_kl, 0.7, 1.0, 0.5)
    (ref_total / n).backward()
    torch.testing.assert_close(total, ref_total.detach() / n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd_mean, ref_kd / n, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], hid.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-4, atol=1e-6)
