"""Input Hessians: reused within reuse_hessians() for the same weights and tokens only, and never outside it."""
from __future__ import annotations

import numpy as np


def _counting(monkeypatch) -> list[int]:
    import edgelm.quant.hessian as h

    calls: list[int] = []
    real = h._collect

    def collect(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(h, "_collect", collect)
    return calls


def test_hessians_are_reused_for_the_same_weights_and_tokens_only(monkeypatch, tiny_q_model):
    import torch

    from edgelm.models.loader import load_model
    from edgelm.quant.hessian import collect_hessians, reuse_hessians

    calls = _counting(monkeypatch)
    model = load_model(str(tiny_q_model))[0].float().eval()
    calib = np.random.default_rng(0).integers(0, 600, size=(4, 32))
    first = collect_hessians(model, calib)
    assert collect_hessians(model, calib) is not first and len(calls) == 2  # outside the block: computed each time
    with reuse_hessians():
        a = collect_hessians(model, calib)
        assert collect_hessians(model, calib) is a and len(calls) == 3
        assert all(torch.equal(a[n], first[n]) for n in first)
        collect_hessians(model, calib[:, :16])  # other tokens
        assert len(calls) == 4
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0  # other weights
        b = collect_hessians(model, calib[:, :16])
        assert len(calls) == 5 and not torch.equal(b["model.layers.1.self_attn.q_proj"],
                                                   collect_hessians(model, calib)["model.layers.1.self_attn.q_proj"])
    collect_hessians(model, calib)
    assert len(calls) == 7
